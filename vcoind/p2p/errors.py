"""Errors of the p2p package."""


class P2PError(Exception):
    """Base of every p2p error."""


class CodecError(P2PError):
    """A wire message is malformed, oversized or of an unknown kind/version."""

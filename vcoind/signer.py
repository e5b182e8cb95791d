"""The one object that holds the node's Ethereum key.

Every signature the node makes with it goes through :class:`Signer`: the heartbeat's
binding of peer id to address, the settlement-v2 typed data (tickets, awards, bids,
results, outcomes: ``vcoind.chain.typed``), and the chain transactions it sends. Nothing
else keeps the raw key; it is never logged.
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct

from vcoind.chain.typed import Domain
from vcoind.chain.typed import sign as typed_sign


class Signer:
    def __init__(self, key: bytes, network: str) -> None:
        self._account = Account.from_key(key)
        self.network = network
        self.address: str = self._account.address

    def __repr__(self) -> str:  # never the key
        return f"Signer({self.address})"

    def sign_text(self, text: str) -> bytes:
        """An EIP-191 personal-message signature over ``text`` (the heartbeat binding)."""
        return bytes(self._account.sign_message(encode_defunct(text=text)).signature)

    def sign_typed(self, domain: Domain, struct_hash: bytes) -> bytes:
        """An EIP-712 signature of a settlement-v2 struct (``vcoind.chain.typed``) under
        ``domain``: tickets, awards, bids, results, outcomes."""
        return typed_sign(self._account.key, domain.digest(struct_hash))

    def sign_transaction(self, tx: dict[str, Any]) -> Any:
        """A signed chain transaction (``.raw_transaction``, ``.hash``)."""
        return self._account.sign_transaction(tx)

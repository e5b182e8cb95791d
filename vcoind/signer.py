"""The one object that holds the node's Ethereum key.

Every signature the node makes with it goes through :class:`Signer`: the heartbeat's
binding of peer id to address, consensus outcomes, single-mode results, training
adapters, oracle answers, and the chain transactions it sends. Nothing else keeps the
raw key; it is never logged.
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct

from vcoind.consensus.outcome import outcome_digest, sign_outcome


class Signer:
    def __init__(self, key: bytes, network: str) -> None:
        self._account = Account.from_key(key)
        self.network = network
        self.address: str = self._account.address

    def __repr__(self) -> str:  # never the key
        return f"Signer({self.address})"

    def sign_digest(self, digest: bytes) -> bytes:
        """An EIP-191 signature over a 32-byte digest (consensus outcomes)."""
        return sign_outcome(self._account.key, digest)

    def sign_text(self, text: str) -> bytes:
        """An EIP-191 personal-message signature over ``text`` (the heartbeat binding)."""
        return bytes(self._account.sign_message(encode_defunct(text=text)).signature)

    def sign_outcome(
        self, task_id: str, result_hash: bytes, model_id: str, decision: str
    ) -> tuple[str, bytes]:
        """(address, signature) over the outcome digest of this node's network; ValueError
        when a field cannot be encoded (a task id or model id of the wrong shape)."""
        digest = outcome_digest(self.network, task_id, result_hash, model_id, decision)
        return self.address, self.sign_digest(digest)

    def sign_transaction(self, tx: dict[str, Any]) -> Any:
        """A signed chain transaction (``.raw_transaction``, ``.hash``)."""
        return self._account.sign_transaction(tx)

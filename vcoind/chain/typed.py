"""EIP-712 typed data of settlement v2: tickets, awards, bids, results and outcomes.

Every object a node or a requester signs for the chain is one of the structs below,
hashed as EIP-712 prescribes under the domain ``EIP712Domain(string name,string version,
uint256 chainId,address verifyingContract)`` with ``name = "VCoin:" + network``,
``version = "2"`` and the TaskAnchor contract of the deployment as verifying contract. A
signature made for another chain, another deployment or another network name therefore
recovers to a different address and is refused, by the contract and by the node alike.

The byte layout is TaskAnchor's (``contracts/src/TaskAnchor.sol``); ``tests/test_contracts``
compares each hash with the contract's own view of it.

- ``Ticket``: the requester's order: who pays (``requester``), for which task, model and
  mode, how many replicas (the quorum is computed from this number), up to which price per
  token and how many tokens, until when.
- ``Award``: the requester's word that ``worker`` was assigned the ticket's task at
  ``price`` per token.
- ``Bid``: the worker's signed price for a task (checked by the origin, not on chain).
- ``Result``: a worker's signature over its own answer and numeric profile: the only
  evidence a slash accepts.
- ``Outcome``: what every agreeing worker signs: the ticket, the agreed result, the
  decision, the units paid for (tokens of the agreed answer) and the chosen answer's profile.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_keys.exceptions import BadSignature
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError as EthKeysValidationError
from web3 import Web3

from vcoind.consensus.outcome import model_id_bytes32, task_id_bytes32

DOMAIN_VERSION = "2"
MODES = {"single": 0, "consensus": 1, "pipeline": 2, "lora_training": 3, "oracle": 4}
DECISIONS = {"majority": 2, "supermajority": 3}
ZERO32 = bytes(32)
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")

TYPES = {
    "Ticket": "Ticket(bytes32 taskId,address requester,bytes32 modelId,uint8 mode,"
    "uint16 replicas,bool deterministic,bytes32 profile,uint256 maxPricePerToken,"
    "uint32 maxTokens,uint64 deadline,uint64 nonce)",
    "Award": "Award(bytes32 ticketHash,address worker,uint256 pricePerToken)",
    "Bid": "Bid(bytes32 taskId,address worker,uint256 pricePerToken)",
    "Result": "Result(bytes32 taskId,bytes32 resultHash,bytes32 profile)",
    "Outcome": "Outcome(bytes32 taskId,bytes32 ticketHash,bytes32 resultHash,uint8 decision,"
    "uint32 units,bytes32 profile)",
}
_DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


def _abi_types(type_string: str) -> list[str]:
    inner = type_string[type_string.index("(") + 1 : -1]
    return [field.split(" ")[0] for field in inner.split(",")]


def struct_hash(name: str, *values: Any) -> bytes:
    """hashStruct(name, values): keccak256(typeHash || abi.encode(values)) for the flat,
    static structs above."""
    t = TYPES[name]
    return keccak(keccak(text=t) + abi_encode(_abi_types(t), list(values)))


@dataclass(frozen=True)
class Domain:
    """Where a signature counts: the network name, chain id and TaskAnchor address.
    ``Domain.offline(network)`` (chain id 0, address 0) is what nodes without a shared
    chain sign under: an attestation between nodes that no contract accepts."""

    network: str
    chain_id: int
    contract: str

    def separator(self) -> bytes:
        values = [keccak(text="VCoin:" + self.network), keccak(text=DOMAIN_VERSION),
                  self.chain_id, Web3.to_checksum_address(self.contract)]  # fmt: skip
        encoded = abi_encode(["bytes32", "bytes32", "uint256", "address"], values)
        return keccak(keccak(text=_DOMAIN_TYPE) + encoded)

    @classmethod
    def offline(cls, network: str) -> Domain:
        return cls(network, 0, "0x" + "00" * 20)

    def digest(self, struct: bytes) -> bytes:
        """keccak256("\\x19\\x01" || domainSeparator || structHash): what is signed."""
        return keccak(b"\x19\x01" + self.separator() + struct)


def profile_hash(profile: Any) -> bytes:
    """keccak256 of a numeric profile (device kind, dtype, torch, transformers) as canonical
    JSON; ``None`` gives 32 zero bytes."""
    if profile is None:
        return ZERO32
    if hasattr(profile, "__dataclass_fields__"):
        d: Any = asdict(profile)
    else:
        d = dict(profile) if isinstance(profile, dict) else str(profile)
    return keccak(text=json.dumps(d, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class Ticket:
    """The requester's signed order for one task (amounts in wei)."""

    task_id: str
    requester: str
    model_id: str
    mode: int
    replicas: int
    deterministic: bool
    max_price: int  # wei per token
    max_tokens: int
    deadline: int  # unix seconds
    nonce: int
    profile: bytes = ZERO32

    def values(self) -> tuple[Any, ...]:
        return (task_id_bytes32(self.task_id), Web3.to_checksum_address(self.requester),
                model_id_bytes32(self.model_id), self.mode, self.replicas, self.deterministic,
                bytes(self.profile), self.max_price, self.max_tokens, self.deadline,
                self.nonce)  # fmt: skip

    def hash(self) -> bytes:
        """The struct hash (``ticketHash`` in awards and outcomes)."""
        return struct_hash("Ticket", *self.values())

    def max_cost(self) -> int:
        """What the requester's deposit must cover: every replica at the maximum."""
        return self.max_price * self.max_tokens * self.replicas

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "requester": self.requester, "model_id": self.model_id,
                "mode": self.mode, "replicas": self.replicas,
                "deterministic": self.deterministic, "max_price": str(self.max_price),
                "max_tokens": self.max_tokens, "deadline": self.deadline,
                "nonce": str(self.nonce), "profile": bytes(self.profile).hex()}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Ticket:
        """ValueError / KeyError / TypeError on a malformed ticket."""
        t = cls(str(d["task_id"]), str(d["requester"]), str(d["model_id"]), int(d["mode"]),
                int(d["replicas"]), bool(d["deterministic"]), int(d["max_price"]),
                int(d["max_tokens"]), int(d["deadline"]), int(d["nonce"]),
                bytes.fromhex(str(d.get("profile", "")) or "00" * 32))  # fmt: skip
        t.check()
        return t

    def check(self) -> None:
        """ValueError unless every field fits its Solidity type."""
        task_id_bytes32(self.task_id)
        model_id_bytes32(self.model_id)
        if not _ADDRESS.fullmatch(self.requester):
            raise ValueError(f"ticket requester is not an address: {self.requester!r}")
        for name, value, bits in (
            ("mode", self.mode, 8),
            ("replicas", self.replicas, 16),
            ("max_price", self.max_price, 256),
            ("max_tokens", self.max_tokens, 32),
            ("deadline", self.deadline, 64),
            ("nonce", self.nonce, 64),
        ):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"ticket {name} out of range: {value}")  # fmt: skip
        if self.replicas < 1:
            raise ValueError("ticket replicas must be at least 1")
        if len(self.profile) != 32:
            raise ValueError("ticket profile must be 32 bytes")


def award_hash(ticket_hash: bytes, worker: str, price: int) -> bytes:
    return struct_hash("Award", ticket_hash, Web3.to_checksum_address(worker), price)


def bid_hash(task_id: str, worker: str, price: int) -> bytes:
    return struct_hash("Bid", task_id_bytes32(task_id), Web3.to_checksum_address(worker), price)


def result_struct_hash(task_id: str, result_hash: bytes, profile: bytes) -> bytes:
    return struct_hash("Result", task_id_bytes32(task_id), bytes(result_hash), bytes(profile))


@dataclass(frozen=True)
class Outcome:
    """The agreed outcome of a ticket's task, as every agreeing worker signs it."""

    result_hash: bytes
    decision: int  # 2 majority, 3 supermajority
    units: int  # tokens of the agreed answer (0: nothing to pay for)
    profile: bytes = ZERO32  # the chosen answer's numeric profile (deterministic tasks)

    def hash(self, ticket: Ticket) -> bytes:
        return self.hash_for(ticket.task_id, ticket.hash())

    def hash_for(self, task_id: str, ticket_hash: bytes) -> bytes:
        """The struct hash for ``task_id`` under the ticket whose struct hash is
        ``ticket_hash`` (32 zero bytes: a task without a ticket, signed off chain only)."""
        return struct_hash("Outcome", task_id_bytes32(task_id), ticket_hash,
                           bytes(self.result_hash), self.decision, self.units,
                           bytes(self.profile))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"result_hash": bytes(self.result_hash).hex(), "decision": self.decision,
                "units": self.units, "profile": bytes(self.profile).hex()}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Outcome:
        return cls(bytes.fromhex(d["result_hash"]), int(d["decision"]), int(d["units"]),
                   bytes.fromhex(d.get("profile") or "00" * 32))  # fmt: skip


def sign(key: bytes, digest: bytes) -> bytes:
    """A 65-byte r || s || v (v 27/28, low s) signature of the 32-byte EIP-712 digest."""
    signed = Account.unsafe_sign_hash(digest, private_key=key)
    return bytes(signed.signature)


def recover(digest: bytes, sig: bytes) -> str | None:
    """The checksum address that signed ``digest``, or None for an unusable signature (what
    OpenZeppelin's ECDSA.tryRecover refuses: not 65 bytes, v not 27/28, high s). Never raises."""
    if not isinstance(sig, bytes | bytearray) or len(sig) != 65 or len(digest) != 32:
        return None
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    if sig[64] not in (27, 28) or not 0 < r < _N or not 0 < s <= _N // 2:
        return None
    try:
        return str(Account._recover_hash(bytes(digest), signature=bytes(sig)))
    except (ValueError, TypeError, IndexError, BadSignature, EthKeysValidationError):
        return None


def signed_by(digest: bytes, sig: bytes, address: str) -> bool:
    got = recover(digest, sig)
    return got is not None and got.lower() == address.lower()

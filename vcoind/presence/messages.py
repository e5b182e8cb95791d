"""Wire message records. Field docs here are the protocol: other implementations rely on them.

Every gossip message travels inside a libp2p pubsub envelope signed with the
sender's Ed25519 key (strict signing); the record's ``peer_id`` must equal the
envelope's ``from`` peer. ``timestamp`` (unix seconds, float) and ``seq``
(strictly increasing per sender and kind, across restarts; stamped by the
gossip layer at publication) let receivers drop stale and replayed messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys.exceptions import BadSignature
from eth_utils.exceptions import ValidationError as EthKeysValidationError

from vcoind.p2p.codec import Message, lim, message

PEER_ID_RE = r"[1-9A-HJ-NP-Za-km-z]{32,64}"  # base58btc
ETH_ADDRESS_RE = r"0x[0-9a-fA-F]{40}"
NETWORK_RE = r"[a-z0-9][a-z0-9-]{0,31}"


@dataclass(frozen=True)
class DeviceInfo:
    """The compute device: ``kind`` "cuda" (figures from NVML) or "cpu" (from psutil).

    memory in MiB, utilization in percent (0-100), temperature in °C (None when unknown).
    """

    kind: str = field(default="cpu", metadata=lim(choices=("cpu", "cuda")))
    name: str = field(default="", metadata=lim(max_len=128))
    count: int = field(default=1, metadata=lim(min=0, max=64))
    memory_total_mb: int = field(default=0, metadata=lim(min=0, max=1 << 31))
    memory_used_mb: int = field(default=0, metadata=lim(min=0, max=1 << 31))
    utilization: float = field(default=0.0, metadata=lim(min=0, max=100))
    temperature_c: float | None = field(default=None, metadata=lim(min=-50, max=200))
    cuda_version: str = field(default="", metadata=lim(max_len=32))


@dataclass(frozen=True)
class NumericProfile:
    """What must match for replicas to agree token for token."""

    device_kind: str = field(default="cpu", metadata=lim(max_len=32))
    dtype: str = field(default="float32", metadata=lim(max_len=32))
    torch: str = field(default="", metadata=lim(max_len=64))
    transformers: str = field(default="", metadata=lim(max_len=64))


@dataclass(frozen=True)
class ModelServed:
    """A whole model the node serves: its short ``name`` and its weight-hash ``model_id``."""

    name: str = field(metadata=lim(max_len=128, pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"))
    model_id: str = field(metadata=lim(max_len=71, pattern=r"sha256:[0-9a-f]{64}"))
    reasoning: bool = False  # it writes a <think> section first (see ModelInfo)


@dataclass(frozen=True)
class LayerSpan:
    """Layers ``start``..``end`` inclusive of model ``model`` (a model id or name)."""

    model: str = field(metadata=lim(max_len=128))
    start: int = field(metadata=lim(min=0, max=10_000))
    end: int = field(metadata=lim(min=0, max=10_000))


@message
@dataclass(frozen=True)
class Heartbeat(Message):
    """Presence and capability of one node, gossiped on ``/vcoin/<network>/heartbeat/1``.

    ``eth_sig`` is an EIP-191 personal-message signature by ``eth_address`` over
    ``binding_text(network, peer_id, eth_address)``: it binds the libp2p identity
    to the Ethereum address that holds the node's stake.
    ``interval`` is the sender's current heartbeat interval in seconds; receivers
    expire the sender after max(their peer timeout, timeout/interval ratio x interval).
    ``health`` is the sender's self-assessed health score in [0, 1].
    """

    KIND: ClassVar[str] = "heartbeat"
    MAX_BYTES: ClassVar[int] = 12 * 1024

    network: str = field(metadata=lim(pattern=NETWORK_RE, max_len=32))
    peer_id: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    eth_address: str = field(metadata=lim(pattern=ETH_ADDRESS_RE, max_len=42))
    eth_sig: bytes = field(metadata=lim(exact_len=65, max_len=65))
    seq: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    timestamp: float = field(metadata=lim(min=0))
    interval: float = field(metadata=lim(min=0.01, max=86_400))
    listen_addrs: tuple[str, ...] = field(default=(), metadata=lim(max_len=8))
    device: DeviceInfo = field(default_factory=lambda: DeviceInfo())
    cpu_percent: float = field(default=0.0, metadata=lim(min=0, max=100))
    memory_percent: float = field(default=0.0, metadata=lim(min=0, max=100))
    models: tuple[ModelServed, ...] = field(default=(), metadata=lim(max_len=64))
    spans: tuple[LayerSpan, ...] = field(default=(), metadata=lim(max_len=64))
    profile: NumericProfile = field(default_factory=lambda: NumericProfile())
    queue_length: int = field(default=0, metadata=lim(min=0, max=1_000_000))
    health: float = field(default=1.0, metadata=lim(min=0, max=1))
    software: str = field(default="", metadata=lim(max_len=64))
    # Extra services the node answers (``oracle``: replicated oracle queries).
    services: tuple[str, ...] = field(
        default=(), metadata=lim(max_len=8, items={"max_len": 32, "pattern": r"[a-z0-9_-]+"})
    )
    # Ids of the LoRA adapters the node holds (sha256 of their bytes), newest first.
    adapters: tuple[str, ...] = field(
        default=(), metadata=lim(max_len=16, items={"pattern": r"[0-9a-f]{64}", "max_len": 64})
    )


def binding_text(network: str, peer_id: str, eth_address: str) -> str:
    """The text a node signs with its Ethereum key to bind it to its peer id."""
    return f"vcoin-bind:{network}:{peer_id}:{eth_address.lower()}"


def sign_binding(eth_key: bytes, network: str, peer_id: str, eth_address: str) -> bytes:
    signed = Account.sign_message(
        encode_defunct(text=binding_text(network, peer_id, eth_address)), eth_key
    )
    return bytes(signed.signature)


def recover_binding(network: str, peer_id: str, eth_address: str, sig: bytes) -> str | None:
    """The address that signed the binding, or None if the signature is unusable."""
    try:
        return str(
            Account.recover_message(
                encode_defunct(text=binding_text(network, peer_id, eth_address)), signature=sig
            )
        )
    except (ValueError, TypeError, BadSignature, EthKeysValidationError):
        return None

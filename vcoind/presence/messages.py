"""Wire message records. Field docs here are the protocol: other implementations rely on them.

Every gossip message travels inside a libp2p pubsub envelope signed with the
sender's Ed25519 key (strict signing); the record's ``peer_id`` must equal the
envelope's ``from`` peer. ``timestamp`` (unix seconds, float) and ``seq``
(strictly increasing per sender and kind, across restarts; stamped by the
gossip layer at publication) let receivers drop stale and replayed messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys.exceptions import BadSignature
from eth_utils.exceptions import ValidationError as EthKeysValidationError

from vcoind.p2p.codec import Message, encode, lim, message

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


@message
@dataclass(frozen=True)
class Beat(Message):
    """A heartbeat whose capability is unchanged: liveness, load and a digest of the rest.

    Gossiped on the heartbeat topic between full :class:`Heartbeat` records (sent when the
    capability changes and every few beats). ``digest`` is :func:`capability_digest` of the
    sender's current full heartbeat; a receiver holding a full heartbeat of the sender with
    that digest applies the load figures to it (:func:`apply_beat`), one holding another
    digest (or none) asks a peer for the full heartbeat over ``/vcoin/presence/1.0.0``, or
    waits for the next full one. Fields mean what they mean in :class:`Heartbeat`.
    """

    KIND: ClassVar[str] = "beat"
    MAX_BYTES: ClassVar[int] = 512

    network: str = field(metadata=lim(pattern=NETWORK_RE, max_len=32))
    peer_id: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    seq: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    timestamp: float = field(metadata=lim(min=0))
    interval: float = field(metadata=lim(min=0.01, max=86_400))
    digest: bytes = field(metadata=lim(exact_len=32, max_len=32))
    cpu_percent: float = field(default=0.0, metadata=lim(min=0, max=100))
    memory_percent: float = field(default=0.0, metadata=lim(min=0, max=100))
    utilization: float = field(default=0.0, metadata=lim(min=0, max=100))
    memory_used_mb: int = field(default=0, metadata=lim(min=0, max=1 << 31))
    temperature_c: float | None = field(default=None, metadata=lim(min=-50, max=200))
    queue_length: int = field(default=0, metadata=lim(min=0, max=1_000_000))
    health: float = field(default=1.0, metadata=lim(min=0, max=1))


def _capability_part(hb: Heartbeat) -> Heartbeat:
    """The heartbeat with what a :class:`Beat` carries (and seq, time, interval) zeroed."""
    device = dataclasses.replace(hb.device, utilization=0.0, memory_used_mb=0, temperature_c=None)
    return dataclasses.replace(
        hb, seq=0, timestamp=0.0, interval=1.0, cpu_percent=0.0, memory_percent=0.0,
        queue_length=0, health=1.0, device=device,
    )  # fmt: skip


def capability_digest(hb: Heartbeat) -> bytes:
    """sha256 of the codec encoding of ``hb`` with the fields a :class:`Beat` carries, and
    ``seq``, ``timestamp`` and ``interval``, set to their defaults (interval 1.0): it
    changes only when the node's capability (models, spans, addresses, device, ...) does."""
    return hashlib.sha256(encode(_capability_part(hb))).digest()


def beat_of(hb: Heartbeat, digest: bytes) -> Beat:
    """The small form of ``hb`` (``digest``: its :func:`capability_digest`)."""
    d = hb.device
    return Beat(
        network=hb.network, peer_id=hb.peer_id, seq=hb.seq, timestamp=hb.timestamp,
        interval=hb.interval, digest=digest, cpu_percent=hb.cpu_percent,
        memory_percent=hb.memory_percent, utilization=d.utilization,
        memory_used_mb=d.memory_used_mb, temperature_c=d.temperature_c,
        queue_length=hb.queue_length, health=hb.health,
    )  # fmt: skip


def apply_beat(full: Heartbeat, beat: Beat) -> Heartbeat:
    """``full`` (the sender's capability, digest ``beat.digest``) as of ``beat``."""
    device = dataclasses.replace(
        full.device, utilization=beat.utilization, memory_used_mb=beat.memory_used_mb,
        temperature_c=beat.temperature_c,
    )  # fmt: skip
    return dataclasses.replace(
        full, seq=beat.seq, timestamp=beat.timestamp, interval=beat.interval,
        cpu_percent=beat.cpu_percent, memory_percent=beat.memory_percent,
        queue_length=beat.queue_length, health=beat.health, device=device,
    )  # fmt: skip


@message
@dataclass(frozen=True)
class PresenceRequest(Message):
    """Ask a peer (``/vcoin/presence/1.0.0``) for the full heartbeats it holds of ``peer_ids``
    (the peer itself included); the answer is a :class:`PresenceReply`."""

    KIND: ClassVar[str] = "presence_request"
    MAX_BYTES: ClassVar[int] = 4 * 1024

    peer_ids: tuple[str, ...] = field(
        default=(), metadata=lim(max_len=32, items={"pattern": PEER_ID_RE, "max_len": 64})
    )


@message
@dataclass(frozen=True)
class PresenceReply(Message):
    """The full heartbeats asked for that the peer holds (others are left out). The asker
    takes one only if its :func:`capability_digest` is the one a fresh :class:`Beat` of that
    sender announced, and its eth binding checks out: who relays it does not matter."""

    KIND: ClassVar[str] = "presence_reply"
    MAX_BYTES: ClassVar[int] = 32 * Heartbeat.MAX_BYTES + 1024

    heartbeats: tuple[Heartbeat, ...] = field(default=(), metadata=lim(max_len=32))


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

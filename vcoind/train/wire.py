"""Wire records of ``/vcoin/train/1.0.0``: LoRA training rounds and content-addressed blobs.

One request, one reply per stream:

- origin -> node: ``TrainJoin`` (a shard of a task: its hash, size and schedule; the
  node pulls the shard and checks the hash before it says yes) -> ``Ack``;
  ``TrainRound`` (train steps ``start_step..`` from the global adapter ``adapter``,
  "" = the seeded initial one) -> ``RoundDone`` (samples, losses, the hash of the
  node's adapter, which the origin then pulls); ``TrainFinish`` (the final adapter:
  the node pulls it, checks it, keeps it and signs it, if it trained its shards of that
  task for that origin to their end) -> ``TrainSigned``;
  ``TrainAbort`` -> ``Ack``;
- node -> origin: ``TrainProgress`` (step, loss) -> ``Ack``;
- either way: ``BlobGet`` (hash, offset) -> ``BlobPart``. Shards and adapters travel as
  blobs named by their sha256, in chunks well under the codec's record limit; the
  puller checks the hash of the whole before it uses any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vcoind.market.messages import MODEL_RE, TASK_ID_RE
from vcoind.p2p.codec import Message, lim, message
from vcoind.train.spec import MAX_ROUND_STEPS

TRAIN_PROTOCOL = "/vcoin/train/1.0.0"
HASH_RE = r"[0-9a-f]{64}"
CHUNK_BYTES = 2 << 20
MAX_BLOB_BYTES = 64 << 20
_TASK = lim(pattern=TASK_ID_RE, max_len=32)
_HASH = lim(pattern=HASH_RE, max_len=64)
_SHARD = lim(min=0, max=255)


@message
@dataclass(frozen=True)
class TrainJoin(Message):
    KIND: ClassVar[str] = "train_join"
    MAX_BYTES: ClassVar[int] = 8192

    task_id: str = field(metadata=_TASK)
    shard: int = field(metadata=_SHARD)
    model: str = field(metadata=lim(pattern=MODEL_RE, max_len=128))
    settings: str = field(metadata=lim(max_len=4096))  # LoraSettings as JSON
    shard_hash: str = field(metadata=_HASH)
    shard_bytes: int = field(metadata=lim(min=1, max=MAX_BLOB_BYTES))
    examples: int = field(metadata=lim(min=1, max=10_000_000))


@message
@dataclass(frozen=True)
class TrainRound(Message):
    KIND: ClassVar[str] = "train_round"
    MAX_BYTES: ClassVar[int] = 1024

    task_id: str = field(metadata=_TASK)
    shard: int = field(metadata=_SHARD)
    round: int = field(metadata=lim(min=0, max=1_000_000))
    start_step: int = field(metadata=lim(min=0, max=100_000_000))
    steps: int = field(metadata=lim(min=1, max=MAX_ROUND_STEPS))
    adapter: str = field(default="", metadata=lim(pattern=f"(|{HASH_RE})", max_len=64))
    adapter_bytes: int = field(default=0, metadata=lim(min=0, max=MAX_BLOB_BYTES))


@message
@dataclass(frozen=True)
class RoundDone(Message):
    KIND: ClassVar[str] = "train_round_done"
    MAX_BYTES: ClassVar[int] = 256 << 10

    task_id: str = field(metadata=_TASK)
    shard: int = field(metadata=_SHARD)
    round: int = field(metadata=lim(min=0, max=1_000_000))
    samples: int = field(metadata=lim(min=0, max=1 << 40))
    losses: tuple[float, ...] = field(metadata=lim(max_len=MAX_ROUND_STEPS))
    adapter: str = field(metadata=_HASH)
    adapter_bytes: int = field(metadata=lim(min=1, max=MAX_BLOB_BYTES))
    train_s: float = field(default=0.0, metadata=lim(min=0))


@message
@dataclass(frozen=True)
class TrainProgress(Message):
    KIND: ClassVar[str] = "train_progress"
    MAX_BYTES: ClassVar[int] = 512

    task_id: str = field(metadata=_TASK)
    shard: int = field(metadata=_SHARD)
    step: int = field(metadata=lim(min=0, max=100_000_000))
    loss: float = field(metadata=lim(min=0, max=1e9))


@message
@dataclass(frozen=True)
class TrainFinish(Message):
    KIND: ClassVar[str] = "train_finish"
    MAX_BYTES: ClassVar[int] = 1024

    task_id: str = field(metadata=_TASK)
    adapter: str = field(metadata=_HASH)
    adapter_bytes: int = field(metadata=lim(min=1, max=MAX_BLOB_BYTES))
    model_id: str = field(metadata=lim(max_len=71))
    # the struct hash of the origin's (unpaid) ticket the outcome is signed under; the
    # node computes it too (the ticket names the origin and ``replicas``, the nodes that
    # finished) and signs only if they agree
    ticket_hash: bytes = field(default=bytes(32), metadata=lim(exact_len=32, max_len=32))
    replicas: int = field(default=1, metadata=lim(min=1, max=1024))


@message
@dataclass(frozen=True)
class TrainSigned(Message):
    """The node holds the final adapter and signs it as the task's outcome (empty
    signature: the node has no chain key to sign with)."""

    KIND: ClassVar[str] = "train_signed"
    MAX_BYTES: ClassVar[int] = 512

    eth_address: str = field(default="", metadata=lim(max_len=42))
    signature: bytes = field(default=b"", metadata=lim(max_len=65))


@message
@dataclass(frozen=True)
class TrainAbort(Message):
    KIND: ClassVar[str] = "train_abort"
    MAX_BYTES: ClassVar[int] = 256

    task_id: str = field(metadata=_TASK)


@message
@dataclass(frozen=True)
class BlobGet(Message):
    KIND: ClassVar[str] = "blob_get"
    MAX_BYTES: ClassVar[int] = 256

    hash: str = field(metadata=_HASH)
    offset: int = field(default=0, metadata=lim(min=0, max=MAX_BLOB_BYTES))


@message
@dataclass(frozen=True)
class BlobPart(Message):
    KIND: ClassVar[str] = "blob_part"
    MAX_BYTES: ClassVar[int] = CHUNK_BYTES + 1024

    hash: str = field(metadata=_HASH)
    offset: int = field(metadata=lim(min=0, max=MAX_BLOB_BYTES))
    total: int = field(metadata=lim(min=1, max=MAX_BLOB_BYTES))
    data: bytes = field(metadata=lim(max_len=CHUNK_BYTES))


TRAIN_REQUESTS = (TrainJoin, TrainRound, TrainProgress, TrainFinish, TrainAbort, BlobGet)

"""Wire records of ``/vcoin/shard/1.0.0``: pipeline sessions over layer spans.

One request, one reply per stream (like ``/vcoin/task/1.0.0``):

- ``ShardOpen`` (session id, model id, span, dtype) -> ``Ack``: the serving node keeps
  a KV cache for the session;
- ``ShardStep`` (session, step number, a tensor frame: token ids for the first span,
  hidden states otherwise; only the new positions) -> ``ShardOutput`` (the span's
  output frame: hidden states, or the last position's logits on the last span, and the
  compute time);
- ``ShardClose`` (session) -> ``Ack``.

Tensor frames are ``{dtype, shape, data}`` with raw bytes (``vcoind.compute.frames``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vcoind.consensus.outcome import TASK_ID_RE
from vcoind.p2p.codec import ABSOLUTE_MAX_BYTES, Message, lim, message

SHARD_PROTOCOL = "/vcoin/shard/1.0.0"
FRAME_OVERHEAD = 4096
# Under the codec's ceiling on any record; the origin sends a long prompt in chunks of
# positions (``CHUNK_TOKENS``), so a frame stays far below it.
MAX_FRAME_BYTES = ABSOLUTE_MAX_BYTES - FRAME_OVERHEAD
CHUNK_TOKENS = 128
_DTYPE = {"max_len": 16}
_SHAPE = {"min_len": 1, "max_len": 4, "items": {"min": 0, "max": 1 << 24}}


@message
@dataclass(frozen=True)
class ShardOpen(Message):
    KIND: ClassVar[str] = "shard_open"
    MAX_BYTES: ClassVar[int] = 1024

    session: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    model_id: str = field(metadata=lim(max_len=71))
    start: int = field(metadata=lim(min=0, max=10_000))
    end: int = field(metadata=lim(min=0, max=10_000))
    dtype: str = field(default="float32", metadata=lim(**_DTYPE))


@message
@dataclass(frozen=True)
class ShardStep(Message):
    KIND: ClassVar[str] = "shard_step"
    MAX_BYTES: ClassVar[int] = MAX_FRAME_BYTES + FRAME_OVERHEAD

    session: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    step: int = field(metadata=lim(min=0, max=1_000_000))
    dtype: str = field(metadata=lim(**_DTYPE))
    shape: tuple[int, ...] = field(metadata=lim(**_SHAPE))
    data: bytes = field(metadata=lim(max_len=MAX_FRAME_BYTES))


@message
@dataclass(frozen=True)
class ShardOutput(Message):
    KIND: ClassVar[str] = "shard_output"
    MAX_BYTES: ClassVar[int] = MAX_FRAME_BYTES + FRAME_OVERHEAD

    dtype: str = field(metadata=lim(**_DTYPE))
    shape: tuple[int, ...] = field(metadata=lim(**_SHAPE))
    data: bytes = field(metadata=lim(max_len=MAX_FRAME_BYTES))
    compute_s: float = field(default=0.0, metadata=lim(min=0))


@message
@dataclass(frozen=True)
class ShardClose(Message):
    KIND: ClassVar[str] = "shard_close"
    MAX_BYTES: ClassVar[int] = 256

    session: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))

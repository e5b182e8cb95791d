"""Tensor frames: a tensor as ``{dtype, shape, bytes}`` for the wire. Raw bytes, no pickle.

bf16 travels as its raw bytes too (numpy has no bf16): the receiver views the buffer as
the named dtype. Everything a peer sends is checked before a tensor is made from it:
a known dtype, a sane shape, and exactly ``numel * itemsize`` bytes, at most a limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# dtype name -> bytes per element. torch itself is imported only where a tensor is made:
# the daemon imports this module at start-up and torch costs seconds.
ITEM_SIZES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1,
}  # fmt: skip
MAX_DIMS = 4
MAX_DIM = 1 << 24
MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameError(ValueError):
    """A frame that does not describe a valid tensor."""


@dataclass(frozen=True)
class TensorFrame:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TensorFrame:
        import torch

        name = str(t.dtype).removeprefix("torch.")
        if name not in ITEM_SIZES:
            raise FrameError(f"dtype {t.dtype} cannot be framed")
        t = t.detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return cls(name, tuple(int(d) for d in t.shape), data)

    def check(self, max_bytes: int = MAX_FRAME_BYTES) -> None:
        size = ITEM_SIZES.get(self.dtype)
        if size is None:
            known = ", ".join(ITEM_SIZES)
            raise FrameError(f"unknown dtype {self.dtype!r} (expected one of {known})")
        if not 1 <= len(self.shape) <= MAX_DIMS:
            raise FrameError(f"a frame has 1 to {MAX_DIMS} dimensions, got {len(self.shape)}")
        if any(not isinstance(d, int) or not 0 <= d <= MAX_DIM for d in self.shape):
            raise FrameError(f"bad shape {self.shape}: dimensions are 0 to {MAX_DIM}")
        want = math.prod(self.shape) * size
        if want > max_bytes:
            raise FrameError(f"frame of {want} bytes exceeds the limit of {max_bytes}")
        # An empty frame still has strides: torch overflows on (0, 2**24, 2**24, 2**24).
        extent = math.prod(max(d, 1) for d in self.shape) * size
        if extent > max_bytes:
            raise FrameError(f"shape {self.shape} spans {extent} bytes, limit {max_bytes}")
        if len(self.data) != want:
            raise FrameError(f"shape {self.shape} of {self.dtype} needs {want} bytes, "
                             f"got {len(self.data)}")  # fmt: skip

    def to_tensor(
        self, device: torch.device | str = "cpu", max_bytes: int = MAX_FRAME_BYTES
    ) -> torch.Tensor:
        import torch

        self.check(max_bytes)
        dtype: torch.dtype = getattr(torch, self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype, device=device)
        raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return raw.view(dtype).reshape(self.shape).to(device)

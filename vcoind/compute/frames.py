"""Tensor frames: a tensor as ``{dtype, shape, bytes}`` for the wire. Raw bytes, no pickle.

bf16 travels as its raw bytes too (numpy has no bf16): the receiver views the buffer as
the named dtype. Everything a peer sends is checked before a tensor is made from it:
a known dtype, a sane shape, and exactly ``numel * itemsize`` bytes, at most a limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
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
        if t.dtype not in NAMES:
            raise FrameError(f"dtype {t.dtype} cannot be framed")
        t = t.detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return cls(NAMES[t.dtype], tuple(int(d) for d in t.shape), data)

    def check(self, max_bytes: int = MAX_FRAME_BYTES) -> torch.dtype:
        dtype = DTYPES.get(self.dtype)
        if dtype is None:
            raise FrameError(f"unknown dtype {self.dtype!r} (expected one of {', '.join(DTYPES)})")
        if not 1 <= len(self.shape) <= MAX_DIMS:
            raise FrameError(f"a frame has 1 to {MAX_DIMS} dimensions, got {len(self.shape)}")
        if any(not isinstance(d, int) or not 0 <= d <= MAX_DIM for d in self.shape):
            raise FrameError(f"bad shape {self.shape}: dimensions are 0 to {MAX_DIM}")
        want = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        if want > max_bytes:
            raise FrameError(f"frame of {want} bytes exceeds the limit of {max_bytes}")
        if len(self.data) != want:
            raise FrameError(f"shape {self.shape} of {self.dtype} needs {want} bytes, "
                             f"got {len(self.data)}")  # fmt: skip
        return dtype

    def to_tensor(
        self, device: torch.device | str = "cpu", max_bytes: int = MAX_FRAME_BYTES
    ) -> torch.Tensor:
        dtype = self.check(max_bytes)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype, device=device)
        raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return raw.view(dtype).reshape(self.shape).to(device)

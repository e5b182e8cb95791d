"""Generation parameters, validated; torch-free so the market can check requests cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_NEW_TOKENS_LIMIT = 8192
MAX_STOP_STRINGS = 8


class GenerationError(Exception):
    """Bad generation parameters or a model that cannot generate."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one request (validated on construction)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise GenerationError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS_LIMIT}")
        if not (0.0 <= self.temperature <= 100.0) or math.isnan(self.temperature):
            raise GenerationError("temperature must be 0..100 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise GenerationError("top_k must be >= 0 (0 = off)")
        if not 0 <= self.seed < 2**63:
            raise GenerationError("seed must be 0..2^63-1")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > 64 for s in self.stop):
            raise GenerationError(
                f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= 64 chars"
            )

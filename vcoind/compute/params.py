"""Generation parameters, validated; torch-free so the market can check requests cheaply."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# What a request may leave to the model: its generation_config.json's sampling settings.
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k")


def generation_config(model_dir: Path) -> dict[str, Any]:
    """The model's ``generation_config.json``; {} when it has none or it does not parse."""
    try:
        cfg = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def model_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling settings of the model's ``generation_config.json`` (greedy when it says
    ``do_sample: false``); {} when it has none or the file does not parse."""
    cfg = generation_config(model_dir)
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    out: dict[str, float] = {}
    for name in SAMPLING_DEFAULTS:
        value = cfg.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


def with_defaults(
    params: GenerationParams, names: tuple[str, ...], defaults: dict[str, float]
) -> GenerationParams:
    """``params`` with each of ``names`` taken from ``defaults`` where it has one."""
    over: dict[str, Any] = {n: defaults[n] for n in names if n in defaults}
    if "top_k" in over:
        over["top_k"] = int(over["top_k"])
    return dataclasses.replace(params, **over) if over else params


def eos_ids(model_dir: Path, tokenizer_eos: int | None) -> frozenset[int]:
    """The tokens that end a reply: the tokenizer's EOS and the ``eos_token_id`` (an id or
    a list) of the model's generation_config.json (Qwen2.5's chat models end on
    <|im_end|>, not on the tokenizer's EOS)."""
    ids = {tokenizer_eos} if tokenizer_eos is not None else set()
    raw = generation_config(model_dir).get("eos_token_id")
    for v in raw if isinstance(raw, list) else [raw]:
        if isinstance(v, int) and not isinstance(v, bool):
            ids.add(v)
    return frozenset(ids)

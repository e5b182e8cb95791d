"""Training settings, datasets, shards and the step schedule: plain Python, no torch.

Every node derives the same batches from the same numbers: step ``s`` of a shard of
``n`` examples is micro-batches ``(s mod spe) * grad_accum ...`` of epoch
``s // spe`` (``spe`` = optimizer steps per epoch), each a slice of a permutation of
the shard drawn from ``(seed, epoch)``. So a node that takes over a shard mid-run
continues exactly where the node before it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from vcoind.market.ports import WorkError

MAX_DATASET_BYTES = 64 << 20  # what an origin reads into memory
MAX_SHARD_BYTES = 8 << 20  # what one shard frame may carry
MAX_EXAMPLE_CHARS = 32_768
MAX_ROUND_STEPS = 16_384  # steps between two syncs (one loss each in a round's reply)


class TrainError(WorkError):
    """A training request, dataset, shard or adapter that cannot be used."""


@dataclass(frozen=True)
class LoraSettings:
    """A ``lora_training`` task's parameters (the seeds' defaults where they give one)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    sync_every: int = 20
    seed: int = 0
    max_length: int = 256
    optimizer: str = "adamw"  # adamw | sgd

    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "r": (1, 256), "alpha": (1, 4096), "dropout": (0.0, 0.9), "epochs": (1, 100),
        "batch_size": (1, 512), "grad_accum": (1, 256), "learning_rate": (1e-8, 1.0),
        "sync_every": (1, MAX_ROUND_STEPS), "seed": (0, (1 << 63) - 1), "max_length": (8, 8192),
    }  # fmt: skip

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise TrainError(f"{name} must be a number from {lo:g} to {hi:g}, not {v!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise TrainError(f"optimizer must be adamw or sgd, not {self.optimizer!r}")
        mods = self.target_modules
        if not mods or len(mods) > 16 or not all(
            isinstance(m, str) and m.replace("_", "").isalnum() and len(m) <= 64 for m in mods
        ):  # fmt: skip
            raise TrainError(f"target_modules must be 1-16 module names, not {mods!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown training parameter(s): {', '.join(unknown)}")
        d = dict(d)
        if "target_modules" in d:
            tm = d["target_modules"]
            d["target_modules"] = tuple(tm.split(",") if isinstance(tm, str) else tm)
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# --- datasets ---------------------------------------------------------------


def normalise_example(item: Any, where: str) -> dict[str, str]:
    """``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``, strings only."""
    if not isinstance(item, dict):
        raise TrainError(f"{where}: an example must be an object, not {type(item).__name__}")
    if isinstance(item.get("text"), str):
        ex = {"text": item["text"]}
    elif isinstance(item.get("prompt"), str) and isinstance(item.get("completion"), str):
        ex = {"prompt": item["prompt"], "completion": item["completion"]}
    else:
        raise TrainError(f'{where}: needs "text", or "prompt" and "completion" (strings)')
    if sum(len(v) for v in ex.values()) > MAX_EXAMPLE_CHARS:
        raise TrainError(f"{where}: longer than {MAX_EXAMPLE_CHARS} characters")
    if not "".join(ex.values()).strip():
        raise TrainError(f"{where}: empty")
    return ex


def parse_jsonl(data: bytes, where: str = "dataset") -> list[dict[str, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainError(f"{where} line {n}: not JSON ({exc.msg})") from None
        out.append(normalise_example(item, f"{where} line {n}"))
    return out


def load_examples(path: Path) -> list[dict[str, str]]:
    """A JSONL file, or a directory written by ``datasets.Dataset.save_to_disk``."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise TrainError(
                f"{path} is a directory: reading a `datasets` directory needs the "
                "`datasets` package (pip install datasets), or give a JSONL file"
            ) from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        examples = [normalise_example(row, f"{path} row {i}") for i, row in enumerate(ds)]
    else:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise TrainError(f"cannot read dataset {path}: {exc.strerror}") from None
        if size > MAX_DATASET_BYTES:
            raise TrainError(f"{path} is {size >> 20} MiB; the limit is "
                             f"{MAX_DATASET_BYTES >> 20} MiB")  # fmt: skip
        examples = parse_jsonl(path.read_bytes(), str(path))
    if not examples:
        raise TrainError(f"{path}: no examples")
    return examples


def split_contiguous(examples: Sequence[dict[str, str]], n: int) -> list[list[dict[str, str]]]:
    """``n`` contiguous shards whose sizes differ by at most one (none empty)."""
    if not 1 <= n <= len(examples):
        raise TrainError(f"cannot split {len(examples)} example(s) into {n} shard(s)")
    q, rem = divmod(len(examples), n)
    out, start = [], 0
    for i in range(n):
        size = q + (i < rem)
        out.append(list(examples[start : start + size]))
        start += size
    return out


def canonical_jsonl(examples: Sequence[dict[str, str]]) -> bytes:
    """One line of sorted-key compact JSON per example: what travels and is hashed."""
    lines = (json.dumps(e, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
             for e in examples)  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def shard_bytes(examples: Sequence[dict[str, str]]) -> bytes:
    """A shard's canonical JSONL, within what one shard may be."""
    data = canonical_jsonl(examples)
    if len(data) > MAX_SHARD_BYTES:
        raise TrainError(f"a shard of {len(data) >> 10} KiB exceeds the limit of "
                         f"{MAX_SHARD_BYTES >> 10} KiB: use more nodes")  # fmt: skip
    return data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the step schedule --------------------------------------------------------


def steps_per_epoch(n_examples: int, s: LoraSettings) -> int:
    return math.ceil(math.ceil(n_examples / s.batch_size) / s.grad_accum)


def total_steps(n_examples: int, s: LoraSettings) -> int:
    return s.epochs * steps_per_epoch(n_examples, s)


def step_batches(n_examples: int, s: LoraSettings, step: int) -> list[list[int]]:
    """The example indices of each micro-batch of optimizer step ``step``."""
    spe = steps_per_epoch(n_examples, s)
    if not 0 <= step < s.epochs * spe:
        raise TrainError(f"step {step} is outside 0..{s.epochs * spe - 1}")
    epoch, k = divmod(step, spe)
    order = list(range(n_examples))
    random.Random(f"{s.seed}:{epoch}").shuffle(order)
    out = []
    for m in range(k * s.grad_accum, (k + 1) * s.grad_accum):
        batch = order[m * s.batch_size : (m + 1) * s.batch_size]
        if batch:
            out.append(batch)
    return out


def rounds(totals: Sequence[int], sync_every: int) -> int:
    """Sync rounds for shards of ``totals`` steps."""
    return math.ceil(max(totals) / sync_every) if totals else 0

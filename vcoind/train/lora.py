"""The PEFT LoRA trainer, FedAvg and adapter bytes. Parsing and merging adapters is
``vcoind.compute.adapters``' (inference needs them); here their errors are TrainErrors.

A node trains a LoRA adapter on a frozen base model, one optimizer step of the
deterministic schedule of ``spec.step_batches`` at a time. The LoRA init is drawn
from ``settings.seed`` on the CPU and dropout per step from ``(seed, step)``, so
every node starts from the same adapter and a step is reproducible. Adapters travel
as safetensors bytes (fp32, sorted keys and metadata: equal adapters give equal
bytes, hence equal ids) and are checked before use.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from vcoind.compute import adapters
from vcoind.compute.adapters import FORMAT, MAX_ADAPTER_BYTES, check_adapter
from vcoind.progress import BOARD
from vcoind.train.spec import LoraSettings, TrainError, sha256_hex, step_batches, total_steps


class AdapterError(TrainError, adapters.AdapterError):
    """Adapter bytes or weights that are corrupt or do not fit: a TrainError to the
    training side, and the compute side's ``AdapterError`` (a ``ModelError``) too."""


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the RNGs seeded, leaving the global RNG state as it was."""
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8]) >> 1


class LoraTrainer:
    """A PEFT LoRA model on a base model dir, trained step by step from a deterministic schedule."""

    def __init__(self, model_dir: Path, settings: LoraSettings, device: str = "cpu") -> None:
        self.model_dir, self.settings, self.device = Path(model_dir), settings, torch.device(device)
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos: int | None = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad: int = pad if pad is not None else (self.eos if self.eos is not None else 0)
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        # Load and wrap on the CPU so the init is the same whatever the device.
        with _seeded(settings.seed, torch.device("cpu")):
            base: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            base.requires_grad_(False)
            try:
                with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated attr
                    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
                    self.model: Any = get_peft_model(base, config)
            except ValueError as exc:  # no such target module
                raise TrainError(f"{self.model_dir.name}: {exc}") from None
        self.model.to(self.device)
        self.model.train()
        infix = f".{self.model.active_adapter}."
        named = self.model.named_parameters()
        self._params: dict[str, torch.nn.Parameter] = {
            name.replace(infix, "."): p for name, p in named if p.requires_grad
        }
        self.optimizer: torch.optim.Optimizer
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        params, lr = list(self._params.values()), self.settings.learning_rate
        if self.settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    @property
    def meta(self) -> dict[str, str]:
        s = self.settings
        mods = ",".join(s.target_modules)
        return {"format": FORMAT, "r": str(s.r), "alpha": str(s.alpha),
                "target_modules": mods, "base_model": self.model_dir.name}  # fmt: skip

    def _encode(self, ex: Mapping[str, str]) -> tuple[list[int], list[int]]:
        tok, eos = self.tokenizer, [self.eos] if self.eos is not None else []
        if "text" in ex:
            ids = [*tok(ex["text"])["input_ids"], *eos]
            labels = list(ids)
        else:
            p = list(tok(ex["prompt"])["input_ids"])
            c = [*tok(ex["completion"], add_special_tokens=False)["input_ids"], *eos]
            ids, labels = p + c, [-100] * len(p) + c
        n = self.settings.max_length
        return ids[:n], labels[:n]

    def _batch(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        rows = [self._encode(ex) for ex in examples]
        width = max(len(ids) for ids, _ in rows)
        ids = [i + [self.pad] * (width - len(i)) for i, _ in rows]
        mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in rows]
        labels = [lab + [-100] * (width - len(lab)) for _, lab in rows]
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in out.items()}

    def train(
        self,
        examples: Sequence[dict[str, str]],
        start_step: int,
        n_steps: int,
        on_step: Callable[[int, float], None] | None = None,
        cancel: threading.Event | None = None,
        label: str = "",
    ) -> tuple[int, list[float]]:
        """Optimizer steps ``start_step ..`` (at most ``n_steps``, clipped at the schedule's
        end); returns the examples processed and the loss of each step. The steps show on
        the progress board (``label``: whose they are)."""
        if not examples:
            raise TrainError("no examples to train on")
        if start_step < 0 or n_steps < 0:
            raise TrainError(f"bad step range {start_step} + {n_steps}")
        end = min(start_step + n_steps, total_steps(len(examples), self.settings))
        if end <= start_step:
            return 0, []
        what = f"{label or 'lora'}: steps {start_step}..{end - 1}"
        with BOARD.step("train", what, total=end - start_step, unit="steps") as board:
            return self._steps(examples, start_step, end, on_step, cancel, board.advance)

    def _steps(
        self,
        examples: Sequence[dict[str, str]],
        start_step: int,
        end: int,
        on_step: Callable[[int, float], None] | None,
        cancel: threading.Event | None,
        stepped: Callable[[], None],
    ) -> tuple[int, list[float]]:
        samples, losses = 0, []
        for step in range(start_step, end):
            batches = step_batches(len(examples), self.settings, step)
            total = 0.0
            self.optimizer.zero_grad(set_to_none=True)
            with _seeded(_step_seed(self.settings.seed, step), self.device):
                for idx in batches:
                    if cancel is not None and cancel.is_set():
                        self.optimizer.zero_grad(set_to_none=True)
                        raise TrainError("cancelled")
                    batch = self._batch([examples[i] for i in idx])
                    samples += len(idx)
                    if not bool((batch["labels"][:, 1:] != -100).any()):
                        continue  # nothing to predict (prompts truncated to max_length)
                    loss = self.model(**batch, use_cache=False).loss
                    if not torch.isfinite(loss):
                        raise TrainError(f"step {step}: the loss is not finite")
                    (loss / len(batches)).backward()
                    total += float(loss.detach())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(total / len(batches))
            stepped()
            if on_step is not None:
                on_step(step, losses[-1])
        return samples, losses

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", torch.float32).clone().contiguous()
                for k, p in self._params.items()}  # fmt: skip

    def set_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights (e.g. the FedAvg average); the optimizer is kept as it is."""
        if set(state) != set(self._params):
            diff = sorted(set(state) ^ set(self._params))
            raise AdapterError(f"adapter keys do not match the model: {', '.join(diff[:4])}")
        for k, p in self._params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise AdapterError(f"{k}: shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(state[k].to(p.device, p.dtype))


def fedavg(states: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The average of adapters weighted by the samples each processed (fp32)."""
    if not states:
        raise AdapterError("nothing to average")
    weights = [float(w) for _, w in states]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise AdapterError(f"bad FedAvg weights {weights}")
    first = states[0][0]
    for st, _ in states[1:]:
        if set(st) != set(first) or any(st[k].shape != first[k].shape for k in first):
            raise AdapterError("adapters to average differ in keys or shapes")
    total, out = sum(weights), {}
    for k in sorted(first):
        acc = torch.zeros(first[k].shape, dtype=torch.float64)
        for st, w in states:
            acc += st[k].detach().to("cpu", torch.float64) * (w / total)
        out[k] = acc.to(torch.float32)
    return out


def adapter_to_bytes(state: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    """Safetensors bytes, fp32, keys and metadata sorted: equal input, equal bytes."""
    # Written here: safetensors' own writer orders the metadata by a random hash seed.
    header: dict[str, Any] = {"__metadata__": {k: str(meta[k]) for k in sorted(meta)}}
    blobs, offset = [], 0
    for k in sorted(state):
        t = state[k].detach().to("cpu", torch.float32).contiguous()
        blob = t.numpy().astype("<f4").tobytes()
        header[k] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def adapter_from_bytes(
    data: bytes, *, max_bytes: int = MAX_ADAPTER_BYTES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse and check adapter bytes (``vcoind.compute.adapters``): fp32 weights and the
    metadata; AdapterError, a TrainError, when they do not check out."""
    try:
        return adapters.adapter_from_bytes(data, max_bytes=max_bytes)
    except adapters.AdapterError as exc:
        raise AdapterError(str(exc)) from exc


def adapter_id(data: bytes) -> str:
    return sha256_hex(data)


def merge_lora(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> int:
    """Merge an adapter into a plain HF model in place (``vcoind.compute.adapters``);
    returns the number of merged modules. AdapterError, a TrainError, when it does not
    fit."""
    try:
        return adapters.merge_lora(model, state, meta)
    except adapters.AdapterError as exc:
        raise AdapterError(str(exc)) from exc


def export_peft_dir(state: Mapping[str, torch.Tensor], meta: Mapping[str, str], out: Path) -> None:
    """Write a standard PEFT adapter directory (``PeftModel.from_pretrained`` loads it)."""
    try:
        check_adapter(state, meta)
    except adapters.AdapterError as exc:
        raise AdapterError(str(exc)) from exc
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(state)}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=int(meta["r"]), lora_alpha=int(meta["alpha"]), lora_dropout=0.0,
                        target_modules=meta["target_modules"].split(","), task_type="CAUSAL_LM",
                        base_model_name_or_path=meta.get("base_model"))  # fmt: skip
    config.save_pretrained(str(out))

"""Layer shards: a model split by layer range, each shard a directory of its own tensors.

``split_model`` reads a checkpoint tensor by tensor (safetensors, memory-mapped; one file
or several) and writes, per layer range, ``shard.safetensors`` holding only that range's
decoder layers, plus the embeddings on the first shard and the final norm and LM head on
the last (a tied checkpoint's embeddings become the last shard's ``lm_head.weight``), the
config and tokenizer files, and ``shard.json``: model name and id, layer range (inclusive),
and the sha256 of every tensor. So no process ever holds more than one shard.

``load_shard`` checks every tensor against the manifest (a corrupted or swapped shard is
refused) and builds the span as transformers' own ``Qwen2DecoderLayer`` modules with
shard-local layer indices, its own rotary embedding, and a per-session ``DynamicCache``:
chaining the shards' ``forward`` reproduces the whole model (tests: token-identical greedy
output). Synchronous and free of the daemon, like ``generate``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vcoind.progress import BOARD

MANIFEST = "shard.json"
WEIGHTS = "shard.safetensors"
MANIFEST_VERSION = 1
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Files of a model directory that a shard does not copy (its weights are its own).
_SKIP = re.compile(r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.pt)$|^\.vcoin-")
SUPPORTED = ("Qwen2ForCausalLM",)


class ShardError(Exception):
    """A split that cannot be made, or a shard that is incomplete, corrupted or foreign."""


@dataclass(frozen=True)
class ShardManifest:
    model: str  # the full model's short name
    model_id: str  # the full model's id ("sha256:<hex>", see ModelStore)
    start: int  # first layer (global index)
    end: int  # last layer, inclusive
    num_layers: int  # of the full model
    embed: bool  # holds the token embeddings (the first shard)
    head: bool  # holds the final norm and the LM head (the last shard)
    tensors: dict[str, str]  # tensor name -> sha256 (see tensor_hash)
    version: int = MANIFEST_VERSION

    @property
    def span(self) -> str:
        return f"{self.start}-{self.end}"

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ShardManifest:
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_text())
            m = cls(**raw)
        except FileNotFoundError:
            raise ShardError(f"{directory} is not a shard (no {MANIFEST})") from None
        except (ValueError, TypeError) as exc:
            raise ShardError(f"{path} is not a valid shard manifest: {exc}") from None
        if m.version != MANIFEST_VERSION:
            raise ShardError(f"{path}: manifest version {m.version} is not supported")
        if not 0 <= m.start <= m.end < m.num_layers:
            raise ShardError(f"{path}: layer range {m.span} is outside 0-{m.num_layers - 1}")
        return m


def is_shard_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes (bf16 included: hashed as bytes)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- ranges -------------------------------------------------------------------


def even_ranges(num_layers: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous inclusive ranges covering all layers, sizes differing by <= 1."""
    if not 1 <= shards <= num_layers:
        raise ShardError(f"cannot split {num_layers} layers into {shards} shards")
    base, extra = divmod(num_layers, shards)
    out, start = [], 0
    for i in range(shards):
        size = base + (i < extra)
        out.append((start, start + size - 1))
        start += size
    return out


def parse_ranges(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """``"0-13,14-27"`` -> [(0, 13), (14, 27)]; must cover every layer once, in order."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if m is None:
            raise ShardError(f"bad layer range {part.strip()!r}: expected START-END, e.g. 0-13")
        out.append((int(m.group(1)), int(m.group(2))))
    expect = 0
    for start, end in out:
        if start != expect or end < start:
            raise ShardError(f"layer ranges {spec!r} must be contiguous from 0, in order "
                             f"(expected one starting at {expect})")  # fmt: skip
        expect = end + 1
    if expect != num_layers:
        raise ShardError(f"layer ranges {spec!r} cover 0-{expect - 1}, the model has "
                         f"{num_layers} layers (0-{num_layers - 1})")  # fmt: skip
    return out


# --- split --------------------------------------------------------------------


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        cfg: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ShardError(f"{model_dir} has no config.json") from None
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ShardError(f"{model_dir}: architecture {arch} cannot be split yet "
                         f"(supported: {', '.join(SUPPORTED)})")  # fmt: skip
    return cfg


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (one file or a sharded checkpoint)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ShardError(f"{model_dir} has no *.safetensors weights")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                where[name] = f
    return where


def split_model(
    model_dir: Path,
    out_root: Path,
    ranges: list[tuple[int, int]],
    *,
    name: str,
    model_id: str,
    partial: bool = False,
) -> list[Path]:
    """Write one shard directory per range under ``out_root``: ``<name>.<start>-<end>``.
    The ranges must cover the model unless ``partial`` (a node's own span)."""
    cfg = _config(model_dir)
    num_layers = int(cfg["num_hidden_layers"])
    if partial:
        for a, b in ranges:
            if not 0 <= a <= b < num_layers:
                raise ShardError(f"layers {a}-{b} are outside 0-{num_layers - 1}")
    else:
        parse_ranges(",".join(f"{a}-{b}" for a, b in ranges), num_layers)  # covers all
    where = _tensor_files(model_dir)
    tied = bool(cfg.get("tie_word_embeddings", False)) or HEAD not in where
    if EMBED not in where or NORM not in where:
        raise ShardError(f"{model_dir}: no {EMBED} / {NORM}: not a complete Qwen2 checkpoint")
    out_dirs = []
    step = BOARD.open("split", f"{name} layers " + ",".join(f"{a}-{b}" for a, b in ranges),
                      total=len(ranges), unit="shards")  # fmt: skip
    try:
        for start, end in ranges:
            wanted: dict[str, str] = {}  # name in the shard -> name in the checkpoint
            for t in where:
                m = _LAYER.match(t)
                if m is not None and start <= int(m.group(1)) <= end:
                    wanted[t] = t
            if start == 0:
                wanted[EMBED] = EMBED
            if end == num_layers - 1:
                wanted[NORM] = NORM
                wanted[HEAD] = EMBED if tied else HEAD
            tensors: dict[str, torch.Tensor] = {}
            with contextlib.ExitStack() as stack:
                handles: dict[Path, Any] = {}
                for dst, src in sorted(wanted.items()):
                    f = where[src]
                    if f not in handles:
                        handles[f] = stack.enter_context(cast(Any, safe_open(str(f), "pt")))
                    tensors[dst] = handles[f].get_tensor(src).contiguous()
            d = out_root / f"{name}.{start}-{end}"
            d.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})
            for f in model_dir.iterdir():
                if f.is_file() and not _SKIP.search(f.name) and f.name != MANIFEST:
                    shutil.copy2(f, d / f.name)
            ShardManifest(
                model=name, model_id=model_id, start=start, end=end, num_layers=num_layers,
                embed=start == 0, head=end == num_layers - 1,
                tensors={k: tensor_hash(v) for k, v in tensors.items()},
            ).write(d)  # fmt: skip
            del tensors
            out_dirs.append(d)
            step.advance()
    except BaseException as exc:
        step.end(f"failed: {exc}"[:200])
        raise
    step.end()
    return out_dirs


# --- load and run -------------------------------------------------------------


def _kwarg(fn: Any, *names: str) -> str:
    """The first of ``names`` that ``fn`` accepts (transformers renamed a few across 5.x)."""
    params = inspect.signature(fn).parameters
    return next((n for n in names if n in params), names[-1])


class Shard(nn.Module):
    """A contiguous span of a Qwen2 model's decoder layers, with embeddings on the first
    shard and norm + LM head on the last. ``forward`` takes token ids (first shard) or
    hidden states and returns hidden states or logits (last shard)."""

    def __init__(self, manifest: ShardManifest, config: Any) -> None:
        from transformers.models.qwen2.modeling_qwen2 import (
            Qwen2DecoderLayer,
            Qwen2RMSNorm,
            Qwen2RotaryEmbedding,
        )

        super().__init__()
        self.manifest = manifest
        n = manifest.end - manifest.start + 1
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = n  # the cache and the layer indices are shard-local
        types = getattr(cfg, "layer_types", None)
        if types:
            cfg.layer_types = list(types)[manifest.start : manifest.end + 1]
        cfg._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.config = cfg
        self.layers = nn.ModuleList([Qwen2DecoderLayer(cfg, i) for i in range(n)])
        self.rotary_emb = Qwen2RotaryEmbedding(config=cfg)
        self.embed_tokens = (
            nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
            if manifest.embed else None
        )  # fmt: skip
        self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) if manifest.head else None
        self.lm_head = (
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if manifest.head else None
        )
        self._layer_cache_kw = _kwarg(Qwen2DecoderLayer.forward, "cache", "past_key_values")

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()

    def state_key(self, name: str) -> str:
        """Checkpoint tensor name -> this module's parameter name."""
        m = _LAYER.match(name)
        if m is not None:
            local = int(m.group(1)) - self.manifest.start
            return f"layers.{local}.{name[m.end() :]}"
        return {EMBED: "embed_tokens.weight", NORM: "norm.weight", HEAD: "lm_head.weight"}[name]

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, cache: Any, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        past = cache.get_seq_length()
        positions = torch.arange(past, past + hidden.shape[1], device=hidden.device)
        position_ids = positions.unsqueeze(0)
        mask_kwargs: dict[str, Any] = {"config": self.config, "attention_mask": attention_mask,
                                       "position_ids": position_ids}  # fmt: skip
        params = inspect.signature(create_causal_mask).parameters
        mask_kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
        mask_kwargs["cache" if "cache" in params else "past_key_values"] = cache
        if "cache_position" in params:
            mask_kwargs["cache_position"] = positions
        mask = create_causal_mask(**mask_kwargs)
        pos_emb = self.rotary_emb(hidden, position_ids)
        extra = {"cache_position": positions} if self._layer_cache_kw == "past_key_values" else {}
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                        use_cache=True, position_embeddings=pos_emb,
                        **{self._layer_cache_kw: cache}, **extra)  # fmt: skip
            hidden = out[0] if isinstance(out, tuple) else out
        if self.lm_head is not None and self.norm is not None:
            logits: torch.Tensor = self.lm_head(self.norm(hidden))
            return logits
        return hidden


def load_shard(
    directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Shard:
    """Load and verify a shard: every tensor the manifest lists, with its hash, and no other."""
    from transformers import AutoConfig

    manifest = ShardManifest.read(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ShardError(f"{directory}: {WEIGHTS} is missing")
    try:
        with safe_open(str(weights), framework="pt") as sf:
            names = set(sf.keys())
            if names != set(manifest.tensors):
                missing = sorted(set(manifest.tensors) - names)[:3]
                extra = sorted(names - set(manifest.tensors))[:3]
                raise ShardError(f"{directory}: tensors differ from the manifest "
                                 f"(missing {missing}, unexpected {extra})")  # fmt: skip
            state = {}
            for name in sorted(names):
                t = sf.get_tensor(name)
                if tensor_hash(t) != manifest.tensors[name]:
                    raise ShardError(f"{directory}: tensor {name} does not match its hash in "
                                     f"{MANIFEST} (corrupted shard)")  # fmt: skip
                state[name] = t
    except ShardError:
        raise
    except Exception as exc:  # a truncated or garbled safetensors file
        raise ShardError(f"{directory}: cannot read {WEIGHTS}: {exc}") from None
    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, "num_hidden_layers", None) != manifest.num_layers:
        raise ShardError(f"{directory}: config.json has {config.num_hidden_layers} layers, "
                         f"the manifest {manifest.num_layers}")  # fmt: skip
    shard = Shard(manifest, config)
    local = {shard.state_key(k): v for k, v in state.items()}
    missing, unexpected = shard.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.startswith("rotary_emb.")]  # computed, not stored
    if missing or unexpected:
        raise ShardError(f"{directory}: weights do not fit the span (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    for name, child in shard.named_children():
        # The rotary frequencies stay fp32, as in the whole model: rounded to fp16 they
        # shift every position's rotation, and greedy output parts from the whole model's.
        child.to(device=device, dtype=None if name == "rotary_emb" else dtype)
    return shard.eval()

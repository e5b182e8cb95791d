"""What an engine runs (a stack of decoder layers, from a whole model or a shard) and
the errors an engine raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from vcoind.compute.params import GenerationError


class EngineError(GenerationError):
    """A request the engine cannot serve (context too long, no free slot)."""


class UnsupportedModel(EngineError):
    """The architecture is outside what the engine implements (callers fall back)."""


@dataclass
class Stack:
    """The modules the engine runs: decoder layers plus optional embeddings and head."""

    layers: Sequence[Any]  # transformers decoder layers
    rotary: Any  # the rotary embedding module: (x, position_ids) -> (cos, sin)
    config: Any
    embed: nn.Module | None = None
    norm: nn.Module | None = None
    head: nn.Module | None = None

    @classmethod
    def of_model(cls, model: Any) -> Stack:
        """A transformers ``Qwen2ForCausalLM`` (or one shaped like it)."""
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
            raise UnsupportedModel(f"{type(model).__name__}: no decoder layer stack")
        return cls(list(inner.layers), inner.rotary_emb, model.config, inner.embed_tokens,
                   inner.norm, model.lm_head)  # fmt: skip

    @classmethod
    def of_shard(cls, shard: Any) -> Stack:
        """A ``vcoind.compute.shards.Shard``."""
        return cls(list(shard.layers), shard.rotary_emb, shard.config, shard.embed_tokens,
                   shard.norm, shard.lm_head)  # fmt: skip


def check_supported(stack: Stack) -> None:
    """UnsupportedModel unless the engine implements ``stack``'s architecture."""
    cfg = stack.config
    if getattr(cfg, "model_type", "qwen2") not in ("qwen2",):
        raise UnsupportedModel(f"model type {cfg.model_type!r}: the engine runs qwen2")
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModel("sliding-window attention is not implemented by the engine")
    for layer in stack.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            raise UnsupportedModel("decoder layers without q/k/v projections")

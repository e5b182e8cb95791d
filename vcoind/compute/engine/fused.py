"""The fused step's parts: q/k/v and gate/up as one weight each, residual adds that ride
in the o_proj and down_proj matmuls, and the triton kernels it runs where they check
out (``vcoind.compute.kernels``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vcoind.compute.engine.stack import EngineError

if TYPE_CHECKING:
    from vcoind.compute.kernels import Kernels

log = logging.getLogger("vcoind.engine")


@dataclass
class Fused:
    """A layer's fused weights (its own modules' parameters are views into them)."""

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_gu: torch.Tensor
    w_o: torch.Tensor | None  # o_proj's weight where it is a plain bias-free Linear
    w_down: torch.Tensor | None


def trusted_kernels(device: torch.device, dtype: torch.dtype, required: bool) -> Kernels | None:
    """The triton kernels if they load and agree with torch on this device, else None
    (or, when ``required``, an error saying why)."""
    from vcoind.compute import kernels

    loaded = kernels.load()
    problem = "triton is not installed" if loaded is None else loaded.check(device, dtype)
    if problem is None:
        log.info("fused decode step with triton kernels (rotary + cache write, SiLU * up)")
        return loaded
    if required:
        raise EngineError(f"the engine's triton kernels cannot run here: {problem}")
    log.warning("fused decode step without triton kernels (%s): torch ops instead", problem)
    return None


def _plain_weight(module: Any) -> torch.Tensor | None:
    if type(module) is nn.Linear and module.bias is None:
        return module.weight
    return None


def add_linear(
    h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, module: Any
) -> torch.Tensor:
    """``h + module(x)``: with a plain weight, one matmul that accumulates into ``h`` in
    place (``h`` is the engine's own residual stream, contiguous ``[B, T, H]``)."""
    if weight is None:
        out: torch.Tensor = h + module(x)
        return out
    h.view(-1, h.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return h


def fuse(layer: Any) -> Fused:
    """One weight for q/k/v and one for gate/up; the layer's own parameters become views
    into them, so the model costs no extra memory and its own forward still works."""
    a, mlp = layer.self_attn, layer.mlp

    def cat(mods: list[Any], attr: str) -> torch.Tensor | None:
        parts = [getattr(m, attr) for m in mods]
        if any(p is None for p in parts):
            return None
        with torch.no_grad():
            whole = torch.cat([p.detach() for p in parts])
            at = 0
            for p in parts:
                p.data = whole[at : at + p.shape[0]]
                at += p.shape[0]
        return whole

    w_qkv = cat([a.q_proj, a.k_proj, a.v_proj], "weight")
    w_gu = cat([mlp.gate_proj, mlp.up_proj], "weight")
    assert w_qkv is not None and w_gu is not None
    b_qkv = cat([a.q_proj, a.k_proj, a.v_proj], "bias")
    return Fused(w_qkv, b_qkv, w_gu, _plain_weight(a.o_proj), _plain_weight(mlp.down_proj))

"""transformers' rotary position step, op by op: what the engine's unfused forward pass
runs, and the reference the triton kernels (``vcoind.compute.kernels``) are checked
against. A leaf: the engine and the kernels both import it, neither the other.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary step, op by op: ``x * cos + rotate_half(x) * sin``."""
    return x * cos + _rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: ``rotate_half(x) * sin`` is then a plain
    rotation of ``x`` by half a head (roll, or the rotation matrix's off-diagonal)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

"""Triton kernels for the engine's fused decode step on CUDA: one kernel where torch
needs several (a CUDA-graph step at batch 1 is bound by its kernel count, not by memory
bandwidth), each rounding exactly as the torch ops it replaces, so greedy output stays
what transformers' own forward gives.

* ``rope_store``: one decode token per row: q and k rotated by the row's rotary angles,
  k and v written into the row's slot of the layer's caches at the row's position, q
  returned. Replaces the rotation and the two cache writes (3 kernels). The rotation
  rounds as transformers' ``q * cos + rotate_half(q) * sin`` does, op by op.
* ``silu_mul``: SwiGLU's ``silu(gate) * up`` from the fused gate/up matmul's output
  ``[.., 2n]`` (2 kernels), silu rounded to the dtype before the product, as in eager.

``load()`` gives the kernels, or None where triton is missing. They run on CUDA tensors;
with ``TRITON_INTERPRET=1`` set before the first ``load()``, triton's interpreter runs
them on CPU tensors (how the tests check them on a machine without a GPU). ``check()``
compares them with the torch ops they replace on a small random input: an engine runs
it before it trusts them (a triton too old or a miscompile falls back to torch).
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from vcoind.compute.rotary import apply_rotary

log = logging.getLogger("vcoind.engine")


class Kernels:
    """The kernels bound to one triton (see the module docstring)."""

    def __init__(self, module: ModuleType) -> None:
        self.interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
        self._k = module
        self._triton = module.triton
        # libdevice's expf (what torch's CUDA silu calls); the interpreter lacks it
        self._precise = not self.interpreted and module.HAS_LIBDEVICE
        self._verdicts: dict[tuple[str, torch.dtype], str | None] = {}

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """``silu(gu[..., :n]) * gu[..., n:]`` for ``gu`` ``[.., 2n]``."""
        n = gu.shape[-1] // 2
        flat = gu.reshape(-1, 2 * n)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = torch.empty((flat.shape[0], n), dtype=gu.dtype, device=gu.device)
        block = min(1024, self._triton.next_power_of_2(n))
        grid = (flat.shape[0], self._triton.cdiv(n, block))
        self._k.silu_mul_kernel[grid](flat, out, n, flat.stride(0), out.stride(0), BLOCK=block,
                             PRECISE=self._precise, enable_fp_fusion=False)  # fmt: skip
        return out.view(*gu.shape[:-1], n)

    def rope_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        n_heads: int,
        n_kv: int,
    ) -> torch.Tensor:
        """One decode token per row of ``qkv`` ``[B, (n_heads + 2 n_kv) d]``: writes the
        row's rotated k and its v into ``k_cache`` / ``v_cache`` ``[slots, n_kv, T, d]``
        at ``(slots[row], :, pos[row])`` and returns the rotated q ``[B, n_heads, d]``.
        ``cos`` and ``sin`` ``[B, d]``: each row's angles (transformers' convention)."""
        b = qkv.shape[0]
        d = k_cache.shape[-1]
        if qkv.shape[-1] != (n_heads + 2 * n_kv) * d or qkv.stride(-1) != 1:
            raise ValueError("rope_store needs contiguous q/k/v rows of whole heads")
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("rope_store needs k and v caches of one layout")
        if cos.stride(-1) != 1 or cos.stride() != sin.stride():
            raise ValueError("rope_store needs cos and sin rows of one layout")
        q = torch.empty((b, n_heads, d), dtype=qkv.dtype, device=qkv.device)
        s_slot, s_head, s_pos, _ = k_cache.stride()
        grid = (b, n_heads + 2 * n_kv)
        self._k.rope_store_kernel[grid](qkv, cos, sin, pos, slots, q, k_cache, v_cache,
                               qkv.stride(0), cos.stride(0), s_slot, s_head, s_pos,
                               NH=n_heads, NKV=n_kv, D=d,
                               BLOCK=self._triton.next_power_of_2(d),
                               enable_fp_fusion=False)  # fmt: skip
        return q

    def check(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Run both kernels on a small random input and compare them with the torch ops
        they replace: None when they agree, else what went wrong. Once per device and
        dtype (every engine a daemon builds asks)."""
        key = (str(device), dtype)
        if key not in self._verdicts:
            try:
                self._verdicts[key] = _check(self, device, dtype)
            except Exception as exc:  # a compile error, an unsupported card
                self._verdicts[key] = f"{type(exc).__name__}: {exc}"
        return self._verdicts[key]


def _check(k: Kernels, device: torch.device, dtype: torch.dtype) -> str | None:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(device, dtype)

    gu = rand(3, 2 * 200, scale=4.0)
    want = torch.nn.functional.silu(gu[:, :200]) * gu[:, 200:]
    got = k.silu_mul(gu)
    # one unit in the last place where the two exps round apart
    if not torch.allclose(got.float(), want.float(), rtol=2e-3 if dtype != torch.float32
                          else 1e-5, atol=1e-5):  # fmt: skip
        return f"silu_mul differs from torch by {(got - want).abs().max().item():.3g}"
    nh, nkv, d, b = 4, 2, 16, 3
    qkv = rand(b, (nh + 2 * nkv) * d)
    angle = torch.rand(b, d // 2, generator=gen) * 6
    cos = torch.cat([angle.cos()] * 2, dim=-1).to(device, dtype)
    sin = torch.cat([angle.sin()] * 2, dim=-1).to(device, dtype)
    kc = torch.zeros(4, nkv, 8, d, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = torch.tensor([1, 7, 3], device=device)
    slots = torch.tensor([2, 0, 3], device=device)
    q = k.rope_store(qkv, cos, sin, pos, slots, kc, vc, nh, nkv)
    heads = qkv.view(b, nh + 2 * nkv, d)
    turned = apply_rotary(heads[:, : nh + nkv], cos[:, None], sin[:, None])
    if not torch.equal(q, turned[:, :nh]):
        return "rope_store's q differs from transformers' rotary step"
    if not (torch.equal(kc[slots, :, pos], turned[:, nh:]) and
            torch.equal(vc[slots, :, pos], heads[:, nh + nkv :])):  # fmt: skip
        return "rope_store wrote other k/v than the rotary step's"
    if int((kc != 0).sum()) != b * nkv * d - int((turned[:, nh:] == 0).sum()):
        return "rope_store wrote outside the rows' positions"
    return None


@functools.cache
def load() -> Kernels | None:
    """The kernels, or None where triton cannot be imported."""
    try:
        from vcoind.compute import triton_kernels
    except Exception as exc:  # not installed, or broken against this torch
        log.debug("triton kernels unavailable: %s", exc)
        return None
    return Kernels(triton_kernels)

"""The triton sources of ``vcoind.compute.kernels`` (imported only where triton is)."""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice

    HAS_LIBDEVICE = True
except ImportError:  # pragma: no cover - older triton
    libdevice = tl
    HAS_LIBDEVICE = False

__all__ = ["HAS_LIBDEVICE", "rope_store_kernel", "silu_mul_kernel", "triton"]


@triton.jit
def silu_mul_kernel(gu, out, n, s_in, s_out, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """``out[r, j] = silu(gu[r, j]) * gu[r, n + j]``, silu rounded to the dtype first."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < n
    g = tl.load(gu + row * s_in + j, mask=m, other=0.0)
    u = tl.load(gu + row * s_in + n + j, mask=m, other=0.0)
    gf = g.to(tl.float32)
    if PRECISE:  # noqa: SIM108 (a constexpr branch: only one is compiled)
        e = libdevice.exp(-gf)
    else:
        e = tl.exp(-gf)
    act = tl.math.div_rn(gf, 1.0 + e).to(g.dtype)
    y = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    tl.store(out + row * s_out + j, y, mask=m)


@triton.jit
def rope_store_kernel(
    qkv, cos, sin, pos, slots, q_out, k_cache, v_cache,
    s_row, s_cs, s_slot, s_head, s_pos,
    NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (row, head): a q head rotated into ``q_out``; a k head rotated, or a v
    head as it is, into the caches at the row's slot and position."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    m = j < D
    src = qkv + row * s_row + head * D
    x = tl.load(src + j, mask=m, other=0.0)
    if head < NH + NKV:
        half = D // 2
        partner = tl.load(src + (j + half) % D, mask=m, other=0.0)
        turned = tl.where(j < half, -partner, partner)  # rotate_half(x)
        c = tl.load(cos + row * s_cs + j, mask=m, other=0.0)
        s = tl.load(sin + row * s_cs + j, mask=m, other=0.0)
        # transformers' x * cos + rotate_half(x) * sin, each op rounded to the dtype
        a = (x.to(tl.float32) * c.to(tl.float32)).to(x.dtype)
        b = (turned.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        y = (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)
        if head < NH:
            tl.store(q_out + (row * NH + head) * D + j, y, mask=m)
        else:
            at = tl.load(slots + row) * s_slot + tl.load(pos + row) * s_pos
            tl.store(k_cache + at + (head - NH) * s_head + j, y, mask=m)
    else:
        at = tl.load(slots + row) * s_slot + tl.load(pos + row) * s_pos
        tl.store(v_cache + at + (head - NH - NKV) * s_head + j, x, mask=m)

"""The engine's forward passes over transformers' modules (their weights, norms and
MLPs): embeddings, q/k/v with the rotary step, attention (SDPA), the layer's output and
MLP, the LM head; a prefill pass over a chunk of positions and a decode step of one
token per row, each unfused (transformers' order of operations) or fused."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from vcoind.compute.engine.cache import SlotCache
from vcoind.compute.engine.fused import Fused, add_linear
from vcoind.compute.engine.stack import Stack
from vcoind.compute.rotary import apply_rotary, signed_sin

if TYPE_CHECKING:
    from vcoind.compute.kernels import Kernels

# SDPA backends: "auto" is torch's own choice; prefill on CUDA leaves cuDNN out (see
# ``sdpa_backends``); the decode step takes ``Engine(decode_attention=...)``.
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
# SDPA's own grouped-query attention (torch 2.5 on), as transformers calls it
_NATIVE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class ForwardPass(SlotCache):
    """The forward part of ``Engine`` (whose ``__init__`` sets what is declared here)."""

    stack: Stack
    device: torch.device
    dtype: torch.dtype
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    groups: int  # query heads per kv head
    scale: float
    last: bool  # the engine has the norm and LM head: it returns logits
    fused: bool
    _fused: list[Fused]  # per layer, on a fused engine
    kernels: Kernels | None
    _silu_mul: bool  # the triton kernel's SiLU * up
    _cols: torch.Tensor  # the cache positions: 0, 1, ..
    _rot_rows: torch.Tensor  # the rotation matrix's off-diagonal entries
    _rot_cols: torch.Tensor
    _open: torch.Tensor  # attention bias where a row may look (0), and where not (-inf)
    _shut: torch.Tensor
    _angles: torch.Tensor | None  # cos | sin of every cache position (fused, static rope)
    _prefill_sdpa: tuple[str, ...]  # SDPA backends of the prefill, and of the decode step
    _decode_sdpa: tuple[str, ...]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            assert self.stack.embed is not None
            out: torch.Tensor = self.stack.embed(x)
            return out
        return x.to(self.dtype, copy=True)  # the residual stream is updated in place

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        if self.last:
            assert self.stack.norm is not None and self.stack.head is not None
            logits: torch.Tensor = self.stack.head(self.stack.norm(h)).float()
            return logits
        return h

    def _norm(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.nn.functional.rms_norm(
                x, (self.hidden,), norm.weight, norm.variance_epsilon
            )
        out: torch.Tensor = norm(x)
        return out

    def _rope(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin per position, shaped to broadcast over heads, once per forward (the
        fused path takes sin with its first half negated: see ``_qkv``)."""
        cos, sin = self.stack.rotary(h, pos)
        if self.fused:
            sin = signed_sin(sin)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _rotation(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Each row's rotary step as a ``[d, d]`` matrix (``x @ R`` == ``x * cos +
        rotate_half(x) * sin``), from cos and signed sin ``[N, d]`` (or ``_rope``'s): a
        decode applies it to q and k of every layer in one batched matmul."""
        cos, sin = cos.flatten(0, -2), sin.flatten(0, -2)  # [N, d]
        rot = torch.diag_embed(cos)
        rot[:, self._rot_rows, self._rot_cols] = sin
        return rot

    def _qkv(
        self,
        i: int,
        layer: Any,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rot: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v ``[B, heads, T, d]``; ``rot`` (fused decode, T == 1):
        the rows' rotation matrices, applied with one kernel instead of three."""
        x = self._norm(layer.input_layernorm, h)
        b, t, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.fused and rot is not None:
            f = self._fused[i]
            qkv = torch.nn.functional.linear(x, f.w_qkv, f.b_qkv).view(b, nh + 2 * nkv, d)
            qk = torch.bmm(qkv[:, : nh + nkv], rot)
            q = qk[:, :nh].unsqueeze(2)
            k = qk[:, nh:].unsqueeze(2)
            return q, k, qkv[:, nh + nkv :].unsqueeze(2)
        if self.fused:
            f = self._fused[i]
            qkv = torch.nn.functional.linear(x, f.w_qkv, f.b_qkv).view(b, t, nh + 2 * nkv, d)
            qk = qkv[:, :, : nh + nkv].transpose(1, 2)
            # q and k rotated together; rotate_half(x) * sin == roll(x) * signed sin
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)
            v = qkv[:, :, nh + nkv :].transpose(1, 2)
            return qk[:, :nh], qk[:, nh:], v
        a = layer.self_attn
        q = a.q_proj(x).view(b, t, nh, d).transpose(1, 2)
        k = a.k_proj(x).view(b, t, nkv, d).transpose(1, 2)
        v = a.v_proj(x).view(b, t, nkv, d).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return q, k, v

    def _layer_out(self, i: int, layer: Any, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        attn = attn.transpose(1, 2).reshape(b, t, -1)
        if not self.fused:
            h = h + layer.self_attn.o_proj(attn)
            out: torch.Tensor = h + layer.mlp(self._norm(layer.post_attention_layernorm, h))
            return out
        f, mlp = self._fused[i], layer.mlp
        h = add_linear(h, attn, f.w_o, layer.self_attn.o_proj)
        gu = torch.nn.functional.linear(self._norm(layer.post_attention_layernorm, h), f.w_gu)
        if self._silu_mul:
            assert self.kernels is not None
            act = self.kernels.silu_mul(gu)
        else:
            n = gu.shape[-1] // 2
            act = mlp.act_fn(gu[..., :n]) * gu[..., n:]
        return add_linear(h, act, f.w_down, mlp.down_proj)

    def _prefill_pass(
        self, rows: slice | torch.Tensor, h: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Every layer over ``h`` ``[B, T, H]`` at positions ``start..start+T-1`` of the
        slots ``rows`` (one per row of ``h``), causal, writing their caches; attention
        also reads what the slots held before ``start``."""
        t = h.shape[1]
        end = start + t
        pos = torch.arange(start, end, device=self.device).expand(h.shape[0], t)
        cos, sin = self._rope(h, pos)
        causal = None
        if start:
            causal = self._cols[:end].unsqueeze(0) <= pos[0].unsqueeze(1)  # [T, end]
        with sdpa_backends(self._prefill_sdpa):
            for i, layer in enumerate(self.stack.layers):
                q, k, v = self._qkv(i, layer, h, cos, sin)
                self.k[i][rows, :, start:end] = k
                self.v[i][rows, :, start:end] = v
                if start:  # the earlier positions too
                    k, v = self.k[i][rows, :, :end], self.v[i][rows, :, :end]
                attn = self._attend(q, k, v, causal, is_causal=causal is None)
                h = self._layer_out(i, layer, h, attn)
        return h

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """SDPA of q ``[B, heads, T, d]`` over k, v ``[B, kv_heads, S, d]``. Unfused, as
        transformers' SDPA attention calls it: with no mask, its native grouped-query
        attention; with one, the K/V heads repeated. (The fused prefill always repeats
        them: with ``enable_gqa`` only flash attention, sm80 and up, and math run, so a
        T4's memory-efficient attention would fall back to math.)"""
        extra: dict[str, Any] = {}
        if self.groups > 1:
            if mask is None and not self.fused and _NATIVE_GQA:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
        out: torch.Tensor = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, **extra
        )
        return out

    def _decode_rows(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        rows: torch.Tensor | None,
        width: int,
        masked: bool = True,
    ) -> torch.Tensor:
        """One token for each row: ``rows`` are slot indices (None: slots 0..B-1), ``pos``
        each row's position; attention over the first ``width`` positions (``masked``
        False: every row is at position ``width - 1``, nothing to mask)."""
        b = x.shape[0]
        h = self._embed(x.unsqueeze(1))
        rot = None
        if not self.fused:
            cos, sin = self._rope(h, pos.unsqueeze(1))
        else:  # transformers' cos and sin [B, d]: rope_store's, or the rotation matrices'
            if self._angles is not None:
                cs = self._angles.index_select(0, pos)
                cos, sin = cs[:, : self.head_dim], cs[:, self.head_dim :]
            else:
                cos, sin = (t.reshape(b, -1) for t in self.stack.rotary(h, pos.unsqueeze(1)))
            if self.kernels is None:
                rot = self._rotation(cos, signed_sin(sin))
        bias = None
        if masked:
            visible = self._cols[:width].unsqueeze(0) <= pos.unsqueeze(1)  # [B, width]
            bias = torch.where(visible, self._open, self._shut).view(b, 1, 1, width)
        index = torch.arange(b, device=self.device) if rows is None else rows
        with sdpa_backends(self._decode_sdpa):
            h = self._decode_layers(h, cos, sin, rot, pos, rows, index, bias, width)
        return self._out(h[:, -1]) if self.last else h[:, -1]

    def _decode_layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rot: torch.Tensor | None,
        pos: torch.Tensor,
        rows: torch.Tensor | None,
        index: torch.Tensor,
        bias: torch.Tensor | None,
        width: int,
    ) -> torch.Tensor:
        """``_decode_rows``' pass over the layers: hidden states ``[B, 1, H]`` out."""
        b = h.shape[0]
        for i, layer in enumerate(self.stack.layers):
            q = self._step_qkv(i, layer, h, cos, sin, rot, pos, index)
            kc, vc = self.k[i], self.v[i]
            keys = kc[:b, :, :width] if rows is None else kc[rows, :, :width]
            vals = vc[:b, :, :width] if rows is None else vc[rows, :, :width]
            if self.fused:  # one kernel (fp32 softmax inside)
                # A kv head's query heads side by side, as if they were query positions.
                qg = q.reshape(b, self.n_kv, self.groups, self.head_dim)
                attn = torch.nn.functional.scaled_dot_product_attention(
                    qg, keys, vals, attn_mask=bias, scale=self.scale
                ).reshape(b, self.n_heads, 1, self.head_dim)
            else:
                attn = self._attend(q, keys, vals, bias)
            h = self._layer_out(i, layer, h, attn)
        return h

    def _step_qkv(
        self,
        i: int,
        layer: Any,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rot: torch.Tensor | None,
        pos: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """A decode step's q ``[B, heads, 1, d]``; each row's k and v go into the caches
        of slot ``index[row]`` at position ``pos[row]``."""
        if self.kernels is not None:
            f = self._fused[i]
            x = self._norm(layer.input_layernorm, h)[:, 0]
            qkv = torch.nn.functional.linear(x, f.w_qkv, f.b_qkv)
            q = self.kernels.rope_store(qkv, cos, sin, pos, index, self.k[i], self.v[i],
                                        self.n_heads, self.n_kv)  # fmt: skip
            return q.unsqueeze(2)
        q, k, v = self._qkv(i, layer, h, cos, sin, rot)
        self.k[i][index, :, pos] = k[:, :, 0]
        self.v[i][index, :, pos] = v[:, :, 0]
        return q


def sdpa_backends(backends: tuple[str, ...]) -> contextlib.AbstractContextManager[Any]:
    """SDPA restricted to ``backends`` (names from ``SDPA_BACKENDS`` but "auto"; none, or
    "auto" alone: torch's own choice, as on torch builds without ``torch.nn.attention``)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    if not backends or backends == ("auto",):
        return contextlib.nullcontext()
    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}  # fmt: skip
    return sdpa_kernel([getattr(SDPBackend, names[b]) for b in backends])

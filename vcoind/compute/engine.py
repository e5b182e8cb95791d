"""Inference engine: static KV cache slots, prefill/decode split, CUDA-graph decode,
continuous batching.

``Engine`` runs a stack of Qwen2 decoder layers (a whole model, or one shard's span:
embeddings on the first, norm + LM head on the last) with its own forward pass over
transformers' modules (their weights, their norms and MLPs) instead of the model's
``forward``:

* **Static cache.** K/V tensors of shape ``[slots, kv_heads, max_context + 1, head_dim]``
  per layer, allocated once. A request owns a slot; its length is the next position.
  Position ``max_context`` is scratch: rows of a decode batch that are not taking part
  write there, and no real query ever attends to it.
* **Prefill** runs one slot's chunk of tokens (or hidden states) from any start
  position (a pipeline replays a prefix this way), eagerly.
* **Decode** runs one token for several slots at once. On CUDA the step for slots
  ``0..B-1`` reading the first ``W`` positions is captured once per batch bucket ``B``
  (1, 2, 4, .., slots) and width bucket ``W`` (256, 512, .., the context) in a CUDA graph
  and replayed (no Python or launch overhead per layer); attention masks positions past
  each row's length, so a step reads the cache up to the longest row rounded up to a
  power of two, not the whole context. Elsewhere it runs eagerly over the rows asked
  for, reading only the positions in use (or, with ``static_shapes``, padded exactly as
  the graph is: how the graph path is tested on a CPU).
* **Fused step** (the default on CUDA, where a batch-1 step is bound by its kernel
  count): q/k/v and gate/up are one matmul each; RMSNorm is one kernel; the rotary step
  of a decode is one batched matmul by each row's rotation matrix; the residual adds
  ride in the o_proj and down_proj matmuls (``addmm_``); attention is one SDPA kernel.
  Where triton is there (CUDA builds of torch bring it) two kernels of our own
  (``vcoind.compute.kernels``) cut it further: the rotary step of q and k with both
  cache writes is one kernel, SiLU * up another, each rounding as transformers' ops do.
* **Numerics.** fp16 on CUDA, with fp32 softmax and fp32 logits; RMSNorm statistics in
  fp32 (transformers' own module). fp32 on CPU, where greedy output is token-identical to
  transformers' ``generate``.

``Batcher`` puts an engine behind a thread that serves many requests at once:
requests join the running batch at token boundaries, leave when done, each with its own
sampling parameters; waiting requests are admitted by priority, then arrival, and the
prompts admitted together are prefilled together (``prefill_batch``: one padded forward
pass of up to ``PREFILL_TOKENS`` tokens), so a burst reaches its first tokens at once.
While other requests are decoding, prompts are prefilled in chunks of ``prefill_chunk``
tokens between their decode steps (chunked prefill): a long prompt joining delays the
running streams' next tokens by one chunk's pass, not by its whole prefill.
A slot's cache outlives its request: a prompt that starts as an earlier or a running
one does (a system prompt, the previous turn of a conversation) gets those positions'
K/V copied into its slot and is prefilled only from where the two part.

Free of the daemon (no trio, no network): only torch and transformers.
"""

from __future__ import annotations

import concurrent.futures
import functools
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vcoind.compute.params import GenerationError, GenerationParams

if TYPE_CHECKING:
    from vcoind.compute.kernels import Kernels

log = logging.getLogger("vcoind.engine")

DEFAULT_MAX_CONTEXT = 4096
PREFILL_TOKENS = 8192  # padded prompt tokens per batched prefill pass
PREFILL_CHUNK = 512  # prompt tokens prefilled between two decode steps of running streams
REUSE_MIN = 16  # prompt tokens found in some slot's cache worth copying from there
STATIC_ROPE = ("default", "linear")  # rotary types whose angles depend on position alone


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary step, op by op: ``x * cos + rotate_half(x) * sin``."""
    return x * cos + _rotate_half(x) * sin


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: ``rotate_half(x) * sin`` is then a plain
    rotation of ``x`` by half a head (roll, or the rotation matrix's off-diagonal)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _check_supported(stack: Stack) -> None:
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


class Engine:
    def __init__(
        self,
        stack: Stack,
        *,
        slots: int,
        max_context: int = DEFAULT_MAX_CONTEXT,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool | None = None,
        fused: bool | None = None,
        compile_decode: bool = False,
        static_shapes: bool | None = None,
        kernels: bool | None = None,
    ) -> None:
        _check_supported(stack)
        if slots < 1:
            raise ValueError("an engine needs at least one slot")
        cfg = stack.config
        self.stack = stack
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_slots = slots
        model_max = int(getattr(cfg, "max_position_embeddings", max_context) or max_context)
        self.max_context = min(max_context, model_max)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.hidden = int(cfg.hidden_size)
        self.groups = self.n_heads // self.n_kv
        self.scale = self.head_dim**-0.5
        self.first = stack.embed is not None
        self.last = stack.head is not None and stack.norm is not None
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        # Decode steps padded to a (batch bucket, width bucket) shape: what a graph needs.
        self.static_shapes = self.cuda_graphs if static_shapes is None else static_shapes
        if self.cuda_graphs and not self.static_shapes:
            raise ValueError("CUDA graphs need static shapes")
        # Fewer, larger kernels (what a CUDA-graph step is bound by): q/k/v and gate/up as
        # one matmul each, fused RMSNorm, one attention kernel per layer. The CPU keeps
        # transformers' exact order of operations (token-identical to its generate).
        self.fused = self.device.type == "cuda" if fused is None else fused
        self._fused = [_fuse(layer) for layer in stack.layers] if self.fused else []
        # Triton kernels for what torch needs several kernels for (the rotary step with
        # both cache writes; SiLU * up): on by default for a fused CUDA engine whose
        # triton passes the kernels' self-check; True insists (the CPU tests, under
        # triton's interpreter).
        self.kernels: Kernels | None = None
        if kernels and not self.fused:
            raise ValueError("the triton kernels are part of the fused step")
        wanted = kernels or (kernels is None and self.device.type == "cuda")
        if self.fused and not compile_decode and wanted:
            self.kernels = _trusted_kernels(self.device, dtype, required=bool(kernels))
        self._silu_mul = self.kernels is not None and getattr(cfg, "hidden_act", "") == "silu"
        # positions: max_context, plus the scratch one, rounded up to 16 (aligned masks)
        shape = (slots, self.n_kv, -(-(self.max_context + 1) // 16) * 16, self.head_dim)
        with torch.inference_mode():
            self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in stack.layers]
            self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in stack.layers]
            self._cols = torch.arange(shape[2], device=self.device)
            # the rotation matrix's off-diagonal entries: column j takes row (j + d/2) % d
            self._rot_cols = torch.arange(self.head_dim, device=self.device)
            self._rot_rows = (self._rot_cols + self.head_dim // 2) % self.head_dim
            # attention bias: 0 where a row may look, -inf past its position
            bias_dtype = dtype if self.fused else torch.float32
            self._open = torch.zeros((), device=self.device, dtype=bias_dtype)
            self._shut = torch.full((), float("-inf"), device=self.device, dtype=bias_dtype)
            # The fused step's rotary angles, cos | sin for every cache position, from the
            # model's own rotary module (each position's values are what it gives for that
            # position alone): one gather a step instead of the module's nine kernels.
            # Rotary types whose angles change with the sequence (dynamic) run it per step.
            self._angles: torch.Tensor | None = None
            if self.fused and getattr(stack.rotary, "rope_type", "default") in STATIC_ROPE:
                every = torch.arange(shape[2], device=self.device).unsqueeze(0)
                probe = torch.zeros(1, device=self.device, dtype=dtype)
                self._angles = torch.cat(stack.rotary(probe, every), dim=-1)[0].contiguous()
        self._batch_buckets = _buckets(slots)
        self._widths = _widths(self.max_context)
        self.length = [0] * slots
        # Engines that take token ids: the ids whose K/V each slot's cache holds, position
        # by position (kept after a release, for a later prompt with the same start).
        self._ids: list[list[int]] = [[] for _ in range(slots)]
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self.lock = threading.RLock()  # one step at a time, from whichever thread
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        # Experimental: torch.compile the decode step before its graph is captured (fuses
        # the elementwise kernels; compiles once per batch and width bucket).
        self._decode_fn = self._decode_rows
        if compile_decode and self.cuda_graphs:
            # one compile per (batch, width) bucket: more than dynamo's default 8
            import torch._dynamo.config as dynamo

            shapes = len(self._batch_buckets) * len(self._widths)
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo, knob):
                    setattr(dynamo, knob, max(getattr(dynamo, knob), shapes))
            self._decode_fn = torch.compile(self._decode_rows, dynamic=False)

    # --- slots --------------------------------------------------------------

    def alloc(self, prompt: Sequence[int] = ()) -> int:
        """The lowest free slot. On an engine that takes token ids, where some slot's
        cache holds the start of ``prompt`` (at least ``REUSE_MIN`` tokens; a slot's
        cache outlives its request, and a running request's prompt is there too), those
        positions' K/V are copied into the new slot (a device copy instead of their
        prefill). The slot's ``length`` is how many of ``prompt``'s positions are in
        place, at most all but the last (whose logits a prefill must give): prefill goes
        on from there."""
        with self.lock:
            if not self._free:
                raise EngineError(f"all {self.n_slots} engine slots are busy")
            slot, have, src = heapq.heappop(self._free), 0, -1
            if self.first and len(prompt) > REUSE_MIN:
                want = list(prompt)
                for s, ids in enumerate(self._ids):
                    n = _common_prefix(ids, want)
                    if n > have or (n == have and s == slot):  # no copy where it is
                        src, have = s, n
                have = min(have, len(prompt) - 1)
            if have < REUSE_MIN:
                have = 0
            elif src != slot:
                with torch.inference_mode():
                    for cache in (*self.k, *self.v):
                        cache[slot, :, :have] = cache[src, :, :have]
                self._ids[slot] = list(prompt[:have])
            if have:
                log.debug("slot %d: %d of the prompt's %d tokens in place (from slot %d)",
                          slot, have, len(prompt), src)  # fmt: skip
            del self._ids[slot][have:]
            self.length[slot] = have
            return slot

    def release(self, slot: int) -> None:
        with self.lock:
            if slot not in self._free:
                heapq.heappush(self._free, slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.max_context:
            raise EngineError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens exceeds the model's "
                f"context of {self.max_context} (compute.max_context)"
            )

    def check_fits(self, tokens: int) -> None:
        if tokens > self.max_context:
            raise EngineError(
                f"{tokens} positions exceed the engine's context of {self.max_context} "
                f"(compute.max_context)"
            )

    # --- forward ------------------------------------------------------------

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
            sin = _signed_sin(sin)
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
        h = _add_linear(h, attn, f.w_o, layer.self_attn.o_proj)
        gu = torch.nn.functional.linear(self._norm(layer.post_attention_layernorm, h), f.w_gu)
        if self._silu_mul:
            assert self.kernels is not None
            act = self.kernels.silu_mul(gu)
        else:
            n = gu.shape[-1] // 2
            act = mlp.act_fn(gu[..., :n]) * gu[..., n:]
        return _add_linear(h, act, f.w_down, mlp.down_proj)

    @torch.inference_mode()
    def prefill(self, slot: int, x: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Run ``x`` (token ids ``[T]`` or hidden states ``[T, H]``) at positions
        ``start..start+T-1`` of ``slot`` (default: after what it holds). Returns the last
        position's fp32 logits ``[V]`` on the last span, else hidden states ``[T, H]``."""
        with self.lock:
            start = self.length[slot] if start is None else start
            t = int(x.shape[0])
            if t == 0 or start > self.length[slot]:
                raise EngineError("prefill needs tokens, from a position the slot has reached")
            self.check_fits(start + t)
            del self._ids[slot][start:]  # overwritten from here on, whatever happens
            h = self._prefill_pass(
                slice(slot, slot + 1), self._embed(x.to(self.device)[None]), start
            )
            self.length[slot] = start + t
            if self.first:
                self._ids[slot].extend(x.tolist())
            return self._out(h[:, -1])[0] if self.last else h[0]

    @torch.inference_mode()
    def prefill_batch(self, slots: Sequence[int], prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Several fresh slots' prompts (token ids from position 0) in one forward pass,
        right-padded to the longest (causal attention keeps the padding out of every real
        position; decode overwrites it). Returns each prompt's last-position fp32 logits
        ``[N, V]``. Whole-model engines only."""
        if not (self.first and self.last):
            raise EngineError("a batched prefill needs an engine over the whole model")
        if len(slots) != len(prompts) or not prompts:
            raise EngineError("a batched prefill needs one prompt per slot")
        with self.lock:
            lengths = [int(p.shape[0]) for p in prompts]
            if min(lengths) == 0:
                raise EngineError("prefill needs tokens")
            t, n = max(lengths), len(prompts)
            self.check_fits(t)
            ids = torch.zeros(n, t, dtype=torch.long)
            for row, (p, m) in enumerate(zip(prompts, lengths, strict=True)):
                ids[row, :m] = p
            index = torch.tensor(list(slots), device=self.device)
            for slot in slots:
                self._ids[slot].clear()
            h = self._prefill_pass(index, self._embed(ids.to(self.device)), 0)
            for slot, p, m in zip(slots, prompts, lengths, strict=True):
                self.length[slot] = m
                self._ids[slot] = p.tolist()
            last = torch.tensor(lengths, device=self.device) - 1
            return self._out(h[torch.arange(n, device=self.device), last])

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
        for i, layer in enumerate(self.stack.layers):
            q, k, v = self._qkv(i, layer, h, cos, sin)
            self.k[i][rows, :, start:end] = k
            self.v[i][rows, :, start:end] = v
            if start:  # the earlier positions too
                k, v = self.k[i][rows, :, :end], self.v[i][rows, :, :end]
            if self.groups > 1:
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
            attn = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=causal, is_causal=causal is None, scale=self.scale
            )
            h = self._layer_out(i, layer, h, attn)
        return h

    def _decode_rows(
        self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None, width: int
    ) -> torch.Tensor:
        """One token for each row: ``rows`` are slot indices (None: slots 0..B-1), ``pos``
        each row's position; attention over the first ``width`` positions."""
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
                rot = self._rotation(cos, _signed_sin(sin))
        visible = self._cols[:width].unsqueeze(0) <= pos.unsqueeze(1)  # [B, width]
        bias = torch.where(visible, self._open, self._shut).view(b, 1, 1, width)
        index = torch.arange(b, device=self.device) if rows is None else rows
        for i, layer in enumerate(self.stack.layers):
            q = self._step_qkv(i, layer, h, cos, sin, rot, pos, index)
            kc, vc = self.k[i], self.v[i]
            keys = kc[:b, :, :width] if rows is None else kc[rows, :, :width]
            vals = vc[:b, :, :width] if rows is None else vc[rows, :, :width]
            # A kv head's query heads side by side, as if they were query positions.
            qg = q.reshape(b, self.n_kv, self.groups, self.head_dim)
            if self.fused:  # one kernel (fp32 softmax inside)
                attn = torch.nn.functional.scaled_dot_product_attention(
                    qg, keys, vals, attn_mask=bias, scale=self.scale
                )
            else:
                scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scale + bias
                probs = torch.softmax(scores, dim=-1).to(vals.dtype)
                attn = torch.matmul(probs, vals)
            attn = attn.reshape(b, self.n_heads, 1, self.head_dim)
            h = self._layer_out(i, layer, h, attn)
        return self._out(h[:, -1]) if self.last else h[:, -1]

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

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """One position for each slot, at its current length: ``x`` is token ids ``[B]``
        or hidden states ``[B, H]``. Returns fp32 logits ``[B, V]`` or hidden ``[B, H]``."""
        with self.lock:
            positions = [self.length[s] for s in slots]
            self.check_fits(max(positions) + 1)
            for s, at in zip(slots, positions, strict=True):
                del self._ids[s][at:]
            if self.static_shapes:
                out = self._static_step(slots, positions, x)
            else:
                x = x.to(self.device)
                pos = torch.tensor(positions, device=self.device)
                # Slots 0..B-1 in order (a full batch) are read in place, others gathered.
                contiguous = list(slots) == list(range(len(slots)))
                rows = None if contiguous else torch.tensor(list(slots), device=self.device)
                out = self._decode_rows(x, pos, rows, max(positions) + 1)
            for s in slots:
                self.length[s] += 1
            if self.first:
                for s, token in zip(slots, x.tolist(), strict=True):
                    self._ids[s].append(int(token))
            return out

    # --- CUDA graphs ----------------------------------------------------------

    def _static_step(
        self, slots: Sequence[int], positions: list[int], x: torch.Tensor
    ) -> torch.Tensor:
        """The step padded to slots ``0..B-1`` and the first ``W`` positions (B, W the
        smallest buckets that hold it): a graph's replay on CUDA, else run eagerly."""
        need, top = max(slots) + 1, max(positions) + 1
        bucket = next(b for b in self._batch_buckets if b >= need)
        width = next(w for w in self._widths if w >= top)
        pos = [self.max_context] * bucket  # rows not taking part write to the scratch column
        for s, p in zip(slots, positions, strict=True):
            pos[s] = p
        graph = self._graphs.get((bucket, width)) if self.cuda_graphs else None
        if graph is None and self.cuda_graphs:  # not warmed up: this step waits for it
            graph = self._capture_or_none(bucket, width)
            if graph is not None:
                log.info("captured the decode graph for %d slots x %d positions on first "
                         "use", bucket, width)  # fmt: skip
        if graph is None:  # the same padded step, run eagerly
            index = torch.tensor(list(slots), device=self.device)
            x = x.to(self.device, self._input_dtype)
            padded = self._blank_input(bucket).index_copy_(0, index, x)
            at = torch.tensor(pos, device=self.device)
            return self._decode_fn(padded, at, None, width).index_select(0, index)
        # One host-to-device copy a step: [token ids | positions | slots] into the graph's
        # input buffer (a span past the first copies its hidden states too).
        n = len(slots)
        start = 0 if self.first else bucket
        host = [*pos, *slots]
        if self.first:
            ids = [0] * bucket
            for s, t in zip(slots, x.tolist(), strict=True):
                ids[s] = int(t)
            host = ids + host
        graph.inp[start : 2 * bucket + n].copy_(torch.tensor(host), non_blocking=True)
        index = graph.inp[2 * bucket : 2 * bucket + n]
        if not self.first:
            graph.x.index_copy_(0, index, x.to(self.device, self.dtype))
        graph.replay()
        return graph.out.index_select(0, index)

    @torch.inference_mode()
    def warm_up(self, batch: int | None = None, positions: int | None = None) -> int:
        """Capture the decode graphs now (CUDA graphs only) rather than in the first step
        of each shape, which would stall the requests in it: every batch bucket up to
        ``batch`` slots and width up to ``positions`` (default: all). Returns how many
        graphs the engine holds."""
        if not self.cuda_graphs:
            return 0
        want_b = min(batch or self.n_slots, self.n_slots)
        want_w = min(positions or self.max_context, self.max_context)
        top_b = next(b for b in self._batch_buckets if b >= want_b)
        top_w = next(w for w in self._widths if w >= want_w)
        t0, before = time.perf_counter(), len(self._graphs)
        with self.lock:
            for b in self._batch_buckets:
                for w in self._widths:
                    wanted = b <= top_b and w <= top_w and (b, w) not in self._graphs
                    if wanted and self._capture_or_none(b, w) is None:
                        return 0
        log.info("%d decode graphs captured in %.1f s (%d slots x %d positions at most)",
                 len(self._graphs) - before, time.perf_counter() - t0, top_b, top_w)  # fmt: skip
        return len(self._graphs)

    def _capture_or_none(self, bucket: int, width: int) -> _Graph | None:
        """The step's graph, kept; or, where this card or torch refuses the capture,
        None, with every later step run eagerly (slower, the same tokens) instead of a
        model that does not serve."""
        try:
            graph = self._graphs[bucket, width] = self._capture(bucket, width)
        except Exception as exc:
            log.warning("capturing the decode graph for %d slots x %d positions failed "
                        "(%s: %s); decode steps run without CUDA graphs from now on",
                        bucket, width, type(exc).__name__, exc)  # fmt: skip
            self.cuda_graphs = False
            self._graphs.clear()
            return None
        return graph

    @property
    def _input_dtype(self) -> torch.dtype:
        return torch.long if self.first else self.dtype

    def _blank_input(self, bucket: int) -> torch.Tensor:
        shape = (bucket,) if self.first else (bucket, self.hidden)
        return torch.zeros(shape, dtype=self._input_dtype, device=self.device)

    def _capture(self, bucket: int, width: int) -> _Graph:
        t0 = time.perf_counter()
        # the step's inputs: token ids (first span), positions, then the slots (read after
        # the replay, by index_select, not by the graph)
        inp = torch.zeros(3 * bucket, dtype=torch.long, device=self.device)
        inp[bucket : 2 * bucket] = self.max_context
        x = inp[:bucket] if self.first else self._blank_input(bucket)
        pos = inp[bucket : 2 * bucket]
        replay, out = self._record(functools.partial(self._decode_fn, x, pos, None, width))
        log.debug(
            "captured decode graph for %d slots x %d positions in %.2f s",
            bucket, width, time.perf_counter() - t0,
        )  # fmt: skip
        return _Graph(replay, inp, x, out)

    def _record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """``step`` captured in a CUDA graph: its replay, and the tensor it writes."""
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy inits happen outside the capture
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = step()
        return graph.replay, out


@dataclass
class _Fused:
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_gu: torch.Tensor
    w_o: torch.Tensor | None  # o_proj's weight where it is a plain bias-free Linear
    w_down: torch.Tensor | None


def _trusted_kernels(device: torch.device, dtype: torch.dtype, required: bool) -> Kernels | None:
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


def _add_linear(
    h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, module: Any
) -> torch.Tensor:
    """``h + module(x)``: with a plain weight, one matmul that accumulates into ``h`` in
    place (``h`` is the engine's own residual stream, contiguous ``[B, T, H]``)."""
    if weight is None:
        out: torch.Tensor = h + module(x)
        return out
    h.view(-1, h.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return h


def _fuse(layer: Any) -> _Fused:
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
    return _Fused(w_qkv, b_qkv, w_gu, _plain_weight(a.o_proj), _plain_weight(mlp.down_proj))


@dataclass
class _Graph:
    replay: Callable[[], None]  # the captured torch.cuda.CUDAGraph's
    inp: torch.Tensor  # long [3B]: token ids, positions, the step's slots
    x: torch.Tensor  # the input rows: inp[:B] (ids), or hidden states [B, H]
    out: torch.Tensor


def _buckets(n: int, first: int = 1) -> list[int]:
    """Powers of two from ``first`` below ``n``, then ``n``."""
    out, b = [], first
    while b < n:
        out.append(b)
        b *= 2
    return [*out, n]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items ``a`` and ``b`` share (by halving: list slices compare
    in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


MIN_WIDTH = 256


def _widths(max_context: int) -> list[int]:
    """The cache widths a decode graph reads: 256, 512, .. then the whole context, each a
    multiple of 16 (aligned attention masks)."""
    return _buckets(-(-max_context // 16) * 16, MIN_WIDTH)


# --- sampling and stop conditions ----------------------------------------------


def sample_next(logits: torch.Tensor, p: GenerationParams, rng: random.Random | None) -> int:
    """Pick the next token from 1-D logits (fp32 math whatever the model dtype)."""
    return sample_rows(logits.unsqueeze(0), [p], [rng])[0]


CANDIDATES = 1024  # tokens a row with top-p but no top-k is first drawn from


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    rngs: Sequence[random.Random | None],
) -> list[int]:
    """The next token of each row of ``logits`` ``[B, V]``, each by its own parameters,
    with one device-to-host copy for the batch (two where a row's cut reaches past its
    candidates). Greedy rows take the argmax. A sampled row is scaled by its temperature,
    cut to its top-k (ties with the k-th value kept, as transformers does), renormalised,
    cut to its top-p nucleus (the smallest prefix, largest first and ties by token id,
    whose mass reaches top_p), and drawn by inverse CDF over the kept tokens, largest
    first (a row without cuts: the whole row in token order, no sort), at one uniform
    from the request's own ``random.Random`` (seeded from its seed; None: a fresh one
    from ``params.seed``). The uniforms come from the host, so no kernel runs per row and a
    seed draws the same on any device and in any batch.

    Rows with a cut are drawn from their largest logits only (``topk`` of k + 1, or
    ``CANDIDATES`` for top-p alone), not from a sort of the whole vocabulary; a row whose
    kept tokens reach the end of its candidates (a tie run or a wide nucleus) is drawn
    again from the whole sorted row."""
    logits = logits.float()
    picks = torch.argmax(logits, dim=-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0.0]
    if not hot:
        return [int(t) for t in picks.tolist()]
    dev, v = logits.device, logits.shape[-1]
    us = [(rngs[i] or random.Random(params[i].seed)).random() for i in hot]
    ks = [params[i].top_k if 0 < params[i].top_k < v else 0 for i in hot]
    tops = [params[i].top_p if params[i].top_p < 1.0 else 2.0 for i in hot]
    host = torch.tensor([[params[i].temperature for i in hot], ks, tops, us],
                        dtype=torch.float64)  # fmt: skip
    cols = host.to(dev).unsqueeze(-1)  # [4, n, 1]: one copy for every row's parameters
    temp, kcol, pcol, ucol = cols[0].float(), cols[1].long(), cols[2].float(), cols[3].float()
    rows = torch.tensor(hot, device=dev)
    x = _take(logits, hot, rows) / temp
    cut = [j for j, (k, t) in enumerate(zip(ks, tops, strict=True)) if k or t < 1.0]
    plain = [j for j in range(len(hot)) if not (ks[j] or tops[j] < 1.0)]
    tokens = torch.empty(len(hot), dtype=torch.long, device=dev)
    overflow = torch.zeros(len(hot), dtype=torch.bool, device=dev)
    if plain:  # the whole row in token order: no sort at all
        at = torch.tensor(plain, device=dev)
        cum = torch.cumsum(torch.softmax(_take(x, plain, at), dim=-1), dim=-1)
        tokens[at] = _inverse_cdf(cum, ucol[at]).squeeze(1)
    if cut:
        at = torch.tensor(cut, device=dev)
        width = max(k + 1 if k else CANDIDATES for k in (ks[j] for j in cut))
        whole = not all(ks[j] for j in cut)
        got, over = _draw_cut(_take(x, cut, at), kcol[at], pcol[at], ucol[at], min(width, v),
                              whole)  # fmt: skip
        tokens[at], overflow[at] = got, over
    nan = torch.isnan(x).any(dim=-1)
    back = torch.cat([picks.index_copy(0, rows, tokens), overflow.long(), nan.long()]).tolist()
    if any(back[-len(hot) :]):
        raise GenerationError("the model's logits hold NaN: nothing to sample from")
    out = [int(t) for t in back[: len(params)]]
    again = [j for j in range(len(hot)) if back[len(params) + j]]
    if again:  # the kept tokens may go on past the candidates: the whole row, sorted
        at = torch.tensor(again, device=dev)
        got, _ = _draw_cut(x[at], kcol[at], pcol[at], ucol[at], v)
        for j, t in zip(again, got.tolist(), strict=True):
            out[hot[j]] = int(t)
    return out


def _take(x: torch.Tensor, rows: list[int], index: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``x`` (``index``: the same on its device): ``x`` itself when they
    are all of its rows in order (no copy of a [B, vocabulary] tensor)."""
    return x if rows == list(range(x.shape[0])) else x[index]


def _draw_cut(
    x: torch.Tensor,
    k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    width: int,
    whole_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of scaled logits ``x`` ``[n, V]`` cut to top-k (``k`` ``[n, 1]``, 0: none) and
    top-p (``[n, 1]``, 2: none), drawn at ``u`` ``[n, 1]`` among the ``width`` largest:
    the token ids ``[n]``, and whether each row's kept tokens reach the last candidate
    (then the draw may be wrong unless ``width`` is the whole row). ``whole_rows``: some
    row has no top-k (False saves a pass over every row)."""
    v = x.shape[-1]
    if width >= v:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    else:  # topk's order among equal values is its own: make it the stable sort's
        vals, idx = torch.topk(x, width, dim=-1)
        by_id = torch.argsort(idx, dim=-1)
        vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
        order = torch.argsort(vals, dim=-1, descending=True, stable=True)
        vals, idx = vals.gather(1, order), idx.gather(1, order)
    has_k = k > 0
    kth = vals.gather(1, (k.clamp(min=1) - 1).clamp(max=width - 1))
    keep = (vals >= kth) | ~has_k
    # renormalised over the top-k set (within the candidates), or over the whole row
    masked = vals.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    if whole_rows:  # rows without a top-k: over the whole row, candidates or not
        lse = torch.where(has_k, lse, torch.logsumexp(x, dim=-1, keepdim=True))
    probs = torch.exp(masked - lse)
    keep &= torch.cumsum(probs, dim=-1) - probs < top_p  # a prefix, at least one token
    probs = probs.masked_fill(~keep, 0.0)
    drawn = _inverse_cdf(torch.cumsum(probs, dim=-1), u)
    last = keep.sum(dim=-1, keepdim=True) - 1  # the last kept candidate
    over = vals.gather(1, last) == vals[:, -1:] if width < v else torch.zeros_like(has_k)
    return idx.gather(1, drawn).squeeze(1), over.squeeze(1)


def _inverse_cdf(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Where each row's cumulative mass ``cum`` ``[n, m]`` first passes ``u`` ``[n, 1]``
    of its total: never an entry of zero mass, even where ``u`` rounds to 1."""
    total = cum[:, -1:]
    drawn = torch.searchsorted(cum, u * total, right=True)
    return drawn.clamp(max=(cum < total).sum(dim=-1, keepdim=True))


def _find_stop(text: str, stops: tuple[str, ...]) -> int:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "length" | "eos" | "stop"
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids)
        return n / self.decode_s if self.decode_s > 0 and n else 0.0


class TokenStream:
    """One request's sampling and stop state: feed it each step's logits, it answers the
    next token to run, or None when the request is finished."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        tokenizer: Any,
    ) -> None:
        if not prompt_ids:
            raise GenerationError("the prompt encodes to no tokens")
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        # the request's draws: one uniform per sampled token, from its seed
        self.rng = random.Random(params.seed) if params.temperature > 0 else None
        self.out: list[int] = []
        self.finish = "length"
        self.text: str | None = None

    def push(self, logits: torch.Tensor) -> int | None:
        return self.accept(sample_next(logits, self.params, self.rng))

    def accept(self, nxt: int) -> int | None:
        p = self.params
        if self.eos is not None and nxt == self.eos:
            self.finish = "eos"
            return None
        self.out.append(nxt)
        if p.stop:
            text = self.tokenizer.decode(self.out, skip_special_tokens=True)
            cut = _find_stop(text, p.stop)
            if cut >= 0:
                self.text, self.finish = text[:cut], "stop"
                return None
        return nxt if len(self.out) < p.max_new_tokens else None

    def result(self, prefill_s: float, decode_s: float) -> GenerationResult:
        text = self.text
        if text is None:
            text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        return GenerationResult(text=text, token_ids=tuple(self.out),
                                prompt_tokens=self.prompt_tokens, finish_reason=self.finish,
                                prefill_s=prefill_s, decode_s=decode_s)  # fmt: skip


# --- continuous batching -------------------------------------------------------


class GenerationCancelled(Exception):
    """The request was cancelled between two tokens."""


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    stream: TokenStream
    priority: int
    on_token: Callable[[int], None] | None
    cancel: threading.Event | None
    future: concurrent.futures.Future[GenerationResult]
    slot: int = -1
    last: int = 0
    done: int = 0  # prompt tokens in the slot's cache (chunked prefill)
    reused: int = 0  # of which were there already (a prefix another request left)
    t_admit: float = 0.0
    t_first: float = 0.0


@dataclass(order=True)
class _Waiting:
    key: tuple[int, int]
    req: _Request = field(compare=False)


class Batcher:
    """Serves requests on an engine from its own thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        name: str = "engine",
        prefill_chunk: int = PREFILL_CHUNK,
        reuse_prefix: bool = True,
    ) -> None:
        """``prefill_chunk``: prompt tokens prefilled between two decode steps while
        other requests are decoding (0: every admitted prompt whole before the next
        step). ``reuse_prefix``: a prompt's start found in some slot's cache is copied,
        not prefilled (``Engine.alloc``)."""
        if not engine.first or not engine.last:
            raise ValueError("a batcher needs an engine over the whole model")
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 = whole prompts)")
        self.engine = engine
        self.prefill_chunk = prefill_chunk
        self.reuse_prefix = reuse_prefix
        self.tokenizer = tokenizer
        self.name = name
        self._cv = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._seq = itertools.count()
        self._active: list[_Request] = []
        self._pending: list[_Request] = []  # admitted, prompt not all in the cache yet
        self._thread: threading.Thread | None = None
        self._closed = False
        self.peak_batch = 0  # the most requests decoded in one step
        self.peak_prefill = 0  # the most prompts prefilled in one pass
        self.prefill_padding = 0  # pad tokens run by batched prefills, all told
        self.prefill_chunks = 0  # passes over part of a prompt (chunked prefill)
        self.reused_tokens = 0  # prompt tokens found in a slot's cache, not prefilled

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        *,
        priority: int = 0,
        on_token: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> concurrent.futures.Future[GenerationResult]:
        """Queue one request; the future holds its ``GenerationResult`` (or the error)."""
        stream = TokenStream(prompt_ids, params, self.tokenizer)
        self.engine.check_request(len(prompt_ids), params.max_new_tokens)
        fut: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        req = _Request(list(prompt_ids), stream, priority, on_token, cancel, fut)
        with self._cv:
            if self._closed:
                raise EngineError("the engine is shut down")
            heapq.heappush(self._waiting, _Waiting((-priority, next(self._seq)), req))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while (not self._waiting and not self._active and not self._pending
                       and not self._closed):  # fmt: skip
                    self._cv.wait()
                if self._closed:
                    break
                while self._waiting and self.engine.free_slots:
                    req = heapq.heappop(self._waiting).req
                    req.slot = self.engine.alloc(req.prompt_ids if self.reuse_prefix else ())
                    req.done = req.reused = self.engine.length[req.slot]
                    self.reused_tokens += req.reused
                    self._pending.append(req)
            try:
                self._prefill()
                self._step()
            except Exception as exc:  # a broken step fails its requests, not the thread
                log.exception("engine step failed")
                for req in [*self._active, *self._pending]:
                    self._finish(req, exc)
                self._active, self._pending = [], []
        for req in [*self._active, *self._pending, *(w.req for w in self._waiting)]:
            self._finish(req, EngineError("the engine is shut down"))

    def _prefill(self) -> None:
        """Prompts of admitted requests. With no request decoding (nobody waits on a
        next token) every prompt runs whole, before the first step. Otherwise at most
        ``prefill_chunk`` prompt tokens run before the next step, in admission order: a
        prompt begun earlier goes on first, a prompt that fits what is left runs whole,
        and a longer one starts with a chunk of what is left (``Engine.prefill`` from
        the position its last chunk reached)."""
        pending = self._pending = self._uncancelled(self._pending)
        budget = self.prefill_chunk if self._active and self.prefill_chunk else None
        whole: list[_Request] = []
        rest: list[_Request] = []  # still to come (or to go on) after the next step
        for req in pending:  # admission order: what was begun first goes on first
            need = len(req.prompt_ids) - req.done
            if budget is not None and budget <= 0:
                rest.append(req)
            elif req.done == 0 and (budget is None or need <= budget):
                whole.append(req)
            else:
                self._prefill_part(req, need if budget is None else min(need, budget))
                if req.slot >= 0 and req.done < len(req.prompt_ids):
                    rest.append(req)
            if budget is not None:
                budget -= need
        self._pending = rest
        self._prefill_whole(whole)

    def _prefill_part(self, req: _Request, n: int) -> None:
        """The next ``n`` tokens of the request's prompt; its first token once the
        prompt is all in."""
        if req.done == req.reused:
            req.t_admit = time.perf_counter()
        try:
            chunk = torch.tensor(req.prompt_ids[req.done : req.done + n])
            out = self.engine.prefill(req.slot, chunk, start=req.done)
            req.done += n
            self.prefill_chunks += n < len(req.prompt_ids) - req.reused
            nxt = req.stream.push(out) if req.done == len(req.prompt_ids) else None
        except Exception as exc:
            self._finish(req, exc)
            return
        if req.done == len(req.prompt_ids):
            self._started(req, nxt)

    def _started(self, req: _Request, nxt: int | None) -> None:
        """The request's prompt is in and ``nxt`` its first token (None: done)."""
        req.t_first = time.perf_counter()
        self._advance(req, nxt)
        if nxt is not None:
            self._active.append(req)

    def _prefill_whole(self, admitted: list[_Request]) -> None:
        """Whole prompts, several per forward pass (up to ``PREFILL_TOKENS`` padded
        tokens): a burst of requests reaches its first tokens together instead of one
        prefill after another. Shortest first, so a pass pads its prompts to a length
        near their own (and short prompts see their first tokens soonest)."""
        group: list[_Request] = []
        for req in sorted(admitted, key=lambda r: len(r.prompt_ids)):
            if group and len(req.prompt_ids) * (len(group) + 1) > PREFILL_TOKENS:
                self._prefill_group(group)
                group = []
            group.append(req)
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[_Request]) -> None:
        t0 = time.perf_counter()
        for req in group:
            req.t_admit = t0
        picks: list[int] = []  # each request's first token, sampled together
        if len(group) > 1:
            try:
                prompts = [torch.tensor(r.prompt_ids) for r in group]
                logits = self.engine.prefill_batch([r.slot for r in group], prompts)
            except Exception as exc:  # out of memory, say: one at a time instead
                log.warning("batched prefill of %d requests failed (%s); one by one",
                            len(group), exc)  # fmt: skip
            else:
                self.peak_prefill = max(self.peak_prefill, len(group))
                longest = max(len(r.prompt_ids) for r in group)
                self.prefill_padding += sum(longest - len(r.prompt_ids) for r in group)
                try:
                    picks = self._sample(group, logits)
                except Exception as exc:  # the prompts are in: no second prefill
                    for req in group:
                        self._finish(req, exc)
                    return
        for i, req in enumerate(group):
            req.done = len(req.prompt_ids)
            try:
                if picks:
                    nxt = req.stream.accept(picks[i])
                else:
                    out = self.engine.prefill(req.slot, torch.tensor(req.prompt_ids))
                    nxt = req.stream.push(out)
            except Exception as exc:
                self._finish(req, exc)
                continue
            self._started(req, nxt)

    def _uncancelled(self, reqs: list[_Request]) -> list[_Request]:
        """``reqs`` less those cancelled, which are finished here."""
        live = []
        for req in reqs:
            if req.cancel is not None and req.cancel.is_set():
                self._finish(req, GenerationCancelled())
            else:
                live.append(req)
        return live

    @staticmethod
    def _sample(reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """Each request's next token from its row of ``logits``, by its own parameters."""
        return sample_rows(logits, [r.stream.params for r in reqs], [r.stream.rng for r in reqs])

    def _advance(self, req: _Request, nxt: int | None) -> None:
        if req.on_token is not None and req.stream.out:
            req.on_token(len(req.stream.out))
        if nxt is None:
            self._finish(req, None)
        else:
            req.last = nxt

    def _step(self) -> None:
        live = self._active = self._uncancelled(self._active)
        if not live:
            return
        self.peak_batch = max(self.peak_batch, len(live))
        x = torch.tensor([r.last for r in live])
        logits = self.engine.decode([r.slot for r in live], x)
        picks = self._sample(live, logits)
        still = []
        for req, pick in zip(live, picks, strict=True):
            nxt = req.stream.accept(pick)
            self._advance(req, nxt)
            if nxt is not None:
                still.append(req)
        self._active = still

    def _finish(self, req: _Request, error: BaseException | None) -> None:
        """Release the request's slot and settle its future (callers drop it from
        ``_active``)."""
        if req.slot >= 0:
            self.engine.release(req.slot)
            req.slot = -1
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            now = time.perf_counter()
            first = req.t_first or now
            req.future.set_result(req.stream.result(first - req.t_admit, now - first))


def decode_loop(
    prompt_ids: Sequence[int],
    params: GenerationParams,
    forward: Callable[[list[int]], torch.Tensor],
    tokenizer: Any,
    max_positions: int,
    *,
    on_token: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Prefill then decode with ``forward(new token ids) -> logits of the last position``
    (an engine slot, or a model with its own KV cache): sampling, EOS, stop strings."""
    stream = TokenStream(prompt_ids, params, tokenizer)
    if len(prompt_ids) + params.max_new_tokens > max_positions:
        raise GenerationError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens exceeds the model's "
            f"context of {max_positions}"
        )
    t0 = time.perf_counter()
    nxt = stream.push(forward(list(prompt_ids)))
    t1 = time.perf_counter()
    while nxt is not None:
        if on_token is not None:
            on_token(len(stream.out))
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        nxt = stream.push(forward([nxt]))
    if on_token is not None and stream.out:
        on_token(len(stream.out))
    return stream.result(t1 - t0, time.perf_counter() - t1)


def generate_ids(
    engine: Engine,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    tokenizer: Any,
    *,
    on_token: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """One request on the calling thread, on a slot of its own (batch 1)."""
    engine.check_request(len(prompt_ids), params.max_new_tokens)  # before taking a slot
    slot = engine.alloc()

    def forward(ids: list[int]) -> torch.Tensor:
        if len(ids) == 1 and engine.length[slot]:
            return engine.decode([slot], torch.tensor(ids))[0]
        return engine.prefill(slot, torch.tensor(ids))

    try:
        return decode_loop(prompt_ids, params, forward, tokenizer, engine.max_context,
                           on_token=on_token, cancel=cancel)  # fmt: skip
    finally:
        engine.release(slot)

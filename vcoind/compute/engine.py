"""Inference engine: static KV cache slots, prefill/decode split, CUDA-graph decode,
prefix reuse.

``Engine`` runs a stack of Qwen2 decoder layers (a whole model, or one shard's span:
embeddings on the first, norm + LM head on the last) with its own forward pass over
transformers' modules (their weights, their norms and MLPs) instead of the model's
``forward``:

* **Static cache.** K/V tensors of shape ``[slots, kv_heads, max_context + 1, head_dim]``
  per layer, allocated once. A request owns a slot; its length is the next position.
  Position ``max_context`` is scratch: rows of a decode batch that are not taking part
  write there, and no real query ever attends to it.
* **Prefill** runs one slot's chunk of tokens (or hidden states) from any start
  position (a pipeline replays a prefix this way), eagerly; on CUDA a whole model's
  prompt of up to 512 tokens from position 0 replays a graph instead, padded to 32, 64,
  .. 512 tokens (captured by ``warm_up``), since its eager pass is bound by launching
  kernels.
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
  fp32 (transformers' own module). fp32 on CPU. The unfused step (``fused=False``, the
  CPU's default) runs transformers' own order of operations and calls SDPA as it does:
  with eager steps its logits are ``generate``'s to the bit, in fp32 and in fp16 (tested
  on the CPU). The fused step and the graphs' padded cache widths round differently in
  fp16, so greedy output parts from ``generate``'s where two tokens' logits all but tie.
* **Prefix reuse.** A slot's cache outlives its request: ``alloc(prompt)`` copies the
  K/V of a prompt's start from whichever slot holds it (``REUSE_MIN`` tokens at least;
  each slot's cached token ids are kept through prefill and decode).

``vcoind.compute.batcher`` serves many requests at once on an engine (continuous
batching); ``vcoind.compute.sampling`` holds the sampler and a request's stop conditions.

Free of the daemon (no trio, no network): only torch and transformers.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vcoind.compute.params import GenerationError, GenerationParams
from vcoind.compute.sampling import GenerationResult, decode_loop

if TYPE_CHECKING:
    from vcoind.compute.kernels import Kernels

log = logging.getLogger("vcoind.engine")

DEFAULT_MAX_CONTEXT = 4096
REUSE_MIN = 16  # prompt tokens found in some slot's cache worth copying from there
# Prompt lengths (padded up to these) whose prefill from position 0 replays a CUDA graph:
# short prompts, whose eager pass is bound by launching its kernels (about 14 ms on an
# H100 whatever the length, against a millisecond or two of GPU work).
PREFILL_GRAPH_TOKENS = (32, 64, 128, 256, 512)
STATIC_ROPE = ("default", "linear")  # rotary types whose angles depend on position alone
# SDPA backends: "auto" is torch's own choice; prefill on CUDA leaves cuDNN out (see
# ``sdpa_backends``); the decode step takes ``Engine(decode_attention=...)``.
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
# SDPA's own grouped-query attention (torch 2.5 on), as transformers calls it
_NATIVE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


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
        decode_attention: str = "auto",
    ) -> None:
        """``decode_attention``: the SDPA backend of the fused decode step's attention
        (one of ``SDPA_BACKENDS``; "auto": torch's choice, cuDNN's on recent CUDA builds),
        for benchmarks comparing them."""
        _check_supported(stack)
        if decode_attention not in SDPA_BACKENDS:
            raise ValueError(f"decode_attention must be one of {', '.join(SDPA_BACKENDS)}")
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
        # Fewer, larger kernels (what a CUDA-graph step is bound by): q/k/v and gate/up as
        # one matmul each, fused RMSNorm, one attention kernel per layer. Unfused (the CPU's
        # default) keeps transformers' exact order of operations and its SDPA calls: greedy
        # output token-identical to its generate, in fp32 and (eager steps) in fp16.
        self.fused = self.device.type == "cuda" if fused is None else fused
        # Prefill's attention shapes change with every prompt length and chunk; cuDNN's
        # SDPA builds an execution plan per new shape (tens of milliseconds), so the fused
        # prefill on CUDA takes flash / memory-efficient attention. A decode graph's shape
        # is fixed when it is captured: there torch's choice stands (or decode_attention).
        cuda_fused = self.device.type == "cuda" and self.fused
        self._prefill_sdpa = ("flash", "efficient", "math") if cuda_fused else ()
        self._decode_sdpa = (decode_attention,)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        # Decode steps padded to a (batch bucket, width bucket) shape: what a graph needs.
        self.static_shapes = self.cuda_graphs if static_shapes is None else static_shapes
        if self.cuda_graphs and not self.static_shapes:
            raise ValueError("CUDA graphs need static shapes")
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
            self._open = torch.zeros((), device=self.device, dtype=dtype)
            self._shut = torch.full((), float("-inf"), device=self.device, dtype=dtype)
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
        self._scope = [""] * slots  # whose request each slot was last allocated to
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self.lock = threading.RLock()  # one step at a time, from whichever thread
        self._graphs: dict[tuple[int, int], _Graph] = {}
        # prefill graphs by padded length (captured by warm_up only: see _prefill_padded)
        self._prefill_graphs: dict[int, _Graph] = {}
        self._prefill_buckets = [t for t in PREFILL_GRAPH_TOKENS if t <= self.max_context]
        if not (self.static_shapes and self.first and self.last and self._angles is not None):
            self._prefill_buckets = []  # spans, and rotary types computed per sequence
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

    def alloc(self, prompt: Sequence[int] = (), scope: str = "") -> int:
        """The lowest free slot. On an engine that takes token ids, where some slot's
        cache holds the start of ``prompt`` (at least ``REUSE_MIN`` tokens; a slot's
        cache outlives its request, and a running request's prompt is there too), those
        positions' K/V are copied into the new slot (a device copy instead of their
        prefill). The slot's ``length`` is how many of ``prompt``'s positions are in
        place, at most all but the last (whose logits a prefill must give): prefill goes
        on from there. Only slots last allocated in the same ``scope`` count: a requester
        cannot tell from a faster first token what another scope's prompts began with."""
        with self.lock:
            if not self._free:
                raise EngineError(f"all {self.n_slots} engine slots are busy")
            slot = heapq.heappop(self._free)
            self._place(slot, prompt, 0, scope)
            self._scope[slot] = scope
            return slot

    def reuse(self, slot: int, prompt: Sequence[int]) -> int:
        """``alloc``'s copy again, for a slot allocated for ``prompt`` whose prefill has
        not begun: where some slot's cache now holds more of the prompt's start (another
        request sharing it was prefilled since), those positions are copied in. Returns
        the slot's ``length``, the positions in place."""
        with self.lock:
            return self._place(slot, prompt, self.length[slot], self._scope[slot])

    def _place(self, slot: int, prompt: Sequence[int], held: int, scope: str) -> int:
        """Copy what some slot of ``scope`` holds of ``prompt``'s start past the ``held``
        positions ``slot`` has of it already; set the slot's ids and length."""
        src, have = self._cached(prompt, scope, slot)
        if have > held and src != slot:
            try:
                with torch.inference_mode():
                    for cache in (*self.k, *self.v):
                        cache[slot, :, held:have] = cache[src, :, held:have]
            except Exception as exc:  # out of memory, say: prefill it instead
                log.warning("copying a prompt's cached start failed (%s); prefilling it",
                            exc)  # fmt: skip
                have = held
            else:
                self._ids[slot] = list(prompt[:have])
        have = max(have, held)
        if have > held:
            log.debug("slot %d: %d of the prompt's %d tokens in place (from slot %d)",
                      slot, have, len(prompt), src)  # fmt: skip
        del self._ids[slot][have:]
        self.length[slot] = have
        return have

    def _cached(self, prompt: Sequence[int], scope: str, prefer: int = -1) -> tuple[int, int]:
        """The slot of ``scope`` whose cache holds the longest start of ``prompt``
        (``prefer`` on a tie: no copy where it is) and how many of its positions are
        usable: at most all but the last, 0 below ``REUSE_MIN``."""
        src, have = -1, 0
        if self.first and len(prompt) > REUSE_MIN:
            want = list(prompt)
            for s, ids in enumerate(self._ids):
                if self._scope[s] != scope:
                    continue
                n = common_prefix(ids, want)
                if n > have or (n == have and s == prefer):
                    src, have = s, n
            have = min(have, len(prompt) - 1)
        return (src, have) if have >= REUSE_MIN else (-1, 0)

    def release(self, slot: int) -> None:
        with self.lock:
            if slot not in self._free:
                heapq.heappush(self._free, slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def graph_counts(self) -> tuple[int, int]:
        """CUDA graphs held: decode steps, prefills."""
        return len(self._graphs), len(self._prefill_graphs)

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
            bucket = next((b for b in self._prefill_buckets if b >= t), 0) if start == 0 else 0
            # its graph's replay (CUDA); run eagerly on a CPU with static shapes (the tests)
            if bucket and (bucket in self._prefill_graphs or self.device.type != "cuda"):
                out = self._prefill_padded(slot, x, bucket)
            else:
                h = self._prefill_pass(
                    slice(slot, slot + 1), self._embed(x.to(self.device)[None]), start
                )
                out = self._out(h[:, -1])[0] if self.last else h[0]
            self.length[slot] = start + t
            if self.first:
                self._ids[slot].extend(x.tolist())
            return out

    def _prefill_padded(self, slot: int, x: torch.Tensor, bucket: int) -> torch.Tensor:
        """A whole-model prefill of prompt ``x`` from position 0, padded to ``bucket``
        tokens (one of ``PREFILL_GRAPH_TOKENS``): the graph's replay where warm_up
        captured it, else the same padded pass run eagerly. Causal attention keeps the
        padding out of the prompt's positions; the cache positions it writes past the
        prompt are the next decode steps' to overwrite, and no step reads them before
        (the mask)."""
        t = int(x.shape[0])
        host = torch.zeros(bucket + 2, dtype=torch.long)
        host[:t] = x
        host[bucket], host[bucket + 1] = slot, t - 1
        graph = self._prefill_graphs.get(bucket)
        if graph is None:
            return self._prefill_step(host.to(self.device), bucket)[0]
        graph.inp.copy_(host, non_blocking=True)
        graph.replay()
        return graph.out[0].clone()

    def _prefill_step(self, inp: torch.Tensor, bucket: int) -> torch.Tensor:
        """``inp`` ``[bucket + 2]``: the padded prompt, its slot, its last position.
        Returns that position's fp32 logits ``[1, V]``."""
        ids, slot, last = inp[:bucket], inp[bucket : bucket + 1], inp[bucket + 1 :]
        h = self._prefill_pass(slot, self._embed(ids[None]), 0)
        return self._out(h[0].index_select(0, last))

    @torch.inference_mode()
    def prefill_batch(
        self, slots: Sequence[int], prompts: Sequence[torch.Tensor], start: int = 0
    ) -> torch.Tensor:
        """Several slots' prompts (token ids) in one forward pass, each from position
        ``start`` (every slot holds that many positions already: 0, or a shared start
        copied in by ``alloc`` or ``reuse``), right-padded to the longest (causal
        attention keeps the padding out of every real position; decode overwrites it).
        Returns each prompt's last-position fp32 logits ``[N, V]``. Whole-model engines
        only."""
        if not (self.first and self.last):
            raise EngineError("a batched prefill needs an engine over the whole model")
        if len(slots) != len(prompts) or not prompts:
            raise EngineError("a batched prefill needs one prompt per slot")
        with self.lock:
            lengths = [int(p.shape[0]) for p in prompts]
            if min(lengths) == 0:
                raise EngineError("prefill needs tokens")
            if any(self.length[s] < start for s in slots):
                raise EngineError("prefill needs tokens, from a position the slot has reached")
            t, n = max(lengths), len(prompts)
            self.check_fits(start + t)
            ids = torch.zeros(n, t, dtype=torch.long)
            for row, (p, m) in enumerate(zip(prompts, lengths, strict=True)):
                ids[row, :m] = p
            index = torch.tensor(list(slots), device=self.device)
            for slot in slots:
                del self._ids[slot][start:]  # overwritten from here on, whatever happens
            h = self._prefill_pass(index, self._embed(ids.to(self.device)), start)
            for slot, p, m in zip(slots, prompts, lengths, strict=True):
                self.length[slot] = start + m
                self._ids[slot].extend(p.tolist())
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
                rot = self._rotation(cos, _signed_sin(sin))
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

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """One position for each slot, at its current length: ``x`` is token ids ``[B]``
        or hidden states ``[B, H]``. Returns fp32 logits ``[B, V]`` or hidden ``[B, H]``."""
        with self.lock:
            positions = [self.length[s] for s in slots]
            self.check_fits(max(positions) + 1)
            for s, at in zip(slots, positions, strict=True):
                del self._ids[s][at:]
            # the token ids on the host, once (the graph's input and the slots' cached ids)
            tokens = [int(t) for t in x.tolist()] if self.first else []
            if self.static_shapes:
                out = self._static_step(slots, positions, x, tokens)
            else:
                x = x.to(self.device)
                pos = torch.tensor(positions, device=self.device)
                # Slots 0..B-1 in order (a full batch) are read in place, others gathered.
                contiguous = list(slots) == list(range(len(slots)))
                rows = None if contiguous else torch.tensor(list(slots), device=self.device)
                masked = min(positions) != max(positions)
                out = self._decode_rows(x, pos, rows, max(positions) + 1, masked)
            for s in slots:
                self.length[s] += 1
            if self.first:
                for s, token in zip(slots, tokens, strict=True):
                    self._ids[s].append(token)
            return out

    # --- CUDA graphs ----------------------------------------------------------

    def _static_step(
        self, slots: Sequence[int], positions: list[int], x: torch.Tensor, tokens: list[int]
    ) -> torch.Tensor:
        """The step padded to slots ``0..B-1`` and the first ``W`` positions (B, W the
        smallest buckets that hold it): a graph's replay on CUDA, else run eagerly.
        ``tokens``: ``x`` on the host, on the first span."""
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
            for s, t in zip(slots, tokens, strict=True):
                ids[s] = t
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
            prefills = self._capture_prefills()
        log.info("%d decode graphs captured in %.1f s (%d slots x %d positions at most), "
                 "%d prefill graphs", len(self._graphs) - before, time.perf_counter() - t0,
                 top_b, top_w, prefills)  # fmt: skip
        return len(self._graphs)

    def _capture_prefills(self) -> int:
        """The prefill graphs, one per ``PREFILL_GRAPH_TOKENS`` length. Capturing runs the
        pass on a slot's cache: a free slot's, whose cached prompt is then forgotten (so
        only here, not on first use, where every slot may be serving). A refused capture
        leaves prefill eager. Returns how many the engine holds."""
        if not self._prefill_buckets or not self._free:
            return len(self._prefill_graphs)
        slot = self._free[0]
        self._ids[slot] = []
        for bucket in self._prefill_buckets:
            if bucket in self._prefill_graphs:
                continue
            inp = torch.zeros(bucket + 2, dtype=torch.long, device=self.device)
            inp[bucket] = slot
            try:
                replay, out = self._record(functools.partial(self._prefill_step, inp, bucket))
            except Exception as exc:
                log.warning("capturing the prefill graph for %d tokens failed (%s: %s); "
                            "prompts are prefilled eagerly", bucket, type(exc).__name__,
                            exc)  # fmt: skip
                self._prefill_buckets = [b for b in self._prefill_buckets if b < bucket]
                break
            self._prefill_graphs[bucket] = _Graph(replay, inp, inp[:bucket], out)
        return len(self._prefill_graphs)

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
            self._prefill_graphs.clear()
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


def _buckets(n: int, first: int = 1) -> list[int]:
    """Powers of two from ``first`` below ``n``, then ``n``."""
    out, b = [], first
    while b < n:
        out.append(b)
        b *= 2
    return [*out, n]


def common_prefix(a: list[int], b: list[int]) -> int:
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

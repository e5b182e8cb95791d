"""``Engine``: the slots, forward passes and CUDA graphs put together (its
``__init__`` decides the engine's shape: fused or not, graphs or not, kernels or
not) with its entry points, ``prefill``, ``prefill_batch`` and ``decode``; and
``generate_ids``, one request on an engine."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from vcoind.compute.engine.forward import SDPA_BACKENDS
from vcoind.compute.engine.fused import fuse, trusted_kernels
from vcoind.compute.engine.graphs import PREFILL_GRAPH_TOKENS, GraphSteps, buckets, decode_widths
from vcoind.compute.engine.stack import EngineError, Stack, check_supported
from vcoind.compute.params import GenerationParams
from vcoind.compute.sampling import GenerationResult, OnToken, decode_loop

DEFAULT_MAX_CONTEXT = 4096
STATIC_ROPE = ("default", "linear")  # rotary types whose angles depend on position alone


class Engine(GraphSteps):
    """The inference engine of the package docstring: its slots (``SlotCache``), forward
    passes (``ForwardPass``) and CUDA graphs (``GraphSteps``) over one set of caches."""

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
        check_supported(stack)
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
        self._fused = [fuse(layer) for layer in stack.layers] if self.fused else []
        # Triton kernels for what torch needs several kernels for (the rotary step with
        # both cache writes; SiLU * up): on by default for a fused CUDA engine whose
        # triton passes the kernels' self-check; True insists (the CPU tests, under
        # triton's interpreter).
        self.kernels = None
        if kernels and not self.fused:
            raise ValueError("the triton kernels are part of the fused step")
        wanted = kernels or (kernels is None and self.device.type == "cuda")
        if self.fused and not compile_decode and wanted:
            self.kernels = trusted_kernels(self.device, dtype, required=bool(kernels))
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
            self._angles = None
            if self.fused and getattr(stack.rotary, "rope_type", "default") in STATIC_ROPE:
                every = torch.arange(shape[2], device=self.device).unsqueeze(0)
                probe = torch.zeros(1, device=self.device, dtype=dtype)
                self._angles = torch.cat(stack.rotary(probe, every), dim=-1)[0].contiguous()
        self._batch_buckets = buckets(slots)
        self._widths = decode_widths(self.max_context)
        self.length = [0] * slots
        # Engines that take token ids: the ids whose K/V each slot's cache holds, position
        # by position (kept after a release, for a later prompt with the same start).
        self._ids = [[] for _ in range(slots)]
        self._scope = [""] * slots  # whose request each slot was last allocated to
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self.lock = threading.RLock()  # one step at a time, from whichever thread
        self._graphs = {}
        # prefill graphs by padded length (captured by warm_up only: see _prefill_padded)
        self._prefill_graphs = {}
        self._prefill_buckets = [t for t in PREFILL_GRAPH_TOKENS if t <= self.max_context]
        if not (self.static_shapes and self.first and self.last and self._angles is not None):
            self._prefill_buckets = []  # spans, and rotary types computed per sequence
        self._pool = None
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


def generate_ids(
    engine: Engine,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    tokenizer: Any,
    *,
    on_token: OnToken | None = None,
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

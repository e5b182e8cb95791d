"""CUDA graphs: a decode step captured once per (batch bucket, width bucket) and a
whole-model prefill per prompt length bucket, replayed with no Python or launch
overhead per layer; elsewhere (a CPU with ``static_shapes``) the same padded steps
run eagerly, which is how the graph path is tested without a GPU."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vcoind.compute.engine.forward import ForwardPass
from vcoind.progress import BOARD

log = logging.getLogger("vcoind.engine")

# Prompt lengths (padded up to these) whose prefill from position 0 replays a CUDA graph:
# short prompts, whose eager pass is bound by launching its kernels (about 14 ms on an
# H100 whatever the length, against a millisecond or two of GPU work).
PREFILL_GRAPH_TOKENS = (32, 64, 128, 256, 512)
MIN_WIDTH = 256  # the narrowest cache width a decode graph reads


@dataclass
class Graph:
    """A captured step: its replay, the input buffer it reads, what it writes."""

    replay: Callable[[], None]  # the captured torch.cuda.CUDAGraph's
    inp: torch.Tensor  # long [3B]: token ids, positions, the step's slots
    x: torch.Tensor  # the input rows: inp[:B] (ids), or hidden states [B, H]
    out: torch.Tensor


class GraphSteps(ForwardPass):
    """The CUDA-graph part of ``Engine`` (whose ``__init__`` sets what is declared
    here)."""

    cuda_graphs: bool
    static_shapes: bool  # decode steps padded to the buckets, as a graph needs
    _batch_buckets: list[int]
    _widths: list[int]
    _graphs: dict[tuple[int, int], Graph]  # decode graphs by (batch, width) bucket
    _prefill_graphs: dict[int, Graph]  # prefill graphs by padded length
    _prefill_buckets: list[int]  # the padded lengths whose prefill replays a graph
    _pool: Any  # the graphs' shared memory pool
    _decode_fn: Callable[..., torch.Tensor]  # _decode_rows, or its torch.compile

    @property
    def graph_counts(self) -> tuple[int, int]:
        """CUDA graphs held: decode steps, prefills."""
        return len(self._graphs), len(self._prefill_graphs)

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
    def warm_up(self, batch: int | None = None, positions: int | None = None,
                label: str = "") -> int:  # fmt: skip
        """Capture the decode graphs now (CUDA graphs only) rather than in the first step
        of each shape, which would stall the requests in it: every batch bucket up to
        ``batch`` slots and width up to ``positions`` (default: all). Returns how many
        graphs the engine holds. The captures show on the progress board (``label``:
        the model's name)."""
        if not self.cuda_graphs:
            return 0
        want_b = min(batch or self.n_slots, self.n_slots)
        want_w = min(positions or self.max_context, self.max_context)
        top_b = next(b for b in self._batch_buckets if b >= want_b)
        top_w = next(w for w in self._widths if w >= want_w)
        t0, before = time.perf_counter(), len(self._graphs)
        wanted = [(b, w) for b in self._batch_buckets for w in self._widths
                  if b <= top_b and w <= top_w and (b, w) not in self._graphs]  # fmt: skip
        prefills_left = sum(b not in self._prefill_graphs for b in self._prefill_buckets
                            if self._free)  # fmt: skip
        what = f"{label or 'decode'}: {top_b} slots x {top_w} positions on {self.device}"
        with self.lock, BOARD.step("graphs", what, total=len(wanted) + prefills_left,
                                   unit="graphs") as step:  # fmt: skip
            for b, w in wanted:
                if self._capture_or_none(b, w) is None:
                    step.end("failed: capture refused, running without CUDA graphs")
                    return 0
                step.advance()
            prefills = self._capture_prefills(step.advance)
        log.info("%d decode graphs captured in %.1f s (%d slots x %d positions at most), "
                 "%d prefill graphs", len(self._graphs) - before, time.perf_counter() - t0,
                 top_b, top_w, prefills)  # fmt: skip
        return len(self._graphs)

    def _capture_prefills(self, captured: Callable[[], None] = lambda: None) -> int:
        """The prefill graphs, one per ``PREFILL_GRAPH_TOKENS`` length. Capturing runs the
        pass on a slot's cache: a free slot's, whose cached prompt is then forgotten (so
        only here, not on first use, where every slot may be serving). A refused capture
        leaves prefill eager. Returns how many the engine holds; ``captured()`` after each."""
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
            self._prefill_graphs[bucket] = Graph(replay, inp, inp[:bucket], out)
            captured()
        return len(self._prefill_graphs)

    def _capture_or_none(self, bucket: int, width: int) -> Graph | None:
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

    def _capture(self, bucket: int, width: int) -> Graph:
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
        return Graph(replay, inp, x, out)

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


def buckets(n: int, first: int = 1) -> list[int]:
    """Powers of two from ``first`` below ``n``, then ``n``."""
    out, b = [], first
    while b < n:
        out.append(b)
        b *= 2
    return [*out, n]


def decode_widths(max_context: int) -> list[int]:
    """The cache widths a decode graph reads: 256, 512, .. then the whole context, each a
    multiple of 16 (aligned attention masks)."""
    return buckets(-(-max_context // 16) * 16, MIN_WIDTH)

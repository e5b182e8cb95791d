"""SDPA backends on this device for the engine's attention shapes (DeepSeek-R1-Distill-
Qwen-1.5B's heads: 12 query heads, 2 KV heads, head dim 128, fp16).

    python bench/attention.py --device cuda        # on a GPU box, about 30 s
    .venv/bin/python bench/attention.py --device cpu --quick

For each backend (torch's own choice, cuDNN, flash, memory-efficient, math) and each
shape, prints the first call's time on a shape that backend has not seen (what a new
prompt length costs: cuDNN builds an execution plan per shape) and the median of later
calls. Shapes:

* prefill, causal: one prompt of T tokens (``is_causal``, K/V repeated per query head,
  as ``Engine._prefill_pass`` runs it from position 0);
* prefill chunk: 512 tokens after E - 512 cached ones (a boolean mask, as a chunk or a
  prompt's remainder after a reused prefix runs);
* decode: B rows of one token, a KV head's 6 query heads side by side, over W cached
  positions with an additive mask (the fused decode step), timed inside a CUDA graph of
  20 calls where the device has graphs (as the engine replays it).

A backend that refuses a shape prints ``n/a``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from vcoind.compute.engine import SDPA_BACKENDS, sdpa_backends

HEADS, KV, D = 12, 2, 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(device: torch.device, fn: Callable[[], Any]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def prefill_case(device: torch.device, dtype: torch.dtype, t: int, end: int) -> Callable[[], Any]:
    q = torch.randn(1, HEADS, t, D, device=device, dtype=dtype)
    k = torch.randn(1, HEADS, end, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    if end == t:
        return lambda: sdpa(q, k, v, is_causal=True)
    start = end - t
    cols = torch.arange(end, device=device)
    mask = cols.unsqueeze(0) <= torch.arange(start, end, device=device).unsqueeze(1)
    return lambda: sdpa(q, k, v, attn_mask=mask)


def decode_case(device: torch.device, dtype: torch.dtype, b: int, w: int) -> Callable[[], Any]:
    q = torch.randn(b, KV, HEADS // KV, D, device=device, dtype=dtype)
    cache = torch.randn(b, KV, w + 16, D, device=device, dtype=dtype)
    k, v = cache[:, :, :w], torch.randn_like(cache)[:, :, :w]
    pos = torch.randint(w // 2, w, (b,), device=device)
    visible = torch.arange(w, device=device).unsqueeze(0) <= pos.unsqueeze(1)
    zero = torch.zeros((), device=device, dtype=dtype)
    shut = torch.full((), float("-inf"), device=device, dtype=dtype)
    bias = torch.where(visible, zero, shut).view(b, 1, 1, w)
    return lambda: sdpa(q, k, v, attn_mask=bias)


def graphed(device: torch.device, fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    """``n`` calls of ``fn`` as one CUDA graph replay (fn itself where no graphs)."""
    if device.type != "cuda":
        return lambda: [fn() for _ in range(n)]
    s = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return g.replay


def measure(
    device: torch.device,
    backend: str,
    make: Callable[[], Callable[[], Any]],
    graph: bool,
    reps: int,
) -> dict[str, float] | None:
    with sdpa_backends((backend,)):
        try:
            fn = make()
            first = wall(device, fn)
            if graph:
                n = 20
                step = graphed(device, fn, n)
            else:
                n, step = 1, fn
            step()
            times = [wall(device, step) / n for _ in range(reps)]
        except Exception:  # no kernel for this shape on this backend ("n/a")
            return None
    return {"first_ms": 1000 * first, "median_us": 1e6 * statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes (CPU)")
    p.add_argument("--json", help="write the figures here")
    ns = p.parse_args()
    device = torch.device(ns.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    reps = 3 if ns.quick else 10
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"SDPA on {where}, torch {torch.__version__}, {dtype}; first call ms on an unseen "
          f"shape / median us of later calls", flush=True)  # fmt: skip
    # (label, kind, size, width); each backend's first call gets a shape of its own
    # (16 positions more than the backend before it)
    cases: list[tuple[str, str, int, int]] = []
    for t in (128, 2048) if ns.quick else (128, 1024, 2048):
        cases.append((f"prefill causal T={t}", "prefill", t, t))
    for end in (1024,) if ns.quick else (1024, 2048, 4096):
        cases.append((f"prefill chunk 512 of E={end}", "chunk", 512, end))
    for b in (1, 64):
        for w in (512,) if ns.quick else (512, 4096):
            cases.append((f"decode B={b} W={w}", "decode", b, w))

    def make(kind: str, size: int, width: int, offset: int) -> Callable[[], Any]:
        if kind == "prefill":
            return prefill_case(device, dtype, size + offset, width + offset)
        if kind == "chunk":
            return prefill_case(device, dtype, size, width + offset)
        return decode_case(device, dtype, size, width + offset)

    out: dict[str, dict[str, Any]] = {}
    for label, kind, size, width in cases:
        row: dict[str, Any] = {}
        cells = []
        for i, backend in enumerate(SDPA_BACKENDS):
            got = measure(device, backend, functools.partial(make, kind, size, width, 16 * i),
                          kind == "decode", reps)  # fmt: skip
            row[backend] = got
            cells.append(f"{backend} " + ("n/a" if got is None else
                         f"{got['first_ms']:.1f}/{got['median_us']:.1f}"))  # fmt: skip
        out[label] = row
        print(f"{label:28s} " + "  ".join(cells), flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""The batched sampler (``vcoind.compute.engine.sample_rows``) on a [rows, vocabulary]
logits tensor: milliseconds per call for greedy, plain temperature, top-k, top-p and
both, as a decode step of that many rows pays it after the model's forward.

    .venv/bin/python bench/sampling.py                       # CPU, 64 x 151,936
    python bench/sampling.py --device cuda --rows 64         # on a GPU box

Logits are Gaussian with a scale (``--scale``) that gives a peaked, model-like
distribution; ``--scale 1`` gives a flat one, whose top-p nucleus is wider than the
sampler's first candidates (the slow path).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vcoind.compute.params import GenerationParams
from vcoind.compute.sampling import sample_rows

KINDS = {
    "greedy": GenerationParams(),
    "temperature 0.8": GenerationParams(temperature=0.8),
    "top-k 50": GenerationParams(temperature=0.8, top_k=50),
    "top-p 0.95": GenerationParams(temperature=0.8, top_p=0.95),
    "top-k 50, top-p 0.95": GenerationParams(temperature=0.8, top_k=50, top_p=0.95),
}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936, help="DeepSeek-R1-Distill-Qwen's")
    p.add_argument("--scale", type=float, default=6.0, help="logits' standard deviation")
    p.add_argument("--runs", type=int, default=5)
    ns = p.parse_args()
    dev = torch.device(ns.device)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(ns.rows, ns.vocab, generator=g) * ns.scale).to(dev)
    print(f"sample_rows on {ns.device}: {ns.rows} rows x {ns.vocab} tokens, scale {ns.scale}")
    for name, params in KINDS.items():
        rngs = [random.Random(i) for i in range(ns.rows)]
        every = [params] * ns.rows
        sample_rows(logits, every, rngs)  # warm-up
        times = []
        for _ in range(ns.runs):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            sample_rows(logits, every, rngs)  # ends in a copy to the host: synchronous
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"  {name:22s} {1000 * times[len(times) // 2]:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

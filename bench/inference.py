"""Single-request inference speed of the executor's generation loop vs HF ``generate``.

    .venv/bin/python bench/inference.py                        # the random test model, CPU
    python bench/inference.py --model /models/DeepSeek-R1-Distill-Qwen-1.5B --device cuda

Needs only torch + transformers (+ this tree): runs on a GPU box without the daemon's
network stack. Greedy decoding, batch 1. Reports decode tokens/s (median over the
prompts), prefill time, and whether the token streams match HF generate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vcoind.compute.generate import (
    GenerationParams,
    encode_prompt,
    generate,
    load_model,
    pick_device,
)
from vcoind.compute.testmodel import make_test_model

PROMPTS = [
    "Explain proof of stake",
    "What is a Merkle tree?",
    "Why must a hash function be collision resistant?",
    "Describe how a transformer splits across hosts",
    "Tokens per second measure",
]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help="model directory (default: make the test model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="passes over the prompts")
    ns = p.parse_args()
    tmp = None
    if ns.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="vcoin-bench-model-")
        ns.model = make_test_model(Path(tmp.name) / "tiny-qwen2")
    device, dtype = pick_device(ns.device)
    lm = load_model(ns.model, device, dtype)
    params = GenerationParams(max_new_tokens=ns.max_new_tokens)
    generate(lm, PROMPTS[0], GenerationParams(max_new_tokens=8))  # warm-up
    ours, prefill, hf, same = [], [], [], 0
    for _ in range(ns.runs):
        for prompt in PROMPTS:
            r = generate(lm, prompt, params)
            ours.append(r.tokens_per_s)
            prefill.append(r.prefill_s * 1000)
            ids = torch.tensor([encode_prompt(lm, prompt)], device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = lm.model.generate(
                ids,
                max_new_tokens=ns.max_new_tokens,
                do_sample=False,
                min_new_tokens=len(r.token_ids),
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            new = out[0, ids.shape[1] :].tolist()
            hf.append(len(new) / (time.perf_counter() - t0))
            same += new[: len(r.token_ids)] == list(r.token_ids)
    n = len(ours)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"model {ns.model.name}, device {name}, dtype {str(dtype).removeprefix('torch.')}, "
        f"greedy, batch 1, {ns.max_new_tokens} new tokens, {n} requests"
    )
    print(
        f"executor loop : {statistics.median(ours):8.1f} tokens/s (median), "
        f"prefill {statistics.median(prefill):.1f} ms"
    )
    print(f"HF generate   : {statistics.median(hf):8.1f} tokens/s (median, incl. prefill)")
    print(f"token streams identical to HF generate: {same}/{n}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

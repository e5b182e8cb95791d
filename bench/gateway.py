"""Streaming through the OpenAI gateway against the engine driven directly, in one run.

    .venv/bin/python bench/gateway.py [--tokens 200] [--runs 5] [--model-dir DIR] [--device auto]

First the engine alone (this process, the batcher the daemon's executor drives): time to
the first token and decode tokens/s. Then one real daemon serving the same model: a streamed
``POST /v1/completions`` (temperature 0), timing the first text chunk and the last one
as an HTTP client sees them. The differences are what the network path costs: the
task's submit, bid and assignment before the first token, and per token the worker's
text deltas (a Progress record per round trip) and the SSE relay. A node serves its own
task here (the origin is also the worker); a remote worker adds a loopback round trip.
Without ``--model-dir`` the random test model is made in a temporary directory.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devnet.__main__ import TEST_MODEL, ensure_test_model, start_node, stop_all
from devnet.chat import sse_chunks
from vcoind.datadir import DataDir

PROMPT = "Explain how a blockchain orders transactions, and why a hash function must be"


def direct(
    model_dir: Path, device: str, tokens: int, runs: int, threads: int
) -> list[dict[str, float]]:
    """TTFT and decode tokens/s of the engine in this process, through the batcher the
    daemon's executor uses (one warm-up run first)."""
    import torch

    from vcoind.compute.batcher import Batcher
    from vcoind.compute.generate import GenerationParams, encode_prompt, load_model, pick_device

    torch.set_num_threads(threads)
    dev, dtype = pick_device(device)
    lm = load_model(model_dir, dev, dtype)
    assert lm.engine is not None, "the model has no engine"
    batcher = Batcher(lm.engine, lm.tokenizer)
    ids = encode_prompt(lm, PROMPT)
    params = GenerationParams(max_new_tokens=tokens)
    out = []
    try:
        for i in range(runs + 1):
            stamps: list[float] = []
            t0 = time.perf_counter()
            r = batcher.submit(ids, params, on_token=functools.partial(_stamp, stamps)).result()
            if i and len(stamps) > 1:
                out.append({"ttft_s": stamps[0] - t0, "tokens": len(r.token_ids),
                            "tps": (len(stamps) - 1) / (stamps[-1] - stamps[0])})  # fmt: skip
    finally:
        batcher.close()
    return out


def _stamp(stamps: list[float], ids: object) -> None:
    stamps.append(time.perf_counter())


def through_gateway(url: str, cookie: str, model: str, tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = last = 0.0
    chunks = 0
    completion = 0
    for ch in sse_chunks(url + "/v1/completions", cookie, body, timeout=600):
        if ch.get("usage"):
            completion = int(ch["usage"]["completion_tokens"])
        if any(c.get("text") for c in ch.get("choices", [])):
            last = time.perf_counter()
            first = first or last
            chunks += 1
    return {"ttft_s": first - t0, "tokens": completion, "chunks": chunks,
            "tps": (completion - 1) / (last - first) if last > first else 0.0}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tokens", type=int, default=200, help="max_new_tokens per request")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--model-dir", type=Path, help="a model directory (default: the test model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    ns = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vcoin-bench-") as tmp:
        base = Path(tmp)
        if ns.model_dir is None:
            models, name = ensure_test_model(base / "models"), TEST_MODEL
        else:
            models, name = ns.model_dir.resolve().parent, ns.model_dir.name
        engine = direct(models / name, ns.device, ns.tokens, ns.runs, ns.threads)
        opts: dict[str, Any] = {"heartbeat": 1.0, "peer_timeout": 6.0, "network": "bench"}
        node = start_node(1, base, bootstrap=None, cpu_threads=ns.threads, **opts,
                          extra=["--models-dir", str(models), "--no-chain", "--device",
                                 ns.device])  # fmt: skip
        try:
            while not any(m["loaded"] for m in node.rpc.call("vcoin_models")["models"]):
                time.sleep(0.2)
            url = node.info["rpc_url"].rstrip("/")
            cookie = DataDir(node.datadir).read_cookie() or ""
            through_gateway(url, cookie, name, ns.tokens)  # warm-up
            gateway = [through_gateway(url, cookie, name, ns.tokens) for _ in range(ns.runs)]
        finally:
            problems = stop_all([node])

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    e_ttft, g_ttft = 1000 * med(engine, "ttft_s"), 1000 * med(gateway, "ttft_s")
    e_tps, g_tps = med(engine, "tps"), med(gateway, "tps")
    print(
        f"{name} on {ns.device}, {ns.tokens} new tokens, median of {ns.runs} runs "
        f"({med(gateway, 'tokens'):.0f} tokens, {med(gateway, 'chunks'):.0f} SSE chunks)"
    )
    print(f"engine direct : first token {e_ttft:8.1f} ms   {e_tps:8.1f} tokens/s")
    print(f"gateway (SSE) : first token {g_ttft:8.1f} ms   {g_tps:8.1f} tokens/s")
    per_token = 1000 * (1 / g_tps - 1 / e_tps) if g_tps and e_tps else float("nan")
    print(f"overhead      : {g_ttft - e_ttft:+.1f} ms at the first token, "
          f"{per_token:+.3f} ms per token")  # fmt: skip
    for pr in problems:
        print(f"bench: {pr}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

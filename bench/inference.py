"""Inference engine vs HF ``generate``: batch-1 speed, aggregate speed under many
concurrent requests, time to first token, peak memory, greedy parity.

    .venv/bin/python bench/inference.py --device cpu --shape test       # under a minute
    python bench/inference.py --device cuda --shape deepseek-1.5b        # on a GPU box
    python bench/inference.py --device cuda --model /models/DeepSeek-R1-Distill-Qwen-1.5B

``--shape deepseek-1.5b`` builds a random-weight model of the exact
DeepSeek-R1-Distill-Qwen-1.5B configuration on the device (no download); ``test`` the
small random test model. Needs only torch + transformers (+ this tree): it runs on a GPU
box without the daemon's network stack. In one run, same prompts:

* batch 1: decode tokens/s for ``--new-tokens`` after a ``--prompt-tokens`` prompt, and
  time to first token, for HF ``generate`` and the engine;
* aggregate tokens/s with ``--concurrent`` requests at once (HF: one padded-free batch;
  engine: the continuous batcher, requests submitted together), time to first token;
* peak GPU memory of each phase;
* each figure's ratio to HF, and batch-1 speed against the memory-bandwidth bound
  (measured copy bandwidth / bytes of weights read per token);
* a ``--join-tokens`` prompt joining ``--join-running`` decoding requests: their longest
  wait between two tokens, with the batcher's chunked prefill and with whole prompts;
* requests sharing a ``--shared-prefix``-token start: time to first token with the
  batcher's prefix reuse and without;
* greedy parity on ``--parity`` prompts: token-identical to HF ``generate``, the largest
  first-step logit difference; and (from a checkpoint directory) a 2-shard pipeline of
  span engines against the whole-model engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vcoind.compute.batcher import PREFILL_CHUNK, Batcher
from vcoind.compute.engine import (
    DEFAULT_MAX_CONTEXT,
    SDPA_BACKENDS,
    Engine,
    Stack,
    generate_ids,
)
from vcoind.compute.generate import GenerationParams, load_model, pick_device
from vcoind.compute.testmodel import make_test_model

DEEPSEEK_1_5B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


class IdTokenizer:
    """Token ids in, no text out: speed runs generate exactly the tokens asked for."""

    eos_token_id = None

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves (read + written)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _, dt = timed(device, lambda: [b.copy_(a) for _ in range(10)])
    return 2 * a.numel() * 4 * 10 / dt


def build(
    ns: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Path | None]:
    """The HF model, and its checkpoint directory where there is one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if ns.model is not None:
        return load_model(ns.model, device, dtype, engine=False).model, ns.model
    if ns.shape == "test":
        path = make_test_model(Path(tempfile.mkdtemp(prefix="vcoin-bench-")) / "tiny-qwen2")
        return load_model(path, device, dtype, engine=False).model, path
    torch.manual_seed(0)
    cfg = Qwen2Config(**DEEPSEEK_1_5B)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model: Any = Qwen2ForCausalLM(cfg)
        model = model.to(dtype)
    model.eval()
    return model, None


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def hf_generate(model: Any, ids: list[list[int]], new: int, device: torch.device) -> Any:
    x = torch.tensor(ids, device=device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, x.shape[1] :]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--shape", default="test", choices=("test", "deepseek-1.5b"))
    p.add_argument("--model", type=Path, help="a model directory instead of a random shape")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--runs", type=int, default=2, help="timed batch-1 runs of each")
    p.add_argument(
        "--join-tokens",
        type=int,
        default=2048,
        help="a prompt this long joins --join-running decoding requests: their longest wait "
        "between tokens, with chunked prefill (the daemon's default) and whole (0 skips)",
    )
    p.add_argument("--join-running", type=int, default=8)
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=1024,
        help="8 requests one after another, each this many shared tokens (a system prompt) "
        "and 32 of its own: time to first token with the batcher's prefix reuse and without "
        "(0 skips)",
    )
    p.add_argument("--parity", type=int, default=50, help="prompts for the parity check")
    p.add_argument("--parity-tokens", type=int, default=32)
    p.add_argument(
        "--no-fp32-reference",
        action="store_true",
        help="skip the fp32 yardstick of an fp16 parity check (HF generate with the same "
        "weights in fp32: how often HF's own fp16 run and the engine's each match it)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "float32"),
        help="the model's dtype (auto: fp16 on CUDA, fp32 on CPU; float16 on a CPU is a "
        "stand-in for the GPU's parity check)",
    )
    p.add_argument("--no-graphs", action="store_true", help="eager decode on CUDA too")
    p.add_argument(
        "--reference",
        action="store_true",
        help="the engine's unfused path with eager steps (no CUDA graphs, no triton kernels): "
        "transformers' own order of operations and SDPA calls, bit-exact with HF generate in "
        "fp16 on a CPU; slow, for the parity check",
    )
    p.add_argument("--compile", action="store_true", help="experimental: torch.compile decode")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "on", "off"),
        help="the engine's triton kernels (rotary + cache write, SiLU * up): auto = the "
        "daemon's default (on for CUDA where triton passes its check); on = the fused step "
        "with them on any device (a CPU runs them under triton's interpreter: slow, for "
        "parity only)",
    )
    p.add_argument(
        "--decode-attention",
        default="auto",
        choices=SDPA_BACKENDS,
        help="SDPA backend of the fused decode step's attention (auto: torch's choice, the "
        "daemon's); bench/attention.py times each on its own",
    )
    p.add_argument("--no-hf", action="store_true", help="engine figures only (no ratios)")
    p.add_argument(
        "--max-context",
        type=int,
        default=DEFAULT_MAX_CONTEXT,
        help="positions per engine slot (default: the daemon's compute.max_context, %(default)s)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="GPU kernels of one decode step (count and time by kernel), and the graph "
        "step's time at each cache width, batch 1 and full",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    ns = p.parse_args()
    device, dtype = pick_device(ns.device)
    if ns.dtype != "auto":
        dtype = getattr(torch, ns.dtype)
    if ns.kernels == "on" and device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model, path = build(ns, device, dtype)
    model.generation_config.eos_token_id = None
    cfg = model.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shape = ns.model.name if ns.model else ns.shape
    weights = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n
    )
    bandwidth = copy_bandwidth(device)
    bound = bandwidth / weights
    # the positions the runs below reach (the batch-1 runs with 8 to spare)
    longest = max(ns.prompt_tokens + ns.new_tokens, ns.join_tokens + 16, ns.shared_prefix + 64)
    ctx = max(ns.max_context, ns.prompt_tokens + ns.new_tokens + 8, longest)
    slots = max(ns.concurrent, 1)
    engine = Engine(
        Stack.of_model(model),
        slots=slots,
        max_context=ctx,
        device=device,
        dtype=dtype,
        compile_decode=ns.compile,
        decode_attention=ns.decode_attention,
        **engine_options(ns),
    )
    # every graph the runs below need, captured before any timing (as the daemon does at load)
    graphs, fig_warm = timed(device, lambda: engine.warm_up(slots, longest))
    tok = IdTokenizer()
    fig: dict[str, Any] = {
        "device": name,
        "shape": shape,
        "dtype": str(dtype),
        "weights_gib": weights / 2**30,
        "copy_gbps": bandwidth / 1e9,
        "bound_tps": bound,
        "cuda_graphs": engine.cuda_graphs,
        "fused": engine.fused,
        "kernels": engine.kernels is not None,
        "decode_attention": ns.decode_attention,
        "graphs": graphs,
        "prefill_graphs": engine.graph_counts[1],
        "graph_capture_s": fig_warm,
    }
    print(
        f"{shape} on {name}, {str(dtype).removeprefix('torch.')}, weights read per token "
        f"{weights / 2**30:.2f} GiB, copy bandwidth {bandwidth / 1e9:.0f} GB/s -> "
        f"bound {bound:.0f} tokens/s at batch 1; engine slots {slots} x {engine.max_context} "
        f"positions, {'fused' if engine.fused else 'unfused (reference)'} step, CUDA graphs "
        f"{'on' if engine.cuda_graphs else 'off'}, triton kernels "
        f"{'on' if engine.kernels is not None else 'off'}, decode attention "
        f"{ns.decode_attention}"
        + (
            f" ({graphs} decode and {engine.graph_counts[1]} prefill graphs captured in "
            f"{fig_warm:.1f} s)"
            if engine.cuda_graphs
            else ""
        ),
        flush=True,
    )

    one = prompts(ns.runs, ns.prompt_tokens, cfg.vocab_size, 1)
    params = GenerationParams(max_new_tokens=ns.new_tokens)

    if ns.profile:
        profile_step(engine, device, ns.prompt_tokens + ns.new_tokens // 2, fig)

    # --- batch 1 -------------------------------------------------------------
    nan = float("nan")
    hf_tps, hf_ttft = [nan], [nan]
    with torch.inference_mode():
        if not ns.no_hf:
            hf_generate(model, one[:1], 4, device)  # warm-up
            hf_tps, hf_ttft = [], []
        peak_reset(device)
        for ids in one if not ns.no_hf else []:
            _, dt = timed(
                device, functools.partial(hf_generate, model, [ids], ns.new_tokens, device)
            )
            hf_tps.append(ns.new_tokens / dt)
            _, t1 = timed(device, functools.partial(hf_generate, model, [ids], 1, device))
            hf_ttft.append(t1)
        fig["hf_peak_gib"] = peak_gib(device)
    generate_ids(engine, one[0], GenerationParams(max_new_tokens=8), tok)  # warm-up, capture
    peak_reset(device)
    en_tps, en_ttft = [], []
    for ids in one:
        r, dt = timed(device, functools.partial(generate_ids, engine, ids, params, tok))
        en_tps.append(len(r.token_ids) / dt)
        en_ttft.append(r.prefill_s)
    fig["engine_peak_gib"] = peak_gib(device)
    fig.update(
        hf_tps=statistics.median(hf_tps),
        hf_ttft_ms=1000 * statistics.median(hf_ttft),
        engine_tps=statistics.median(en_tps),
        engine_ttft_ms=1000 * statistics.median(en_ttft),
    )
    print(
        f"batch 1 ({ns.prompt_tokens}-token prompt, {ns.new_tokens} new, incl. prefill): "
        f"HF {fig['hf_tps']:.1f} tok/s, engine {fig['engine_tps']:.1f} tok/s "
        f"({fig['engine_tps'] / fig['hf_tps']:.1f}x HF, "
        f"{100 * fig['engine_tps'] / bound:.0f}% of bound); TTFT HF "
        f"{fig['hf_ttft_ms']:.1f} ms, engine {fig['engine_ttft_ms']:.1f} ms",
        flush=True,
    )

    # --- concurrent ------------------------------------------------------------
    if ns.concurrent > 1:
        many = prompts(ns.concurrent, ns.prompt_tokens, cfg.vocab_size, 2)
        peak_reset(device)
        fig["hf_batch_tps"] = nan
        if not ns.no_hf:
            with torch.inference_mode():
                _, dt = timed(device, lambda: hf_generate(model, many, ns.new_tokens, device))
            fig["hf_batch_tps"] = ns.concurrent * ns.new_tokens / dt
        fig["hf_batch_peak_gib"] = peak_gib(device)
        batcher = Batcher(engine, tok)
        # warm-up prompts of their own: the timed prompts' K/V must not be in the slots'
        # caches already (prefix reuse would skip their prefill)
        warm_up = prompts(ns.concurrent, ns.prompt_tokens, cfg.vocab_size, 3)
        warm = [batcher.submit(ids, GenerationParams(max_new_tokens=4)) for ids in warm_up]
        [f.result() for f in warm]
        peak_reset(device)
        reused = batcher.reused_tokens
        tps, ttft = serve(batcher, many, [params] * len(many))
        fig.update(
            engine_batch_reused_tokens=batcher.reused_tokens - reused,
            engine_batch_peak_prefill=batcher.peak_prefill,
            engine_batch_tps=tps,
            engine_batch_peak_gib=peak_gib(device),
            engine_batch_ttft_p50_ms=1000 * ttft[len(ttft) // 2],
            engine_batch_ttft_p95_ms=1000 * ttft[int(len(ttft) * 0.95) - 1],
            peak_batch=batcher.peak_batch,
        )
        print(
            f"{ns.concurrent} concurrent: HF batched {fig['hf_batch_tps']:.0f} tok/s, engine "
            f"{fig['engine_batch_tps']:.0f} tok/s "
            f"({fig['engine_batch_tps'] / fig['hf_batch_tps']:.1f}x "
            f"HF batched, {fig['engine_batch_tps'] / fig['hf_tps']:.0f}x HF batch 1); "
            f"engine TTFT p50 {fig['engine_batch_ttft_p50_ms']:.0f} ms, p95 "
            f"{fig['engine_batch_ttft_p95_ms']:.0f} ms, peak batch {batcher.peak_batch}, "
            f"prompts per prefill pass {batcher.peak_prefill}",
            flush=True,
        )
        # The same requests sampled, each with its own seed (what most users send).
        sampled = [dataclasses.replace(params, temperature=0.8, top_p=0.95, top_k=50, seed=i)
                   for i in range(len(many))]  # fmt: skip
        fresh = prompts(ns.concurrent, ns.prompt_tokens, cfg.vocab_size, 8)
        fig["engine_batch_sampled_tps"], _ = serve(batcher, fresh, sampled)
        batcher.close()
        print(f"{ns.concurrent} concurrent, sampled (temperature 0.8, top-p 0.95, top-k 50): "
              f"engine {fig['engine_batch_sampled_tps']:.0f} tok/s", flush=True)  # fmt: skip
    if ns.join_tokens and ns.join_running:
        join(ns, engine, tok, cfg.vocab_size, fig)
    if ns.shared_prefix:
        shared(ns, engine, tok, cfg.vocab_size, fig)
    for key in ("hf_peak_gib", "engine_peak_gib", "hf_batch_peak_gib", "engine_batch_peak_gib"):
        if fig.get(key) is not None:
            print(f"  peak memory {key.removesuffix('_peak_gib')}: {fig[key]:.2f} GiB")

    # --- parity ------------------------------------------------------------------
    if ns.parity and not ns.no_hf:
        parity(ns, model, engine, path, device, dtype, fig)
    if ns.json:
        ns.json.write_text(json.dumps(fig, indent=2) + "\n")
    return 0


def join(ns: argparse.Namespace, engine: Engine, tok: Any, vocab: int, fig: dict[str, Any]) -> None:
    """A ``--join-tokens`` prompt joins ``--join-running`` decoding requests, with the
    batcher's chunked prefill (the daemon's default chunk) and with whole prompts: the
    running requests' longest wait between two tokens, their median, and the joiner's
    time to first token."""
    if engine.n_slots <= ns.join_running:
        print(f"join skipped: {engine.n_slots} engine slots (--concurrent) for "
              f"{ns.join_running} running requests and the joiner")  # fmt: skip
        return
    running = prompts(ns.join_running, ns.prompt_tokens, vocab, 4)
    joiner = prompts(1, ns.join_tokens, vocab, 5)[0]
    for chunk in (PREFILL_CHUNK, 0):
        key = f"join_chunk{chunk}"
        batcher = Batcher(engine, tok, prefill_chunk=chunk, reuse_prefix=False)  # both runs
        fig[key] = joined(batcher, running, joiner)  # prefill the same prompts
        how = f"chunks of {chunk}" if chunk else "whole"
        print(
            f"a {ns.join_tokens}-token prompt joins {len(running)} decoding requests, "
            f"prefilled {how}: their longest wait between tokens "
            f"{fig[key]['longest_gap_ms']:.1f} ms (median {fig[key]['median_gap_ms']:.1f}); "
            f"its first token after {fig[key]['joiner_ttft_ms']:.1f} ms",
            flush=True,
        )


def joined(batcher: Batcher, running: list[list[int]], joiner: list[int]) -> dict[str, Any]:
    """``joiner`` submitted once every ``running`` request has 8 tokens (then closes
    ``batcher``): see ``join``."""
    stamps: list[list[float]] = [[] for _ in running]
    going = threading.Event()  # all of them decoding
    first: list[float] = []

    def mark(i: int, ids: Sequence[int]) -> None:  # on the batcher's thread: must not block
        stamps[i].append(time.perf_counter())
        if len(ids) == 8 and all(len(ts) >= 8 for ts in stamps):
            going.set()

    params = GenerationParams(max_new_tokens=64 + len(joiner) // 16)
    futures = [batcher.submit(ids, params, on_token=functools.partial(mark, i))
               for i, ids in enumerate(running)]  # fmt: skip
    if not going.wait(300):
        raise RuntimeError(f"the running requests did not reach 8 tokens: {futures}")
    t_join = time.perf_counter()
    late = batcher.submit(joiner, GenerationParams(max_new_tokens=4),
                          on_token=lambda ids: first.append(time.perf_counter()))  # fmt: skip
    late.result()
    [f.result() for f in futures]
    batcher.close()
    # every wait that ended after the joiner came (the first may span its whole prefill)
    gaps = [b - a for ts in stamps for a, b in itertools.pairwise(ts) if b > t_join]
    return {
        "longest_gap_ms": 1000 * max(gaps),
        "median_gap_ms": 1000 * statistics.median(gaps),
        "joiner_ttft_ms": 1000 * (first[0] - t_join),
        "chunks": batcher.prefill_chunks,
    }


def shared(
    ns: argparse.Namespace, engine: Engine, tok: Any, vocab: int, fig: dict[str, Any]
) -> None:
    """8 requests one after another, each a ``--shared-prefix``-token system prompt and 32
    tokens of its own, 16 new tokens: median time to first token with the batcher's
    prefix reuse (the daemon's default) and without; then 8 such requests at once whose
    shared start no slot holds yet (the batcher prefills it once and copies it)."""
    system = prompts(1, ns.shared_prefix, vocab, 6)[0]
    warm, *own = prompts(9, 32, vocab, 7)
    for reuse in (True, False):
        batcher = Batcher(engine, tok, reuse_prefix=reuse)
        batcher.submit(system + warm, GenerationParams(max_new_tokens=2)).result()
        ttft = [batcher.submit(system + ids, GenerationParams(max_new_tokens=16)).result().prefill_s
                for ids in own]  # fmt: skip
        batcher.close()
        key = "shared_prefix_reuse" if reuse else "shared_prefix_whole"
        fig[key] = {"ttft_ms": 1000 * statistics.median(ttft), "reused": batcher.reused_tokens}
        how = "reused" if reuse else "prefilled every time"
        print(f"a {ns.shared_prefix}-token shared prefix + 32 own tokens, {how}: time to first "
              f"token {fig[key]['ttft_ms']:.1f} ms (median of 8)", flush=True)  # fmt: skip
    # The same, as a burst: 8 at once, sharing a start no slot holds yet.
    fresh = prompts(1, ns.shared_prefix, vocab, 9)[0]
    few = GenerationParams(max_new_tokens=16)
    for reuse in (True, False):
        batcher = Batcher(engine, tok, reuse_prefix=reuse)
        batcher.submit(warm, GenerationParams(max_new_tokens=2)).result()
        _, ttft = serve(batcher, [fresh + ids for ids in own], [few] * len(own))
        batcher.close()
        key = "shared_burst_reuse" if reuse else "shared_burst_whole"
        fig[key] = {"ttft_p50_ms": 1000 * ttft[len(ttft) // 2], "ttft_max_ms": 1000 * ttft[-1],
                    "reused": batcher.reused_tokens}  # fmt: skip
        how = "prefilled once, then copied" if reuse else "prefilled by each"
        print(f"the same 8 at once, their shared prefix new ({how}): time to first token p50 "
              f"{fig[key]['ttft_p50_ms']:.1f} ms, last {fig[key]['ttft_max_ms']:.1f} ms",
              flush=True)  # fmt: skip


def engine_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The Engine arguments for ``--kernels``, ``--no-graphs`` and ``--reference``."""
    graphs: dict[str, Any] = {"cuda_graphs": False} if ns.no_graphs or ns.reference else {}
    if ns.reference:
        if ns.kernels == "on":
            raise SystemExit("--reference runs without the triton kernels (--kernels on)")
        return {**graphs, "fused": False, "kernels": False}
    if ns.kernels == "auto":
        return graphs
    if ns.kernels == "off":
        return {**graphs, "kernels": False}
    return {**graphs, "kernels": True, "fused": True}


def serve(
    batcher: Batcher, many: list[list[int]], params: list[GenerationParams]
) -> tuple[float, list[float]]:
    """All requests at once (queued before the batcher admits any): aggregate tokens/s
    and the sorted times to first token."""
    first: list[float] = []
    lock = threading.Lock()

    def on_token(ids: Sequence[int]) -> None:
        if len(ids) == 1:
            with lock:
                first.append(time.perf_counter())

    t0 = time.perf_counter()
    pairs = zip(many, params, strict=True)
    with batcher._cv:  # its thread admits nothing until all are queued
        futures = [batcher.submit(ids, p, on_token=on_token) for ids, p in pairs]
    results = [f.result() for f in futures]
    dt = time.perf_counter() - t0
    return sum(len(r.token_ids) for r in results) / dt, sorted(t - t0 for t in first)


def profile_step(engine: Engine, device: torch.device, at: int, fig: dict[str, Any]) -> None:
    """What a decode step costs on the GPU: the kernels of one eager batch-1 step at
    position ``at`` (what its graph replays), by count and time; then the graph replay's
    own time at each cache width, batch 1 and every slot."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        print("decode step: the profile needs a CUDA device")
        return
    width = next(w for w in engine._widths if w > at)
    x = torch.zeros(1, dtype=torch.long, device=device)
    pos = torch.full((1,), at, dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(2):
            engine._decode_fn(x, pos, None, width)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_fn(x, pos, None, width)
            sync(device)
    kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    layers = len(engine.stack.layers)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:70], []).append(e.time_range.elapsed_us())
    busy = sum(sum(v) for v in by_name.values())
    print(
        f"decode step at position {at} (width {width}): {len(kernels)} GPU kernels "
        f"({len(kernels) / layers:.1f} per layer), {busy:.0f} us of kernel time"
    )
    for n, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]:
        print(f"  {len(ts):5d} x {sum(ts) / len(ts):7.1f} us = {sum(ts):8.0f} us  {n}")
    fig["profile"] = {
        "kernels": len(kernels),
        "kernel_us": busy,
        "by_kernel": {n: [len(ts), sum(ts)] for n, ts in by_name.items()},
    }
    if not engine.cuda_graphs:
        return
    steps: dict[str, float] = {}
    for rows in sorted({1, engine.n_slots}):
        for w in engine._widths:
            slots, positions = list(range(rows)), [w - 1] * rows
            ids = torch.zeros(rows, dtype=torch.long, device=device)
            with torch.inference_mode(), engine.lock:
                step = functools.partial(engine._static_step, slots, positions, ids, [0] * rows)
                step()  # captures
                _, dt = timed(device, lambda: [step() for _ in range(50)])  # noqa: B023
            steps[f"{rows}x{w}"] = 1e6 * dt / 50
    fig["graph_step_us"] = steps
    print(
        "graph step, us (rows x cache width): "
        + ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
    )


def parity(
    ns: argparse.Namespace,
    model: Any,
    engine: Engine,
    path: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    fig: dict[str, Any],
) -> None:
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    lengths = torch.randint(4, 64, (ns.parity,), generator=g).tolist()
    cases = [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]
    params = GenerationParams(max_new_tokens=ns.parity_tokens)
    tok = IdTokenizer()
    same, max_diff, ours, gaps = 0, 0.0, [], []
    # The yardstick for fp16: the same weights in fp32. Where HF's own fp16 run parts
    # from it as often as the engine does, the partings are fp16 rounding at near-ties.
    ref32 = None
    if dtype != torch.float32 and not ns.no_fp32_reference:
        import copy

        ref32 = copy.deepcopy(model).float()
    hf_32 = engine_32 = 0
    with torch.inference_mode():
        for ids in cases:
            r = generate_ids(engine, ids, params, tok)
            ours.append(r.token_ids)
            ref = hf_generate(model, [ids], ns.parity_tokens, device)[0].tolist()
            same += ref == list(r.token_ids)
            if ref32 is not None:
                want = hf_generate(ref32, [ids], ns.parity_tokens, device)[0].tolist()
                hf_32 += ref == want
                engine_32 += list(r.token_ids) == want
            if ref != list(r.token_ids):
                # How close a call was it? HF's logit margin between the two picks.
                j = next(
                    i for i, (a, b) in enumerate(zip(ref, r.token_ids, strict=False)) if a != b
                )
                logits = model(torch.tensor([ids + ref[:j]], device=device)).logits[0, -1]
                gaps.append(float(logits[ref[j]] - logits[r.token_ids[j]]))
            slot = engine.alloc()
            try:
                mine = engine.prefill(slot, torch.tensor(ids))
            finally:
                engine.release(slot)
            # generate's own first logits (its LM head runs on the last position alone: a
            # forward over every position rounds them differently)
            first = model.generate(torch.tensor([ids], device=device), max_new_tokens=1,
                                   do_sample=False, pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)  # fmt: skip
            theirs = first.logits[0][0].float()
            max_diff = max(max_diff, float((mine - theirs).abs().max()))
    fig.update(
        parity_same=same,
        parity_n=len(cases),
        parity_max_logit_diff=max_diff,
        parity_divergence_gaps=gaps,
    )
    print(
        f"greedy parity vs HF generate: {same}/{len(cases)} token-identical "
        f"({ns.parity_tokens} tokens each); max first-step logit diff {max_diff:.2e}"
    )
    if ref32 is not None:
        del ref32
        fig.update(parity_fp32_hf=hf_32, parity_fp32_engine=engine_32)
        print(
            f"  against HF generate in fp32 (same weights): HF {str(dtype).removeprefix('torch.')} "
            f"token-identical on {hf_32}/{len(cases)}, the engine on {engine_32}/{len(cases)}"
        )
    if gaps:
        print(
            f"  where they part, HF's own logits rank the two picks {max(gaps):.2e} apart "
            f"at most (median {statistics.median(gaps):.2e}): near-ties"
        )
    if path is None:
        return
    from vcoind.compute.shards import even_ranges, load_shard, split_model

    n_layers = model.config.num_hidden_layers
    out = Path(tempfile.mkdtemp(prefix="vcoin-bench-shards-"))
    dirs = split_model(path, out, even_ranges(n_layers, 2), name="bench", model_id="bench")
    spans = [
        Engine(
            Stack.of_shard(load_shard(d, device, dtype)),
            slots=1,
            max_context=engine.max_context,
            device=device,
            dtype=dtype,
            **engine_options(ns),
        )
        for d in dirs
    ]
    agree = 0
    with torch.inference_mode():
        for ids, want in zip(cases, ours, strict=True):
            slots = [e.alloc() for e in spans]
            x: Any = torch.tensor(ids)
            got: list[int] = []
            try:
                for step in range(ns.parity_tokens):
                    h = x
                    for e, s in zip(spans, slots, strict=True):
                        h = e.prefill(s, h) if step == 0 else e.decode([s], h)
                    logits = h if h.dim() == 1 else h[-1]
                    got.append(int(torch.argmax(logits)))
                    x = torch.tensor([got[-1]])
            finally:
                for e, s in zip(spans, slots, strict=True):
                    e.release(s)
            agree += tuple(got) == tuple(want)
    fig.update(shard_parity_same=agree)
    print(f"2-shard span engines vs whole-model engine: {agree}/{len(cases)} token-identical")


if __name__ == "__main__":
    sys.exit(main())

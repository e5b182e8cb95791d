"""Model store, generation and the executor, on the random Qwen2 test model (CPU, fp32)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio
from safetensors import safe_open

from vcoind.compute.executor import Executor, ExecutorConfig
from vcoind.compute.generate import (
    GenerationError,
    GenerationParams,
    encode_prompt,
    generate,
    load_model,
)
from vcoind.compute.models import ID_CACHE, ModelError, ModelStore, compute_model_id
from vcoind.compute.testmodel import TinyModelSpec, make_test_model
from vcoind.progress import BOARD

PROMPTS = [
    "Explain proof of stake",
    "What is a Merkle tree?",
    "The quick brown fox",
    "Tokens per second measure",
    "A decentralised network of GPU hosts",
    "Why must a hash function be collision resistant?",
    "peers that vanish",
    "Rewards are minted to nodes",
    "Hello",
    "Layers of a transformer can be split across hosts; hidden states travel",
]


@pytest.fixture(scope="module")
def lm(models_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(models_dir / "tiny-qwen2", torch.device("cpu"), torch.float32)


def test_store_scans_and_resolves(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    (models_dir / "broken").mkdir(exist_ok=True)  # no config: skipped, not fatal
    infos = store.scan()
    assert [m.name for m in infos] == ["tiny-qwen2"]
    info = infos[0]
    assert info.architecture == "Qwen2ForCausalLM"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (4, 64, 1024)
    assert info.tied_embeddings is False
    assert info.model_id.startswith("sha256:") and len(info.model_id) == 71
    assert store.resolve("tiny-qwen2") == info
    assert store.resolve(info.model_id) == info
    with pytest.raises(ModelError, match="unknown model 'nope' \\(this node serves: tiny-qwen2\\)"):
        store.resolve("nope")


def test_model_id_follows_the_weights(models_dir: Path, tmp_path: Path) -> None:
    original = compute_model_id(models_dir / "tiny-qwen2")
    copy = tmp_path / "copy"
    shutil.copytree(models_dir / "tiny-qwen2", copy)
    (copy / ID_CACHE).unlink()
    assert compute_model_id(copy) == original  # same bytes, same id, computed afresh
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in one weight
    weights.write_bytes(bytes(data))
    assert compute_model_id(copy) != original  # the cache notices the changed file


def test_greedy_matches_hf_generate(lm) -> None:  # type: ignore[no-untyped-def]
    for prompt in PROMPTS:
        ours = generate(lm, prompt, GenerationParams(max_new_tokens=24))
        ids = torch.tensor([encode_prompt(lm, prompt)])
        ref = lm.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        eos = lm.tokenizer.eos_token_id
        ref_tokens = [int(t) for t in ref if int(t) != eos]
        assert list(ours.token_ids) == ref_tokens[: len(ours.token_ids)], prompt
        assert ours.prompt_tokens == ids.shape[1]


def test_output_is_not_degenerate(lm) -> None:  # type: ignore[no-untyped-def]
    outs = {generate(lm, p, GenerationParams(max_new_tokens=32)).text for p in PROMPTS[:4]}
    assert len(outs) == 4  # different prompts, different answers
    r = generate(lm, PROMPTS[0], GenerationParams(max_new_tokens=32))
    assert len(set(r.token_ids)) >= 8 and r.text.strip()


def test_sampling_is_deterministic_per_seed(lm) -> None:  # type: ignore[no-untyped-def]
    p = GenerationParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    a = generate(lm, PROMPTS[1], p)
    b = generate(lm, PROMPTS[1], p)
    assert a.token_ids == b.token_ids
    others = {
        generate(lm, PROMPTS[1], GenerationParams(24, 0.9, 0.9, 40, seed=s)).token_ids
        for s in range(8, 12)
    }
    assert len(others | {a.token_ids}) > 1


def test_stop_strings_truncate(lm) -> None:  # type: ignore[no-untyped-def]
    full = generate(lm, PROMPTS[0], GenerationParams(max_new_tokens=32))
    stop = full.text[5:8]
    cut = generate(lm, PROMPTS[0], GenerationParams(max_new_tokens=32, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -5}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple("abcdefghij")}, "stop"),
    ],
)
def test_bad_parameters(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(GenerationError, match=problem):
        GenerationParams(**kwargs)  # type: ignore[arg-type]


def test_prompt_longer_than_context(lm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        generate(lm, "word " * 5000, GenerationParams(max_new_tokens=8))


async def test_executor_progress_and_warm_models(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    store.scan()
    ex = Executor(store, ExecutorConfig(device="cpu"))
    seen: list[int] = []
    r = await ex.generate(
        "tiny-qwen2", PROMPTS[0], GenerationParams(max_new_tokens=16), on_progress=seen.append
    )
    assert seen and seen[-1] == len(r.token_ids)  # throttled, but always the final count
    assert seen == sorted(seen) and seen[0] >= 1
    assert [m.name for m in ex.loaded()] == ["tiny-qwen2"]
    slot_model = ex._loaded[store.resolve("tiny-qwen2").model_id].lm.model
    await ex.generate("tiny-qwen2", PROMPTS[1], GenerationParams(max_new_tokens=4))
    assert ex._loaded[store.resolve("tiny-qwen2").model_id].lm.model is slot_model  # kept warm
    assert ex.tokens_per_s[store.resolve("tiny-qwen2").model_id] > 0
    with pytest.raises(ModelError, match="unknown model"):
        await ex.generate("missing", "x", GenerationParams())


async def test_executor_load_shows_its_tensors_on_the_progress_board(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    store.scan()
    ex = Executor(store, ExecutorConfig(device="cpu"))
    before = {s["id"] for s in BOARD.snapshot()}
    await ex.load("tiny-qwen2")
    (step,) = [s for s in BOARD.snapshot() if s["kind"] == "load" and s["id"] not in before]
    with safe_open(str(models_dir / "tiny-qwen2" / "model.safetensors"), "pt") as f:
        tensors = len(list(f.keys()))
    assert step["label"] == "tiny-qwen2 on cpu" and step["unit"] == "tensors"
    assert step["outcome"] == "done" and step["total"] == step["done"] == tensors > 0
    await ex.load("tiny-qwen2")  # warm: nothing to load, no step
    assert [s for s in BOARD.snapshot() if s["kind"] == "load" and s["id"] not in before] == [step]


async def test_executor_cancel_stops_between_tokens(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    store.scan()
    ex = Executor(store, ExecutorConfig(device="cpu"))
    await ex.load("tiny-qwen2")
    seen: list[int] = []
    got_three = trio.Event()

    def progress(n: int) -> None:
        seen.append(n)
        if n >= 3:
            got_three.set()

    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await ex.generate(
                "tiny-qwen2",
                PROMPTS[0],
                GenerationParams(max_new_tokens=4000),
                on_progress=progress,
            )

        nursery.start_soon(run)
        await got_three.wait()
        nursery.cancel_scope.cancel()
    # the worker thread stops at its next token and frees the device
    with trio.fail_after(10):
        r = await ex.generate("tiny-qwen2", PROMPTS[1], GenerationParams(max_new_tokens=2))
    assert len(r.token_ids) <= 2
    assert max(seen) < 4000
    assert ex.running == 0


async def test_executor_evicts_least_recently_used(models_dir: Path, tmp_path: Path) -> None:
    make_test_model(tmp_path / "other-qwen2", TinyModelSpec(seed=1))
    shutil.copytree(models_dir / "tiny-qwen2", tmp_path / "tiny-qwen2")
    store = ModelStore(tmp_path)
    store.scan()
    size = store.resolve("tiny-qwen2").weight_bytes
    ex = Executor(store, ExecutorConfig(device="cpu", memory_budget_mb=1))
    ex.budget_bytes = int(size * 1.5)  # room for one model, not two
    await ex.load("tiny-qwen2")
    await ex.load("other-qwen2")
    assert [m.name for m in ex.loaded()] == ["other-qwen2"]
    ex.budget_bytes = size // 2
    with pytest.raises(ModelError, match="more than the memory budget"):
        await ex.load("tiny-qwen2")


GPU_BOX_CHECK = """
import runpy, sys
ABSENT = {"libp2p", "multiaddr", "trio", "web3", "eth_account", "eth_tester", "eth_utils",
          "hypercorn", "starlette", "msgpack", "httpx", "peft", "sentence_transformers",
          "prometheus_client", "triton"}
for name in ABSENT:  # as if not installed: imports fail, importlib.util.find_spec is None
    sys.modules[name] = None
import vcoind.compute.batcher, vcoind.compute.engine, vcoind.compute.generate
import vcoind.compute.kernels, vcoind.compute.sampling
import vcoind.compute.shards, vcoind.compute.telemetry, vcoind.compute.testmodel
assert vcoind.compute.kernels.load() is None  # no triton: the engine runs torch's ops
figures = sys.argv[1]
runs = [[s, "--help"] for s in ("bench/inference.py", "bench/sampling.py", "bench/train.py",
                                 "bench/attention.py")]
runs.append(["bench/attention.py", "--device", "cpu", "--quick", "--json", sys.argv[2]])
runs.append(["bench/inference.py", "--device", "cpu", "--shape", "test", "--runs", "1",
             "--new-tokens", "16", "--concurrent", "4", "--parity", "3", "--parity-tokens",
             "8", "--join-tokens", "1100", "--join-running", "2", "--shared-prefix", "100",
             "--max-context", "1200", "--json", figures])
for argv in runs:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
print("imports:", sorted(m for m, mod in sys.modules.items()
                         if m.split(".")[0] in ABSENT and mod is not None))
"""


def test_compute_and_benches_run_without_the_daemons_network_stack(tmp_path: Path) -> None:
    """The GPU box has torch, transformers, safetensors, pynvml and psutil, none of the
    daemon's network, chain or training stack (and maybe no triton): ``vcoind.compute``
    and the benchmarks import there, the engine's kernels stand down, and the inference
    benchmark runs end to end (here on the CPU, with the test model, cut short)."""
    root = Path(__file__).resolve().parent.parent
    figures, attention = tmp_path / "engine.json", tmp_path / "attention.json"
    done = subprocess.run([sys.executable, "-c", GPU_BOX_CHECK, str(figures), str(attention)],
                          cwd=root, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imports: []" in done.stdout
    fig = json.loads(figures.read_text())
    assert fig["engine_tps"] > 0 and fig["engine_batch_tps"] > 0 and fig["peak_batch"] == 4
    # the concurrent run's prompts were not in the cache (the warm-up had its own)
    assert fig["engine_batch_reused_tokens"] == 0 and fig["engine_batch_peak_prefill"] == 4
    assert (fig["parity_same"], fig["parity_n"]) == (3, 3)  # fp32 on a CPU: identical
    # the 1,100-token prompt joined the decoding requests in 3 chunks, or whole
    assert fig["join_chunk512"]["chunks"] == 3 and fig["join_chunk0"]["chunks"] == 0
    # 8 requests after a warm-up, each finding the 100-token shared start in place
    assert fig["shared_prefix_reuse"]["reused"] == 8 * 100
    assert fig["shared_prefix_whole"]["reused"] == 0
    # SDPA backends by shape: torch's choice and math run on a CPU, cuDNN does not
    att = json.loads(attention.read_text())
    assert set(att) >= {"prefill causal T=128", "prefill chunk 512 of E=1024", "decode B=64 W=512"}
    for row in att.values():
        assert row["auto"]["median_us"] > 0 and row["math"]["median_us"] > 0
        assert row["cudnn"] is None

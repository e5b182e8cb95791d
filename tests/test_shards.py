"""Layer shards: split, verify, load, and chained shards reproduce the whole model.

Real checkpoints: the random Qwen2 test model, and a tied-embedding variant saved as a
multi-file checkpoint. Parity is against the node's own single-model generation loop.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vcoind.compute.frames import FrameError, TensorFrame
from vcoind.compute.generate import GenerationParams, encode_prompt, generate, load_model
from vcoind.compute.models import ModelStore, inspect_model
from vcoind.compute.shards import (
    MANIFEST,
    WEIGHTS,
    Shard,
    ShardError,
    ShardManifest,
    even_ranges,
    load_shard,
    parse_ranges,
    split_model,
)
from vcoind.compute.testmodel import CORPUS

CPU = torch.device("cpu")
PROMPTS = [line[: 12 + (i * 7) % 50] for i, line in enumerate(CORPUS.splitlines() * 4)][:50]


def keys(d: Path) -> set[str]:
    with safe_open(str(d / WEIGHTS), framework="pt") as sf:
        return set(sf.keys())


def pipeline_generate(shards: Sequence[Shard], ids: list[int], n: int) -> list[int]:
    """Greedy generation through the chained shards, each with its own KV cache."""
    caches = [s.new_cache() for s in shards]
    x, out = torch.tensor([ids]), []
    for _ in range(n):
        for s, c in zip(shards, caches, strict=True):
            x = s(x, c)
        out.append(int(x[0, -1].argmax()))
        x = torch.tensor([[out[-1]]])
    return out


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Path:
    return models_dir / "tiny-qwen2"


def test_split_writes_only_each_shards_tensors(tiny: Path, tmp_path: Path) -> None:
    info = inspect_model(tiny)
    dirs = split_model(tiny, tmp_path, [(0, 0), (1, 2), (3, 3)], name="tiny-qwen2",
                       model_id=info.model_id)  # fmt: skip
    assert [d.name for d in dirs] == ["tiny-qwen2.0-0", "tiny-qwen2.1-2", "tiny-qwen2.3-3"]
    first, mid, last = (keys(d) for d in dirs)

    def layer(i: int) -> set[str]:
        return {k for k in first | mid | last if k.startswith(f"model.layers.{i}.")}

    assert first == {"model.embed_tokens.weight"} | layer(0)
    assert mid == layer(1) | layer(2) and layer(1) and layer(2)
    assert last == {"model.norm.weight", "lm_head.weight"} | layer(3)
    m = ShardManifest.read(dirs[1])
    assert (m.start, m.end, m.num_layers, m.embed, m.head) == (1, 2, 4, False, False)
    assert m.model_id == info.model_id and set(m.tensors) == mid
    assert (dirs[1] / "tokenizer.json").is_file() and (dirs[1] / "config.json").is_file()
    # The model store does not mistake shards for models.
    store = ModelStore(tmp_path)
    assert store.scan() == []


def test_chained_shards_match_the_whole_model_on_50_prompts(tiny: Path, tmp_path: Path) -> None:
    lm = load_model(tiny, CPU, torch.float32)
    for n in (2, 3):
        dirs = split_model(tiny, tmp_path / str(n), even_ranges(4, n), name="t",
                           model_id="sha256:" + "0" * 64)  # fmt: skip
        shards = [load_shard(d) for d in dirs]
        identical, worst = 0, 0.0
        for prompt in PROMPTS:
            ids = encode_prompt(lm, prompt)
            ref = generate(lm, prompt, GenerationParams(max_new_tokens=16))
            got = pipeline_generate(shards, ids, len(ref.token_ids))
            identical += tuple(got) == ref.token_ids
            x = torch.tensor([ids])
            caches = [s.new_cache() for s in shards]
            for s, c in zip(shards, caches, strict=True):
                x = s(x, c)
            with torch.no_grad():
                full = lm.model(torch.tensor([ids])).logits
            worst = max(worst, float((full - x).abs().max()))
        print(f"{n} shards: {identical}/50 token-identical, max logit diff {worst:.2e}")
        assert identical == len(PROMPTS)
        assert worst < 1e-4


def test_tied_multi_file_checkpoint_splits_and_matches(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(str(tiny))
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    src = tmp_path / "tied"
    model.save_pretrained(str(src), max_shard_size="40KB")
    for f in tiny.glob("tokenizer*"):
        shutil.copy2(f, src / f.name)
    assert len(list(src.glob("*.safetensors"))) > 2  # really a multi-file checkpoint
    dirs = split_model(src, tmp_path / "shards", even_ranges(4, 2), name="tied",
                       model_id=inspect_model(src).model_id)  # fmt: skip
    assert "lm_head.weight" in keys(dirs[1]) and "model.embed_tokens.weight" not in keys(dirs[1])
    shards = [load_shard(d) for d in dirs]
    assert torch.equal(shards[1].lm_head.weight, shards[0].embed_tokens.weight)  # type: ignore[union-attr]
    lm = load_model(src, CPU, torch.float32)
    for prompt in PROMPTS[:5]:
        ref = generate(lm, prompt, GenerationParams(max_new_tokens=12))
        assert tuple(pipeline_generate(shards, encode_prompt(lm, prompt), 12)) == ref.token_ids


def test_corrupted_or_foreign_shards_are_refused(tiny: Path, tmp_path: Path) -> None:
    dirs = split_model(tiny, tmp_path, even_ranges(4, 2), name="t", model_id="sha256:" + "1" * 64)
    d = dirs[0]
    data = bytearray((d / WEIGHTS).read_bytes())
    good = bytes(data)
    data[-5] ^= 0xFF  # a flipped bit in the last tensor's bytes
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="does not match its hash"):
        load_shard(d)
    (d / WEIGHTS).write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ShardError, match="cannot read"):
        load_shard(d)
    (d / WEIGHTS).write_bytes(good)
    load_shard(d)  # intact again
    # The other shard's weights under this manifest: different tensors.
    shutil.copy2(dirs[1] / WEIGHTS, d / WEIGHTS)
    with pytest.raises(ShardError, match="differ from the manifest"):
        load_shard(d)
    m = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**m, "end": 9}))
    with pytest.raises(ShardError, match="outside"):
        load_shard(d)
    with pytest.raises(ShardError, match="not a shard"):
        load_shard(tiny)


def test_range_specs() -> None:
    assert even_ranges(28, 2) == [(0, 13), (14, 27)]
    assert even_ranges(28, 3) == [(0, 9), (10, 18), (19, 27)]
    assert parse_ranges("0-13, 14-27", 28) == [(0, 13), (14, 27)]
    for bad, why in (("0-13,15-27", "contiguous"), ("0-13", "cover 0-13"), ("1-27", "contiguous"),
                     ("0-x", "bad layer range"), ("0-27,28-30", "cover")):  # fmt: skip
        with pytest.raises(ShardError, match=why):
            parse_ranges(bad, 28)
    with pytest.raises(ShardError, match="cannot split"):
        even_ranges(4, 5)


def test_split_cli(tiny: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny, models / "tiny-qwen2")
    vcoind = [sys.executable, "-m", "vcoind", "model"]
    out = subprocess.run([*vcoind, "split", "tiny-qwen2", "--shards", "2", "--models-dir",
                          str(models)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tiny-qwen2.0-1" in out.stdout and "tiny-qwen2.2-3" in out.stdout
    assert ShardManifest.read(models / "tiny-qwen2.2-3").head
    listed = subprocess.run([*vcoind, "list", "--models-dir", str(models), "--json"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert [m["name"] for m in json.loads(listed.stdout)] == ["tiny-qwen2"]
    bad = subprocess.run([*vcoind, "split", "tiny-qwen2", "--ranges", "0-1,3-3",
                          "--models-dir", str(models)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "contiguous" in bad.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_frames_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    f = TensorFrame.from_tensor(t)
    assert f.dtype == str(dtype).removeprefix("torch.") and f.shape == (2, 3, 5)
    assert torch.equal(f.to_tensor(), t)
    empty = TensorFrame.from_tensor(torch.empty(0, 4, dtype=dtype))
    assert empty.to_tensor().shape == (0, 4)


@pytest.mark.parametrize(
    "frame, why",
    [
        (TensorFrame("float64", (1,), b"\0" * 8), "unknown dtype"),
        (TensorFrame("float32", (2, 2), b"\0" * 15), "needs 16 bytes"),
        (TensorFrame("float32", (), b""), "1 to 4 dimensions"),
        (TensorFrame("float32", (1, 1, 1, 1, 1), b"\0" * 4), "1 to 4 dimensions"),
        (TensorFrame("float32", (-1, 4), b""), "bad shape"),
        (TensorFrame("float16", (1 << 24, 1 << 10), b""), "exceeds the limit"),
    ],
)
def test_malformed_tensor_frames_are_refused(frame: TensorFrame, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        frame.to_tensor()

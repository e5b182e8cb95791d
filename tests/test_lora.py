"""The LoRA trainer, FedAvg, adapter bytes and merging, on the real tiny Qwen2 model."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save as st_save

from vcoind.compute.generate import load_model
from vcoind.compute.testmodel import CORPUS, TinyModelSpec, make_test_model
from vcoind.progress import BOARD
from vcoind.train.lora import (
    AdapterError,
    LoraTrainer,
    adapter_from_bytes,
    adapter_id,
    adapter_to_bytes,
    export_peft_dir,
    fedavg,
    merge_lora,
)
from vcoind.train.spec import LoraSettings, TrainError, sha256_hex, split_contiguous

# peft 0.21 reads a property that transformers 5 deprecates when it wraps a model.
PEFT_WARNING = "ignore:`is_gradient_checkpointing`:FutureWarning"
LINES = [ln for ln in CORPUS.splitlines() if ln]
TEXTS = [{"text": ln} for ln in LINES[:4]] * 4  # 16 short repeated texts
BASE = LoraSettings(r=4, alpha=8, dropout=0.0, learning_rate=1e-2, batch_size=4, seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(
        tmp_path_factory.mktemp("lora") / "tiny-qwen2", TinyModelSpec(num_layers=2)
    )


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_training_reduces_loss(model_dir: Path) -> None:
    settings = replace(BASE, dropout=0.05, epochs=5)  # 4 steps per epoch
    trainer = LoraTrainer(model_dir, settings)
    seen: list[tuple[int, float]] = []
    before = {s["id"] for s in BOARD.snapshot()}
    samples, losses = trainer.train(TEXTS, 0, 100, on_step=lambda s, x: seen.append((s, x)),
                                    label="t1 shard 0 round 0")  # fmt: skip
    assert samples == 16 * 5 and len(losses) == 20  # clipped at the schedule's end
    assert seen == list(enumerate(losses))
    (step,) = [s for s in BOARD.snapshot() if s["id"] not in before]  # on the board
    assert (step["kind"], step["label"], step["unit"], step["outcome"]) == (
        "train", "t1 shard 0 round 0: steps 0..19", "steps", "done")  # fmt: skip
    assert step["done"] == step["total"] == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, losses
    assert trainer.train(TEXTS, 20, 5) == (0, [])  # past the end: nothing to do


def test_same_init_and_steps_everywhere_without_touching_global_rng(model_dir: Path) -> None:
    settings = replace(BASE, dropout=0.1, epochs=2)
    rng = torch.get_rng_state()
    a, b = LoraTrainer(model_dir, settings), LoraTrainer(model_dir, settings)
    other = LoraTrainer(model_dir, replace(settings, seed=8))
    assert max_diff(a.adapter_state(), b.adapter_state()) == 0
    assert max_diff(a.adapter_state(), other.adapter_state()) > 0.01
    a.train(TEXTS, 0, 3)
    b.train(TEXTS, 0, 3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert max_diff(a.adapter_state(), b.adapter_state()) == 0  # dropout drawn per (seed, step)
    meta = a.meta
    assert meta == {"format": "vcoin-lora/1", "r": "4", "alpha": "8",
                    "target_modules": "q_proj,v_proj", "base_model": "tiny-qwen2"}  # fmt: skip


def test_resume_on_another_trainer_is_exact(model_dir: Path) -> None:
    settings = replace(BASE, optimizer="sgd", learning_rate=0.5, epochs=3)  # 12 steps
    a = LoraTrainer(model_dir, settings)
    assert a.train(TEXTS, 0, 10)[0] == 40
    b = LoraTrainer(model_dir, settings)
    assert b.train(TEXTS, 0, 5)[0] == 20
    c = LoraTrainer(model_dir, settings)
    c.set_adapter_state(b.adapter_state())
    assert c.train(TEXTS, 5, 5)[0] == 20
    assert max_diff(c.adapter_state(), a.adapter_state()) < 1e-6
    assert max_diff(b.adapter_state(), a.adapter_state()) > 1e-3  # the steps mattered


def test_cancel_and_bad_state(model_dir: Path) -> None:
    trainer = LoraTrainer(model_dir, BASE)
    before = trainer.adapter_state()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TrainError, match="cancelled"):
        trainer.train(TEXTS, 0, 2, cancel=cancel)
    assert max_diff(trainer.adapter_state(), before) == 0
    state = trainer.adapter_state()
    key = sorted(state)[0]
    with pytest.raises(AdapterError):
        trainer.set_adapter_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterError):
        trainer.set_adapter_state({**state, key: torch.zeros(2, 2)})
    with pytest.raises(TrainError):
        LoraTrainer(model_dir, replace(BASE, target_modules=("no_such_proj",)))


def test_batches_mask_prompts_and_pads(model_dir: Path) -> None:
    trainer = LoraTrainer(model_dir, replace(BASE, max_length=8))
    tok, eos = trainer.tokenizer, trainer.tokenizer.eos_token_id
    prompt, completion = tok("A node")["input_ids"], tok(" runs", add_special_tokens=False)
    batch = trainer._batch([{"prompt": "A node", "completion": " runs"}, {"text": LINES[0]}])
    n = len(prompt) + len(completion["input_ids"]) + 1
    assert n < 8
    assert batch["input_ids"].shape == (2, 8)  # the long text is truncated to max_length
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + [
        *completion["input_ids"], eos] + [-100] * (8 - n)  # fmt: skip
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (8 - n)
    assert batch["input_ids"][0, n:].tolist() == [trainer.pad] * (8 - n)
    assert batch["labels"][1].tolist() == batch["input_ids"][1].tolist()
    assert batch["attention_mask"][1].tolist() == [1] * 8


def test_fedavg_of_sgd_shards_equals_full_batch(model_dir: Path) -> None:
    """Plain SGD, equal shards, one local step per round: the average is the full-batch step."""
    data = [{"text": ln} for ln in LINES[:8]]
    settings = replace(BASE, optimizer="sgd", learning_rate=1.0, max_length=12, epochs=3)
    tok = LoraTrainer(model_dir, settings).tokenizer
    assert all(len(tok(e["text"])["input_ids"]) >= 12 for e in data)  # all exactly 12 tokens
    single = LoraTrainer(model_dir, replace(settings, batch_size=8))
    assert single.train(data, 0, 3)[0] == 24
    accum = LoraTrainer(model_dir, replace(settings, grad_accum=2))  # 2 micro-batches of 4
    assert accum.train(data, 0, 3)[0] == 24
    assert max_diff(accum.adapter_state(), single.adapter_state()) < 1e-5

    nodes = [LoraTrainer(model_dir, settings) for _ in range(2)]
    shards = split_contiguous(data, 2)
    avg = nodes[0].adapter_state()
    init = dict(avg)
    for step in range(3):
        results = []
        for node, shard in zip(nodes, shards, strict=True):
            node.set_adapter_state(avg)
            samples, _ = node.train(shard, step, 1)
            results.append((node.adapter_state(), float(samples)))
        avg = fedavg(results)
    assert max_diff(avg, single.adapter_state()) < 1e-5
    assert max_diff(avg, init) > 1e-2
    assert max_diff(results[0][0], single.adapter_state()) > 1e-3  # one shard alone is not it
    assert all(v.dtype == torch.float32 for v in avg.values())


def test_fedavg_weights_and_checks() -> None:
    a = {"x.lora_A.weight": torch.ones(2, 3)}
    b = {"x.lora_A.weight": torch.full((2, 3), 4.0, dtype=torch.float64)}
    out = fedavg([(a, 1.0), (b, 2.0)])
    assert out["x.lora_A.weight"].dtype == torch.float32
    assert torch.allclose(out["x.lora_A.weight"], torch.full((2, 3), 3.0))
    assert torch.equal(
        fedavg([(a, 0.0), (b, 5.0)])["x.lora_A.weight"], b["x.lora_A.weight"].float()
    )
    for bad in ([], [(a, 0.0), (b, 0.0)], [(a, 1.0), (b, -1.0)], [(a, 1.0), ({}, 1.0)],
                [(a, 1.0), ({"x.lora_A.weight": torch.ones(3, 2)}, 1.0)]):  # fmt: skip
        with pytest.raises(AdapterError):
            fedavg(bad)


def test_adapter_bytes(model_dir: Path) -> None:
    trainer = LoraTrainer(model_dir, replace(BASE, r=2))
    trainer.train(TEXTS, 0, 2)
    state, meta = trainer.adapter_state(), trainer.meta
    data = adapter_to_bytes(state, meta)
    got, got_meta = adapter_from_bytes(data)
    assert got_meta == meta and max_diff(got, state) == 0
    reordered = adapter_to_bytes(dict(reversed(state.items())), dict(reversed(meta.items())))
    assert reordered == data and adapter_to_bytes(got, got_meta) == data
    assert adapter_id(data) == sha256_hex(data) == adapter_id(reordered)
    assert len(adapter_id(data)) == 64

    key = sorted(k for k in state if k.endswith("lora_B.weight"))[0]
    nan = {**state, key: state[key].clone()}
    nan[key][0, 0] = float("nan")
    int_state = {k: v.to(torch.int32) for k, v in state.items()}
    corrupt = {
        "header byte": data[:8] + b"[" + data[9:],
        "length prefix": b"\xff" + data[1:],
        "truncated": data[:-10],
        "tiny": data[:5],
        "empty": b"",
        "format": adapter_to_bytes(state, {**meta, "format": "other/1"}),
        "no metadata": st_save(state),
        "nan": adapter_to_bytes(nan, meta),
        "missing B": adapter_to_bytes({k: v for k, v in state.items() if k != key}, meta),
        "stray key": adapter_to_bytes({**state, "model.embed.weight": torch.ones(2, 2)}, meta),
        "r": adapter_to_bytes(state, {**meta, "r": "3"}),
        "dtype": st_save(int_state, metadata=dict(meta)),
    }
    for what, bad in corrupt.items():
        with pytest.raises(AdapterError):
            adapter_from_bytes(bad)
            pytest.fail(f"accepted: {what}")
    with pytest.raises(AdapterError, match="limit"):
        adapter_from_bytes(data, max_bytes=len(data) - 1)


@pytest.mark.filterwarnings(PEFT_WARNING)
def test_merge_matches_peft(model_dir: Path, tmp_path: Path) -> None:
    trainer = LoraTrainer(
        model_dir, replace(BASE, target_modules=("q_proj", "v_proj", "down_proj"))
    )
    trainer.train(TEXTS, 0, 4)
    state, meta = trainer.adapter_state(), trainer.meta
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)
    export_peft_dir(state, meta, tmp_path / "adapter")

    ids = torch.tensor([trainer.tokenizer(LINES[5])["input_ids"]])
    cpu, fp32 = torch.device("cpu"), torch.float32
    peft_model = PeftModel.from_pretrained(load_model(model_dir, cpu, fp32, engine=False).model,
                                           str(tmp_path / "adapter")).eval()  # fmt: skip
    merged = load_model(model_dir, cpu, fp32, engine=False).model
    with torch.no_grad():
        base_logits = merged(input_ids=ids).logits
        assert merge_lora(merged, state, meta) == 2 * 3  # 2 layers, 3 target modules
        merged_logits = merged(input_ids=ids).logits
        peft_logits = peft_model(input_ids=ids).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
    assert float((merged_logits - base_logits).abs().max()) > 1e-2

    other = dict(state)
    for k in [k for k in state if ".layers.1." in k]:
        other[k.replace(".layers.1.", ".layers.9.")] = other.pop(k)
    with pytest.raises(AdapterError, match="no module"):
        merge_lora(merged, other, meta)

"""Training datasets, shards, settings and the step schedule (no torch, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vcoind.train.adapters import BlobCache
from vcoind.train.run import TrainingRun
from vcoind.train.spec import (
    LoraSettings,
    TrainError,
    canonical_jsonl,
    load_examples,
    parse_jsonl,
    rounds,
    sha256_hex,
    split_contiguous,
    step_batches,
    steps_per_epoch,
    total_steps,
)


def test_jsonl_text_and_prompt_completion_and_clear_errors(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"prompt": "q", "completion": "r", "extra": 1}\n')
    assert load_examples(f) == [{"text": "a"}, {"prompt": "q", "completion": "r"}]
    for body, problem in [
        ('{"text": "a"}\nnot json\n', "line 2: not JSON"),
        ('{"prompt": "q"}\n', 'line 1: needs "text", or "prompt" and "completion"'),
        ("[1, 2]\n", "line 1: an example must be an object"),
        ('{"text": "   "}\n', "line 1: empty"),
        ("\n\n", "no examples"),
    ]:
        f.write_text(body)
        with pytest.raises(TrainError, match=problem):
            load_examples(f)
    f.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(TrainError, match="not UTF-8"):
        load_examples(f)
    with pytest.raises(TrainError, match="cannot read dataset"):
        load_examples(tmp_path / "missing.jsonl")


def test_a_datasets_directory_loads(tmp_path: Path) -> None:
    import datasets

    rows = [{"text": f"line {i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(tmp_path / "ds") == rows


def test_contiguous_shards_and_canonical_bytes() -> None:
    ex = [{"text": str(i)} for i in range(10)]
    shards = split_contiguous(ex, 3)
    assert [len(s) for s in shards] == [4, 3, 3]
    assert [e for s in shards for e in s] == ex  # contiguous, in order, nothing lost
    with pytest.raises(TrainError, match="cannot split 2"):
        split_contiguous(ex[:2], 3)
    data = canonical_jsonl([{"prompt": "p", "completion": "c"}])
    assert data == b'{"completion":"c","prompt":"p"}\n'
    assert parse_jsonl(data) == [{"prompt": "p", "completion": "c"}]


def test_step_schedule_covers_each_epoch_once_and_is_reproducible() -> None:
    s = LoraSettings(batch_size=3, grad_accum=2, epochs=2, seed=7)
    n = 10  # 4 micro-batches an epoch -> 2 optimizer steps
    assert steps_per_epoch(n, s) == 2 and total_steps(n, s) == 4
    for epoch in range(2):
        seen = [i for step in (2 * epoch, 2 * epoch + 1) for b in step_batches(n, s, step)
                for i in b]  # fmt: skip
        assert sorted(seen) == list(range(n))
    again = LoraSettings.from_dict(s.as_dict())  # a node rebuilding them from the wire
    schedule = [step_batches(n, s, k) for k in range(4)]
    assert [step_batches(n, again, k) for k in range(4)] == schedule
    assert step_batches(n, s, 0) != step_batches(n, s, 2)  # reshuffled each epoch
    with pytest.raises(TrainError, match="outside"):
        step_batches(n, s, 4)
    assert rounds([12, 11, 12], 5) == 3


def test_settings_are_validated() -> None:
    assert LoraSettings.from_dict({"target_modules": "q_proj,k_proj"}).target_modules == (
        "q_proj", "k_proj")  # fmt: skip
    for bad, problem in [
        ({"r": 0}, "r must be"), ({"learning_rate": 2.0}, "learning_rate must be"),
        ({"optimizer": "lion"}, "optimizer must be"), ({"bogus": 1}, "unknown training"),
        ({"target_modules": ["q proj"]}, "target_modules"), ({"epochs": True}, "epochs"),
    ]:  # fmt: skip
        with pytest.raises(TrainError, match=problem):
            LoraSettings.from_dict(bad)
    assert json.loads(json.dumps(LoraSettings().as_dict()))["r"] == 8


def _run(peers: list[str], resume: dict[str, Any] | None = None) -> TrainingRun:
    examples = [{"text": f"line {i}"} for i in range(48)]
    settings = LoraSettings.from_dict({"epochs": 3, "batch_size": 2, "sync_every": 1})

    async def nothing(*_: Any) -> Any:
        raise AssertionError("no request is made before run()")

    return TrainingRun("t1", "m", "id", settings, examples, peers, [], nothing, BlobCache(),
                       nothing, resume=resume)  # fmt: skip


def test_a_resumed_run_keeps_the_earlier_split_whoever_bids() -> None:
    """An origin restarted mid-training goes on with the shards (and so the rounds) of
    its earlier run, even when fewer or other nodes bid this time."""
    first = _run(["a", "b"])
    assert [s.owner for s in first.shards] == ["a", "b"] and first.rounds == 36
    adapter = b"the average after round 3"
    first.history = [{"round": k} for k in range(4)]
    first.global_hash = sha256_hex(adapter)
    view = first.view()
    resume = {"view": view, "adapter": adapter}

    alone = _run(["b"], resume)  # only one of them bid again: it trains both shards
    assert [s.hash for s in alone.shards] == [s.hash for s in first.shards]
    assert alone.rounds == 36 and alone.round == 4 and alone.history == first.history
    assert [s.owner for s in alone.shards] == ["b", "b"]

    more = _run(["c", "b", "a"], resume)  # the earlier owners keep their shards
    assert [s.owner for s in more.shards] == ["a", "b"] and more._spares == ["c"]

    swapped = _run(["c", "b"], resume)  # a newcomer takes the missing node's shard
    assert [s.owner for s in swapped.shards] == ["c", "b"]

    with pytest.raises(TrainError, match="does not check out"):
        _run(["a"], {"view": view, "adapter": b"another adapter"})


def test_the_cli_sends_a_small_dataset_inline_and_a_large_one_by_path(tmp_path: Path) -> None:
    """The daemon reads dataset files only under its data directory: ``vcoin train``
    sends a small JSONL file's examples with the request instead of its path."""
    import argparse

    from vcoind.train.cli import INLINE_MAX_BYTES, train_request

    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "one"}\n\n{"prompt": "a", "completion": "b"}\n')
    ns = argparse.Namespace(model="m", dataset=small, nodes=2, lora_r=8, lora_alpha=16,
                            lora_dropout=0.0, target_modules="q_proj", epochs=1, batch_size=1,
                            grad_accum=1, lr=1e-4, sync_every=1, seed=0, max_length=16,
                            optimizer="sgd")  # fmt: skip
    req = train_request(ns)
    assert "dataset" not in req
    assert req["examples"] == [{"text": "one"}, {"prompt": "a", "completion": "b"}]
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "x"}\n' * (INLINE_MAX_BYTES // 10))
    req = train_request(argparse.Namespace(**{**vars(ns), "dataset": big}))
    assert req["dataset"] == str(big.resolve()) and "examples" not in req

"""The inference engine on the random Qwen2 test model (CPU, fp32): parity with
transformers, static-cache slots, prefill from an offset, continuous batching."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from vcoind.compute import batcher as batcher_mod
from vcoind.compute import engine as engine_mod
from vcoind.compute import sampling as sampling_mod
from vcoind.compute.batcher import Batcher
from vcoind.compute.engine import Engine, EngineError, Stack, UnsupportedModel, generate_ids
from vcoind.compute.engine.graphs import Graph
from vcoind.compute.executor import Executor, ExecutorConfig
from vcoind.compute.generate import GenerationParams, encode_prompt, load_model
from vcoind.compute.models import ModelStore
from vcoind.compute.sampling import GenerationCancelled, sample_rows
from vcoind.compute.shards import even_ranges, load_shard, split_model
from vcoind.progress import BOARD

TOPICS = ["stake", "blocks", "a Merkle tree", "GPU hosts", "rewards", "the quick brown fox",
          "hidden states", "consensus", "peers", "tokens per second"]  # fmt: skip
PROMPTS = [f"{verb} {t}" for t in TOPICS for verb in ("Explain", "Why does", "Describe",
                                                      "What about", "Tell me of")]  # fmt: skip


@pytest.fixture(scope="module")
def lm(models_dir: Path) -> Any:
    return load_model(models_dir / "tiny-qwen2", torch.device("cpu"), torch.float32)


def hf_greedy(lm: Any, ids: list[int], n: int) -> list[int]:
    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    eos = lm.tokenizer.eos_token_id
    return [int(t) for t in out[0, len(ids) :] if int(t) != eos]


def test_engine_greedy_is_token_identical_to_hf_generate_on_50_prompts(lm: Any) -> None:
    assert lm.engine is not None and len(PROMPTS) == 50
    for prompt in PROMPTS:
        ids = encode_prompt(lm, prompt)
        ours = generate_ids(lm.engine, ids, GenerationParams(max_new_tokens=24), lm.tokenizer)
        assert list(ours.token_ids) == hf_greedy(lm, ids, 24)[: len(ours.token_ids)], prompt
    assert lm.engine.free_slots == lm.engine.n_slots  # every slot given back


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_unfused_engine_is_bit_exact_with_hf_generate(
    models_dir: Path, dtype: torch.dtype
) -> None:
    """On the CPU, fp16 (the GPU's dtype) too: the unfused path runs transformers' own
    order of operations and SDPA calls, so its logits are generate's to the bit, and
    greedy output is token-identical (where the fused step parts at fp16 near-ties)."""
    one = load_model(models_dir / "tiny-qwen2", torch.device("cpu"), dtype)
    assert one.engine is not None and not one.engine.fused
    for prompt in PROMPTS:
        ids = encode_prompt(one, prompt)
        ours = generate_ids(one.engine, ids, GenerationParams(max_new_tokens=24),
                            one.tokenizer)  # fmt: skip
        assert list(ours.token_ids) == hf_greedy(one, ids, 24)[: len(ours.token_ids)], prompt
    # the logits of generate's prefill and of its first three decode steps, to the bit
    ref = one.model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    slot = one.engine.alloc()
    try:
        mine = [one.engine.prefill(slot, torch.tensor(ids))]
        for t in ref.sequences[0, len(ids) : -1]:
            mine.append(one.engine.decode([slot], t.view(1))[0])
    finally:
        one.engine.release(slot)
    assert len(mine) == len(ref.logits) == 4
    for ours_t, theirs in zip(mine, ref.logits, strict=True):
        assert torch.equal(ours_t, theirs[0].float())


def test_fused_path_matches_the_reference_path(lm: Any, models_dir: Path) -> None:
    """The CUDA path's fused q/k/v, gate/up, RMSNorm and attention, run on the CPU."""
    other = load_model(models_dir / "tiny-qwen2", torch.device("cpu"), torch.float32,
                       engine=False)  # fmt: skip
    fused = Engine(Stack.of_model(other.model), slots=2, max_context=256, fused=True)
    same = 0
    for prompt in PROMPTS[:20]:
        ids = encode_prompt(lm, prompt)
        p = GenerationParams(max_new_tokens=16)
        a = generate_ids(lm.engine, ids, p, lm.tokenizer)
        b = generate_ids(fused, ids, p, lm.tokenizer)
        same += a.token_ids == b.token_ids
    assert same == 20
    # the model's own forward still works on the fused weights (they are views)
    ids = encode_prompt(lm, PROMPTS[0])
    assert hf_greedy(other, ids, 8) == hf_greedy(lm, ids, 8)


def padded_engine(models_dir: Path, slots: int, max_context: int) -> Engine:
    """The CUDA path's fused, padded steps, run eagerly on the CPU, over a model of its
    own (the fused weights become views of the engine's)."""
    other = load_model(models_dir / "tiny-qwen2", torch.device("cpu"), torch.float32,
                       engine=False)  # fmt: skip
    return Engine(Stack.of_model(other.model), slots=slots, max_context=max_context,
                  fused=True, static_shapes=True)  # fmt: skip


def replayed_eagerly(monkeypatch: pytest.MonkeyPatch, *engines: Engine) -> None:
    """The engines take the CUDA-graph path on the CPU: each "graph" is its step over the
    same static input and output buffers, run again at each replay (what a captured
    graph does), so the path's buffers and bookkeeping are what is tested."""

    def record(self: Engine, step: Any) -> tuple[Any, torch.Tensor]:
        out = step().clone()
        return (lambda: out.copy_(step())), out

    monkeypatch.setattr(Engine, "_record", record)
    for e in engines:
        e.cuda_graphs = True


def served_as_alone(
    engine: Engine, lm: Any, cases: list[tuple[list[int], GenerationParams]]
) -> tuple[Batcher, list[Any]]:
    """All ``cases`` at once on a batcher over ``engine``: each gets the tokens the plain
    engine gives it alone. The (closed) batcher and the results."""
    batcher = Batcher(engine, lm.tokenizer)
    try:
        got = [f.result(timeout=300) for f in [batcher.submit(i, p) for i, p in cases]]
    finally:
        batcher.close()
    for (ids, p), r in zip(cases, got, strict=True):
        assert r.token_ids == generate_ids(lm.engine, ids, p, lm.tokenizer).token_ids
    return batcher, got


@pytest.mark.parametrize("replayed", [False, True])
def test_graph_padding_run_eagerly_gives_the_same_tokens(
    lm: Any, models_dir: Path, replayed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path's decode step, padded to batch and width buckets as its graphs are
    (slots 0..B-1, the cache read up to 256, 512, .. positions, idle rows writing to the
    scratch column), run eagerly on the CPU: the same tokens as the plain path, for rows
    in any slots, across width buckets. ``replayed``: through the graphs' input buffers,
    some captured up front (``warm_up``), the others on first use."""
    padded = padded_engine(models_dir, 5, 600)
    assert padded._widths == [256, 512, 608] and padded._batch_buckets == [1, 2, 4, 5]
    before = {s["id"] for s in BOARD.snapshot()}
    if replayed:
        replayed_eagerly(monkeypatch, padded)
        assert padded.warm_up(batch=2, positions=300, label="tiny") == 4  # 1, 2 x 256, 512
        # each capture on the board: the 4 decode graphs and the prefill graphs
        (step,) = [s for s in BOARD.snapshot() if s["id"] not in before]
        assert (step["kind"], step["label"], step["outcome"]) == (
            "graphs", "tiny: 2 slots x 512 positions on cpu", "done")  # fmt: skip
        assert step["done"] == step["total"] == 4 + len(padded._prefill_graphs) > 4
    else:
        assert padded.warm_up() == 0  # nothing to capture
        assert [s for s in BOARD.snapshot() if s["id"] not in before] == []  # nor a step
    long_ids = encode_prompt(lm, " ".join(PROMPTS))[:240]  # crosses 256 while decoding
    cases = [(encode_prompt(lm, PROMPTS[i]), GenerationParams(max_new_tokens=12 + 5 * i))
             for i in range(6)] + [(long_ids, GenerationParams(max_new_tokens=40))]  # fmt: skip
    batcher, got = served_as_alone(padded, lm, cases)
    assert len(got[-1].token_ids) == 40 and batcher.peak_batch == 5 and padded.free_slots == 5
    # Rows that sit out a padded step keep their cache: slot 4 decodes alone (a bucket of
    # 5 rows), then slots 0..3 go on where they were.
    prompts = [encode_prompt(lm, PROMPTS[i]) for i in (7, 8, 9, 10, 11)]
    want = [generate_ids(lm.engine, ids, GenerationParams(max_new_tokens=10), lm.tokenizer)
            for ids in prompts]  # fmt: skip
    slots = [padded.alloc() for _ in prompts]
    last = [
        int(padded.prefill(s, torch.tensor(ids)).argmax())
        for s, ids in zip(slots, prompts, strict=True)
    ]
    seen: list[list[int]] = [[t] for t in last]
    for group in ([4], [0, 1, 2, 3]):
        for _ in range(9):
            logits = padded.decode(group, torch.tensor([seen[s][-1] for s in group]))
            for s, row in zip(group, logits, strict=True):
                seen[s].append(int(row.argmax()))
    for s, w in zip(slots, want, strict=True):
        assert tuple(seen[s][: len(w.token_ids)]) == w.token_ids
    if replayed:  # the long prompt reached the third width with 4 or 5 rows, say
        assert len(padded._graphs) > 4 and (2, 256) in padded._graphs
        padded.release(s)


def test_short_prompts_are_prefilled_through_padded_graphs(
    lm: Any, models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prompt of up to 512 tokens from position 0 is prefilled padded to 32, 64, ..
    512 tokens, through a graph warm_up captured (replayed eagerly here): the plain
    pass's logits, the prompt's own ids claimed, the decode steps after it unchanged.
    Capturing runs on a free slot's cache, whose cached prompt is forgotten. Longer
    prompts and prompts that go on from a position run eagerly; a refused capture leaves
    prefill eager, and the model serving."""
    padded = padded_engine(models_dir, 3, 600)
    plain = Engine(padded.stack, slots=1, max_context=600, fused=True)
    assert padded._prefill_buckets == [32, 64, 128, 256, 512]
    assert plain._prefill_buckets == [] and not plain.static_shapes
    ids = encode_prompt(lm, " ".join(PROMPTS))
    ids = (ids * (1 + 600 // len(ids)))[:560]
    slot = padded.alloc()
    padded.prefill(slot, torch.tensor(ids[:40]))
    padded.release(slot)
    assert padded._ids[0] == ids[:40]
    replayed_eagerly(monkeypatch, padded)
    padded.warm_up(batch=1, positions=256)
    assert sorted(padded._prefill_graphs) == [32, 64, 128, 256, 512] and padded._ids[0] == []
    passes: list[int] = []
    inner = padded._prefill_pass

    def spy(rows: Any, h: torch.Tensor, start: int) -> torch.Tensor:
        passes.append(h.shape[1])
        return inner(rows, h, start)

    padded._prefill_pass = spy  # type: ignore[method-assign]
    for n, width in ((5, 32), (32, 32), (33, 64), (200, 256), (512, 512), (513, 513)):
        del passes[:]
        slot, ref = padded.alloc(), plain.alloc()
        got, want = (
            padded.prefill(slot, torch.tensor(ids[:n])),
            plain.prefill(ref, torch.tensor(ids[:n])),
        )
        assert passes == [width]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        assert padded._ids[slot] == ids[:n] and padded.length[slot] == n
        nxt = got.argmax().view(1)
        after = padded.decode([slot], nxt)[0], plain.decode([ref], nxt)[0]
        assert torch.allclose(*after, atol=1e-4, rtol=1e-4)
        padded.release(slot)
        plain.release(ref)
    # going on from a position (a chunk, a reused prefix's remainder): eager
    del passes[:]
    slot = padded.alloc()
    padded.prefill(slot, torch.tensor(ids[:20]))
    padded.prefill(slot, torch.tensor(ids[20:30]))
    assert passes == [32, 10]
    padded.release(slot)

    def refuse(self: Engine, step: Any) -> tuple[Any, torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")

    again = Engine(padded.stack, slots=2, max_context=600, fused=True,
                   static_shapes=True)  # fmt: skip
    again.cuda_graphs = True
    monkeypatch.setattr(Engine, "_capture", lambda self, b, w: _fake_graph())
    monkeypatch.setattr(Engine, "_record", refuse)
    with caplog.at_level("WARNING", logger="vcoind.engine"):
        again.warm_up(batch=1, positions=200)
    assert "prefill graph for 32 tokens failed" in caplog.text
    assert not again._prefill_graphs and again._prefill_buckets == []
    want = plain.prefill(plain.alloc(), torch.tensor(ids[:9]))
    assert torch.allclose(again.prefill(again.alloc(), torch.tensor(ids[:9])), want, atol=1e-4)


def _fake_graph() -> Any:
    """A stand-in for a captured decode graph (where only prefill captures are tested)."""
    return Graph(lambda: None, torch.zeros(3), torch.zeros(1), torch.zeros(1))


def test_a_refused_graph_capture_falls_back_to_eager_steps(
    lm: Any, models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the card or torch refuses a capture (here: graphs wider than 256 positions,
    at a width's first use; then every graph, at load), the engine says so and runs its
    steps eagerly from then on: the model still serves, with the same tokens."""
    padded = padded_engine(models_dir, 4, 600)
    replayed_eagerly(monkeypatch, padded)
    replay = Engine._record
    widest = [256]

    def refuse_wide(self: Engine, step: Any) -> tuple[Any, torch.Tensor]:
        if len(step.args) == 4 and step.args[3] > widest[0]:  # a decode step's width
            raise RuntimeError("operation not permitted when stream is capturing")
        return replay(self, step)

    monkeypatch.setattr(Engine, "_record", refuse_wide)
    assert padded.warm_up(positions=200) == 3  # 1, 2 and 4 slots x 256
    assert len(padded._prefill_graphs) == 5  # 32 .. 512 tokens
    long_ids = encode_prompt(lm, " ".join(PROMPTS))[:240]  # crosses 256 while decoding
    cases = [(encode_prompt(lm, PROMPTS[i]), GenerationParams(max_new_tokens=20))
             for i in range(3)] + [(long_ids, GenerationParams(max_new_tokens=40))]  # fmt: skip
    with caplog.at_level("WARNING", logger="vcoind.engine"):
        served_as_alone(padded, lm, cases)
    assert not padded.cuda_graphs and not padded._graphs and not padded._prefill_graphs
    assert "decode steps run without CUDA graphs" in caplog.text
    again = Engine(padded.stack, slots=2, max_context=600, fused=True,
                   static_shapes=True)  # fmt: skip
    again.cuda_graphs = True
    widest[0] = 0
    before = {s["id"] for s in BOARD.snapshot()}
    assert again.warm_up() == 0 and not again.cuda_graphs
    (step,) = [s for s in BOARD.snapshot() if s["id"] not in before]
    assert step["kind"] == "graphs" and step["outcome"].startswith("failed: capture refused")
    served_as_alone(again, lm, cases[:2])


def queued_at_once(batcher: Batcher, prompts: list[list[int]], p: GenerationParams) -> list[Any]:
    """``prompts`` queued before the batcher admits any (a burst); their results. Closes
    the batcher."""
    try:
        with batcher._cv:  # the batcher's thread admits nothing until all are queued
            futures = [batcher.submit(x, p) for x in prompts]
        return [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()


@pytest.mark.parametrize("fused", [False, True])
def test_batched_prefill_matches_one_by_one(lm: Any, models_dir: Path, fused: bool) -> None:
    other = load_model(models_dir / "tiny-qwen2", torch.device("cpu"), torch.float32,
                       engine=False)  # fmt: skip
    engine = Engine(Stack.of_model(other.model), slots=4, max_context=256, fused=fused)
    prompts = [torch.tensor(encode_prompt(lm, PROMPTS[i])) for i in (0, 5, 13, 22)]
    assert len({len(p) for p in prompts}) > 1  # padded to the longest
    solo = []
    for p in prompts:
        s = engine.alloc()
        solo.append(engine.prefill(s, p))
        solo.append(engine.decode([s], solo[-1].argmax().view(1))[0])
        engine.release(s)
    slots = [engine.alloc() for _ in prompts]
    first = engine.prefill_batch(slots, prompts)
    assert [engine.length[s] for s in slots] == [len(p) for p in prompts]
    assert [engine._ids[s] for s in slots] == [p.tolist() for p in prompts]  # for reuse
    then = engine.decode(slots, first.argmax(dim=-1))  # the padding is overwritten, unseen
    assert [engine._ids[s][-1] for s in slots] == first.argmax(dim=-1).tolist()
    assert torch.allclose(first, torch.stack(solo[0::2]), atol=1e-4)  # gemm shapes differ
    assert torch.allclose(then, torch.stack(solo[1::2]), atol=1e-4)
    with pytest.raises(EngineError, match="one prompt per slot"):
        engine.prefill_batch(slots[:2], prompts)
    spans = Engine(Stack(engine.stack.layers, engine.stack.rotary, engine.stack.config),
                   slots=1, max_context=64)  # fmt: skip
    with pytest.raises(EngineError, match="whole model"):
        spans.prefill_batch([0], prompts[:1])
    # a burst queued at once is prefilled together, and each gets what it gets alone
    for s in slots:
        engine.release(s)
    batcher = Batcher(engine, lm.tokenizer)
    p = GenerationParams(max_new_tokens=10)
    got = queued_at_once(batcher, [x.tolist() for x in prompts], p)
    assert batcher.peak_prefill == 4
    for x, r in zip(prompts, got, strict=True):
        assert r.token_ids == generate_ids(lm.engine, x.tolist(), p, lm.tokenizer).token_ids


def test_a_burst_is_prefilled_shortest_first_in_passes_of_like_lengths(
    lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long and short prompts queued together, alternating, with room for two prompts a
    pass: the two short ones share a pass and the two long ones another, so the passes
    pad little (one pad token a pass here; in arrival order, 100 in all)."""
    monkeypatch.setattr(batcher_mod, "PREFILL_TOKENS", 2 * 60)
    ids = encode_prompt(lm, " ".join(PROMPTS))
    prompts = [ids[:60], ids[:9], ids[3:62], ids[5:15]]  # 60, 9, 59 and 10 tokens
    engine = Engine(Stack.of_model(lm.model), slots=4, max_context=128)
    p = GenerationParams(max_new_tokens=6)
    batcher = Batcher(engine, lm.tokenizer)
    got = queued_at_once(batcher, prompts, p)
    assert batcher.peak_prefill == 2 and batcher.prefill_padding == 1 + 1
    for x, r in zip(prompts, got, strict=True):
        assert r.token_ids == generate_ids(lm.engine, x, p, lm.tokenizer).token_ids


def test_rotation_matrix_is_the_rotary_step(lm: Any) -> None:
    engine = Engine(Stack.of_model(lm.model), slots=1, max_context=64, fused=True)
    pos = torch.tensor([[0], [5], [63]])
    h = torch.zeros(3, 1, engine.hidden)
    cos, sin = lm.model.model.rotary_emb(h, pos)  # transformers' own rotary [3, 1, d]
    x = torch.randn(3, 4, engine.head_dim)
    half = engine.head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    want = x * cos + rotated * sin
    got = torch.bmm(x, engine._rotation(*engine._rope(h, pos)))
    assert torch.allclose(got, want, atol=1e-6)


def test_prefill_in_chunks_and_from_an_earlier_position(lm: Any) -> None:
    engine = Engine(Stack.of_model(lm.model), slots=2, max_context=128)
    ids = encode_prompt(lm, PROMPTS[3] + " and more words to make it longer")
    whole, chunked = engine.alloc(), engine.alloc()
    want = engine.prefill(whole, torch.tensor(ids))
    engine.prefill(chunked, torch.tensor(ids[:5]))
    got = engine.prefill(chunked, torch.tensor(ids[5:]))
    assert torch.allclose(want, got, atol=1e-5)
    # a replay from position 3 overwrites what was there (a pipeline rebuilding a cache)
    engine.prefill(chunked, torch.tensor([7, 8, 9]), start=3)
    again = engine.prefill(chunked, torch.tensor(ids[3:]), start=3)
    assert torch.allclose(want, again, atol=1e-5)
    with pytest.raises(EngineError, match="position the slot has reached"):
        engine.prefill(chunked, torch.tensor([1]), start=engine.length[chunked] + 1)
    with pytest.raises(EngineError, match="exceed the engine's context of 128"):
        engine.prefill(chunked, torch.tensor([1] * 200))
    engine.release(whole)
    engine.release(chunked)


def test_slots_run_out_with_a_clear_error(lm: Any) -> None:
    engine = Engine(Stack.of_model(lm.model), slots=2, max_context=64)
    a, b = engine.alloc(), engine.alloc()
    assert (a, b) == (0, 1)
    with pytest.raises(EngineError, match="all 2 engine slots are busy"):
        engine.alloc()
    engine.release(a)
    assert engine.alloc() == 0  # the lowest free slot first
    with pytest.raises(EngineError, match="exceeds the model's context of 64"):
        generate_ids(engine, [1] * 60, GenerationParams(max_new_tokens=8), lm.tokenizer)


def test_the_fused_steps_rotary_table_is_the_modules_own(lm: Any, models_dir: Path) -> None:
    """Every cache position's cos | sin, gathered in a decode step, is what the model's
    rotary module gives for that position alone; a rotary type whose angles change with
    the sequence gets no table (the module runs each step)."""
    model = load_model(models_dir / "tiny-qwen2", torch.device("cpu"), torch.float16,
                       engine=False).model  # fmt: skip
    eng = Engine(Stack.of_model(model), slots=1, max_context=300, dtype=torch.float16,
                 fused=True)  # fmt: skip
    assert eng._angles is not None and eng._angles.shape[0] == eng.k[0].shape[2]
    for p in (0, 1, 37, 299, 300):  # 300: the scratch position
        x = torch.zeros(1, 1, eng.hidden, dtype=torch.float16)
        cos, sin = model.model.rotary_emb(x, torch.tensor([[p]]))
        assert torch.equal(eng._angles[p], torch.cat([cos, sin], dim=-1)[0, 0])
    model.model.rotary_emb.rope_type = "dynamic"
    again = Engine(Stack.of_model(model), slots=1, max_context=300, fused=True)
    assert again._angles is None


def test_unsupported_architectures_are_refused(lm: Any) -> None:
    stack = Stack.of_model(lm.model)
    cfg = type("Cfg", (), {"model_type": "llama"})()
    with pytest.raises(UnsupportedModel, match="llama"):
        Engine(Stack(stack.layers, stack.rotary, cfg), slots=1)


@pytest.mark.parametrize(
    "fused,replayed,kernels",
    [(False, False, False), (True, False, False), (True, True, False), (True, False, True)],
)
def test_span_engines_chain_to_the_whole_model(
    lm: Any, models_dir: Path, tmp_path: Path, fused: bool, replayed: bool, kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``kernels``: the fused step with the triton kernels (tests/test_kernels.py), under
    triton's interpreter."""
    dirs = split_model(models_dir / "tiny-qwen2", tmp_path, even_ranges(4, 2), name="t",
                       model_id="x")  # fmt: skip
    spans = [Engine(Stack.of_shard(load_shard(d)), slots=1, max_context=256, fused=fused,
                    static_shapes=fused, kernels=kernels) for d in dirs]  # fmt: skip
    if replayed:  # token ids into the first span's graph, hidden states into the second's
        replayed_eagerly(monkeypatch, *spans)
    for prompt in PROMPTS[:10]:
        ids = encode_prompt(lm, prompt)
        want = generate_ids(lm.engine, ids, GenerationParams(max_new_tokens=16), lm.tokenizer)
        slots = [e.alloc() for e in spans]
        x, got = torch.tensor(ids), []
        for step in range(len(want.token_ids)):
            h = x
            for e, s in zip(spans, slots, strict=True):
                given = h.clone()
                out = e.prefill(s, h) if step == 0 else e.decode([s], h)
                assert torch.equal(h, given)  # a span's input is left as it was
                h = out
            got.append(int(torch.argmax(h if h.dim() == 1 else h[-1])))
            x = torch.tensor([got[-1]])
        for e, s in zip(spans, slots, strict=True):
            e.release(s)
        assert tuple(got) == want.token_ids, prompt


def test_batcher_serves_mixed_requests_like_solo_runs(lm: Any) -> None:
    """12 requests on 4 slots: they join and leave the batch at token boundaries, each
    with its own parameters, and each gets what it would alone."""
    solo_engine = Engine(Stack.of_model(lm.model), slots=1, max_context=256)
    batch_engine = Engine(Stack.of_model(lm.model), slots=4, max_context=256)
    full = generate_ids(solo_engine, encode_prompt(lm, PROMPTS[0]),
                        GenerationParams(max_new_tokens=32), lm.tokenizer)  # fmt: skip
    cases = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            p = GenerationParams(max_new_tokens=8 + 3 * i)
        elif kind == 1:
            p = GenerationParams(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=i)
        elif kind == 2:
            p = GenerationParams(max_new_tokens=32, stop=(full.text[4:7],))
        else:
            p = GenerationParams(max_new_tokens=5 + i)
        cases.append((encode_prompt(lm, PROMPTS[0 if kind == 2 else i]), p))
    batcher = Batcher(batch_engine, lm.tokenizer)
    try:
        futures = [batcher.submit(ids, p) for ids, p in cases]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    for (ids, p), r in zip(cases, results, strict=True):
        alone = generate_ids(solo_engine, ids, p, lm.tokenizer)
        assert (r.token_ids, r.text, r.finish_reason) == (
            alone.token_ids, alone.text, alone.finish_reason)  # fmt: skip
    assert any(r.finish_reason == "stop" for r in results)
    assert batcher.peak_batch == 4  # the batch was full at some step
    assert batch_engine.free_slots == 4


def test_batcher_cancel_and_priority(lm: Any) -> None:
    engine = Engine(Stack.of_model(lm.model), slots=1, max_context=512)
    batcher = Batcher(engine, lm.tokenizer)
    ids = encode_prompt(lm, PROMPTS[1])
    order: list[str] = []
    started = threading.Event()
    try:
        cancel = threading.Event()
        long = batcher.submit(ids, GenerationParams(max_new_tokens=400), cancel=cancel,
                              on_token=lambda n: started.set())  # fmt: skip
        assert started.wait(30)
        # the slot is taken: these wait, the higher priority first whatever the arrival
        low = batcher.submit(ids, GenerationParams(max_new_tokens=4), priority=0)
        high = batcher.submit(ids, GenerationParams(max_new_tokens=4), priority=5)
        low.add_done_callback(lambda f: order.append("low"))
        high.add_done_callback(lambda f: order.append("high"))
        time.sleep(0.05)
        assert not low.done() and not high.done()
        cancel.set()
        with pytest.raises(GenerationCancelled):
            long.result(timeout=30)
        low.result(timeout=30)
        high.result(timeout=30)
    finally:
        batcher.close()
    assert order == ["high", "low"]
    assert engine.free_slots == 1


def test_the_decode_steps_attention_backend_is_a_choice(lm: Any) -> None:
    """``decode_attention`` picks the SDPA backend of the fused decode step (how the
    benchmarks compare them): the math backend gives the tokens torch's own choice gives;
    a name that is not a backend is refused."""
    params = GenerationParams(max_new_tokens=12)
    ids = encode_prompt(lm, PROMPTS[0])
    got = {}
    for backend in ("auto", "math"):
        engine = Engine(Stack.of_model(lm.model), slots=2, max_context=256, fused=True,
                        static_shapes=True, decode_attention=backend)  # fmt: skip
        got[backend] = generate_ids(engine, ids, params, lm.tokenizer).token_ids
    assert got["math"] == got["auto"] and len(got["auto"]) == 12
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        Engine(Stack.of_model(lm.model), slots=1, decode_attention="cudnn2")


def spied(engine: Engine) -> list[tuple[Any, ...]]:
    """The engine's prefill and decode calls from now on, in order: ("prefill", slot,
    start, tokens), ("prefill_batch", slots, start, tokens) and ("decode", slots)."""
    calls: list[tuple[Any, ...]] = []
    prefill, decode, batch = engine.prefill, engine.decode, engine.prefill_batch

    def spy_prefill(slot: int, x: torch.Tensor, start: int | None = None) -> torch.Tensor:
        calls.append(("prefill", slot, start, int(x.shape[0])))
        return prefill(slot, x, start)

    def spy_decode(slots: Any, x: torch.Tensor) -> torch.Tensor:
        calls.append(("decode", tuple(slots)))
        return decode(slots, x)

    def spy_batch(slots: Any, prompts: Any, start: int = 0) -> torch.Tensor:
        calls.append(("prefill_batch", tuple(slots), start, tuple(len(p) for p in prompts)))
        return batch(slots, prompts, start)

    engine.prefill = spy_prefill  # type: ignore[method-assign]
    engine.decode = spy_decode  # type: ignore[method-assign]
    engine.prefill_batch = spy_batch  # type: ignore[method-assign]
    return calls


def test_long_prompts_joining_a_running_batch_are_prefilled_in_chunks(lm: Any) -> None:
    """While a request decodes, two long prompts join: each is prefilled in chunks of
    ``prefill_chunk`` tokens with a decode step of the running request between chunks
    (the first begun, the first finished), and every request gets the tokens it gets
    alone. A third, cancelled after its first chunk, gives its slot back. Alone, a long
    prompt runs whole."""
    engine = Engine(Stack.of_model(lm.model), slots=4, max_context=512)
    ids = encode_prompt(lm, " ".join(PROMPTS))
    assert len(ids) > 350
    running_p, long_p = GenerationParams(max_new_tokens=300), GenerationParams(max_new_tokens=4)
    batcher = Batcher(engine, lm.tokenizer, prefill_chunk=64)
    calls = spied(engine)
    started, cancel = threading.Event(), threading.Event()
    try:
        running = batcher.submit(ids[:8], running_p, on_token=lambda n: started.set())
        assert started.wait(30)
        with batcher._cv:  # admitted together
            first = batcher.submit(ids[:300], long_p)
            second = batcher.submit(ids[10:150], long_p)
            dropped = batcher.submit(ids[20:220], long_p, cancel=cancel)
        # cancelled once its first chunk is in
        prefill = engine.prefill

        def cancel_after_a_chunk(slot: int, x: torch.Tensor, start: int | None = None) -> Any:
            out = prefill(slot, x, start)
            if slot == 3:
                cancel.set()
            return out

        engine.prefill = cancel_after_a_chunk  # type: ignore[method-assign]
        got = [f.result(timeout=120) for f in (running, first, second)]
        with pytest.raises(GenerationCancelled):
            dropped.result(timeout=30)
    finally:
        batcher.close()
    for x, p, r in zip((ids[:8], ids[:300], ids[10:150]), (running_p, long_p, long_p), got,
                       strict=True):  # fmt: skip
        assert r.token_ids == generate_ids(lm.engine, x, p, lm.tokenizer).token_ids
    chunks = [(c[1], c[2], c[3]) for c in calls if c[0] == "prefill" and c[1] != 0]
    assert chunks[:5] == [(1, 0, 64), (1, 64, 64), (1, 128, 64), (1, 192, 64), (1, 256, 44)]
    assert chunks[5:8] == [(2, 0, 20), (2, 20, 64), (2, 84, 56)]  # a chunk of what is left
    assert chunks[8:] == [(3, 0, 8)]  # what the budget had left; none after the cancel
    assert batcher.prefill_chunks == 9
    # at most 64 prompt tokens between two decode steps of the running request
    between, runs = 0, []
    for c in calls:
        if c[0] == "decode" and 0 in c[1]:
            runs.append(between)
            between = 0
        elif c[0] == "prefill" and c[1] != 0:
            between += c[3]
    assert max(runs) == 64 and sum(runs) == 300 + 140 + 8
    assert engine.free_slots == 4
    # with no request decoding, a long prompt runs whole
    alone = Batcher(engine, lm.tokenizer, prefill_chunk=64)
    engine.prefill = prefill  # type: ignore[method-assign]
    try:
        r = alone.submit(ids[40:340], long_p).result(timeout=60)
    finally:
        alone.close()
    assert alone.prefill_chunks == 0 and calls[-long_p.max_new_tokens :][0][1:] == (0, 0, 300)
    assert r.token_ids == generate_ids(lm.engine, ids[40:340], long_p, lm.tokenizer).token_ids


@pytest.mark.parametrize("graph_path", [False, True])
def test_a_prompt_that_starts_as_another_is_prefilled_from_where_they_part(
    lm: Any, models_dir: Path, graph_path: bool
) -> None:
    """A slot's cache outlives its request: a prompt that starts as an earlier one (a
    shared system prompt; the previous turn with its answer) or a running one does gets
    those positions in place (copied where they are in another slot) and is prefilled
    from where they part, with the tokens it gets alone. A prefill that fails part way
    leaves no stale claim on what it overwrote. ``graph_path``: the CUDA path's fused,
    padded steps (run eagerly)."""
    if graph_path:
        engine = padded_engine(models_dir, 3, 512)
    else:
        engine = Engine(Stack.of_model(lm.model), slots=3, max_context=512)
    ids = encode_prompt(lm, " ".join(PROMPTS))
    system, p = ids[:100], GenerationParams(max_new_tokens=12)
    batcher = Batcher(engine, lm.tokenizer)
    calls = spied(engine)

    def served(prompt: list[int], slot: int, start: int) -> Any:
        """``prompt`` through the batcher: prefilled in ``slot`` from ``start`` (all but
        its last token in place: that token is the slot's first decode step)."""
        del calls[:]
        r = batcher.submit(prompt, p).result(timeout=60)
        prefills = [c for c in calls if c[0] == "prefill"]  # (a running request decodes)
        if start == len(prompt) - 1:
            assert prefills == []
            assert calls[0] == ("decode", (slot,))
            assert len(calls) == len(r.token_ids)
        else:
            assert prefills == [("prefill", slot, start, len(prompt) - start)]
        assert r.token_ids == generate_ids(lm.engine, prompt, p, lm.tokenizer).token_ids
        return r

    try:
        served(system + ids[200:220], 0, 0)
        turn = system + ids[230:250]
        answer = served(turn, 0, 100)  # the system prompt was in place
        assert answer.finish_reason == "length"
        then = turn + list(answer.token_ids) + ids[260:270]  # its answer's last token
        assert len(then) > 130
        served(then, 0, len(turn) + len(answer.token_ids) - 1)  # was never fed
        served(then, 0, len(then) - 1)  # the same again: its last token decoded
        # a prefill that fails after its layers wrote the cache: what it overwrote is not
        # claimed (the slot holds `then`'s first 130 tokens after it, not all of them)
        failing = engine._prefill_pass

        def fail(rows: Any, h: torch.Tensor, start: int) -> torch.Tensor:
            for cache in (*engine.k, *engine.v):
                cache[rows, :, start:] = 99.0
            raise RuntimeError("out of memory, say")

        engine._prefill_pass = fail  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(then[:130] + ids[:20], p).result(timeout=60)
        engine._prefill_pass = failing  # type: ignore[method-assign]
        served(then, 0, 130)
        # copied from a running request's slot into the lowest free one
        started = threading.Event()
        long_p = GenerationParams(max_new_tokens=200)
        running = batcher.submit(system + ids[300:310], long_p, on_token=lambda n: started.set())
        assert started.wait(30)
        served(system + ids[320:330], 1, 100)
        want = generate_ids(lm.engine, system + ids[300:310], long_p, lm.tokenizer)
        assert running.result(timeout=60).token_ids == want.token_ids
    finally:
        batcher.close()
    assert batcher.reused_tokens == (100 + (len(turn) + len(answer.token_ids) - 1)
                                     + (len(then) - 1) + 130 + 130 + 100 + 100)  # fmt: skip
    # not below REUSE_MIN tokens, nor with reuse off
    plain = Batcher(engine, lm.tokenizer, reuse_prefix=False)
    try:
        del calls[:]
        plain.submit(then, p).result(timeout=60)
    finally:
        plain.close()
    assert calls[0] == ("prefill", 0, 0, len(then)) and plain.reused_tokens == 0
    slot = engine.alloc([*then[: engine_mod.REUSE_MIN - 1], 5, 6])
    assert engine.length[slot] == 0
    engine.release(slot)
    slot = engine.alloc([*then[: engine_mod.REUSE_MIN], 5, 6])
    assert engine.length[slot] == engine_mod.REUSE_MIN
    engine.release(slot)
    # a replay from an earlier position (a pipeline's) that fails part way: nothing is
    # claimed from there on
    q = ids[::-1][:80]
    slot = engine.alloc()
    engine.prefill(slot, torch.tensor(q))
    engine._prefill_pass = fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.prefill(slot, torch.tensor(q[50:55]), start=50)
    engine._prefill_pass = failing  # type: ignore[method-assign]
    engine.release(slot)
    slot = engine.alloc(q)
    assert engine.length[slot] == 50


@pytest.mark.parametrize(("reuse", "graph_path"), [(True, False), (False, False), (True, True)])
def test_a_burst_sharing_a_system_prompt_prefills_it_once(
    lm: Any, models_dir: Path, reuse: bool, graph_path: bool
) -> None:
    """Five prompts queued at once, four sharing a 100-token start (a system prompt) no
    slot holds yet: the first of the four is prefilled (with the fifth, which shares
    nothing), then the other three get its first 100 positions copied and only their
    own tokens prefilled, together in one pass from position 100. Each gets what it gets
    alone. With reuse off, all five are prefilled whole in one pass. ``graph_path``: the
    CUDA path's fused, padded steps (run eagerly)."""
    if graph_path:
        engine = padded_engine(models_dir, 5, 256)
    else:
        engine = Engine(Stack.of_model(lm.model), slots=5, max_context=256)
    ids = encode_prompt(lm, " ".join(PROMPTS))
    system = ids[:100]
    burst = [system + ids[200:215], ids[300:320], system + ids[220:232],
             system + ids[240:260], system + ids[262:270]]  # fmt: skip
    p = GenerationParams(max_new_tokens=8)
    batcher = Batcher(engine, lm.tokenizer, reuse_prefix=reuse)
    calls = spied(engine)
    got = queued_at_once(batcher, burst, p)
    prefills = [c for c in calls if c[0] != "decode"]
    if reuse:
        assert prefills == [("prefill_batch", (1, 0), 0, (20, 115)),  # shortest first
                            ("prefill_batch", (4, 2, 3), 100, (8, 12, 20))]  # fmt: skip
        assert batcher.reused_tokens == 300
    else:
        assert prefills == [("prefill_batch", (1, 4, 2, 0, 3), 0, (20, 108, 112, 115, 120))]
        assert batcher.reused_tokens == 0
    for x, r in zip(burst, got, strict=True):
        assert r.token_ids == generate_ids(lm.engine, x, p, lm.tokenizer).token_ids
    # a batched prefill from a position every slot has reached, and not from beyond
    own = [list(range(500, 510)), list(range(510, 520))]  # found in no slot
    slots = [engine.alloc(system + own[0]), engine.alloc(system + own[1])]
    assert [engine.length[s] for s in slots] == [100, 100]
    logits = engine.prefill_batch(slots, [torch.tensor(own[0]), torch.tensor(own[1])],
                                  100)  # fmt: skip
    assert [engine.length[s] for s in slots] == [110, 110]
    assert engine._ids[slots[1]] == system + own[1]
    alone = Engine(Stack.of_model(lm.model), slots=1, max_context=256)
    want = alone.prefill(alone.alloc(), torch.tensor(system + own[1]))
    assert torch.allclose(logits[1], want, atol=1e-4)
    with pytest.raises(EngineError, match="a position the slot has reached"):
        engine.prefill_batch(slots, [torch.tensor(ids[:3]), torch.tensor(ids[:3])], 111)


def test_a_burst_joining_a_running_batch_shares_its_system_prompt_chunk_by_chunk(
    lm: Any,
) -> None:
    """While a request decodes (chunked prefill, 64 tokens between its steps), three
    prompts sharing a 150-token start arrive together: the first is prefilled in chunks,
    the other two wait for it, then get the 150 positions copied and prefill only their
    own tokens. Never more than 64 prompt tokens between two decode steps; each request
    gets what it gets alone."""
    engine = Engine(Stack.of_model(lm.model), slots=4, max_context=512)
    ids = encode_prompt(lm, " ".join(PROMPTS))
    system = ids[:150]
    burst = [system + ids[200:215], system + ids[220:232], system + ids[240:260]]
    batcher = Batcher(engine, lm.tokenizer, prefill_chunk=64)
    calls = spied(engine)
    started = threading.Event()
    running_p, p = GenerationParams(max_new_tokens=120), GenerationParams(max_new_tokens=6)
    try:
        running = batcher.submit(ids[300:310], running_p, on_token=lambda n: started.set())
        assert started.wait(30)
        with batcher._cv:
            futures = [batcher.submit(x, p) for x in burst]
        got = [f.result(timeout=60) for f in futures]
        want = generate_ids(lm.engine, ids[300:310], running_p, lm.tokenizer)
        assert running.result(timeout=60).token_ids == want.token_ids
    finally:
        batcher.close()
    assert batcher.reused_tokens == 2 * 150
    followers = {2, 3}  # slot 0 runs the first request, slot 1 the burst's first
    for c in calls:
        if c[0] == "prefill" and c[1] in followers:
            assert c[2] >= 150
        elif c[0] == "prefill_batch":
            assert set(c[1]) <= followers and c[2] == 150
    between, most = 0, 0
    for c in calls:
        if c[0] == "decode" and 0 in c[1]:
            most, between = max(most, between), 0
        elif c[0] == "prefill":
            between += c[3]
        elif c[0] == "prefill_batch":
            between += sum(c[3])
    assert most <= 64
    for x, r in zip(burst, got, strict=True):
        assert r.token_ids == generate_ids(lm.engine, x, p, lm.tokenizer).token_ids


def test_prompt_starts_are_reused_within_a_scope_only(lm: Any) -> None:
    """A slot's cached prompt is reused for requests of the scope it was allocated in
    (the daemon's: the task's origin), never across: another requester's first token
    must not come faster for guessing how someone's prompt began. A burst of two scopes
    sharing a start: each scope's first prefills it, its followers copy it."""
    engine = Engine(Stack.of_model(lm.model), slots=6, max_context=256)
    ids = encode_prompt(lm, " ".join(PROMPTS))
    system = ids[:100]
    slot = engine.alloc(system + ids[200:210], scope="alice")
    engine.prefill(slot, torch.tensor(system + ids[200:210]))
    engine.release(slot)
    other = engine.alloc(system + ids[210:220], scope="bob")
    assert engine.length[other] == 0  # alice's start is not bob's to reuse
    engine.release(other)  # (alloc took slot 0 itself, now bob's: alice's ids are gone)
    again = engine.alloc(system + ids[220:230], scope="bob")
    assert engine.length[again] == 0
    engine.release(again)
    burst = [system + ids[200:215], system + ids[220:232], system + ids[240:260],
             system + ids[262:270]]  # fmt: skip
    scopes = ["alice", "bob", "alice", "bob"]
    p = GenerationParams(max_new_tokens=6)
    batcher = Batcher(engine, lm.tokenizer)
    calls = spied(engine)
    try:
        with batcher._cv:
            futures = [
                batcher.submit(x, p, scope=who) for x, who in zip(burst, scopes, strict=True)
            ]
        got = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert batcher.reused_tokens == 2 * 100  # one follower in each scope
    prefills = [c for c in calls if c[0] != "decode"]
    assert prefills[0] == ("prefill_batch", (1, 0), 0, (112, 115))  # a leader each
    assert [c[2] for c in prefills[1:]] == [100] and set(prefills[1][1]) == {2, 3}
    for x, r in zip(burst, got, strict=True):
        assert r.token_ids == generate_ids(lm.engine, x, p, lm.tokenizer).token_ids


def test_a_failed_prefix_copy_prefills_the_whole_prompt(lm: Any) -> None:
    """Copying a prompt's cached start that fails (out of memory, say) claims nothing:
    the new slot starts empty and the prompt is prefilled from its first token."""
    engine = Engine(Stack.of_model(lm.model), slots=2, max_context=256)
    ids = encode_prompt(lm, " ".join(PROMPTS))[:60]
    busy = engine.alloc()
    engine.prefill(busy, torch.tensor(ids))

    class Refusing:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

        def __getitem__(self, i: Any) -> torch.Tensor:
            return self.t[i]

        def __setitem__(self, i: Any, v: torch.Tensor) -> None:
            raise RuntimeError("CUDA out of memory")

    real = engine.k[1]
    engine.k[1] = Refusing(real)  # type: ignore[call-overload]
    slot = engine.alloc([*ids, 5])
    engine.k[1] = real
    assert (slot, engine.length[slot], engine._ids[slot]) == (1, 0, [])
    engine.release(slot)
    slot = engine.alloc([*ids, 5])  # with the copy working: 60 positions in place
    assert (slot, engine.length[slot]) == (1, 60)


def test_common_prefix() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(9))]
        want = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        assert engine_mod.common_prefix(a, b) == want


async def test_executor_batches_concurrent_requests(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    store.scan()
    ex = Executor(store, ExecutorConfig(device="cpu", batch_slots=4))
    await ex.load("tiny-qwen2")
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await ex.generate(
            "tiny-qwen2", PROMPTS[i], GenerationParams(max_new_tokens=48), scope="origin-a"
        )

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
    slot = next(iter(ex._loaded.values()))
    assert slot.batcher is not None and slot.batcher.peak_batch >= 2
    [figures] = ex.engines()  # what vcoin_nodeInfo reports
    assert figures["model"] == "tiny-qwen2" and figures["adapter"] is None
    assert (figures["slots"], figures["busy_slots"]) == (4, 0)
    assert figures["peak_batch"] == slot.batcher.peak_batch and not figures["cuda_graphs"]
    for i, r in results.items():
        ids = encode_prompt(slot.lm, PROMPTS[i])
        assert list(r.token_ids) == hf_greedy(slot.lm, ids, 48)[: len(r.token_ids)]
    # a prompt again: its start is reused for the same requester, not for another
    long_prompt = " ".join(PROMPTS[:8])
    p = GenerationParams(max_new_tokens=2)
    await ex.generate("tiny-qwen2", long_prompt, p, scope="origin-a")
    before = slot.batcher.reused_tokens
    await ex.generate("tiny-qwen2", long_prompt, p, scope="origin-a")
    assert slot.batcher.reused_tokens > before
    before = slot.batcher.reused_tokens
    await ex.generate("tiny-qwen2", long_prompt, p, scope="origin-b")
    assert slot.batcher.reused_tokens == before
    ex.close()


def one_draw(logits: torch.Tensor, p: GenerationParams, seed: int) -> int:
    """The textbook draw for one row, in plain Python: temperature; top-k keeping ties
    with the k-th value; softmax; the top-p nucleus (largest first, ties by token id);
    inverse CDF at one uniform from ``random.Random(seed)``, over the kept tokens largest
    first (a row without cuts: all of them in token order)."""
    if p.temperature == 0.0:
        return int(torch.argmax(logits))
    x = (logits.float() / p.temperature).tolist()
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    if not 0 < p.top_k < len(x) and p.top_p >= 1.0:  # no cut: the row in token order
        order = list(range(len(x)))
    if 0 < p.top_k < len(x):
        kth = x[order[p.top_k - 1]]
        order = [i for i in order if x[i] >= kth]
    top = x[order[0]]
    weights = [math.exp(x[i] - top) for i in order]
    probs = [w / sum(weights) for w in weights]
    if p.top_p < 1.0:
        mass, n = 0.0, 0
        while n < len(probs) and (n == 0 or mass < p.top_p):
            mass, n = mass + probs[n], n + 1
        order, probs = order[:n], probs[:n]
    target, mass = random.Random(seed).random() * sum(probs), 0.0
    for i, pr in zip(order, probs, strict=True):
        mass += pr
        if mass > target:
            return i
    return order[-1]


def test_a_batch_samples_each_row_by_its_own_parameters_and_seed() -> None:
    """One batched draw (``sample_rows``) gives each row what its own parameters and seed
    give it alone, whatever else is in the batch; the seed decides the draw."""
    torch.manual_seed(0)
    logits = torch.randn(48, 500) * 4
    logits[24:] /= 8  # flat rows: many tokens in reach, the cuts decide
    kinds = [(0.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 1.0, 20), (0.9, 0.8, 0), (1.3, 0.5, 40),
             (0.8, 0.95, 499), (2.0, 0.3, 1), (1.0, 1.0, 500)]  # fmt: skip
    params = [GenerationParams(temperature=t, top_p=tp, top_k=k, seed=i)
              for i, (t, tp, k) in enumerate(kinds * 6)]  # fmt: skip

    def rngs(order: list[int]) -> list[random.Random | None]:
        return [random.Random(params[i].seed) for i in order]

    rows = list(range(48))
    got = sample_rows(logits, params, rngs(rows))
    want = [one_draw(logits[i], params[i], params[i].seed) for i in rows]
    assert got == want
    assert len(set(got[1::8])) > 1  # sampled rows draw different tokens
    back = rows[::-1]  # the same rows in another batch, order and company
    assert sample_rows(logits[back], [params[i] for i in back], rngs(back)) == got[::-1]
    odd = rows[1::2]
    assert sample_rows(logits[odd], [params[i] for i in odd], rngs(odd)) == got[1::2]
    assert sample_rows(logits, params, [random.Random(p.seed + 1) for p in params]) != got
    # a vocabulary wider than the candidates: rows with cuts are drawn from their largest
    # logits, renormalised over the whole row (top-p alone) or the top-k set
    wide = torch.randn(16, 3000) * 3
    cuts = [GenerationParams(temperature=t, top_p=tp, top_k=k, seed=100 + i)
            for i, (t, tp, k) in enumerate([(1.0, 0.7, 0), (0.8, 0.5, 0), (1.0, 0.9, 64),
                                            (1.2, 1.0, 900)] * 4)]  # fmt: skip
    drawn = sample_rows(wide, cuts, [random.Random(p.seed) for p in cuts])
    assert drawn == [one_draw(r, p, p.seed) for r, p in zip(wide, cuts, strict=True)]
    picked = sample_rows(logits[6::8], params[6::8], rngs(rows[6::8]))  # top_k 1: argmax
    assert picked == torch.argmax(logits[6::8], dim=-1).tolist()
    # a request's generator moves on: its next draw is the next uniform
    gen = random.Random(5)
    p = dataclasses.replace(params[1], seed=5)
    first, second = (sample_rows(logits[1:2], [p], [gen])[0] for _ in range(2))
    twice = random.Random(5)
    twice.random()
    assert second == sample_rows(logits[1:2], [p], [twice])[0]
    assert first == one_draw(logits[1], p, 5)


def test_draws_follow_the_cut_distribution() -> None:
    """4,000 seeds: each token is drawn about as often as its renormalised probability
    after the cuts (within 4 standard deviations), and never a token cut away."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -8.0]).log_softmax(0)
    n = 4000
    for p in (GenerationParams(temperature=1.0),
              GenerationParams(temperature=0.7, top_k=5),
              GenerationParams(temperature=1.0, top_k=6, top_p=0.8)):  # fmt: skip
        probs = one_cut_distribution(logits, p)
        params = [dataclasses.replace(p, seed=s) for s in range(n)]
        got = sample_rows(logits.expand(n, -1), params, [random.Random(s) for s in range(n)])
        counts = torch.bincount(torch.tensor(got), minlength=len(logits)).double()
        sd = (n * probs * (1 - probs)).sqrt()
        assert torch.all((counts - n * probs).abs() <= 4 * sd + 1e-9), (p, counts, n * probs)
        assert torch.all(counts[probs == 0] == 0)


def one_cut_distribution(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    x = logits.double() / p.temperature
    if p.top_k:
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, 0)
    ordered, order = torch.sort(probs, descending=True, stable=True)
    ordered = ordered.masked_fill(torch.cumsum(ordered, 0) - ordered >= p.top_p, 0.0)
    probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return probs / probs.sum()


def test_the_inverse_cdf_never_lands_on_a_token_of_no_mass() -> None:
    """Uniforms at the very ends (0, and 1 after rounding) pick the first and the last
    token that has mass, not one whose probability underflowed to 0."""
    cum = torch.cumsum(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0]]), dim=-1)
    ends = sampling_mod._inverse_cdf
    assert ends(cum, torch.tensor([[1.0], [1.0]])).tolist() == [[1], [2]]
    assert ends(cum, torch.tensor([[0.0], [0.0]])).tolist() == [[0], [1]]
    assert ends(cum, torch.tensor([[0.6], [0.1]])).tolist() == [[1], [1]]
    assert ends(cum, torch.tensor([[0.4], [0.3]])).tolist() == [[0], [2]]


def test_cuts_past_the_candidates_are_drawn_from_the_whole_row() -> None:
    """A tie run at the k-th value keeps every tied token (more than k+1 candidates hold),
    and a nucleus wider than ``CANDIDATES`` reaches past them: both are drawn again from
    the whole sorted row, alone or in a batch."""
    ties = torch.full((3000,), -10.0)
    ties[:4] = torch.tensor([1.5, 1.4, 1.3, 1.2])
    ties[2000:2040] = 1.0  # 40 tokens tie with the 5th largest
    wide = -torch.arange(5000.0) / 5000  # token i ranks i-th; a flat nucleus of ~4,500
    n = 600
    for logits, p, allowed in [
        (ties, GenerationParams(temperature=1.0, top_k=5), {0, 1, 2, 3, *range(2000, 2040)}),
        (wide, GenerationParams(temperature=1.0, top_p=0.9), set(range(4600))),
    ]:
        params = [dataclasses.replace(p, seed=s) for s in range(n)]
        got = sample_rows(logits.expand(n, -1), params, [random.Random(s) for s in range(n)])
        assert set(got) <= allowed
        assert got[:20] == [one_draw(logits, q, q.seed) for q in params[:20]]
        if p.top_k:
            assert len(set(got) & set(range(2000, 2040))) > 30  # all of the tie run
        else:
            assert max(got) > sampling_mod.CANDIDATES  # past the first candidates
            assert sum(t > 2 * sampling_mod.CANDIDATES for t in got) > n // 4
    # the same rows next to a greedy row and a plain one draw the same
    mixed = torch.stack([ties[:3000], wide[:3000], wide[:3000]])
    q = [GenerationParams(temperature=1.0, top_k=5, seed=7), GenerationParams(seed=1),
         GenerationParams(temperature=0.9, seed=2)]  # fmt: skip
    got = sample_rows(mixed, q, [random.Random(7), None, random.Random(2)])
    assert got == [one_draw(r, p, p.seed) for r, p in zip(mixed, q, strict=True)]


def test_top_k_and_top_p_cut_where_they_should() -> None:
    """Over 300 seeds, top-k 3 of a flat row draws exactly its 3 largest; top-p 0.7 of
    probabilities 0.5/0.3/0.15/0.05 draws exactly the first two."""
    flat = torch.tensor([0.1, 0.3, 0.0, 0.25, 0.2, 0.05])
    skewed = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for logits, p, want in [
        (flat, GenerationParams(temperature=1.0, top_k=3), {1, 3, 4}),
        (skewed, GenerationParams(temperature=1.0, top_p=0.7), {0, 1}),
    ]:
        params = [dataclasses.replace(p, seed=s) for s in range(300)]
        rngs = [random.Random(s) for s in range(300)]
        assert set(sample_rows(logits.expand(300, -1), params, rngs)) == want

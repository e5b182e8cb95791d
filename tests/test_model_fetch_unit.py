"""The parts of model fetching that need no network: span choice, manifests, resume, the
upload bucket (in trio's virtual time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from vcoind.compute.autospan import (
    AutoSpec,
    choose_span,
    coverage,
    layers_that_fit,
    parse_auto,
    rebalanced,
)
from vcoind.compute.fetch import TokenBucket
from vcoind.compute.fetchwire import CHUNK_BYTES, WHOLE, ModelManifest
from vcoind.compute.manifest import (
    ManifestError,
    build_manifest,
    check_manifest,
    missing_chunks,
    travelling_files,
)
from vcoind.compute.models import inspect_model
from vcoind.p2p.codec import decode, encode


def test_auto_specs_parse() -> None:
    assert parse_auto("auto") == AutoSpec(None, None)
    assert parse_auto("auto:3") == AutoSpec(None, 3)
    assert parse_auto("tiny-qwen2:auto:2") == AutoSpec("tiny-qwen2", 2)
    assert parse_auto("tiny-qwen2:auto") == AutoSpec("tiny-qwen2", None)
    for other in ("tiny-qwen2:0-1", "auto:0", "auto:x", "a:b:auto"):
        assert parse_auto(other) is None


def test_spans_fill_the_least_served_layers_and_chain() -> None:
    assert choose_span([], 12, 3) == (0, 2)
    assert choose_span([(0, 2)], 12, 9) == (3, 11)
    # everything served once: the lowest start, so routes chain from layer 0
    assert choose_span([(0, 2), (3, 11)], 12, 9) == (0, 8)
    # a start where others' spans end, not in the middle of one (routes chain end to start)
    assert choose_span([(0, 5)], 12, 4) == (6, 9)
    assert choose_span([(0, 5), (6, 9)], 12, 4) == (10, 11)
    assert choose_span([], 4, 99) == (0, 3)
    assert coverage([(0, 2), (2, 3)], 4) == [1, 1, 2, 1]


def test_a_span_host_moves_into_a_gap_only_when_that_closes_it() -> None:
    others = {"B": [(0, 2)]}  # C (3-11) left: D (0-8) moves to 3-11
    assert rebalanced((0, 8), "D", others, 12, 9) == (3, 11)
    # no gap: stay
    assert rebalanced((0, 8), "D", {"B": [(0, 2)], "C": [(3, 11)]}, 12, 9) is None
    # moving would open as many layers as it closes: stay
    assert rebalanced((6, 11), "D", {"B": [(0, 2)]}, 12, 6) is None
    # a span half in a gap moves to cover more of it
    assert rebalanced((0, 5), "D", {"B": [(0, 2)]}, 12, 6) == (3, 8)
    # twins: of D and E on the same span, the first by peer id stays, the other moves
    twins = {"E": [(0, 5)], "B": [(0, 2)]}
    assert rebalanced((0, 5), "D", twins, 12, 6) is None
    assert rebalanced((0, 5), "F", twins, 12, 6) == (6, 11)


def test_layers_that_fit_the_memory() -> None:
    assert layers_that_fit(10 << 30, 3 << 30, 28) == 28
    assert layers_that_fit(1 << 30, 3 << 30, 28) == 7  # 1 GiB / (3 GiB / 28 * 1.25)
    assert layers_that_fit(0, 3 << 30, 28) == 1


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vcoind.compute.testmodel import TinyModelSpec, make_test_model

    d = tmp_path_factory.mktemp("m") / "mid"
    make_test_model(d, TinyModelSpec(hidden_size=192, intermediate_size=512, seed=1))
    return d


def manifest_of(model: Path) -> ModelManifest:
    info = inspect_model(model)
    return build_manifest(model, name=info.name, model_id=info.model_id,
                          num_layers=info.num_layers)  # fmt: skip


def test_a_manifest_is_checked_against_the_model_id_before_any_byte(model: Path) -> None:
    m = manifest_of(model)
    assert decode(encode(m)) == m  # it travels
    names = [f.name for f in m.files]
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.startswith(".") for n in names)  # no caches, no provenance
    check_manifest(m, m.model_id, WHOLE, WHOLE)
    w = next(f for f in m.files if f.name == "model.safetensors")
    assert w.count == -(-w.size // CHUNK_BYTES) > 1
    # another model's id
    with pytest.raises(ManifestError, match="not sha256:"):
        check_manifest(m, "sha256:" + "0" * 64, WHOLE, WHOLE)
    # a weight file's hash swapped: the hashes no longer make up the id it names
    bad = dataclasses.replace(w, sha256="f" * 64)
    forged = dataclasses.replace(m, files=tuple(bad if f is w else f for f in m.files))
    with pytest.raises(ManifestError, match="make up"):
        check_manifest(forged, m.model_id, WHOLE, WHOLE)
    # chunk hashes that do not fit the file's size
    short = dataclasses.replace(w, chunks=w.chunks[:32])
    with pytest.raises(ManifestError, match="chunk hashes"):
        check_manifest(dataclasses.replace(m, files=tuple(
            short if f is w else f for f in m.files)), m.model_id, WHOLE, WHOLE)  # fmt: skip
    # a span asked for, the whole model described
    with pytest.raises(ManifestError, match="layers"):
        check_manifest(m, m.model_id, 0, 1)


def test_resume_keeps_exactly_the_chunks_that_hash_right(model: Path, tmp_path: Path) -> None:
    m = manifest_of(model)
    w = next(f for f in m.files if f.name == "model.safetensors")
    data = (model / w.name).read_bytes()
    part = tmp_path / "x.part"
    assert missing_chunks(part, w) == list(range(w.count))  # nothing yet
    buf = bytearray(len(data))
    buf[CHUNK_BYTES : 2 * CHUNK_BYTES] = data[CHUNK_BYTES : 2 * CHUNK_BYTES]
    buf[-5:] = data[-5:]  # the last chunk only partly there
    part.write_bytes(bytes(buf))
    assert missing_chunks(part, w) == [i for i in range(w.count) if i != 1]
    buf[CHUNK_BYTES + 7] ^= 1  # a flipped byte: that chunk is fetched again
    part.write_bytes(bytes(buf))
    assert missing_chunks(part, w) == list(range(w.count))


def test_only_model_files_travel(model: Path, tmp_path: Path) -> None:
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    (model / "notes.txt").write_text("x")
    try:
        names = {p.name for p in travelling_files(model)}
    finally:
        (model / "pytorch_model.bin").unlink()
        (model / "notes.txt").unlink()
    assert "pytorch_model.bin" not in names and "notes.txt" not in names
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


async def test_the_upload_bucket_holds_the_node_wide_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(1_000_000.0, 1_000_000.0)  # 1 MB/s, a second's burst
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:  # three peers at once share it
        for _ in range(3):
            nursery.start_soon(lambda: _take(bucket, 10, 400_000))
    took = trio.current_time() - t0
    assert 10.9 <= took <= 11.1, took  # 12 MB at 1 MB/s, less the first second's burst
    free = TokenBucket(0.0)
    t0 = trio.current_time()
    await _take(free, 100, 1 << 20)
    assert trio.current_time() == t0  # no limit: no wait


async def _take(bucket: TokenBucket, times: int, n: int) -> None:
    for _ in range(times):
        await bucket.take(n)


async def test_a_peer_cannot_keep_the_node_splitting_spans(model: Path, tmp_path: Path) -> None:
    from typing import Any, cast

    from vcoind.compute.service import ComputeService
    from vcoind.compute.supply import SPLITS_PER_PEER_HOUR
    from vcoind.config import ComputeConfig
    from vcoind.p2p.streams import StreamProtocolError

    compute = ComputeService(ComputeConfig(), model.parent, tmp_path / "shards", "me",
                             cast(Any, None), announce=lambda **changes: None)  # fmt: skip
    compute.models.scan()
    supply = compute.supply
    spans = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (2, 3)]
    for a, b in spans[:SPLITS_PER_PEER_HOUR]:
        found = await supply.locate(model.name, a, b, peer="greedy")
        assert found is not None and (found.directory / "shard.json").is_file()
    with pytest.raises(StreamProtocolError, match="split for you"):
        await supply.locate(model.name, *spans[SPLITS_PER_PEER_HOUR], peer="greedy")
    # a span split before costs nothing and is not refused; another peer has its own budget
    assert await supply.locate(model.name, 0, 0, peer="greedy") is not None
    assert await supply.locate(model.name, *spans[SPLITS_PER_PEER_HOUR], peer="other")

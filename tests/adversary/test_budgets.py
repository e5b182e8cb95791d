"""Per-peer resource budgets (issue 22, item 7: training slots, adapter storage,
pipeline sessions).

One hostile peer tries to take everything a real daemon offers to all its peers: every
training slot, every pipeline session, unbounded adapter storage. It gets an
``over_budget`` error naming the budget and its value, another peer is still served, and
each refusal is counted in ``vcoin_budget_refused_total``.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.adversary.hostile import hostile, in_thread, metrics_text
from tests.conftest import Cluster
from tests.test_tasks import MODEL, serving
from vcoind.compute.models import ModelStore
from vcoind.compute.service import SHARD_STREAM
from vcoind.compute.shardwire import ShardClose, ShardOpen
from vcoind.market.messages import Ack
from vcoind.p2p.streams import StreamProtocolError
from vcoind.train.adapters import blob_part
from vcoind.train.service import TRAIN_STREAM
from vcoind.train.spec import LoraSettings, canonical_jsonl, sha256_hex
from vcoind.train.wire import BlobGet, TrainJoin, TrainProgress

pytestmark = pytest.mark.slow


async def test_one_peer_cannot_take_every_training_slot(cluster: Cluster, models_dir: Path) -> None:
    """compute.train_slots_per_peer (2 of the node's 4 by default): a third shard from
    the same origin is refused before anything is pulled; another origin still joins."""
    node = await in_thread(lambda: cluster.start(1, extra=serving(models_dir)))
    settings = json.dumps(LoraSettings(batch_size=1, max_length=16).as_dict())
    shard = canonical_jsonl([{"text": "one two three"}])

    async def serve(peer: Any, r: Any) -> Any:
        if isinstance(r, TrainProgress):
            return Ack()
        assert isinstance(r, BlobGet)
        return blob_part(shard if r.hash == sha256_hex(shard) else None, r)

    def join(task: str, i: int) -> TrainJoin:
        return TrainJoin(task, i, MODEL, settings, sha256_hex(shard), len(shard), 1)

    async with hostile() as h, hostile() as other:
        for x in (h, other):
            x.streams.serve(TRAIN_STREAM, serve)
        target = await h.join(node.p2p_addr, "tasks")
        await other.join(node.p2p_addr, "tasks")
        task, task2, task3 = (secrets.token_hex(16) for _ in range(3))
        await h.offered_training(target, MODEL, task, task2)
        await other.offered_training(target, MODEL, task3)
        for i in range(2):
            assert isinstance(await h.request(target, TRAIN_STREAM, join(task, i), Ack), Ack)
        with pytest.raises(StreamProtocolError, match="over_budget: training slots per peer: "
                           r"you hold 2 .*compute.train_slots_per_peer = 2"):  # fmt: skip
            await h.request(target, TRAIN_STREAM, join(task, 2), Ack)
        with pytest.raises(StreamProtocolError, match="over_budget"):  # another task of its
            await h.request(target, TRAIN_STREAM, join(task2, 0), Ack)
        got = await other.request(target, TRAIN_STREAM, join(task3, 0), Ack)
        assert isinstance(got, Ack)
    text = await in_thread(metrics_text, node)
    assert 'vcoin_budget_refused_total{resource="train_slots_per_peer"} 2.0' in text


async def test_one_peer_cannot_hold_every_pipeline_session(
    cluster: Cluster, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute.pipeline_sessions_per_peer: a peer's third session is refused while
    another peer still opens one; a session answers only the peer that opened it."""
    monkeypatch.setenv("VCOIN_COMPUTE_PIPELINE_SESSIONS_PER_PEER", "2")
    node = await in_thread(lambda: cluster.start(
        1, extra=[*serving(models_dir), "--serve-layers", f"{MODEL}:0-1"]))  # fmt: skip
    store = ModelStore(models_dir)
    store.scan()
    mid = store.resolve(MODEL).model_id
    sids = [secrets.token_hex(16) for _ in range(4)]

    async with hostile() as h, hostile() as other:
        target = await h.connect(node.p2p_addr)
        await other.connect(node.p2p_addr)

        async def open_(who: Any, sid: str) -> Any:
            return await who.request(target, SHARD_STREAM, ShardOpen(sid, mid, 0, 1), Ack,
                                     timeout_s=120)  # fmt: skip

        for _ in range(300):  # the span is split out of the model at start-up
            try:
                await open_(h, sids[0])
                break
            except StreamProtocolError as exc:
                if "not served" not in str(exc):
                    raise
                await trio.sleep(0.2)
        assert isinstance(await open_(h, sids[1]), Ack)
        with pytest.raises(StreamProtocolError, match="over_budget: pipeline sessions per peer"
                           r": you hold 2, .*pipeline_sessions_per_peer = 2"):  # fmt: skip
            await open_(h, sids[2])
        assert isinstance(await open_(other, sids[3]), Ack)
        # another peer's session is not its to re-open or close
        with pytest.raises(StreamProtocolError, match="another peer's"):
            await open_(other, sids[0])
        await other.request(target, SHARD_STREAM, ShardClose(sids[0]), Ack)
        info = await in_thread(node.rpc.call, "vcoin_nodeInfo")
        assert info["pipeline_sessions"] == 3, info
        # closing one of its own frees the peer's budget
        await h.request(target, SHARD_STREAM, ShardClose(sids[1]), Ack)
        assert isinstance(await open_(h, sids[2]), Ack)
    text = await in_thread(metrics_text, node)
    assert 'vcoin_budget_refused_total{resource="pipeline_sessions_per_peer"} 1.0' in text


def test_adapter_storage_is_kept_within_a_quota_per_peer_and_a_node_cap(
    tmp_path: Path,
) -> None:
    """The adapters a peer brings stay within its quota (its own least recently used
    dropped first); all peers' within the node's capacity; ours are never dropped for a
    peer's; one that cannot fit is refused with the budget named."""
    from vcoind.train.adapters import AdapterStore, Refusal

    def blob(i: int, n: int = 100) -> tuple[str, bytes]:
        data = bytes([i]) * n
        return sha256_hex(data), data

    store = AdapterStore(tmp_path, quota_bytes=250, capacity_bytes=600)
    a = [blob(i) for i in range(4)]
    for h, d in a[:2]:
        store.put(h, d, "peer-a")
    store.touch(a[0][0])  # used: a[1] is now the least recently used
    store.put(*a[2], "peer-a")  # over the quota: peer-a's least recently used goes
    assert not store.has(a[1][0]) and store.has(a[0][0]) and store.has(a[2][0])
    assert store.usage() == {"peer-a": 200}
    with pytest.raises(
        Refusal,
        match="adapter storage per peer: an adapter of 300 bytes "
        r"exceeds the quota of 250 bytes \(compute.adapter_quota_mb_per_peer\)",
    ):
        store.put(*blob(9, 300), "peer-a")  # fmt: skip
    ours = [blob(20 + i) for i in range(2)]
    for h, d in ours:
        store.put(h, d)  # trained here: "" is ours
    b = [blob(10 + i) for i in range(2)]
    for h, d in b:
        store.put(h, d, "peer-b")
    assert sum(store.usage().values()) == 600
    store.put(*a[3], "peer-a")  # the node is full: the least recently used peer's goes
    assert sum(store.usage().values()) <= 600
    assert all(store.has(h) for h, _ in ours)
    assert store.usage()["peer-a"] <= 250
    store2 = AdapterStore(tmp_path / "full", capacity_bytes=200)
    for h, d in ours:
        store2.put(h, d)
    with pytest.raises(Refusal, match=r"the node's 200 bytes .* are full") as e:
        store2.put(*b[0], "peer-b")
    assert e.value.code == "over_budget" and e.value.label == "adapter_store"

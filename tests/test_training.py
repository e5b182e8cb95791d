"""Distributed LoRA training on real daemons: shards, FedAvg rounds, failover, anchoring,
inference with the trained adapter, and refusal of corrupted shards and adapters."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import DevNode, stake_all
from devnet.chain import fund_nodes
from tests.conftest import Chain, Cluster, free_port, wait_until
from tests.test_chain import anchor_of, three_on_chain
from tests.test_tasks import MODEL, finished, knows_model, serving, task
from vcoind.cli import ClientError
from vcoind.compute.testmodel import CORPUS

pytestmark = pytest.mark.slow


def write_dataset(path: Path, n: int) -> Path:
    """``n`` distinct lines of the test model's corpus, one JSONL example each."""
    lines = [ln for ln in CORPUS.splitlines() if ln.strip()][:12]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{lines[i % 12]} ({i // 12})"}) + "\n")
    return path


def train(node: DevNode, dataset: Path, nodes: int, **settings: Any) -> str:
    base = {"epochs": 3, "batch_size": 2, "learning_rate": 0.03, "sync_every": 2,
            "dropout": 0.0, "seed": 1, "max_length": 32}  # fmt: skip
    req = {"model": MODEL, "dataset": str(dataset), "nodes": nodes,
           "settings": {**base, **settings}}  # fmt: skip
    r = node.rpc.call("vcoin_train", req)
    return str(r["task_id"])


def generate(node: DevNode, prompt: str, adapter: str | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"model": MODEL, "input": prompt,
                           "parameters": {"max_new_tokens": 12}}  # fmt: skip
    if adapter:
        req["adapter"] = adapter
    return finished(node, str(node.rpc.call("vcoin_submitTask", req)["task_id"]), timeout=120)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # peft 0.21
def test_three_daemons_train_anchor_and_serve_the_adapter(
    cluster: Cluster, models_dir: Path, chain: Chain, tmp_path: Path
) -> None:
    nodes = three_on_chain(cluster, models_dir, chain)
    n1 = nodes[0]
    addr = {n.index: n.info["eth_address"] for n in nodes}
    fund_nodes(chain.anvil.url, chain.deployment, list(addr.values()))
    stake_all(nodes, 1000)
    wait_until(lambda: all(p["stake"] and p["stake"]["eligible"]
                           for p in n1.rpc.call("vcoin_peers")), 20, "stakes seen")  # fmt: skip

    data = write_dataset(n1.datadir / "train.jsonl", 25)  # 3 contiguous shards: 9, 8, 8
    t = finished(n1, train(n1, data, nodes=3), timeout=300)
    assert t["status"] == "completed", t["error"]
    assert t["type"] == "lora_training"
    tr = t["training"]
    s = tr["summary"]
    # batch 2, 3 epochs: 5 + 4 + 4 steps an epoch -> 15 + 12 + 12; sync every 2 -> 8 rounds
    assert s["rounds"] == len(tr["history"]) == 8 and s["steps"] == 39
    assert s["samples"] == 75 and s["reassigned"] == 0
    assert s["final_loss"] < s["first_loss"] * 0.8, s  # it learns
    assert {n["node_id"] for n in tr["nodes"]} == {n.info["peer_id"] for n in nodes}
    assert sorted(n["samples"] for n in tr["nodes"]) == [24, 24, 27]
    assert all(n["status"] == "done" for n in tr["nodes"])
    assert len({sh["hash"] for sh in tr["shards"]}) == 3  # contiguous, distinct shards
    adapter = tr["adapter_id"]
    assert t["result"] == adapter and len(adapter) == 64

    # Anchored: the adapter's hash, signed by the three trainers under the origin's unpaid
    # ticket (training is not priced yet: nothing is paid or minted).
    a = anchor_of(n1, t["task_id"])
    ev = chain.anchored_events(t["task_id"])
    assert len(ev) == 1 and bytes(ev[0]["args"]["resultHash"]).hex() == adapter
    assert ev[0]["args"]["voterCount"] == 3
    assert len(tr["signatures"]) == 3
    got = n1.rpc.call("vcoin_getAnchor", {"task_id": t["task_id"]})["payload"]
    assert {v["worker"] for v in got["votes"]} == set(addr.values())
    assert got["ticket"]["max_price"] == "0" and got["ticket"]["mode"] == 3
    assert all(r["gross"] == 0 and r["minted"] == 0 for r in a["rewards"]), a

    # Every participant holds it and says so in its heartbeats.
    for n in nodes:
        assert adapter in [x["adapter_id"] for x in n.rpc.call("vcoin_adapters")["local"]]
    wait_until(lambda: any(adapter == x["adapter_id"]
                           for x in n1.rpc.call("vcoin_adapters")["network"]), 10,
               "the adapter in peers' heartbeats")  # fmt: skip

    # Inference with the adapter differs from the base model's and equals a local load of
    # the same adapter with PEFT (not our merge code).
    prompt = "A Merkle tree hashes pairs"
    base = generate(n1, prompt)
    tuned = generate(n1, prompt, adapter)
    assert base["status"] == tuned["status"] == "completed", tuned["error"]
    assert tuned["result"] != base["result"]
    assert tuned["result"] == peft_generate(models_dir / MODEL, n1.datadir / "adapters" /
                                            f"{adapter}.safetensors", prompt, tmp_path)  # fmt: skip


def peft_generate(model_dir: Path, adapter_file: Path, prompt: str, tmp: Path) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vcoind.compute.generate import encode_text
    from vcoind.train.lora import adapter_from_bytes, export_peft_dir

    state, meta = adapter_from_bytes(adapter_file.read_bytes())
    export_peft_dir(state, meta, tmp / "peft")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), tmp / "peft"
    ).eval()
    ids = torch.tensor([encode_text(tok, prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=12, do_sample=False)  # fmt: skip
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_killed_training_node_shard_is_reassigned(
    cluster: Cluster, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VCOIN_MARKET_TRAIN_ROUND_TIMEOUT_S", "20")
    extra = serving(models_dir)
    n1 = cluster.start(1, extra=[*extra, "--bid-window", "5"])
    n2 = cluster.start(2, bootstrap=n1, extra=extra, wait=False)
    n3 = cluster.start(3, bootstrap=n1, extra=extra)
    wait_until(lambda: knows_model(n1, 2), 20, "node 1 sees the model on both peers")
    data = write_dataset(n1.datadir / "train.jsonl", 48)
    # 2 nodes of 3 (the third is the spare); 24 examples each, 12 steps an epoch, 3 epochs,
    # a sync after every step: 36 rounds, long enough to kill a node in the middle.
    task_id = train(n1, data, nodes=2, sync_every=1)
    tr = wait_until(lambda: (x := task(n1, task_id)["training"]) and len(x["history"]) >= 3
                    and x, 120, "three synced rounds")  # fmt: skip
    victim = next(n for n in (n2, n3) if n.info["peer_id"] in
                  {x["node_id"] for x in tr["nodes"]})  # fmt: skip
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t = finished(n1, task_id, timeout=300)
    assert t["status"] == "completed", t["error"]
    tr = t["training"]
    assert tr["summary"]["reassigned"] >= 1
    assert tr["summary"]["rounds"] == 36
    by_id = {x["node_id"]: x for x in tr["nodes"]}
    assert by_id[victim.info["peer_id"]]["status"] == "failed"
    # Every shard ended on a live node and all its steps were trained.
    assert all(sh["node_id"] != victim.info["peer_id"] for sh in tr["shards"])
    assert len({sh["hash"] for sh in tr["shards"]}) == 2
    assert tr["summary"]["samples"] == 48 * 3
    assert tr["summary"]["final_loss"] < tr["summary"]["first_loss"]

    # A node that took no part fetches the adapter on demand from a holder (checked by
    # hash) and then announces it too.
    adapter = tr["adapter_id"]
    n4 = cluster.start(4, bootstrap=n1, extra=extra)
    wait_until(lambda: any(x["adapter_id"] == adapter
                           for x in n4.rpc.call("vcoin_adapters")["network"]), 20,
               "node 4 sees the adapter announced")  # fmt: skip
    got = n4.client(60).call("vcoin_fetchAdapter", {"adapter_id": adapter})
    assert got["fetched"] and Path(got["path"]).read_bytes() == (
        n1.datadir / "adapters" / f"{adapter}.safetensors").read_bytes()  # fmt: skip
    assert not n4.rpc.call("vcoin_fetchAdapter", {"adapter_id": adapter})["fetched"]
    with pytest.raises(ClientError, match="no holder known"):
        n4.rpc.call("vcoin_fetchAdapter", {"adapter_id": "0" * 64})
    # Clear errors up front, not a task that waits for bids that cannot come.
    with pytest.raises(ClientError, match="no node is known to hold"):
        n4.rpc.call("vcoin_submitTask", {"model": MODEL, "input": "hi", "adapter": "0" * 64})
    with pytest.raises(ClientError, match="unknown model 'nope'"):
        n4.rpc.call("vcoin_train", {"model": "nope", "dataset": str(data)})
    with pytest.raises(ClientError, match="one of dataset"):
        n4.rpc.call("vcoin_train", {"model": MODEL})
    with pytest.raises(ClientError, match="cannot read dataset"):
        n4.rpc.call("vcoin_train", {"model": MODEL, "dataset": str(n4.datadir / "none.jsonl")})
    with pytest.raises(ClientError, match="r must be a number"):
        n4.rpc.call("vcoin_train", {"model": MODEL, "dataset": str(data), "settings": {"r": 0}})


def test_origin_restarted_mid_training_goes_on_from_its_last_round(
    cluster: Cluster, models_dir: Path, tmp_path: Path
) -> None:
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    n1 = cluster.start(1, listen=listen, extra=["--bid-window", "5"])  # an origin only
    for i in (2, 3):
        cluster.start(i, bootstrap=n1, extra=serving(models_dir), wait=False)
    wait_until(lambda: knows_model(n1, 2), 20, "node 1 sees the model on both peers")
    task_id = train(n1, write_dataset(n1.datadir / "train.jsonl", 48), nodes=2, sync_every=1)
    wait_until(lambda: len(task(n1, task_id)["training"]["history"]) >= 4, 120, "4 rounds")
    n1.proc.send_signal(signal.SIGKILL)
    n1.proc.wait()
    n1 = cluster.start(1, listen=listen, extra=["--bid-window", "5"])
    t = finished(n1, task_id, timeout=300)
    assert t["status"] == "completed", t["error"]
    tr = t["training"]
    assert [h["round"] for h in tr["history"]] == list(range(36))  # none lost, none twice
    assert tr["summary"]["samples"] == 48 * 3
    assert "resuming after round" in n1.log_path.read_text()
    assert not any((n1.datadir / "train").iterdir())  # its files are gone once it is done


async def test_corrupted_shard_and_adapter_frames_are_refused(
    cluster: Cluster, models_dir: Path
) -> None:
    """A peer playing origin hands a daemon shards and adapters that are not what their
    hashes say: each is refused with a clear reason; the good ones are used."""
    import dataclasses

    import trio

    from tests.adversary.hostile import hostile
    from vcoind.market.messages import Ack
    from vcoind.p2p.streams import StreamProtocolError
    from vcoind.train.adapters import blob_part, pull_blob
    from vcoind.train.lora import adapter_from_bytes
    from vcoind.train.service import TRAIN_STREAM
    from vcoind.train.spec import LoraSettings, canonical_jsonl, sha256_hex
    from vcoind.train.wire import BlobGet, RoundDone, TrainJoin, TrainRound

    n1 = await trio.to_thread.run_sync(lambda: cluster.start(1, extra=serving(models_dir)))
    good = canonical_jsonl([{"text": f"hello world number {i}"} for i in range(4)])
    served: dict[str, bytes] = {}  # what this fake origin hands out under each hash

    async def handler(peer: Any, req: Any) -> Any:
        if isinstance(req, BlobGet):
            return blob_part(served.get(req.hash), req)
        return Ack()

    async with hostile() as fake:  # an origin the node offered to train for
        fake.streams.serve(TRAIN_STREAM, handler)
        await fake.join(n1.p2p_addr, "tasks")
        await fake.offered_training(n1.info["peer_id"], MODEL, "ab" * 16)

        async def ask(record: Any, reply: type[Any] = Ack) -> Any:
            return await fake.request(n1.info["peer_id"], TRAIN_STREAM, record, reply,
                                      timeout_s=60)  # fmt: skip

        settings = json.dumps(LoraSettings(batch_size=2, max_length=16, dropout=0.0).as_dict())
        h = sha256_hex(good)
        join = TrainJoin("ab" * 16, 0, MODEL, settings, h, len(good), 4)
        served[h] = good.replace(b"hello", b"HELLO")  # not what the hash says
        with pytest.raises(StreamProtocolError, match="does not hash to"):
            await ask(join)
        served[h] = good
        with pytest.raises(StreamProtocolError, match="holds 4 examples, not 5"):
            await ask(dataclasses.replace(join, examples=5))
        with pytest.raises(StreamProtocolError, match="settings"):
            await ask(dataclasses.replace(join, settings='{"r": 0}'))
        with pytest.raises(StreamProtocolError, match="exceeds the limit"):
            await ask(dataclasses.replace(join, shard=9, shard_bytes=9 << 20))
        assert await ask(join) == Ack()  # the real shard
        # at most 2 shards from one origin (compute.train_slots_per_peer), 4 in all
        assert await ask(dataclasses.replace(join, shard=1)) == Ack()
        with pytest.raises(StreamProtocolError, match="over_budget: training slots per peer"):
            await ask(dataclasses.replace(join, shard=2))

        # A round for a shard never joined; a global adapter that does not hash right;
        # one that hashes right but is no adapter.
        with pytest.raises(StreamProtocolError, match="not joined"):
            await ask(TrainRound("ab" * 16, 7, 0, 0, 1), RoundDone)
        junk = b"\x08" + b"\x00" * 7 + b"{}" + b"junk" * 20
        hj = sha256_hex(junk)
        served[hj] = junk[::-1]
        with pytest.raises(StreamProtocolError, match="does not hash to"):
            await ask(TrainRound("ab" * 16, 0, 0, 0, 1, hj, len(junk)), RoundDone)
        served[hj] = junk
        with pytest.raises(StreamProtocolError, match="not a valid safetensors adapter"):
            await ask(TrainRound("ab" * 16, 0, 0, 0, 1, hj, len(junk)), RoundDone)

        # From the seeded initial adapter the round trains, and its adapter is served.
        done = await ask(TrainRound("ab" * 16, 0, 0, 0, 2), RoundDone)
        assert done.samples == 4 and len(done.losses) == 2

        async def via(peer: str, record: Any, reply: type[Any]) -> Any:
            return await fake.request(peer, TRAIN_STREAM, record, reply)

        data = await pull_blob(via, n1.info["peer_id"], done.adapter, done.adapter_bytes)
        state, meta = adapter_from_bytes(data)
        assert meta["r"] == "8" and state
    info = await trio.to_thread.run_sync(n1.rpc.call, "vcoin_nodeInfo")
    assert info["peer_id"] == n1.info["peer_id"]  # the daemon is fine


def local_train_host(models_dir: Path, adapters: Path, request: Any) -> Any:
    """A ``TrainHost`` alone on CPU, its peers answered by ``request(peer, record, reply)``."""
    import trio

    from vcoind.compute.models import ModelStore
    from vcoind.train.adapters import AdapterStore, BlobCache
    from vcoind.train.host import TrainHost

    async def limiter() -> trio.CapacityLimiter:
        return trio.CapacityLimiter(1)

    async def lora() -> Any:
        import vcoind.train.lora

        return vcoind.train.lora

    models = ModelStore(models_dir)
    models.scan()
    return TrainHost(models, AdapterStore(adapters), BlobCache(), request,
                     device=lambda: "cpu", limiter=limiter, lora=lora)  # fmt: skip


async def test_a_shard_left_idle_by_its_origin_is_dropped(models_dir: Path, tmp_path: Path) -> None:
    """The host side alone, its origin a plain function: a joined shard whose origin goes
    silent is swept (with its model) and later rounds for it are refused."""

    from vcoind.market.messages import Ack
    from vcoind.p2p.streams import StreamProtocolError
    from vcoind.train.adapters import blob_part
    from vcoind.train.spec import LoraSettings, canonical_jsonl, sha256_hex
    from vcoind.train.wire import BlobGet, RoundDone, TrainJoin, TrainProgress, TrainRound

    shard = canonical_jsonl([{"text": "one two three"}, {"text": "four five six"}])

    progress: list[TrainProgress] = []

    async def origin(peer: str, record: Any, reply: type[Any], *_: Any) -> Any:
        if isinstance(record, TrainProgress):
            progress.append(record)
            return Ack()
        assert isinstance(record, BlobGet)
        return blob_part(shard if record.hash == sha256_hex(shard) else None, record)

    host = local_train_host(models_dir, tmp_path / "adapters", origin)
    settings = json.dumps(LoraSettings(batch_size=1, max_length=16).as_dict())
    host.offered("cd" * 16, "origin")  # we bid to train it
    await host.handle("origin", TrainJoin("cd" * 16, 0, MODEL, settings, sha256_hex(shard),
                                          len(shard), 2))  # fmt: skip
    done = await host.handle("origin", TrainRound("cd" * 16, 0, 0, 0, 1))
    assert isinstance(done, RoundDone) and done.samples == 1
    assert [(p.step, p.loss) for p in progress] == [(0, done.losses[0])]  # reported live
    with pytest.raises(StreamProtocolError, match="not joined by this origin"):
        await host.handle("someone-else", TrainRound("cd" * 16, 0, 1, 1, 1))
    assert host.sweep(3600) == 0 and host.active == 1
    assert host.sweep(0) == 1 and host.active == 0
    with pytest.raises(StreamProtocolError, match="not joined"):
        await host.handle("origin", TrainRound("cd" * 16, 0, 1, 1, 1))

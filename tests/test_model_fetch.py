"""Weights between real daemons over /vcoin/model/1.0.0, and --serve-layers auto.

Node B starts with an empty models directory and gets the model from node A, checked
against its model id; a peer that advertises the model but sends bad bytes is dropped
and penalised while the fetch completes from the honest one; a fetch cut by kill -9
resumes from what is on disk; span hosts with ``--serve-layers auto`` fetch only their
span's tensors and the pipeline's text equals the whole model's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import DevNode
from tests.conftest import Cluster, wait_until
from tests.test_tasks import finished
from vcoind.compute.fetchwire import CHUNK_BYTES
from vcoind.compute.manifest import file_entries, travelling_bytes
from vcoind.compute.models import compute_model_id, inspect_model

pytestmark = pytest.mark.slow
BIG = "mid-qwen2"  # ~12 MB of weights: a dozen chunks, so several peers share a fetch
DEEP = "deep-qwen2"  # 12 layers: a span of a few is a small part of the model


@pytest.fixture(scope="module")
def big_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vcoind.compute.testmodel import TinyModelSpec, make_test_model

    root = tmp_path_factory.mktemp("bigmodels")
    make_test_model(root / BIG, TinyModelSpec(hidden_size=256, intermediate_size=704, seed=3))
    return root


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vcoind.compute.testmodel import TinyModelSpec, make_test_model

    root = tmp_path_factory.mktemp("deepmodels")
    make_test_model(root / DEEP, TinyModelSpec(num_layers=12, seed=5))
    return root


def opts(models: Path, *more: str) -> list[str]:
    return ["--models-dir", str(models), "--no-chain", *more]


def fetch(node: DevNode, model: str) -> dict[str, Any]:
    """Start a fetch over RPC and wait for its outcome in vcoin_models."""
    node.rpc.call("vcoin_fetchModel", {"model": model})

    def ended() -> dict[str, Any] | None:
        jobs = node.rpc.call("vcoin_models")["fetches"]
        job = next((j for j in jobs if j["model"] == model), None)
        return job if job is not None and job["status"] != "running" else None

    return dict(wait_until(ended, 120, f"the fetch of {model} to end"))


def advertises(node: DevNode, model: str, peers: int) -> bool:
    return sum(any(m["name"] == model for m in p["models"])
               for p in node.rpc.call("vcoin_peers")) >= peers  # fmt: skip


def greedy(node: DevNode, model: str, prompt: str, **req: Any) -> dict[str, Any]:
    tid = node.rpc.call("vcoin_submitTask", {
        "model": model, "input": prompt, **req,
        "parameters": {"max_new_tokens": 12, "temperature": 0},
    })["task_id"]  # fmt: skip
    t = finished(node, tid, timeout=120)
    assert t["status"] == "completed", t
    return t


def liar_copy(src: Path, root: Path) -> Path:
    """The model with a flipped byte in every chunk of its weights, but with the honest
    model id and chunk hashes cached (same sizes and mtimes): a node serving it
    advertises the real model and manifest, then sends bad bytes."""
    d = root / src.name
    shutil.copytree(src, d)
    compute_model_id(d)
    file_entries(d)
    for f in d.glob("*.safetensors"):
        st = f.stat()
        data = bytearray(f.read_bytes())
        for off in range(0, len(data), CHUNK_BYTES):
            data[min(off + CHUNK_BYTES // 2, len(data) - 1)] ^= 0xFF
        f.write_bytes(bytes(data))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return d


def test_a_node_fetches_a_model_it_lacks_and_serves_it_with_the_same_text(
    cluster: Cluster, big_models: Path, tmp_path: Path
) -> None:
    a = cluster.start(1, extra=opts(big_models))
    empty = tmp_path / "b-models"
    empty.mkdir()
    b = cluster.start(2, bootstrap=a, extra=opts(empty))
    wait_until(lambda: advertises(b, BIG, 1), 20, "B sees A's model")
    want_id = inspect_model(big_models / BIG).model_id
    before = greedy(a, BIG, "What is a Merkle tree?")

    # as an operator would: `vcoind model fetch`, which waits and prints the outcome
    out = subprocess.run([sys.executable, "-m", "vcoind", "model", "fetch", BIG, "--json",
                          "--datadir", str(b.datadir)], capture_output=True, text=True,
                         timeout=180, check=True)  # fmt: skip
    job = json.loads(out.stdout)
    assert job["status"] == "done", job
    assert job["bytes"] == travelling_bytes(big_models / BIG)
    assert list(job["peers"]) == [a.info["peer_id"]]
    got = inspect_model(empty / BIG)
    assert got.model_id == want_id
    models = b.rpc.call("vcoin_models")
    assert [m["model_id"] for m in models["models"]] == [want_id]
    assert models["fetches"][0]["status"] == "done"
    # the progress of the fetch was on the board, and ended
    steps = [s for s in b.rpc.call("vcoin_nodeInfo")["progress"] if s["kind"] == "fetch"]
    assert steps and steps[0]["outcome"] == "done" and steps[0]["fraction"] == 1.0

    # A leaves: B runs the task on the weights it fetched, with the same greedy text.
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(timeout=30)
    after = greedy(b, BIG, "What is a Merkle tree?")
    assert after["node_id"] == b.info["peer_id"]
    assert after["result"] == before["result"]

    # A second fetch of a model it holds is refused with a clear error.
    with pytest.raises(Exception, match="already"):
        b.rpc.call("vcoin_fetchModel", {"model": BIG})


def test_a_peer_sending_bad_bytes_is_dropped_and_the_fetch_completes_from_another(
    cluster: Cluster, big_models: Path, tmp_path: Path
) -> None:
    liar_models = tmp_path / "liar"
    liar_copy(big_models / BIG, liar_models)
    a = cluster.start(1, extra=opts(big_models))
    c = cluster.start(3, bootstrap=a, extra=opts(liar_models))
    empty = tmp_path / "b-models"
    empty.mkdir()
    b = cluster.start(2, bootstrap=a, extra=opts(empty))
    wait_until(lambda: advertises(b, BIG, 2), 20, "B sees the model on A and C")
    # both advertise the same model id: C's cached id is the honest one
    ids = {m["model_id"] for p in b.rpc.call("vcoin_peers") for m in p["models"]}
    assert ids == {inspect_model(big_models / BIG).model_id}

    job = fetch(b, BIG)
    assert job["status"] == "done", job
    liar = c.info["peer_id"]
    assert "bad bytes" in job["dropped"][liar]
    assert job["peers"][a.info["peer_id"]] > 0
    assert inspect_model(empty / BIG).model_id == inspect_model(big_models / BIG).model_id
    log = (b.datadir / "vcoind.log").read_text()
    assert f"peer {liar} sent a bad model file" in log
    with pytest.raises(Exception, match="already"):
        b.rpc.call("vcoin_fetchModel", {"model": BIG})


def test_a_fetch_cut_by_kill_resumes_from_the_bytes_on_disk(
    cluster: Cluster, big_models: Path, tmp_path: Path
) -> None:
    a_dir = cluster.base / "node1"
    a_dir.mkdir(parents=True)
    (a_dir / "config.toml").write_text("[compute]\nupload_mb_s = 1.5\n")  # ~8 s for 12 MB
    a = cluster.start(1, extra=opts(big_models))
    empty = tmp_path / "b-models"
    empty.mkdir()
    b = cluster.start(2, bootstrap=a, extra=opts(empty))
    wait_until(lambda: advertises(b, BIG, 1), 20, "B sees A's model")
    b.rpc.call("vcoin_fetchModel", {"model": BIG})

    def fraction() -> float:
        steps = [s for s in b.rpc.call("vcoin_nodeInfo")["progress"] if s["kind"] == "fetch"]
        return float(steps[0]["fraction"]) if steps else 0.0

    wait_until(lambda: 0.3 < fraction() < 0.9, 30, "the fetch under way")
    b.proc.kill()
    b.proc.wait()
    staging = [d for d in empty.iterdir() if d.name.startswith(".fetch-")]
    assert len(staging) == 1 and not (empty / BIG).exists()

    # restarted as configured to serve the model: it fetches it on its own, resuming
    b = cluster.start(2, bootstrap=a, extra=opts(empty, "--fetch-model", BIG))

    def ended() -> dict[str, Any] | None:
        jobs = b.rpc.call("vcoin_models")["fetches"]
        return next((j for j in jobs if j["status"] != "running"), None)

    try:
        job = wait_until(ended, 120, "the fetch on start to end")
    except AssertionError as exc:  # say what B knew, and what its log says
        peers = [(p["peer_id"][:12], [m["name"] for m in p["models"]])
                 for p in b.rpc.call("vcoin_peers")]  # fmt: skip
        tail = (b.datadir / "vcoind.log").read_text().splitlines()[-40:]
        raise AssertionError(
            f"{exc}; jobs {b.rpc.call('vcoin_models')['fetches']}; "
            f"peers {peers}; log:\n" + "\n".join(tail)
        ) from None
    assert job["status"] == "done", job
    assert [m["name"] for m in b.rpc.call("vcoin_models")["models"]] == [BIG]
    # at least one chunk was not fetched again
    assert 0 < job["bytes"] <= travelling_bytes(big_models / BIG) - CHUNK_BYTES
    assert "resuming" in (b.datadir / "vcoind.log").read_text()
    assert inspect_model(empty / BIG).model_id == inspect_model(big_models / BIG).model_id


def test_auto_span_hosts_fetch_only_their_spans_and_the_pipeline_matches(
    cluster: Cluster, deep_models: Path, tmp_path: Path
) -> None:
    a = cluster.start(1, extra=opts(deep_models))
    hosts = []
    for i, size in ((2, 3), (3, 9)):
        empty = tmp_path / f"models{i}"
        empty.mkdir()
        n = cluster.start(i, bootstrap=a, extra=opts(empty, "--serve-layers", f"auto:{size}"))
        # one at a time: the second picks after it has heard of the first's span
        wait_until(lambda n=n: n.rpc.call("vcoin_nodeInfo")["capabilities"]["spans"], 60,
                   f"node {i} serves a span")  # fmt: skip
        hosts.append(n)
    spans = [h.rpc.call("vcoin_nodeInfo")["capabilities"]["spans"] for h in hosts]
    assert [[(s["start"], s["end"]) for s in ss] for ss in spans] == [[(0, 2)], [(3, 11)]]
    whole = sum(f.stat().st_size for f in (deep_models / DEEP).glob("*.safetensors"))
    first = hosts[0].datadir / "shards" / f"{DEEP}.0-2"
    span_bytes = sum(f.stat().st_size for f in first.glob("*.safetensors"))
    assert span_bytes < 0.35 * whole, (span_bytes, whole)
    assert not (tmp_path / "models2" / DEEP).exists()  # never the whole model

    wait_until(lambda: sum(bool(p["spans"]) for p in a.rpc.call("vcoin_peers")) >= 2, 20,
               "A sees both spans")  # fmt: skip
    single = greedy(a, DEEP, "Explain proof of stake")
    piped = greedy(a, DEEP, "Explain proof of stake", pipeline=True)
    assert [h["layers"] for h in piped["timings"]["hops"]] == ["0-2", "3-11"]
    assert piped["result"] == single["result"]


def test_auto_span_hosts_close_the_gap_a_leaving_host_leaves(
    cluster: Cluster, models_dir: Path, tmp_path: Path
) -> None:
    """Three span hosts with auto:2 on a 4-layer model: two serve 0-1, one 2-3. When the
    2-3 host dies, one of the others moves there and pipelines work again."""
    a = cluster.start(1, extra=opts(models_dir))
    hosts = {}
    for i in (2, 3, 4):
        empty = tmp_path / f"models{i}"
        empty.mkdir()
        n = cluster.start(i, bootstrap=a, extra=opts(empty, "--serve-layers", "auto:2"))
        wait_until(lambda n=n: n.rpc.call("vcoin_nodeInfo")["capabilities"]["spans"], 60,
                   f"node {i} serves a span")  # fmt: skip
        hosts[i] = n

    def spans_of(n: DevNode) -> list[tuple[int, int]]:
        return [
            (s["start"], s["end"]) for s in n.rpc.call("vcoin_nodeInfo")["capabilities"]["spans"]
        ]

    picked = {i: spans_of(n) for i, n in hosts.items()}
    assert sorted(map(tuple, picked.values())) == [((0, 1),), ((0, 1),), ((2, 3),)], picked
    lone = next(i for i, ss in picked.items() if ss == [(2, 3)])
    hosts[lone].proc.kill()
    hosts[lone].proc.wait()
    rest = [n for i, n in hosts.items() if i != lone]
    wait_until(lambda: sorted(s for n in rest for s in spans_of(n)) == [(0, 1), (2, 3)], 60,
               "one of the 0-1 hosts moves to 2-3")  # fmt: skip

    def route_ok() -> bool:
        alive = {p["peer_id"] for p in a.rpc.call("vcoin_peers")}
        return all(n.info["peer_id"] in alive for n in rest) and lone_gone(a, hosts[lone])

    wait_until(route_ok, 30, "A forgets the dead host")
    single = greedy(a, "tiny-qwen2", "What is a GPU?")
    piped = greedy(a, "tiny-qwen2", "What is a GPU?", pipeline=True)
    assert [h["layers"] for h in piped["timings"]["hops"]] == ["0-1", "2-3"]
    assert piped["result"] == single["result"]


def lone_gone(a: DevNode, dead: DevNode) -> bool:
    return all(p["peer_id"] != dead.info["peer_id"] or not p["spans"]
               for p in a.rpc.call("vcoin_peers"))  # fmt: skip

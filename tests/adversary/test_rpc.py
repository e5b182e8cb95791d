"""A web page the operator visits attacks the local daemon's RPC (a real vcoind process).

The page's browser talks to 127.0.0.1 like the CLI does; what it cannot do is send the
RPC cookie or choose its own Origin. A DNS-rebinding page reaches the port under its own
host name. Each attack below worked on the daemon before the access guard
(vcoind/rpc/guard.py): it reached the methods and got 200.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from devnet.__main__ import DevNode
from tests.conftest import Cluster
from vcoind.cli.client import ClientError
from vcoind.rpc import RPCError

pytestmark = pytest.mark.slow

EVIL = "https://evil.example"
CALL = {"jsonrpc": "2.0", "id": 1, "method": "vcoin_nodeInfo", "params": {}}
SLA = {"jsonrpc": "2.0", "id": 2, "method": "vcoin_slaCreate", "params": {"customer": "evil"}}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[DevNode]:
    """One real daemon (serving the test model) for the whole file: the attacks change
    nothing on it, each test checks that itself."""
    cluster = Cluster(tmp_path_factory.mktemp("rpc"))
    node = cluster.start(1, extra=["--models-dir", str(models_dir)])
    yield node
    assert cluster.stop() == []
    assert "Traceback" not in node.log_path.read_text()


def port_of(node: DevNode) -> int:
    return int(node.info["rpc_url"].rsplit(":", 1)[1])


def test_an_evil_origin_websocket_is_refused(node: DevNode) -> None:
    ws_url = node.info["rpc_url"].replace("http://", "ws://") + "/ws"

    async def attack() -> Any:
        # What `new WebSocket("ws://127.0.0.1:PORT/ws")` on evil.example sends.
        async with trio_websocket.open_websocket_url(
            ws_url, extra_headers=[(b"Origin", EVIL.encode())]
        ) as ws:
            await ws.send_message(json.dumps(CALL))
            return json.loads(await ws.get_message())

    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        reply = trio.run(attack)
        pytest.fail(f"the page's WebSocket reached the RPC: {reply}")
    assert refused.value.status_code == 403
    assert b"Origin" in (refused.value.body or b"")


def test_a_rebinding_text_plain_post_is_refused(node: DevNode) -> None:
    port = port_of(node)
    # A "simple" cross-site request (no preflight): text/plain, a foreign Origin, and the
    # Host a rebound name carries; it tries to write (an SLA) and to read.
    for body in (SLA, CALL):
        for headers in (
            {"Origin": f"http://rebind.evil.example:{port}", "Host": f"rebind.evil.example:{port}"},
            {"Origin": EVIL},
        ):
            r = httpx.post(node.info["rpc_url"] + "/rpc", content=json.dumps(body), timeout=10,
                           headers={"Content-Type": "text/plain", **headers})  # fmt: skip
            assert r.status_code == 403, (headers, r.text)
            assert "result" not in r.text and "access-control-allow-origin" not in r.headers
    assert node.rpc.call("vcoin_slaList")["slas"] == []  # nothing was written


def test_no_cookie_no_rpc(node: DevNode) -> None:
    url = node.info["rpc_url"]
    r = httpx.post(url + "/rpc", json=CALL, timeout=10)
    assert r.status_code == 401 and "rpc.cookie" in r.json()["error"]["message"]
    for path in ("/metrics", "/api/cluster/nodes", "/dashboard"):
        assert httpx.get(url + path, timeout=10).status_code == 401, path
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    ok = httpx.post(url + "/rpc", json=CALL, headers=node.rpc.auth, timeout=10)
    assert ok.json()["result"]["peer_id"] == node.info["peer_id"]


def test_the_dashboard_link_works_once_and_sets_a_strict_httponly_session(node: DevNode) -> None:
    vcoin = [sys.executable, "-c",
             "import sys; from vcoind.cli import client_main; sys.exit(client_main())"]  # fmt: skip
    out = subprocess.run([*vcoin, "--datadir", str(node.datadir), "dashboard"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    link = out.stdout.strip()
    base = node.info["rpc_url"]
    assert link.startswith(base + "/dashboard?token=")
    with httpx.Client(timeout=10) as browser:
        opened = browser.get(link)
        assert opened.status_code == 303 and opened.headers["location"] == "/dashboard"
        cookie = opened.headers["set-cookie"]
        attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict"} <= attrs, cookie
        page = browser.get(base + "/dashboard")  # the jar sends the session cookie
        assert page.status_code == 200 and "<title>VCoin node</title>" in page.text
        own = {"Origin": base}
        assert browser.post(base + "/rpc", json=CALL, headers=own).json()["result"]
    # The link is spent: a second browser (or whoever saw the URL) gets nothing.
    again = httpx.get(link, timeout=10)
    assert again.status_code == 401 and "set-cookie" not in again.headers
    assert "already used" in again.json()["error"]["message"]


def test_training_reads_no_file_outside_the_data_directory(node: DevNode, tmp_path: Path) -> None:
    outside = tmp_path / "notes.jsonl"  # the operator's file, next to (not in) the datadir
    outside.write_text(json.dumps({"text": "my seed phrase is ..."}) + "\n")
    link = node.datadir / "link.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/hostname")
    for path in ("/etc/hostname", str(outside), str(node.datadir / ".." / outside.name),
                 str(link), "eth.key", str(node.datadir / "rpc.cookie")):  # fmt: skip
        with pytest.raises(ClientError, match="not under the node's data directory") as refused:
            node.rpc.call("vcoin_train", {"model": "tiny-qwen2", "dataset": path})
        assert "-32602" in str(refused.value), path  # INVALID_PARAMS


def test_the_dataset_rule(tmp_path: Path) -> None:
    from vcoind.train.api import dataset_path

    root = tmp_path / "datadir"
    (root / "sets").mkdir(parents=True)
    (root / "sets" / "a.jsonl").write_text("{}\n")
    assert dataset_path("sets/a.jsonl", root) == (root / "sets" / "a.jsonl").resolve()
    assert dataset_path(str(root / "sets"), root) == (root / "sets").resolve()
    (root / "sets" / "escape").symlink_to(tmp_path)  # a directory dataset with a way out
    (tmp_path / "elsewhere.jsonl").write_text("{}\n")
    for bad in ("sets", "../elsewhere.jsonl", str(tmp_path / "elsewhere.jsonl"), "p2p.key",
                "sets/escape/elsewhere.jsonl"):  # fmt: skip
        with pytest.raises(RPCError, match="not under the node's data directory"):
            dataset_path(bad, root)

"""Three real daemons as separate OS processes on loopback."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import Cluster, free_port, peers_of, wait_until

pytestmark = pytest.mark.slow


def test_full_mesh_and_clean_sigterm(cluster: Cluster) -> None:
    n1 = cluster.start(1)
    n2 = cluster.start(2, bootstrap=n1, wait=False)
    n3 = cluster.start(3, bootstrap=n1)
    ids = {n.info["peer_id"] for n in (n1, n2, n3)}
    for n in (n1, n2, n3):
        wait_until(
            lambda n=n: peers_of(n) == ids - {n.info["peer_id"]}, 15, f"mesh at node {n.index}"
        )

    # node 2 and 3 only knew node 1: they found each other through gossip and dialled directly
    def direct() -> bool:
        conn = {p["peer_id"]: p["connected"] for p in n2.rpc.call("vcoin_peers")}
        return conn[n3.info["peer_id"]] is True

    wait_until(direct, 15, "node 2 dialled node 3 directly")

    problems = cluster.stop()
    assert problems == []
    for n in (n1, n2, n3):
        assert n.proc.returncode == 0
        assert not (n.datadir / "run.json").exists()
        assert "Traceback" not in n.log_path.read_text()
        db = sqlite3.connect(n.datadir / "vcoin.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT peer_id FROM peers").fetchall()
        assert {r[0] for r in rows} == ids - {n.info["peer_id"]}
        db.close()


def test_heartbeat_relayed_when_not_directly_connected(cluster: Cluster) -> None:
    n1 = cluster.start(1)
    n2 = cluster.start(2, bootstrap=n1, extra=["--no-discover"], wait=False)
    n3 = cluster.start(3, bootstrap=n1, extra=["--no-discover"])
    id2, id3 = n2.info["peer_id"], n3.info["peer_id"]
    wait_until(lambda: id2 in peers_of(n3), 15, "node 3 hears node 2")
    wait_until(lambda: id3 in peers_of(n2), 15, "node 2 hears node 3")
    view = {p["peer_id"]: p for p in n3.rpc.call("vcoin_peers")}
    assert view[id2]["connected"] is False  # heard only through node 1
    assert view[n1.info["peer_id"]]["connected"] is True


def test_killed_node_expires_and_rejoins_with_same_key(cluster: Cluster) -> None:
    n1 = cluster.start(1)
    n2 = cluster.start(2, bootstrap=n1, wait=False)
    n3 = cluster.start(3, bootstrap=n1)
    id3 = n3.info["peer_id"]
    wait_until(lambda: id3 in peers_of(n1) and id3 in peers_of(n2), 15, "node 3 joined")

    n3.proc.send_signal(signal.SIGKILL)
    n3.proc.wait()
    wait_until(
        lambda: id3 not in peers_of(n1) and id3 not in peers_of(n2),
        15,
        "node 3 expired from the peer tables",
    )
    offline = {
        p["peer_id"]: p["status"] for p in n1.rpc.call("vcoin_peers", {"include_offline": True})
    }
    assert offline[id3] == "offline"

    n3b = cluster.start(3, bootstrap=n1)  # same datadir -> same key
    assert n3b.info["peer_id"] == id3
    wait_until(lambda: id3 in peers_of(n1) and id3 in peers_of(n2), 15, "node 3 rejoined")


def test_restarted_bootstrap_node_is_redialled(cluster: Cluster) -> None:
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    n1 = cluster.start(1, listen=listen)
    n2 = cluster.start(2, bootstrap=n1, extra=["--no-discover"])
    id1, id2 = n1.info["peer_id"], n2.info["peer_id"]
    wait_until(lambda: id2 in peers_of(n1), 15, "node 2 joined")

    n1.proc.send_signal(signal.SIGTERM)
    assert n1.proc.wait(20) == 0
    wait_until(lambda: id1 not in peers_of(n2), 15, "node 1 expired at node 2")

    n1b = cluster.start(1, listen=listen)
    assert n1b.info["peer_id"] == id1
    # node 2 has only its bootstrap entry: it must redial node 1 by itself
    wait_until(
        lambda: id1 in peers_of(n2) and id2 in peers_of(n1b),
        20,
        "node 2 redialled the restarted bootstrap node",
    )


def test_second_daemon_on_same_datadir_refuses(cluster: Cluster) -> None:
    n1 = cluster.start(1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vcoind",
            "--datadir",
            str(n1.datadir),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--rpc-addr",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert f"pid {n1.proc.pid}" in proc.stderr
    assert n1.rpc.call("vcoin_nodeInfo")["peer_id"] == n1.info["peer_id"]  # untouched


def test_client_cli_against_running_daemon(cluster: Cluster) -> None:
    n1 = cluster.start(1)
    n2 = cluster.start(2, bootstrap=n1)
    wait_until(lambda: n2.info["peer_id"] in peers_of(n1), 15, "node 2 joined")
    vcoin = [
        sys.executable,
        "-c",
        "import sys; from vcoind.cli import client_main; sys.exit(client_main())",
    ]
    out = subprocess.run(
        [*vcoin, "--datadir", str(n1.datadir), "peers"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "PEER" in out.stdout and n2.info["peer_id"][:8] in out.stdout
    js = subprocess.run(
        [*vcoin, "--datadir", str(n1.datadir), "--json", "node-info"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert js.returncode == 0, js.stderr
    assert f'"peer_id": "{n1.info["peer_id"]}"' in js.stdout
    status = subprocess.run(
        [*vcoin, "--datadir", str(n1.datadir), "--rpc", n1.info["rpc_url"], "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0 and "2 active nodes" in status.stdout
    missing = subprocess.run(
        [*vcoin, "--datadir", str(cluster.base / "nowhere"), "peers"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1 and "no daemon running" in missing.stderr


def test_sigint_is_a_clean_shutdown(cluster: Cluster) -> None:
    n1 = cluster.start(1)
    n1.proc.send_signal(signal.SIGINT)
    assert n1.proc.wait(20) == 0
    assert not (n1.datadir / "run.json").exists()
    log = n1.log_path.read_text()
    assert "received SIGINT, shutting down" in log and "Traceback" not in log


def test_taken_ports_are_clear_errors(cluster: Cluster) -> None:
    port = free_port()
    n1 = cluster.start(1, listen=f"/ip4/127.0.0.1/tcp/{port}")
    base = [sys.executable, "-m", "vcoind", "--datadir", str(cluster.base / "other")]
    p2p = subprocess.run(
        [*base, "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--rpc-addr", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p2p.returncode == 1
    assert f"cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already in use" in p2p.stderr
    rpc_addr = n1.info["rpc_url"].removeprefix("http://")
    rpc = subprocess.run(
        [*base, "--listen", "/ip4/127.0.0.1/tcp/0", "--rpc-addr", rpc_addr],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rpc.returncode == 1
    assert f"cannot serve RPC on {rpc_addr}: Address already in use" in rpc.stderr
    assert "Traceback" not in rpc.stderr + p2p.stderr
    assert not (cluster.base / "other" / "run.json").exists()

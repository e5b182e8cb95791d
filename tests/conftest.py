"""Shared fixtures: real daemons as OS processes (through the devnet launcher)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import DevNode, start_node, stop_all

FAST = {"heartbeat": 0.3, "peer_timeout": 3.0, "network": "testnet"}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll a condition on real state (RPC, files) until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # the daemon may be between restarts
            last_exc = exc
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error {last_exc})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: list[DevNode] = []

    def start(self, index: int, bootstrap: DevNode | None = None, **kw: Any) -> DevNode:
        opts = {**FAST, **kw}
        node = start_node(
            index, self.base, bootstrap=bootstrap.p2p_addr if bootstrap else None, **opts
        )
        self.nodes = [n for n in self.nodes if n.index != index] + [node]
        return node

    def stop(self) -> list[str]:
        return stop_all(self.nodes)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    for n in c.nodes:
        if n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()


def peers_of(node: DevNode) -> set[str]:
    return {p["peer_id"] for p in node.rpc.call("vcoin_peers")}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with the random test model (real safetensors + tokenizer), made once."""
    from vcoind.compute.testmodel import make_test_model

    root = tmp_path_factory.mktemp("models")
    make_test_model(root / "tiny-qwen2")
    return root

"""Shared fixtures: real daemons as OS processes (through the devnet launcher)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

import devnet.__main__ as devnet_main
from devnet.__main__ import DevNode, start_node, stop_all
from devnet.chain import ANVIL_DEPLOYER_KEY, Anvil, start_anvil
from devnet.zygote import Zygote
from vcoind.chain.cli import DEPLOYER_KEY_ENV
from vcoind.chain.contracts import Contracts, Deployment
from vcoind.consensus.outcome import task_id_bytes32
from vcoind.store import Store

# The engine's triton kernels (vcoind.compute.kernels) run on CPU tensors under triton's
# interpreter: read when the kernels are first loaded.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _zygote() -> Iterator[None]:
    """Daemons are forked from one process that imported their stack once (``devnet.zygote``):
    about 130 starts would each spend 3-7 s of CPU on imports. ``VCOIN_TEST_ZYGOTE=0`` starts
    each with ``python -m vcoind`` instead."""
    if os.environ.get("VCOIN_TEST_ZYGOTE", "1") == "0":
        yield
        return
    devnet_main.ZYGOTE = z = Zygote()
    try:
        yield
    finally:
        devnet_main.ZYGOTE = None
        z.close()


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

    def start(
        self, index: int, bootstrap: DevNode | None = None, wait: bool = True, **kw: Any
    ) -> DevNode:
        """Start a daemon. ``wait=False`` returns once it is launched: the next one starts
        meanwhile (two cores import at once), and it is waited for when first used."""
        opts = {**FAST, **kw}
        node = start_node(
            index, self.base, bootstrap=bootstrap.p2p_addr if bootstrap else None, wait=wait,
            **opts,
        )  # fmt: skip
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


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real SQLite store in the test's directory, opened and closed around it."""
    s = Store(tmp_path / "db")
    await s.open()
    yield s
    await s.close()


def peers_of(node: DevNode) -> set[str]:
    return {p["peer_id"] for p in node.rpc.call("vcoin_peers")}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with the random test model (real safetensors + tokenizer), made once."""
    from vcoind.compute.testmodel import make_test_model

    root = tmp_path_factory.mktemp("models")
    make_test_model(root / "tiny-qwen2")
    return root


# --- a shared anvil chain (tests of anchoring) ------------------------------------


@dataclass
class Chain:
    anvil: Anvil
    deployment: Deployment
    path: Path
    c: Contracts

    def flags(self) -> list[str]:
        return ["--chain-rpc", self.anvil.url, "--contracts", str(self.path)]

    def stake(self, address: str) -> int:
        return int(self.c.staking.functions.stakeOf(address).call())

    def balance(self, address: str) -> int:
        return int(self.c.token.functions.balanceOf(address).call())

    def anchored_events(self, task_id: str) -> list[Any]:
        return list(self.c.anchor.events.Anchored().get_logs(
            from_block=0, argument_filters={"taskId": task_id_bytes32(task_id)}))  # fmt: skip


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Chain]:
    # The daemons (children) read these: stake changes show within half a second, and a
    # task nobody may bid on fails fast.
    monkeypatch.setenv("VCOIN_CHAIN_STAKE_REFRESH_S", "0.5")
    monkeypatch.setenv("VCOIN_CHAIN_RETRY_MAX_S", "3")
    monkeypatch.setenv("VCOIN_CHAIN_TIMEOUT_S", "3")
    anvil = start_anvil(free_port(), tmp_path / "anvil.log")
    try:
        path = tmp_path / "deployment.json"
        # Deployed with the command line a user would run.
        out = subprocess.run(
            [sys.executable, "-m", "vcoind", "chain", "deploy", "--rpc", anvil.url,
             "--out", str(path), "--network", "testnet"],
            env={**os.environ, DEPLOYER_KEY_ENV: ANVIL_DEPLOYER_KEY}, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "TaskAnchor" in out.stdout
        d = Deployment.read(path)
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        yield Chain(anvil, d, path, Contracts.at(w3, d.addresses))
    finally:
        anvil.stop()

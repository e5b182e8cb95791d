"""The chaos run's faults: a schedule drawn from the seed, and how each kind is injected on
real processes (kill -9 and restart, SIGSTOP/SIGCONT, anvil frozen, anvil_reorg, junk and
oversized RPC bodies)."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from devnet.__main__ import DevNode
from devnet.chain import Anvil
from vcoind.datadir import DataDir

KINDS = ("kill", "stop", "anvil", "reorg", "rpc_junk")


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the client started
    kind: str
    target: int  # node index (0: the chain)
    duration_s: float


@dataclass
class Injected:
    fault: Fault
    start: float  # wall clock (time.time(): the daemons' timestamps)
    end: float = 0.0
    detail: str = ""
    error: str = ""  # set when the system did not take it as it should (a finding)
    extra: dict[str, Any] = field(default_factory=dict)


def schedule(rng: random.Random, nodes: int, window_s: float, short: bool) -> list[Fault]:
    """About one fault per 20 s of the window (at least two of each kind), spread over its
    middle; node faults pick any node: every node is an origin, a worker and a span host."""
    per_kind = max(2, round(window_s / 20 / len(KINDS)))
    out = []
    for kind in KINDS:
        for _ in range(per_kind):
            at = rng.uniform(0.1, 0.8) * window_s
            target = 0 if kind in ("anvil", "reorg") else rng.randint(1, nodes)
            freeze = rng.uniform(8, 15) if short else rng.uniform(30, 60)
            dur = {"kill": rng.uniform(1, 5), "stop": rng.uniform(3, 6 if short else 15),
                   "anvil": freeze}.get(kind, 0.0)  # fmt: skip
            out.append(Fault(round(at, 1), kind, target, round(dur, 1)))
    return sorted(out, key=lambda f: f.at_s)


def chain_call(url: str, method: str, params: list[Any], timeout: float = 3.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    if "error" in out:
        raise RuntimeError(f"{method}: {out['error']}")
    return out.get("result")


class Nodes(Protocol):
    """What the faults need from the run: its nodes, and a way to restart one."""

    def node(self, index: int) -> DevNode: ...

    def restart(self, index: int) -> DevNode: ...


def raw_http(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes to 127.0.0.1:port as they are; the first bytes of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on an oversized body: its answer still counts
        chunks: list[bytes] = []
        try:
            while len(b"".join(chunks)) < 4096 and (b := s.recv(4096)):
                chunks.append(b)
        except OSError:
            pass
    return b"".join(chunks)


def rpc_junk(node: DevNode) -> tuple[str, str]:
    """Junk bytes, a non-JSON body and a 4 MiB body to the node's RPC port: each must get a
    clear HTTP error (or a close for bytes that are not HTTP), and the node must still answer
    afterwards. Returns (detail, error)."""
    port = int(str(node.info["rpc_url"]).rstrip("/").rsplit(":", 1)[1])
    # With the cookie: the bodies must reach the size limit and the JSON parser, not stop
    # at the authorisation check.
    auth = f"Authorization: Bearer {DataDir(node.datadir).read_cookie()}\r\n".encode()
    rng = random.Random(port)
    junk = bytes(rng.getrandbits(8) for _ in range(512))
    big = b"[" + b"1," * (2 * 1024 * 1024) + b"1]"
    head = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        + auth
        + (b"Content-Type: application/json\r\n")
    )
    tries = {
        "bytes": junk,
        "body": head + b"Content-Length: 512\r\n\r\n" + junk,
        "oversized": head + f"Content-Length: {len(big)}\r\n\r\n".encode() + big,
    }
    seen, errors = [], []
    for name, payload in tries.items():
        try:
            reply = raw_http(port, payload)
        except OSError as exc:
            reply = f"({type(exc).__name__})".encode()
        status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
        seen.append(f"{name}: {status or '(closed)'}")
        # A clear error: an HTTP 4xx, or a JSON-RPC error object (HTTP 200, as the spec says)
        clear = status.startswith(("HTTP/1.1 4", "HTTP/1.0 4")) or (
            status.startswith("HTTP/1.1 200") and b'"error"' in reply)  # fmt: skip
        if name != "bytes" and not clear:
            errors.append(f"{name} got {status or 'no answer'}")
    try:
        node.rpc.call("vcoin_nodeInfo")
    except Exception as exc:
        errors.append(f"no answer after the junk: {exc}")
    return "; ".join(seen), "; ".join(errors)


def inject(f: Fault, nodes: Nodes, anvil: Anvil, chain_lock: threading.Lock,
           log: Callable[[str], None]) -> Injected:  # fmt: skip
    rec = Injected(f, time.time())
    if f.kind == "kill":
        n = nodes.node(f.target)
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait()
        time.sleep(f.duration_s)
        try:
            nodes.restart(f.target)
            rec.detail = f"killed, restarted after {f.duration_s:g} s"
        except Exception as exc:
            rec.error = f"restart failed: {exc}"
    elif f.kind == "stop":
        n = nodes.node(f.target)
        n.proc.send_signal(signal.SIGSTOP)
        time.sleep(f.duration_s)
        n.proc.send_signal(signal.SIGCONT)
        rec.detail = f"SIGSTOP {f.duration_s:g} s"
    elif f.kind == "anvil":
        with chain_lock:  # the miner waits too: a frozen chain makes no blocks
            anvil.pause()
            time.sleep(f.duration_s)
            anvil.resume()
        rec.detail = f"anvil frozen {f.duration_s:g} s"
    elif f.kind == "reorg":
        depth = 1 + int(f.at_s * 10) % 2
        with chain_lock:
            try:
                head = int(chain_call(anvil.url, "eth_blockNumber", []), 16)
                chain_call(anvil.url, "anvil_reorg", [depth, []], timeout=10)
                rec.detail = f"reorg of the last {depth} block(s) at {head}"
            except (OSError, RuntimeError, ValueError) as exc:
                rec.error = f"anvil_reorg failed: {exc}"
    elif f.kind == "rpc_junk":
        try:
            rec.detail, rec.error = rpc_junk(nodes.node(f.target))
        except Exception as exc:
            rec.error = f"could not send: {exc}"
    rec.end = time.time()
    log(f"fault {f.kind} node {f.target}: {rec.detail}{' ERROR ' + rec.error if rec.error else ''}")
    return rec

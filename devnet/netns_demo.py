"""``python -m devnet --netns``: the namespace testbed (``devnet.netns``) with a daemon on
the public LAN and one behind each NAT; shows what reaches what.

Checked (``--check`` exits 1 if one fails): the NAT hides the NATed nodes, they cannot be
dialled from the public LAN, the three form a network, a task on the public node is
served by the NATed worker over the connection it dialled out, and a task between the
two NATed nodes goes through the public node's relay (each found by a dial-back that it
cannot be dialled and holds a slot there), after which DCUtR punches a direct connection
between them through both NATs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devnet.__main__ import (
    TEST_MODEL,
    DevnetError,
    ensure_test_model,
    report_stop,
    run_task,
    status_line,
    stop_all,
    wait_for_mesh,
)
from devnet.netns import (
    P2P_PORT,
    ROLES,
    NetnsError,
    NsNode,
    Testbed,
    connect_in,
    established_peers,
    start_network,
)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    what: str
    detail: str


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def check_nat(bed: Testbed) -> Outcome:
    """The public node's p2p connections come from the routers' public IPs only."""
    seen = established_peers(bed.public.ns)
    routers = {h.nat_ip for h in bed.nated}
    ok = seen == routers
    return Outcome(ok, "the NAT hides the NATed nodes",
                   f"the public node's connections to port {P2P_PORT} come from "
                   f"{', '.join(sorted(seen)) or 'nobody'} (the routers are "
                   f"{', '.join(sorted(routers))})")  # fmt: skip


def check_unreachable(bed: Testbed) -> Outcome:
    """A TCP connect from the public namespace to a NATed node fails."""
    h = bed.nated[0]
    what, tcp = "a NATed node cannot be dialled from the public LAN", f"TCP {h.ip}:{P2P_PORT}"
    try:
        connect_in(bed.public.ns, h.ip, P2P_PORT, 2.0).close()
    except OSError as exc:
        return Outcome(True, what, f"{tcp} from {bed.public.ip}: {exc.strerror or exc}")
    return Outcome(False, what, f"{tcp} from {bed.public.ip}: CONNECTED")


def task_outcome(origin: NsNode, worker: NsNode, what: str, timeout: float,
                 prompt: str) -> Outcome:  # fmt: skip
    req: dict[str, Any] = {"model": TEST_MODEL, "input": prompt, "timeout_s": timeout / 2,
                           "parameters": {"max_new_tokens": 16}}  # fmt: skip
    t0 = time.monotonic()
    t = run_task(origin, req, timeout)
    took = time.monotonic() - t0
    by = "the worker" if t.get("node_id") == worker.info["peer_id"] else str(t.get("node_id"))
    if t["status"] == "completed":
        return Outcome(True, what, f"completed by {by} in {took:.1f} s: {t['result']!r}")
    return Outcome(False, what, f"{t['status']} after {took:.1f} s: {t.get('error')}")


def _connections(n: NsNode, names: dict[str, str]) -> str:
    peers = n.rpc.call("vcoin_peers")
    direct = [names.get(p["peer_id"], p["peer_id"][-6:]) for p in peers if p["connected"]]
    gossip = [names.get(p["peer_id"], p["peer_id"][-6:]) for p in peers if not p["connected"]]
    return f"direct: {', '.join(direct) or '-'}; through gossip only: {', '.join(gossip) or '-'}"


def hole_punched(bed: Testbed, worker: NsNode, requester: NsNode, timeout: float = 60.0
                 ) -> Outcome:  # fmt: skip
    """DCUtR upgraded the NATed nodes' relayed connection: the worker's namespace has a
    direct connection from the requester's NAT."""
    nat2 = bed.nated[1].nat_ip
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if nat2 in established_peers(bed.nated[0].ns):
            return Outcome(True, "hole punched between the NATed nodes",
                           f"a direct connection from {nat2} (NAT 2) to the worker "
                           f"{time.monotonic() - t0:.1f} s after the relayed task")  # fmt: skip
        time.sleep(0.5)
    return Outcome(
        False,
        "hole punched between the NATed nodes",
        f"no direct connection after {timeout:.0f} s (still relayed)",
    )


def _demo(bed: Testbed, base: Path, ns: argparse.Namespace, nodes: list[NsNode]) -> int:
    """Start the daemons (appended to ``nodes`` at once, for the caller to stop), check,
    report; with ``ns.check`` returns, else runs until Ctrl-C."""
    print(f"devnet --netns: testbed {bed.id} built in {bed.build_s:.2f} s (network "
          f"namespaces, veth pairs, a bridge, nftables NAT); datadirs under {base}",
          flush=True)  # fmt: skip
    _table([("NAMESPACE", "ADDRESS", "WHAT"), *bed.describe()])
    models = ensure_test_model(base / "models")
    t0 = time.monotonic()
    nodes += start_network(bed, base, models, heartbeat=ns.heartbeat_interval,
                           peer_timeout=ns.peer_timeout, network=ns.network)  # fmt: skip
    for n in nodes:
        n.info  # noqa: B018 (each is up, or a clear error)
    up = time.monotonic() - t0
    took = wait_for_mesh(list(nodes), ns.timeout)
    print(f"\n3 daemons up in {up:.1f} s; every node lists the other 2 {took:.1f} s later\n",
          flush=True)  # fmt: skip
    names = {n.info["peer_id"]: f"node {n.index}" for n in nodes}
    rows = [("NODE", "NAMESPACE", "IP", "ROLE", "PEER ID")]
    for n, role in zip(nodes, ROLES.values(), strict=True):
        assert n.host is not None
        rows.append((str(n.index), n.host.ns, n.host.ip, role, n.info["peer_id"]))
    _table(rows)
    for n in nodes:
        print(f"  node {n.index} peers: {_connections(n, names)}", flush=True)
    pub, worker, requester = nodes
    checks = [check_nat(bed), check_unreachable(bed)]
    checks.append(task_outcome(pub, worker, "task public node -> NATed worker", 60.0,
                               ns.prompt))  # fmt: skip
    print("\nwhat works:", flush=True)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'}  {c.what}: {c.detail}", flush=True)
    relayed = task_outcome(requester, worker, "task NATed requester -> NATed worker (relay)",
                           60.0, ns.prompt)  # fmt: skip
    checks.append(relayed)
    print(f"  {'ok  ' if relayed.ok else 'FAIL'}  {relayed.what}: {relayed.detail}", flush=True)
    checks.append(hole_punched(bed, worker, requester))
    print(f"  {'ok  ' if checks[-1].ok else 'FAIL'}  {checks[-1].what}: {checks[-1].detail}",
          flush=True)  # fmt: skip
    if ns.check:
        return 0 if all(c.ok for c in checks) else 1
    print("running; Ctrl-C stops all nodes and removes the namespaces", flush=True)
    started = time.monotonic()
    while True:
        line = status_line(list(nodes), started)
        if sys.stdout.isatty():
            print("\r" + line, end="", flush=True)
        else:
            print(line, flush=True)
        time.sleep(2 if sys.stdout.isatty() else 10)


def run(ns: argparse.Namespace) -> int:
    """The whole ``--netns`` devnet (``ns``: the devnet's parsed arguments). The daemons
    are stopped before the namespaces go (``Testbed`` kills whatever still runs there)."""
    base = ns.dir or Path(tempfile.mkdtemp(prefix="vcoin-netns-"))
    temp = ns.dir is None and not ns.keep
    nodes: list[NsNode] = []
    problems: list[str] = []
    code = 1
    try:
        with Testbed() as bed:
            try:
                code = _demo(bed, base, ns, nodes)
            except KeyboardInterrupt:
                print("\nstopping", flush=True)
                code = 0
            finally:
                problems = stop_all(list(nodes))
    except (NetnsError, DevnetError) as exc:
        print(f"devnet --netns: error: {exc}", file=sys.stderr)
        code = 1
    # no daemon started: no logs worth keeping
    code = report_stop("devnet --netns", problems, len(nodes), code, base, temp,
                       "; namespaces removed")  # fmt: skip
    return code

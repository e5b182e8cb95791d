"""A simulated transport for ``bench/scale.py``: heartbeats over a model of GossipSub.

What it models (the py-libp2p 0.8.1 router as ``vcoind.p2p.host`` configures it):

- every node publishes one heartbeat every ``interval`` seconds on one topic;
- each node holds ``conns`` connections (the keeper dials learned peers up to
  ``p2p.conn_low`` = 64) and a mesh of ``mesh`` of them (D = 6; a network of at most
  D_high + 1 = 13 nodes ends fully meshed, since grafts are accepted up to D_high);
- a message is forwarded on first receipt to every mesh peer but the one it came from
  and its origin (no flood publish), so duplicates arrive; the copies and hops are
  counted in a discrete-event run in virtual time (one hop = ``hop_ms`` plus an
  exponential jitter of the same mean, which decides which copy wins);
- IHAVE gossip, once per router heartbeat (1 s): to max(6, 25 % of the non-mesh
  peers) non-mesh peers, the ids of every message of the last 3 router heartbeats;
  IWANT is counted as none (the mesh delivers first: the real run measures it);
- bytes: ``msg_bytes`` per copy (the real run's mean RPC size), ``id_bytes`` per IHAVE id.

CPU is projected with a :class:`CpuModel` fitted on the real run: an idle part plus a
cost per unique heartbeat taken (which carries its duplicates and gossip at the sizes
measured). Per-node rates are averaged over a sample of origins.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

D, D_HIGH = 6, 12
CONN_LOW = 64
GOSSIP_WINDOW = 3  # router heartbeats of message ids in an IHAVE
GOSSIP_MIN, GOSSIP_FACTOR = 6, 0.25
ROUTER_HEARTBEAT_S = 1.0
MSG_ID_BYTES = 48  # from-id (38) + seqno (8) + framing


@dataclass(frozen=True)
class CpuModel:
    """CPU % of a core per node = idle_pct + ms_per_hb x unique heartbeats per second / 10."""

    idle_pct: float
    ms_per_hb: float

    def project(self, hb_per_s: float) -> float:
        return self.idle_pct + self.ms_per_hb * hb_per_s / 10.0


@dataclass
class SimFigures:
    n: int
    interval_s: float
    mesh: int
    conns: int
    hb_in_per_s: float  # unique heartbeats per node per second
    msgs_in_per_s: float  # copies, duplicates included
    msgs_out_per_s: float
    dup_per_hb: float  # copies received per unique heartbeat
    ihave_ids_in_per_s: float
    kb_in_per_s: float
    kb_out_per_s: float
    hops_p50: float
    hops_max: int
    latency_p95_ms: float
    cpu_pct: float | None


def fit_exponent(ns: list[int], ys: list[float]) -> float | None:
    """Slope of the least squares line of log(y) against log(n) (1.0: linear in n)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.mean(p[0] for p in pts)
    my = statistics.mean(p[1] for p in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def fit_cpu(hb_per_s: list[float], cpu_pct: list[float]) -> CpuModel | None:
    """Least squares of CPU % against unique heartbeats per second (intercept: idle).

    When the sizes took about the same heartbeat rate (``--interval auto`` holds it), the
    line is not determined: then all the CPU is charged to the heartbeats (no idle part),
    an upper bound of the marginal cost.
    """
    pts = [(x, y) for x, y in zip(hb_per_s, cpu_pct, strict=True) if x > 0]
    if not pts:
        return None
    xs = [x for x, _ in pts]
    if len(pts) < 2 or max(xs) < 1.5 * min(xs):
        return CpuModel(0.0, statistics.mean(10.0 * y / x for x, y in pts))
    mx, my = statistics.mean(xs), statistics.mean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return CpuModel(idle_pct=max(0.0, my - slope * mx), ms_per_hb=max(0.0, 10.0 * slope))


def random_regular(n: int, k: int, rng: random.Random) -> list[set[int]]:
    """A random graph where every node has about ``k`` neighbours (complete if k >= n-1)."""
    if k >= n - 1:
        return [set(range(n)) - {i} for i in range(n)]
    adj: list[set[int]] = [set() for _ in range(n)]
    for _ in range(50):
        stubs = [i for i in range(n) for _ in range(k)]
        rng.shuffle(stubs)
        adj = [set() for _ in range(n)]
        for a, b in zip(stubs[::2], stubs[1::2], strict=False):
            if a != b:
                adj[a].add(b)
                adj[b].add(a)
        if all(adj):
            break
    return adj


def spread(mesh: list[set[int]], origin: int, hop_ms: float,
           rng: random.Random) -> tuple[list[int], list[int], list[float]]:  # fmt: skip
    """One message from ``origin``: copies received per node, hops and time to first copy."""
    n = len(mesh)
    copies = [0] * n
    hops = [-1] * n
    first = [math.inf] * n
    hops[origin], first[origin] = 0, 0.0
    queue: list[tuple[float, int, int, int]] = []  # (time, to, from, hops)
    for p in mesh[origin]:
        heapq.heappush(queue, (hop_ms + rng.expovariate(1 / hop_ms), p, origin, 1))
    while queue:
        t, to, frm, h = heapq.heappop(queue)
        copies[to] += 1
        if hops[to] >= 0:
            continue  # a duplicate: dropped by the seen cache, not forwarded
        hops[to], first[to] = h, t
        for p in mesh[to]:
            if p not in (frm, origin):
                heapq.heappush(queue, (t + hop_ms + rng.expovariate(1 / hop_ms), p, to, h + 1))
    return copies, hops, first


def simulate(n: int, *, interval: float, msg_bytes: float, cpu: CpuModel | None = None,
             hop_ms: float = 2.0, origins: int = 200, seed: int = 1) -> SimFigures:  # fmt: skip
    rng = random.Random(seed)
    conns = min(n - 1, CONN_LOW)
    mesh_k = n - 1 if n - 1 <= D_HIGH else D
    mesh = random_regular(n, mesh_k, rng)
    sample = list(range(n)) if n <= origins else rng.sample(range(n), origins)
    copies_total = 0
    all_hops: list[int] = []
    last: list[float] = []
    for o in sample:
        copies, hops, first = spread(mesh, o, hop_ms, rng)
        copies_total += sum(copies)
        all_hops += [h for i, h in enumerate(hops) if i != o and h >= 0]
        last.append(max(f for f in first if f < math.inf))
    # per node and second: each of the n origins publishes every interval
    copies_per_msg_per_node = copies_total / len(sample) / n
    msgs_in = copies_per_msg_per_node * n / interval
    hb_in = (n - 1) / interval
    mean_mesh = statistics.mean(len(m) for m in mesh)
    non_mesh = max(0.0, conns - mean_mesh)
    gossip_to = min(non_mesh, max(GOSSIP_MIN, int(GOSSIP_FACTOR * non_mesh)))
    ids_per_ihave = GOSSIP_WINDOW * ROUTER_HEARTBEAT_S * n / interval
    ihave_ids = gossip_to * ids_per_ihave / ROUTER_HEARTBEAT_S
    kb = (msgs_in * msg_bytes + ihave_ids * MSG_ID_BYTES) / 1024
    return SimFigures(
        n=n, interval_s=interval, mesh=round(mean_mesh), conns=conns, hb_in_per_s=hb_in,
        msgs_in_per_s=msgs_in, msgs_out_per_s=msgs_in,  # every copy sent is received
        dup_per_hb=msgs_in / hb_in if hb_in else 0.0, ihave_ids_in_per_s=ihave_ids,
        kb_in_per_s=kb, kb_out_per_s=kb, hops_p50=statistics.median(all_hops),
        hops_max=max(all_hops), latency_p95_ms=sorted(last)[int(0.95 * (len(last) - 1))],
        cpu_pct=cpu.project(hb_in) if cpu is not None else None,
    )  # fmt: skip


def print_sim(rows: list[SimFigures]) -> None:
    print("\nSimulated transport (GossipSub model, bench/scale_sim.py); per node")
    head = ("N", "int s", "mesh", "conns", "hb/s", "msg/s in", "copies/hb", "IHAVE id/s",
            "KB/s in", "hops p50", "hops max", "p95 ms", "CPU %")  # fmt: skip
    print(" ".join(f"{h:>10}" for h in head))
    for f in rows:
        vals = (
            f.n,
            f"{f.interval_s:.1f}",
            f.mesh,
            f.conns,
            f"{f.hb_in_per_s:.1f}",
            f"{f.msgs_in_per_s:.1f}",
            f"{f.dup_per_hb:.2f}",
            f"{f.ihave_ids_in_per_s:.0f}",
            f"{f.kb_in_per_s:.1f}",
            f"{f.hops_p50:.0f}",
            f.hops_max,
            f"{f.latency_p95_ms:.0f}",
            "-" if f.cpu_pct is None else f"{f.cpu_pct:.1f}",
        )
        print(" ".join(f"{v:>10}" for v in vals))


def growth(real: Sequence[Any], sim: list[SimFigures], base: float) -> dict[str, float | None]:
    """Growth exponents in N. Real rates are rescaled to one interval (``base``) first:
    the real runs stretch the interval with N, the daemon's figures at ``base`` do not."""
    ns = [f.n for f in real]
    out = {
        "real msgs/s/node in (at the base interval)":
            fit_exponent(ns, [f.msgs_in_per_s * f.interval_s / base for f in real]),
        "real KB/s/node in (at the base interval)":
            fit_exponent(ns, [f.kb_in_per_s * f.interval_s / base for f in real]),
        "real CPU/node (as measured)": fit_exponent(ns, [f.cpu_pct for f in real]),
        "real convergence time": fit_exponent(
            [f.n for f in real if f.convergence_s], [f.convergence_s or 0.0 for f in real
                                                    if f.convergence_s]),
        "real announce -> last bid": fit_exponent(ns, [f.bid_last_ms or 0.0 for f in real]),
    }  # fmt: skip
    sn = [f.n for f in sim]
    out["sim msgs/s/node"] = fit_exponent(sn, [f.msgs_in_per_s for f in sim])
    out["sim KB/s/node"] = fit_exponent(sn, [f.kb_in_per_s for f in sim])
    out["sim projected CPU/node"] = fit_exponent(sn, [f.cpu_pct or 0.0 for f in sim])
    return out

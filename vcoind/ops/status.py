"""Status JSON-RPC methods: vcoin_nodeInfo, vcoin_peers, vcoin_clusterStatus,
vcoin_gossipStats (and their REST aliases), read across the node's services."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vcoind import __version__
from vcoind.presence.peers import PeerState
from vcoind.progress import BOARD
from vcoind.rpc import MethodRegistry, Param, RPCMethod

if TYPE_CHECKING:
    from vcoind.chain.service import ChainService
    from vcoind.compute.service import ComputeService
    from vcoind.market.service import MarketService
    from vcoind.metrics import NodeMetrics
    from vcoind.p2p.gossip import Gossip
    from vcoind.presence.service import PresenceService
    from vcoind.store import Store

OBJ: dict[str, Any] = {"type": "object"}
REST_ALIASES = {
    "/api/cluster/status": "vcoin_clusterStatus",
    "/api/cluster/nodes": "vcoin_peers",
    "/api/cluster/metrics": "vcoin_gossipStats",
}


def peer_view(st: PeerState, connected: bool) -> dict[str, Any]:
    hb = st.heartbeat
    return {
        "peer_id": hb.peer_id,
        "eth_address": hb.eth_address,
        "addrs": list(hb.listen_addrs),
        "connected": connected,
        "status": "online",
        "health": st.health,
        "self_health": hb.health,
        "latency_ms": round(st.latency_s * 1000, 3),
        "first_seen": st.first_seen,
        "last_seen": st.last_seen,
        "interval": hb.interval,
        "device": dataclasses.asdict(hb.device),
        "cpu_percent": hb.cpu_percent,
        "memory_percent": hb.memory_percent,
        "models": [dataclasses.asdict(m) for m in hb.models],
        "spans": [dataclasses.asdict(s) for s in hb.spans],
        "services": list(hb.services),
        "profile": dataclasses.asdict(hb.profile),
        "queue_length": hb.queue_length,
        "software": hb.software,
    }


def stake_view(chain: ChainService | None, address: str) -> dict[str, Any] | None:
    """The peer's stake as last read from the chain (None: no chain or not read yet)."""
    info = chain.stake_of(address) if chain is not None else None
    return info.view() if info else None


@dataclass(frozen=True)
class NodeFacts:
    """Who this node is and where it listens (for vcoin_nodeInfo)."""

    peer_id: str
    eth_address: str
    network: str
    started_at: float
    datadir: Path
    addrs: Callable[[], list[str]]  # advertised p2p addresses
    rpc_url: Callable[[], str | None]
    # relay service, reachability, relays and the reservations held (``Relays.status``)
    reach: Callable[[], dict[str, Any]] = dict
    # peer id -> the relay's peer id when that peer is reached only through a relay
    via_relay: Callable[[str], str | None] = lambda peer: None


def register_status_api(
    reg: MethodRegistry,
    facts: NodeFacts,
    presence: PresenceService,
    compute: ComputeService,
    market: MarketService,
    store: Store,
    gossip: Gossip,
    metrics: NodeMetrics,
    chain: ChainService | None,
) -> None:
    peers_ = presence.peers
    heartbeat = presence.heartbeat
    view = presence.view

    async def node_info(params: dict[str, Any]) -> dict[str, Any]:
        hb = heartbeat.last
        return {
            "peer_id": facts.peer_id,
            "eth_address": facts.eth_address,
            "network": facts.network,
            "version": __version__,
            "p2p_addrs": facts.addrs(),
            "reachability": facts.reach(),
            "rpc_url": facts.rpc_url(),
            "uptime_s": round(time.time() - facts.started_at, 3),
            "heartbeat_interval": heartbeat.interval,
            "peer_count": len(peers_),
            "connections": len(view.connected()),
            "device": dataclasses.asdict(hb.device) if hb else None,
            "health": hb.health if hb else None,
            "capabilities": dataclasses.asdict(heartbeat.capabilities),
            **compute.status(),
            # long steps in flight (model fetch, split, load, ...) with their fraction
            "progress": BOARD.snapshot(),
            "datadir": str(facts.datadir),
        }

    async def peers(params: dict[str, Any]) -> list[dict[str, Any]]:
        connected = view.connected()
        out = [peer_view(st, st.peer_id in connected) for st in peers_.peers()]
        reps = await market.consensus_store.reputations([p["peer_id"] for p in out], 100.0)
        for p in out:
            p["reputation_score"] = reps[p["peer_id"]]
            p["via_relay"] = facts.via_relay(p["peer_id"]) if p["connected"] else None
            p["stake"] = stake_view(chain, p["eth_address"])
        if params["include_offline"]:
            online = {p["peer_id"] for p in out}
            for row in await store.list_peers(status="offline"):
                if row.peer_id not in online:
                    out.append(
                        {
                            "peer_id": row.peer_id,
                            "eth_address": row.eth_address,
                            "addrs": list(row.addrs),
                            "connected": row.peer_id in connected,
                            "status": "offline",
                            "health": row.health_score,
                            "last_seen": row.last_heartbeat,
                            "software": row.software,
                        }
                    )
        return out

    async def cluster_status(params: dict[str, Any]) -> dict[str, Any]:
        me = heartbeat.last
        nodes: list[dict[str, Any]] = []
        if me is not None:
            nodes.append(
                {
                    "peer_id": me.peer_id,
                    "self": True,
                    "health": me.health,
                    "cpu_percent": me.cpu_percent,
                    "memory_percent": me.memory_percent,
                    "device_utilization": me.device.utilization,
                    "queue_length": me.queue_length,
                    "error_rate": round(market.worker.error_rate, 6),  # failed attempts
                }
            )
        for st in peers_.peers():
            hb = st.heartbeat
            nodes.append(
                {
                    "peer_id": hb.peer_id,
                    "self": False,
                    "health": st.health,
                    "cpu_percent": hb.cpu_percent,
                    "memory_percent": hb.memory_percent,
                    "device_utilization": hb.device.utilization,
                    "queue_length": hb.queue_length,
                    "error_rate": round(gossip.error_rate(hb.peer_id), 6),
                }
            )
        healths = [n["health"] for n in nodes]
        return {
            "network": facts.network,
            "active_nodes": len(nodes),
            "queue_length": sum(n["queue_length"] for n in nodes),
            "average_health": round(sum(healths) / len(healths), 6) if healths else None,
            "load_distribution": nodes,
            "gossip": gossip_stats_view(presence, metrics),
            "tasks": {
                "by_status": await market.tasks.count_by_status(),
                "in_flight": market.origin.in_flight(),
                "local_queue": market.worker.queue_length,
            },
        }

    async def gossip_stats(params: dict[str, Any]) -> dict[str, Any]:
        out = gossip_stats_view(presence, metrics)
        if params["include_samples"]:
            out["samples_ms"] = [round(x * 1000, 3) for x in peers_.latencies]
        return out

    reg.add(
        RPCMethod(
            "vcoin_nodeInfo",
            "Identity, addresses, device and health of this node.",
            (),
            OBJ,
            node_info,
        )
    )
    reg.add(
        RPCMethod(
            "vcoin_peers",
            "Peers in the peer table (alive within the peer timeout).",
            (
                Param(
                    "include_offline",
                    {"type": "boolean"},
                    default=False,
                    description="also list peers known from the store that are offline",
                ),
            ),
            {"type": "array", "items": OBJ},
            peers,
        )
    )
    reg.add(
        RPCMethod(
            "vcoin_clusterStatus",
            "Active nodes, load distribution, error rates and gossip totals.",
            (),
            OBJ,
            cluster_status,
        )
    )
    reg.add(
        RPCMethod(
            "vcoin_gossipStats",
            "Heartbeat propagation latency (p50/p95/max) and gossip counters.",
            (
                Param(
                    "include_samples",
                    {"type": "boolean"},
                    default=False,
                    description="also return the raw latency samples (ms, newest last)",
                ),
            ),
            OBJ,
            gossip_stats,
        )
    )


def _counter_values(counter: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                key = "/".join(v for v in s.labels.values()) or "all"
                out[key] = s.value
    return out


def gossip_stats_view(presence: PresenceService, m: NodeMetrics) -> dict[str, Any]:
    return {
        "latency": presence.peers.latency_stats(),
        "received": _counter_values(m.gossip_in),
        "published": _counter_values(m.gossip_out),
        "rejected": _counter_values(m.gossip_rejected),
    }

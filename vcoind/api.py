"""The node's JSON-RPC methods (vcoin_*). Each is declared once; rpc.discover documents it."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, cast

from vcoind import __version__
from vcoind.chain.service import anchor_view
from vcoind.compute.params import GenerationError, GenerationParams
from vcoind.market.messages import MAX_INPUT_CHARS, TASK_ID_RE, GenParams
from vcoind.market.origin import TaskError, task_view
from vcoind.p2p.peers import PeerState
from vcoind.rpc import INVALID_PARAMS, NOT_FOUND, MethodRegistry, Param, RPCError, RPCMethod
from vcoind.store import TaskRow

if TYPE_CHECKING:
    from vcoind.node import Node

OBJ: dict[str, Any] = {"type": "object"}
# The planning documents' REST paths, served as aliases of the RPC methods.
REST_ALIASES = {
    "/api/cluster/status": "vcoin_clusterStatus",
    "/api/cluster/nodes": "vcoin_peers",
    "/api/cluster/metrics": "vcoin_gossipStats",
    "/api/cluster/tasks": "vcoin_listTasks",
    "/api/consensus/status": "vcoin_consensusStatus",
    "/api/consensus/metrics": "vcoin_consensusMetrics",
    "/api/consensus/history": "vcoin_consensusHistory",
    "/api/consensus/conflicts": "vcoin_consensusConflicts",
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


def stake_view(node: Node, address: str) -> dict[str, Any] | None:
    """The peer's stake as last read from the chain (None: no chain or not read yet)."""
    info = node.chain.stake_of(address) if node.chain is not None else None
    return info.view() if info else None


def register_node_api(reg: MethodRegistry, node: Node) -> None:
    async def node_info(params: dict[str, Any]) -> dict[str, Any]:
        hb = node.heartbeat.last
        return {
            "peer_id": node.identity.peer_id,
            "eth_address": node.identity.eth_address,
            "network": node.config.network,
            "version": __version__,
            "p2p_addrs": node.advertised_addrs(),
            "rpc_url": node.info.rpc_url if node.info else None,
            "uptime_s": round(time.time() - node.started_at, 3),
            "heartbeat_interval": node.heartbeat.interval,
            "peer_count": len(node.peers),
            "connections": len(node.p2p.connected_peers()),
            "device": dataclasses.asdict(hb.device) if hb else None,
            "health": hb.health if hb else None,
            "capabilities": dataclasses.asdict(node.heartbeat.capabilities),
            "pipeline_sessions": node.shard_host.open_sessions,
            "pipeline_sessions_served": node.shard_host.sessions_served,
            "pipeline_peak_batch": node.shard_host.peak_batch,
            "engines": node.executor.engines() if node.has_executor else [],
            "datadir": str(node.datadir.path),
        }

    async def peers(params: dict[str, Any]) -> list[dict[str, Any]]:
        connected = {p.to_base58() for p in node.p2p.connected_peers()}
        out = [peer_view(st, st.peer_id in connected) for st in node.peers.peers()]
        reps = await node.consensus_store.reputations([p["peer_id"] for p in out], 100.0)
        for p in out:
            p["reputation_score"] = reps[p["peer_id"]]
            p["stake"] = stake_view(node, p["eth_address"])
        if params["include_offline"]:
            online = {p["peer_id"] for p in out}
            for row in await node.store.list_peers(status="offline"):
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
        me = node.heartbeat.last
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
                    "error_rate": 0.0,
                }
            )
        for st in node.peers.peers():
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
                    "error_rate": round(node.gossip.error_rate(hb.peer_id), 6),
                }
            )
        healths = [n["health"] for n in nodes]
        return {
            "network": node.config.network,
            "active_nodes": len(nodes),
            "queue_length": sum(n["queue_length"] for n in nodes),
            "average_health": round(sum(healths) / len(healths), 6) if healths else None,
            "load_distribution": nodes,
            "gossip": gossip_stats_view(node),
            "tasks": {
                "by_status": await node.tasks.count_by_status(),
                "in_flight": node.origin.in_flight(),
                "local_queue": node.worker.queue_length,
            },
        }

    async def gossip_stats(params: dict[str, Any]) -> dict[str, Any]:
        out = gossip_stats_view(node)
        if params["include_samples"]:
            out["samples_ms"] = [round(x * 1000, 3) for x in node.peers.latencies]
        return out

    async def models(params: dict[str, Any]) -> dict[str, Any]:
        if params["rescan"]:
            await node.rescan_models()
        loaded = {m.model_id for m in node.executor.loaded()} if node.has_executor else set()
        return {
            "models_dir": str(node.models.root),
            "models": [{**m.as_dict(), "loaded": m.model_id in loaded} for m in node.models.all()],
        }

    reg.add(
        RPCMethod(
            "vcoin_models",
            "Models in this node's store (name, weight-hash id, size) and which are loaded.",
            (
                Param(
                    "rescan",
                    {"type": "boolean"},
                    default=False,
                    description="re-read the models directory first (new models are announced)",
                ),
            ),
            OBJ,
            models,
        )
    )
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


def gossip_stats_view(node: Node) -> dict[str, Any]:
    m = node.metrics
    return {
        "latency": node.peers.latency_stats(),
        "received": _counter_values(m.gossip_in),
        "published": _counter_values(m.gossip_out),
        "rejected": _counter_values(m.gossip_rejected),
    }


PARAM_SCHEMAS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "stop": (list,),
}


def parse_gen_params(raw: dict[str, Any]) -> GenParams:
    """Validate the ``parameters`` object of vcoin_submitTask (errors name the field)."""
    for key, value in raw.items():
        if key not in PARAM_SCHEMAS:
            raise RPCError(INVALID_PARAMS, f"parameters.{key}: unknown parameter "
                           f"(known: {', '.join(PARAM_SCHEMAS)})")  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, PARAM_SCHEMAS[key]):
            raise RPCError(INVALID_PARAMS, f"parameters.{key}: wrong type")
        if key == "stop" and not all(isinstance(s, str) for s in cast(list[Any], value)):
            raise RPCError(INVALID_PARAMS, "parameters.stop: must be a list of strings")
    merged = {**raw, "stop": tuple(raw.get("stop", ()))}
    try:
        checked = GenerationParams(**merged)
    except GenerationError as exc:
        raise RPCError(INVALID_PARAMS, f"parameters.{exc}") from None
    return GenParams(**{k: getattr(checked, k) for k in PARAM_SCHEMAS})


def network_models(node: Node) -> dict[str, str]:
    """Model names and ids served anywhere in the network we know of -> a name."""
    known: dict[str, str] = {}
    for m in node.models.all():
        known[m.name] = known[m.model_id] = m.name
    for st in node.peers.peers():
        for served in st.heartbeat.models:
            known[served.name] = known[served.model_id] = served.name
    return known


def register_task_api(reg: MethodRegistry, node: Node) -> None:
    async def submit(params: dict[str, Any]) -> dict[str, Any]:
        known = network_models(node)
        pipelined_replicas = False
        if params["pipeline"]:
            if params["mode"] == "auto":
                raise RPCError(INVALID_PARAMS, "pipeline: with mode single or consensus")
            if params["mode"] == "consensus":  # replicas are pipelines on disjoint routes
                pipelined_replicas = True
            elif params["replicas"] not in (None, 1):
                raise RPCError(INVALID_PARAMS, "replicas: more than 1 needs mode consensus")
            else:
                params = {**params, "mode": "pipeline"}
        elif params["model"] not in known:
            names = ", ".join(sorted({v for v in known.values()})) or "none"
            raise RPCError(INVALID_PARAMS, f"model: unknown model {params['model']!r} "
                           f"(served in the network: {names})")  # fmt: skip
        mode, replicas = params["mode"], params["replicas"]
        if mode == "single" and replicas not in (None, 1):
            raise RPCError(INVALID_PARAMS, "replicas: more than 1 needs mode consensus or auto")
        if mode != "single" and replicas == 1:
            raise RPCError(INVALID_PARAMS, "replicas: consensus needs 2 to 5")
        gen = parse_gen_params(params["parameters"] or {})
        adapter = params["adapter"]
        if adapter and not node.worker.adapter_known(adapter):
            raise RPCError(INVALID_PARAMS, f"adapter: no node is known to hold {adapter} "
                           "(vcoin_adapters lists the ones here and announced)")  # fmt: skip
        try:
            task_id = await node.origin.submit(
                params["model"], params["input"], gen, priority=params["priority"],
                timeout_s=params["timeout_s"], max_price=params["max_price"], mode=mode,
                replicas=None if replicas in (None, 1) else replicas,
                pipeline=pipelined_replicas, customer=params["customer"] or "",
                adapter=adapter or "",
            )  # fmt: skip
        except TaskError as exc:
            raise RPCError(INVALID_PARAMS, str(exc)) from None
        return {"task_id": task_id}

    async def get_task(params: dict[str, Any]) -> dict[str, Any]:
        row = await node.tasks.get(params["task_id"])
        if row is None:
            raise RPCError(NOT_FOUND, f"task_id: no task {params['task_id']!r} on this node")
        attempts = await node.tasks.attempts(row.id)
        view = task_view(row, len(attempts), node.origin.live_progress(row.id))
        view["route"] = [
            {"attempt": a.attempt, "node_id": a.peer_id, "status": a.status, "error": a.error,
             "assigned_at": a.assigned_at, "finished_at": a.finished_at}
            for a in attempts
        ]  # fmt: skip
        view["bids"] = [dataclasses.asdict(b) for b in await node.tasks.bids(row.id)]
        if node.chain is not None:
            view["anchor"] = anchor_view(await node.chain.ops.by_key(f"anchor:{row.id}"))
        if row.mode == "consensus":
            view["validations"] = [
                dataclasses.asdict(v) for v in await node.consensus_store.validations(row.id)
            ]
        return view

    async def list_tasks(params: dict[str, Any]) -> dict[str, Any]:
        rows, total = await node.tasks.page(params["status"], params["limit"], params["offset"])
        return {
            "total": total,
            "tasks": [task_view(r, r.retry_count + (r.node_id is not None)) for r in rows],
        }

    async def cancel_task(params: dict[str, Any]) -> dict[str, Any]:
        row = await node.origin.cancel(params["task_id"])
        if row is None:
            raise RPCError(NOT_FOUND, f"task_id: no task {params['task_id']!r} on this node")
        return {"task_id": row.id, "status": row.status}

    task_id = Param("task_id", {"type": "string", "pattern": TASK_ID_RE}, required=True)
    reg.add(RPCMethod(
        "vcoin_submitTask",
        "Submit an inference task; this node becomes its origin. Returns once it is on disk.",
        (
            Param("model", {"type": "string", "minLength": 1, "maxLength": 128}, required=True,
                  description="model name or id, served by some node"),
            Param("input", {"type": "string", "minLength": 1, "maxLength": MAX_INPUT_CHARS},
                  required=True, description="the prompt"),
            Param("parameters", {"type": "object"}, default=None,
                  description="max_new_tokens, temperature, top_p, top_k, seed, stop"),
            Param("priority", {"type": "integer", "minimum": -1000, "maximum": 1000}, default=0),
            Param("replicas", {"type": "integer", "minimum": 1, "maximum": 5}, default=None,
                  description="replicas in consensus mode, 2-5 (default 3)"),
            Param("mode", {"enum": ["single", "consensus", "auto"]}, default="single",
                  description="consensus: several nodes vote; auto: consensus when 3 or "
                  "more nodes serve the model"),
            Param("timeout_s", {"type": "number", "minimum": 0.5, "maximum": 86400},
                  default=None, description="reassign after this long without progress"),
            Param("max_price", {"type": "number", "minimum": 0}, default=None),
            Param("customer", {"type": "string", "pattern": "[A-Za-z0-9_.-]{1,64}"},
                  default=None, description="whose SLA the task counts under"),
            Param("adapter", {"type": "string", "pattern": "[0-9a-f]{64}"}, default=None,
                  description="generate with this LoRA adapter (vcoin_adapters) merged in"),
            Param("pipeline", {"type": "boolean"}, default=False,
                  description="run across nodes serving layer spans that together cover "
                  "the model (this node needs its tokenizer: a span or the model); with "
                  "mode consensus every replica is a pipeline, on routes sharing no node"),
        ),
        {"type": "object"}, submit,
    ))  # fmt: skip
    reg.add(RPCMethod("vcoin_getTask", "Status, progress, result, route, bids and timings.",
                      (task_id,), OBJ, get_task))  # fmt: skip
    reg.add(RPCMethod(
        "vcoin_listTasks", "Tasks this node is origin of, newest first.",
        (
            Param("status", {"enum": ["pending", "running", "completed", "failed", "cancelled"]},
                  default=None),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 500}, default=50),
            Param("offset", {"type": "integer", "minimum": 0}, default=0),
        ),
        OBJ, list_tasks,
    ))  # fmt: skip
    reg.add(RPCMethod("vcoin_cancelTask", "Cancel a task (the worker stops between tokens).",
                      (task_id,), OBJ, cancel_task))  # fmt: skip


def register_consensus_api(reg: MethodRegistry, node: Node) -> None:
    page = (
        Param("limit", {"type": "integer", "minimum": 1, "maximum": 500}, default=20),
        Param("offset", {"type": "integer", "minimum": 0}, default=0),
    )

    def summary(row: TaskRow) -> dict[str, Any]:
        c = row.consensus or {}
        return {
            "task_id": row.id, "status": row.status, "model": row.model,
            "created_at": row.created_at, "completed_at": row.completed_at,
            "decision": c.get("decision"), "confidence": c.get("confidence"),
            "action": c.get("action"), "rounds": c.get("rounds"),
            "replicas": len(c.get("replicas", [])), "error": row.error,
        }  # fmt: skip

    async def history(params: dict[str, Any]) -> dict[str, Any]:
        rows, total = await node.consensus_store.consensus_tasks(params["limit"], params["offset"])
        return {"total": total, "tasks": [summary(r) for r in rows]}

    async def conflicts(params: dict[str, Any]) -> dict[str, Any]:
        rows, total = await node.consensus_store.consensus_tasks(
            params["limit"], params["offset"], conflicts_only=True
        )
        out = []
        for r in rows:
            c = r.consensus or {}
            outvoted = [x["node_id"] for x in c.get("replicas", []) if not x.get("agreed")]
            why = []
            if outvoted:
                why.append(f"outvoted: {', '.join(outvoted)}")
            if (c.get("rounds") or 1) > 1:
                why.append("low confidence: recomputed with more replicas")
            if c.get("decision") in ("none", "tie"):
                why.append(f"no clear winner ({c.get('decision')})")
            out.append({**summary(r), "why": "; ".join(why), "similarity": [
                x.get("similarity") for x in c.get("replicas", [])]})  # fmt: skip
        return {"total": total, "conflicts": out}

    async def metrics(params: dict[str, Any]) -> dict[str, Any]:
        rows, total = await node.consensus_store.consensus_tasks(500, 0)
        done = [r for r in rows if r.status == "completed"]
        singles, _ = await node.tasks.page("completed", 500, 0)
        single_lat = [r.timings.get("total_s", 0.0) for r in singles if r.mode == "single"]
        cons_lat = [r.timings.get("total_s", 0.0) for r in done]

        def median(xs: list[float]) -> float | None:
            return sorted(xs)[len(xs) // 2] if xs else None

        agreed = sum(1 for r in done if not (r.consensus or {}).get("conflict"))
        recomputed = sum(1 for r in done if ((r.consensus or {}).get("rounds") or 1) > 1)
        m_single, m_cons = median(single_lat), median(cons_lat)
        return {
            "tasks": total, "completed": len(done),
            "agreement_rate": round(agreed / len(done), 4) if done else None,
            "recompute_rate": round(recomputed / len(done), 4) if done else None,
            "median_latency_s": {"consensus": m_cons, "single": m_single},
            "latency_vs_single": round(m_cons / m_single, 3) if m_cons and m_single else None,
            "sample": "the latest 500 tasks of each mode",
        }  # fmt: skip

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        counts = await node.tasks.count_by_status()
        serving = node.serving_count_by_model()
        return {
            "available": True, "fault_injection": node.config.market.fault or None,
            "embedding_model": "all-MiniLM-L6-v2",
            "replicas_possible": serving, "tasks_by_status": counts,
            "rounds_in_flight": node.coordinator.in_flight(),
        }  # fmt: skip

    reg.add(RPCMethod("vcoin_consensusStatus",
                      "Consensus readiness: replicas possible per model, rounds in flight.",
                      (), OBJ, status))  # fmt: skip
    reg.add(RPCMethod("vcoin_consensusMetrics",
                      "Agreement rate, recompute rate, latency of consensus vs single mode.",
                      (), OBJ, metrics))  # fmt: skip
    reg.add(RPCMethod("vcoin_consensusHistory", "Finished consensus tasks, newest first.",
                      page, OBJ, history))  # fmt: skip
    reg.add(RPCMethod("vcoin_consensusConflicts",
                      "Consensus tasks where replicas disagreed, and why.", page, OBJ,
                      conflicts))  # fmt: skip

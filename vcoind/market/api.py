"""JSON-RPC methods of the task market: tasks (vcoin_submitTask, vcoin_getTask,
vcoin_listTasks, vcoin_cancelTask) and consensus (vcoin_consensus*). Each request is
checked here once; the origin takes it as given."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, cast

from vcoind.chain.service import anchor_view
from vcoind.chain.views import slash_view
from vcoind.compute.params import SAMPLING_DEFAULTS, GenerationError, GenerationParams
from vcoind.config import STRATEGIES
from vcoind.market.chat import ChatError, messages_json
from vcoind.market.messages import MAX_INPUT_CHARS, TASK_ID_RE, GenParams
from vcoind.market.origin import TaskError, task_view
from vcoind.rpc import INVALID_PARAMS, NOT_FOUND, MethodRegistry, Param, RPCError, RPCMethod
from vcoind.store import TaskRow

if TYPE_CHECKING:
    from vcoind.chain.service import ChainService
    from vcoind.market.consensus import Coordinator
    from vcoind.market.origin import TaskOrigin
    from vcoind.market.ports import Trainer
    from vcoind.presence.view import NetworkView
    from vcoind.store import ConsensusStore, TaskStore

OBJ: dict[str, Any] = {"type": "object"}
# The planning documents' REST paths, served as aliases of these methods.
REST_ALIASES = {
    "/api/cluster/tasks": "vcoin_listTasks",
    "/api/consensus/status": "vcoin_consensusStatus",
    "/api/consensus/metrics": "vcoin_consensusMetrics",
    "/api/consensus/history": "vcoin_consensusHistory",
    "/api/consensus/conflicts": "vcoin_consensusConflicts",
}


PARAM_SCHEMAS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "stop": (list,),
    "defaults": (list,),
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
    defaults = tuple(raw.get("defaults", ()))
    if not set(defaults) <= set(SAMPLING_DEFAULTS) or len(set(defaults)) != len(defaults):
        raise RPCError(INVALID_PARAMS, "parameters.defaults: names among "
                       f"{', '.join(SAMPLING_DEFAULTS)}, taken from the model's "
                       "generation_config.json")  # fmt: skip
    merged = {**raw, "stop": tuple(raw.get("stop", ()))}
    merged.pop("defaults", None)
    try:
        checked = GenerationParams(**merged)
    except GenerationError as exc:
        raise RPCError(INVALID_PARAMS, f"parameters.{exc}") from None
    return GenParams(**{k: getattr(checked, k) for k in PARAM_SCHEMAS if k != "defaults"},
                     defaults=defaults)  # fmt: skip


def register_task_api(
    reg: MethodRegistry,
    origin: TaskOrigin,
    tasks: TaskStore,
    consensus_store: ConsensusStore,
    view: NetworkView,
    *,
    trainer: Trainer | None,
    chain: ChainService | None,
) -> None:
    async def submit(params: dict[str, Any]) -> dict[str, Any]:
        known = view.models()
        if (params["input"] is None) == (params["messages"] is None):
            raise RPCError(INVALID_PARAMS, "one of input (a prompt) or messages (a chat)")
        text = params["input"]
        if params["messages"] is not None:
            try:
                text = messages_json(params["messages"])
            except ChatError as exc:
                raise RPCError(INVALID_PARAMS, str(exc)) from None
            if len(text) > MAX_INPUT_CHARS:
                raise RPCError(INVALID_PARAMS, f"messages: over {MAX_INPUT_CHARS} characters "
                               "as JSON")  # fmt: skip
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
        if adapter and (trainer is None or not trainer.adapter_known(adapter)):
            raise RPCError(INVALID_PARAMS, f"adapter: no node is known to hold {adapter} "
                           "(vcoin_adapters lists the ones here and announced)")  # fmt: skip
        if adapter and params["pipeline"]:
            raise RPCError(INVALID_PARAMS, "adapter: an adapter runs on whole-model tasks, "
                           "not pipelines")  # fmt: skip
        try:
            task_id = await origin.submit(
                params["model"], text, gen, priority=params["priority"],
                timeout_s=params["timeout_s"], max_price=params["max_price"], mode=mode,
                replicas=None if replicas in (None, 1) else replicas,
                pipeline=pipelined_replicas, customer=params["customer"] or "",
                adapter=adapter or "", chat=params["messages"] is not None,
                stream=params["stream"], strategy=params["strategy"],
            )  # fmt: skip
        except TaskError as exc:
            raise RPCError(INVALID_PARAMS, str(exc)) from None
        return {"task_id": task_id}

    async def get_task(params: dict[str, Any]) -> dict[str, Any]:
        row = await tasks.get(params["task_id"])
        if row is None:
            raise RPCError(NOT_FOUND, f"task_id: no task {params['task_id']!r} on this node")
        attempts = await tasks.attempts(row.id)
        view = task_view(row, len(attempts), origin.live_progress(row.id))
        view["route"] = [
            {"attempt": a.attempt, "node_id": a.peer_id, "status": a.status, "error": a.error,
             "assigned_at": a.assigned_at, "finished_at": a.finished_at}
            for a in attempts
        ]  # fmt: skip
        view["bids"] = [dataclasses.asdict(b) for b in await tasks.bids(row.id)]
        live = origin.live(row.id)
        if live is not None and row.parameters.get("stream"):
            view["partial"] = live.streamed.shown  # the answer so far
        if chain is not None:
            view["anchor"] = anchor_view(await chain.ops.by_key(f"anchor:{row.id}"))
            if view["anchor"] is not None:
                view["anchor"]["slashed"] = [
                    slash_view(op) for op in await chain.ops.with_key_prefix(f"slash:{row.id}:")
                ]
        if row.mode == "consensus":
            view["validations"] = [
                dataclasses.asdict(v) for v in await consensus_store.validations(row.id)
            ]
        return view

    async def list_tasks(params: dict[str, Any]) -> dict[str, Any]:
        rows, total = await tasks.page(params["status"], params["limit"], params["offset"])
        return {
            "total": total,
            "tasks": [task_view(r, r.retry_count + (r.node_id is not None)) for r in rows],
        }

    async def cancel_task(params: dict[str, Any]) -> dict[str, Any]:
        row = await origin.cancel(params["task_id"])
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
                  default=None, description="the prompt (or messages)"),
            Param("messages", {"type": "array", "maxItems": 256}, default=None,
                  description="a chat: [{role: system|user|assistant, content}], run through "
                  "the model's chat template by the worker"),
            Param("parameters", {"type": "object"}, default=None,
                  description="max_new_tokens, temperature, top_p, top_k, seed, stop; "
                  "defaults: names of those to take from the model's generation_config"),
            Param("strategy", {"enum": list(STRATEGIES)}, default=None,
                  description="how this task's worker is chosen among the bids (default "
                  "the node's market.strategy)"),
            Param("stream", {"type": "boolean"}, default=False,
                  description="the worker sends the text as it grows: vcoin_getTask's "
                  "partial and the task channel's updates carry it"),
            Param("priority", {"type": "integer", "minimum": -1000, "maximum": 1000}, default=0),
            Param("replicas", {"type": "integer", "minimum": 1, "maximum": 5}, default=None,
                  description="replicas in consensus mode, 2-5 (default 3)"),
            Param("mode", {"enum": ["single", "consensus", "auto"]}, default="single",
                  description="consensus: several nodes vote; auto: consensus when 3 or "
                  "more nodes serve the model"),
            Param("timeout_s", {"type": "number", "minimum": 0.5, "maximum": 86400},
                  default=None, description="reassign after this long without progress"),
            Param("max_price", {"type": "number", "minimum": 0, "maximum": 9}, default=None,
                  description="the most paid per generated token, VCOIN (the ticket's cap; "
                  "default market.max_price_per_token); bids above it are not taken"),
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


def register_consensus_api(
    reg: MethodRegistry,
    consensus_store: ConsensusStore,
    tasks: TaskStore,
    coordinator: Coordinator,
    view: NetworkView,
    *,
    fault: str,
) -> None:
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
        rows, total = await consensus_store.consensus_tasks(params["limit"], params["offset"])
        return {"total": total, "tasks": [summary(r) for r in rows]}

    async def conflicts(params: dict[str, Any]) -> dict[str, Any]:
        rows, total = await consensus_store.consensus_tasks(
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
        rows, total = await consensus_store.consensus_tasks(500, 0)
        done = [r for r in rows if r.status == "completed"]
        singles, _ = await tasks.page("completed", 500, 0)
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
        counts = await tasks.count_by_status()
        serving = view.serving_count_by_model()
        return {
            "available": True, "fault_injection": fault or None,
            "embedding_model": "all-MiniLM-L6-v2",
            "replicas_possible": serving, "tasks_by_status": counts,
            "rounds_in_flight": coordinator.in_flight(),
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

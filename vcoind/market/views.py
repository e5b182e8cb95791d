"""The public shapes of a task: its view (``vcoin_getTask``, notifications) and the
timings of one generation. ``vcoind.market.origin`` re-exports both."""

from __future__ import annotations

from typing import Any

from vcoind.chain.typed import Ticket
from vcoind.store import FINISHED, TaskRow


def generation_timings(r: Any) -> dict[str, Any]:
    """Timings of one generation: a worker's ``TaskResult`` or a pipeline's
    ``GenerationResult``."""
    tokens = len(r.token_ids)
    return {
        "prefill_s": round(r.prefill_s, 6), "decode_s": round(r.decode_s, 6), "tokens": tokens,
        "prompt_tokens": r.prompt_tokens, "finish_reason": r.finish_reason,
        "tokens_per_s": round(tokens / r.decode_s, 3) if r.decode_s else 0.0,
    }  # fmt: skip


def task_view(row: TaskRow, attempts: int, live_progress: int | None = None) -> dict[str, Any]:
    """The public shape of a task (vcoin_getTask, notifications)."""
    return {
        "task_id": row.id,
        "status": row.status,
        "phase": row.phase,
        "model": row.model,
        "model_id": row.model_id or None,
        "input": row.input,
        "parameters": row.parameters,
        "priority": row.priority,
        "progress": max(row.progress, live_progress or 0),
        "result": row.result,
        "node_id": row.node_id,
        "attempts": attempts,
        "error": row.error,
        "timings": row.timings,
        "mode": row.mode,
        "replicas": row.replicas,
        "pipeline": row.pipeline or row.mode == "pipeline",
        "customer": row.customer or None,
        "consensus": row.consensus or None,
        "type": row.type,
        "training": row.training or None,
        "payment": payment_view(row.payment),
        "created_at": row.created_at,
        "completed_at": row.completed_at,
        "finished": row.status in FINISHED,
    }


def payment_view(payment: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the task is paid (settlement v2) and, if so, the requester's ticket terms in
    VCOIN; None for a task from before settlement v2."""
    if not payment:
        return None
    t = payment.get("ticket")
    if not payment.get("paid") or not t:
        return {"paid": False, "reason": payment.get("reason", "unpaid")}
    return {
        "paid": True, "requester": t["requester"],
        "max_price_per_token": int(t["max_price"]) / 1e18, "max_tokens": t["max_tokens"],
        "replicas": t["replicas"], "deadline": t["deadline"],
        "max_cost": Ticket.from_json(t).max_cost() / 1e18,
    }  # fmt: skip

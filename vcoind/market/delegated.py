"""Task kinds the origin hands whole to a port and records the outcome of.

A pipelined task (``mode="pipeline"``) runs on layer spans of several nodes through
``Pipelines``; a ``lora_training`` task goes to the bidders through ``Trainer``.
"""

from __future__ import annotations

import time
from typing import Any

from vcoind.compute.shard_host import PipelineError
from vcoind.market.bidding import Bidding
from vcoind.market.deltas import sendable
from vcoind.market.live import LiveTask, Update
from vcoind.market.ports import Pipelines, Trainer, WorkError
from vcoind.store import TaskStore


async def run_pipeline(
    live: LiveTask, pipelines: Pipelines, tasks: TaskStore, update: Update
) -> tuple[str, str | None]:
    """Layer spans on several nodes; the route and per-hop times go into the task."""
    row = live.row

    def on_token(n: int) -> None:
        live.progress = n
        live.wake()

    stop = tuple(row.parameters.get("stop", ()))

    def on_text(text: str) -> None:  # a streamed task: the origin's own loop decodes
        if live.streamed.update(sendable(text, stop)):
            live.wake()

    await update(live, phase="running", status="running")
    try:
        out = await pipelines.run(row, on_token, on_text if row.parameters.get("stream") else None)
    except PipelineError as exc:
        return "failed", str(exc)
    now = time.time()
    for n, hop in enumerate(out["hops"], 1):
        await tasks.add_attempt(row.id, n, hop["node_id"], now)
        ok = hop["status"] == "completed"
        why = None if ok else f"layers {hop['layers']}: {hop['status']}"
        await tasks.finish_attempt(row.id, n, hop["status"], why, now)
    live.attempt = len(out["hops"])
    await update(live, timings={**row.timings, **out["timings"]})
    live.final = {
        "result": out["text"], "model_id": out["model_id"], "progress": out["tokens"],
        "node_id": ",".join(h["node_id"] for h in out["hops"] if h["status"] == "completed"),
    }  # fmt: skip
    return "completed", None


async def run_training(
    live: LiveTask, trainer: Trainer, bidding: Bidding, update: Update
) -> tuple[str, str | None]:
    """Bids from nodes that can train the model, then the rounds (``vcoind.train``)."""
    row = live.row  # resumed: the node goes on from the last round it saved
    bids = await bidding.collect(live, want=int(row.parameters.get("nodes", 1)))
    if not bids:
        return "failed", f"no node bid to train {row.model!r}"
    await update(live, phase="running", status="running")

    async def on_view(view: dict[str, Any]) -> None:
        live.progress = sum(n["samples"] for n in view["nodes"])
        await update(live, training=view,
                     node_id=",".join(n["node_id"] for n in view["nodes"]))  # fmt: skip

    try:
        out = await trainer.run_training(row, bids, on_view)
    except WorkError as exc:
        return "failed", str(exc)
    await update(live, timings={**live.row.timings,
                                "train_s": out["summary"]["train_s"]})  # fmt: skip
    live.final = {"result": out["adapter_id"], "model_id": out["model_id"],
                  "progress": out["summary"]["samples"], "training": out["view"]}  # fmt: skip
    return "completed", None

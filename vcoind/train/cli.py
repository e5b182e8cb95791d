"""``vcoin train`` and ``vcoin adapters``: the client side of LoRA training."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class _Client(Protocol):
    def call(self, method: str, params: dict[str, Any] | None = None) -> Any: ...


# flag -> LoraSettings field
SETTING_FLAGS = {
    "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "target_modules", "epochs": "epochs", "batch_size": "batch_size",
    "grad_accum": "grad_accum", "lr": "learning_rate", "sync_every": "sync_every",
    "seed": "seed", "max_length": "max_length", "optimizer": "optimizer",
}  # fmt: skip


def add_train_commands(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="LoRA-train a model across nodes (this daemon is the task's origin)",
        description="Splits the dataset into contiguous shards, one per node; every "
        "--sync-every steps the nodes' adapters are averaged (FedAvg, weighted by samples) "
        "and training goes on from the average. The final adapter is kept by every "
        "participant under an id that is the hash of its bytes, and anchored on chain.",
    )
    t.add_argument("--model", required=True, help="base model name or id")
    t.add_argument("--dataset", required=True, type=Path,
                   help='JSONL ({"text": ...} or {"prompt": ..., "completion": ...} per line) '
                   "or a `datasets` directory. A JSONL file up to 768 KiB is sent with the "
                   "request; a larger one, or a directory, must lie in the daemon's data "
                   "directory (it reads no file elsewhere)")  # fmt: skip
    t.add_argument("--nodes", type=int, default=1, help="nodes to train on, one shard each")
    t.add_argument("--epochs", type=int, default=1, help="passes over each shard")
    t.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    t.add_argument("--lora-alpha", type=int, default=16, help="LoRA scale numerator (alpha/r)")
    t.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on LoRA inputs")
    t.add_argument("--target-modules", default="q_proj,v_proj",
                   help="comma-separated module names to adapt")  # fmt: skip
    t.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    t.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    t.add_argument("--sync-every", type=int, default=20, help="steps between FedAvg syncs")
    t.add_argument("--seed", type=int, default=0,
                   help="LoRA init, batch order and dropout (the same on every node)")  # fmt: skip
    t.add_argument("--max-length", type=int, default=256, help="tokens per example (cut)")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="AdamW (weight decay 0) or plain SGD")  # fmt: skip
    t.add_argument("--wait", action="store_true",
                   help="show per-node progress and sync rounds, then the adapter")  # fmt: skip
    a = sub.add_parser("adapters", help="LoRA adapters held here and announced by peers")
    a.add_argument("--fetch", metavar="ID", help="fetch this adapter from a peer that holds it")


INLINE_MAX_BYTES = 768 * 1024  # a JSONL file this small travels in the request itself


def train_request(ns: argparse.Namespace) -> dict[str, Any]:
    """The ``vcoin_train`` request. The daemon reads dataset files only under its data
    directory: a JSONL file small enough to fit a request is sent inline instead, so a
    dataset anywhere on this machine works; a larger one (or a ``datasets`` directory)
    goes by path and must lie in the data directory."""
    settings = {field: getattr(ns, flag) for flag, field in SETTING_FLAGS.items()}
    req: dict[str, Any] = {"model": ns.model, "nodes": ns.nodes, "settings": settings}
    path = ns.dataset.expanduser().resolve()
    if path.is_file() and path.stat().st_size <= INLINE_MAX_BYTES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            req["examples"] = [json.loads(line) for line in lines if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # not JSONL: the daemon reads it and says what is wrong
        else:
            return req
    return {**req, "dataset": str(path)}


def run_train_command(ns: argparse.Namespace, client: _Client) -> tuple[Any, Callable[[Any], str]]:
    if ns.command == "adapters":
        if ns.fetch:
            r = client.call("vcoin_fetchAdapter", {"adapter_id": ns.fetch})
            return r, lambda r: (f"adapter {r['adapter_id']}: "
                                 f"{'fetched' if r['fetched'] else 'already here'}, "
                                 f"{r['bytes']} bytes at {r['path']}")  # fmt: skip
        return client.call("vcoin_adapters"), fmt_adapters
    r = client.call("vcoin_train", train_request(ns))
    if not ns.wait:
        return r, lambda r: (f"submitted {r['task_id']}: {r['examples']} examples on "
                             f"{r['nodes']} node(s)")  # fmt: skip
    return _wait(client, r["task_id"]), fmt_training


def _wait(client: _Client, task_id: str) -> dict[str, Any]:
    shown: set[int] = set()
    last = ""
    while True:
        t = client.call("vcoin_getTask", {"task_id": task_id})
        tr = t.get("training") or {}
        for h in tr.get("history", []):
            if h["round"] not in shown:
                shown.add(h["round"])
                print(f"\rround {h['round'] + 1}/{tr['rounds']} synced: {h['samples']} samples, "
                      f"mean loss {h['loss']:.4f}, adapter {h['adapter'][:12]}",
                      file=sys.stderr)  # fmt: skip
                last = ""
        nodes = "  ".join(
            f"{n['node_id'][-6:]} step {n['step']} loss "
            + (f"{n['loss']:.3f}" if n["loss"] is not None else "-")
            + ("" if n["status"] in ("training", "done") else f" ({n['status']})")
            for n in tr.get("nodes", [])
        )
        line = f"\r{t['status']:<9} {nodes}"
        if line != last:
            print(line, end="", file=sys.stderr, flush=True)
            last = line
        if t["finished"]:
            print(file=sys.stderr)
            return dict(t)
        time.sleep(0.3)


def fmt_training(t: dict[str, Any]) -> str:
    tr = t.get("training") or {}
    lines = [f"task {t['task_id']}: {t['status']}" + (f" — {t['error']}" if t["error"] else "")]
    s = tr.get("summary")
    if s:
        lines.append(f"adapter {tr['adapter_id']}")
        lines.append(f"{s['rounds']} rounds, {s['steps']} steps, {s['samples']} samples, "
                     f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
                     f"{s['reassigned']} reassignment(s), {s['train_s']:.1f} s")  # fmt: skip
    for n in tr.get("nodes", []):
        lines.append(f"  {n['node_id']}  shards {n['shards']}  samples {n['samples']}  "
                     f"{n['status']}" + (f" ({n['error']})" if n["error"] else ""))  # fmt: skip
    a = t.get("anchor")
    if a:
        lines.append(f"anchor: {a['status']}"
                     + (f" tx {a['tx_hash']} block {a['block']}" if a.get("tx_hash") else "")
                     + (f" ({a['error']})" if a.get("error") else ""))  # fmt: skip
        for rw in a.get("rewards", []):
            lines.append(f"  reward {rw['amount']:.6g} VCOIN -> {rw['node']}")
    return "\n".join(lines)


def fmt_adapters(r: dict[str, Any]) -> str:
    lines = [f"{len(r['local'])} adapter(s) here"]
    for a in r["local"]:
        m = a["meta"]
        lines.append(f"  {a['adapter_id']}  {a['bytes'] >> 10} KiB  r={m.get('r', '?')} "
                     f"alpha={m.get('alpha', '?')}  base {m.get('base_model', '?')}")  # fmt: skip
    if r["network"]:
        lines.append("announced by peers:")
        for a in r["network"]:
            lines.append(f"  {a['adapter_id']}  on {len(a['holders'])} node(s)")
    return "\n".join(lines)

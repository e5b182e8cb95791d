"""JSON-RPC methods of LoRA training: ``vcoin_train`` and ``vcoin_adapters``."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vcoind.datadir import DataDir
from vcoind.market.messages import MODEL_RE
from vcoind.market.origin import TaskError
from vcoind.rpc import INVALID_PARAMS, NOT_FOUND, MethodRegistry, Param, RPCError
from vcoind.rpc import RPCMethod as M
from vcoind.train.spec import (
    MAX_DATASET_BYTES,
    LoraSettings,
    TrainError,
    canonical_jsonl,
    load_examples,
    normalise_example,
    sha256_hex,
    shard_bytes,
    split_contiguous,
)

if TYPE_CHECKING:
    from vcoind.market.origin import TaskOrigin
    from vcoind.presence.view import NetworkView
    from vcoind.train.service import TrainService

OBJ: dict[str, Any] = {"type": "object"}
MAX_NODES = 64


def dataset_path(raw: str, datadir: Path) -> Path:
    """The dataset ``raw`` names (relative: to the data directory), if it lies under the
    node's data directory once symlinks and ``..`` are resolved, a directory's files
    included; never the node's keys or cookie. Otherwise INVALID_PARAMS naming the rule:
    a caller of the RPC must not make the daemon read files elsewhere on its machine."""
    root = datadir.expanduser().resolve()
    dd = DataDir(root)
    secret = {dd.p2p_key, dd.eth_key, dd.cookie_file}
    refusal = RPCError(INVALID_PARAMS, f"dataset: {raw!r} is not under the node's data "
                       f"directory {root}: vcoin_train reads dataset files only there (never "
                       "its keys or cookie; copy the file there) or takes the examples inline "
                       "(examples)")  # fmt: skip
    try:
        path = (root / Path(raw).expanduser()).resolve()
        for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
            real = p.resolve()
            if not real.is_relative_to(root) or real in secret:
                raise refusal
    except (OSError, RuntimeError):  # a symlink loop, an unreadable directory
        raise refusal from None
    return path


def register_train_api(
    reg: MethodRegistry, service: TrainService, origin: TaskOrigin, view: NetworkView
) -> None:
    async def train(params: dict[str, Any]) -> dict[str, Any]:
        if (params["dataset"] is None) == (params["examples"] is None):
            raise RPCError(INVALID_PARAMS, "give one of dataset (a path) or examples (a list)")
        known = view.models()
        if params["model"] not in known:
            names = ", ".join(sorted(set(known.values()))) or "none"
            raise RPCError(INVALID_PARAMS, f"model: unknown model {params['model']!r} "
                           f"(served in the network: {names})")  # fmt: skip
        try:
            settings = LoraSettings.from_dict(params["settings"] or {})
            if params["dataset"] is not None:
                # DATADIR/train holds the canonical copies; its parent is the data directory.
                root = service.datasets_dir.parent
                path = await trio.to_thread.run_sync(dataset_path, params["dataset"], root)
                examples = await trio.to_thread.run_sync(load_examples, path)
                name = path.name
            else:
                examples = [normalise_example(e, f"examples[{i}]")
                            for i, e in enumerate(params["examples"])]  # fmt: skip
                name = "inline"
            n = min(params["nodes"], len(examples))
            for part in split_contiguous(examples, n):  # every shard fits a frame
                shard_bytes(part)
        except TrainError as exc:
            raise RPCError(INVALID_PARAMS, str(exc)) from None
        task_id = secrets.token_hex(16)
        data = canonical_jsonl(examples)
        if len(data) > MAX_DATASET_BYTES:
            raise RPCError(INVALID_PARAMS, f"dataset: over {MAX_DATASET_BYTES >> 20} MiB")
        digest = sha256_hex(data)
        file = service.datasets_dir / f"{task_id}.jsonl"

        def save() -> None:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)

        await trio.to_thread.run_sync(save)
        description = f"LoRA training on {name}: {len(examples)} examples (sha256 {digest[:16]})"
        try:
            await origin.submit_training(
                params["model"], description,
                {"task_id": task_id, "lora": settings.as_dict(), "nodes": n,
                 "dataset_file": str(file), "dataset_hash": digest, "examples": len(examples)},
                timeout_s=params["timeout_s"], priority=params["priority"],
                customer=params["customer"] or "",
            )  # fmt: skip
        except TaskError as exc:
            file.unlink(missing_ok=True)
            raise RPCError(INVALID_PARAMS, str(exc)) from None
        return {"task_id": task_id, "examples": len(examples), "nodes": n,
                "dataset_hash": digest}  # fmt: skip

    async def adapters(params: dict[str, Any]) -> dict[str, Any]:
        def local() -> list[dict[str, Any]]:
            from safetensors import safe_open

            out = []
            for a in service.adapters.ids():
                p = service.adapters.path(a)
                try:
                    with safe_open(str(p), "pt") as f:
                        meta = f.metadata() or {}
                except Exception as exc:  # a damaged file is listed with why
                    meta = {"error": str(exc)[:200]}
                out.append({"adapter_id": a, "bytes": p.stat().st_size,
                            "stored_at": p.stat().st_mtime, "meta": meta})  # fmt: skip
            return out

        held = await trio.to_thread.run_sync(local)
        network: dict[str, list[str]] = {}
        for st in view.peers.peers():
            for a in st.heartbeat.adapters:
                network.setdefault(a, []).append(st.peer_id)
        return {"local": held, "network": [{"adapter_id": a, "holders": h}
                                           for a, h in sorted(network.items())]}  # fmt: skip

    async def fetch(params: dict[str, Any]) -> dict[str, Any]:
        a = params["adapter_id"]
        had = service.adapters.has(a)
        try:
            path = await service.adapter_path(a)
        except TrainError as exc:
            raise RPCError(NOT_FOUND, str(exc)) from None
        return {"adapter_id": a, "path": str(path), "bytes": path.stat().st_size,
                "fetched": not had}  # fmt: skip

    reg.add(M(
        "vcoin_train",
        "Submit a LoRA training task (type lora_training); this node is its origin: it "
        "splits the dataset into contiguous shards, one per node, and runs FedAvg rounds.",
        (
            Param("model", {"type": "string", "pattern": MODEL_RE}, required=True,
                  description="base model name or id, served by the training nodes"),
            Param("dataset", {"type": "string", "minLength": 1, "maxLength": 4096},
                  default=None, description="JSONL file (text, or prompt/completion) or a "
                  "`datasets` directory under the daemon's data directory (a relative path: "
                  "relative to it); anything elsewhere is refused"),
            Param("examples", {"type": "array", "maxItems": 100_000},
                  default=None, description="the examples inline, instead of dataset"),
            Param("nodes", {"type": "integer", "minimum": 1, "maximum": MAX_NODES},
                  default=1, description="nodes to train on (one shard each)"),
            Param("settings", OBJ, default=None,
                  description="r, alpha, dropout, target_modules, epochs, batch_size, "
                  "grad_accum, learning_rate, sync_every, seed, max_length, optimizer"),
            Param("timeout_s", {"type": "number", "minimum": 0.5, "maximum": 86400},
                  default=None, description="time for the bid window's no-bid limit"),
            Param("priority", {"type": "integer", "minimum": -1000, "maximum": 1000}, default=0),
            Param("customer", {"type": "string", "pattern": "[A-Za-z0-9_.-]{1,64}"},
                  default=None, description="whose SLA the task counts under"),
        ),
        OBJ, train,
    ))  # fmt: skip
    reg.add(M("vcoin_adapters", "LoRA adapters held here (id, size, metadata) and those "
              "peers announce (with their holders).", (), OBJ, adapters))  # fmt: skip
    reg.add(M("vcoin_fetchAdapter", "Fetch an adapter a peer announces (checked by its hash) "
              "and keep it here; a no-op when it is here already.",
              (Param("adapter_id", {"type": "string", "pattern": "[0-9a-f]{64}"},
                     required=True),), OBJ, fetch))  # fmt: skip

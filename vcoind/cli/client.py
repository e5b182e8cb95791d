"""``vcoin``: the client of a local daemon's JSON-RPC."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vcoind import __version__
from vcoind.chain.cli import CHAIN_COMMANDS, add_client_commands, run_client_command
from vcoind.chain.cli import fmt_kv as _fmt_kv
from vcoind.cli.format import (
    fmt_alert,
    fmt_consensus_tasks,
    fmt_node_info,
    fmt_peers,
    fmt_sla,
    fmt_status,
    fmt_task,
    fmt_tasks,
    fmt_violations,
    short_id,
)
from vcoind.config import DEFAULT_DATADIR
from vcoind.datadir import DataDir
from vcoind.oracle.cli import add_oracle_commands, run_oracle_command
from vcoind.train.cli import add_train_commands, run_train_command


class ClientError(Exception):
    pass


class RPCClient:
    def __init__(self, url: str, cookie: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.cookie = cookie
        self.timeout = timeout
        self._id = 0

    @property
    def auth(self) -> dict[str, str]:
        """The header every request to the daemon needs (loopback included)."""
        return {"Authorization": f"Bearer {self.cookie}"} if self.cookie else {}

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._id += 1
        body = json.dumps(
            {"jsonrpc": "2.0", "id": self._id, "method": method, "params": params or {}}
        ).encode()
        reply = json.loads(self._request("/rpc", body))
        if "error" in reply:
            err = reply["error"]
            raise ClientError(f"{method}: {err.get('message')} (code {err.get('code')})")
        return reply["result"]

    def get(self, path: str) -> bytes:
        """``GET path`` on the daemon's RPC port (``/metrics``, ``/api/...``), with the cookie."""
        return self._request(path, None)

    def _request(self, path: str, body: bytes | None) -> bytes:
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json", **self.auth},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{self.url}: HTTP {exc.code} {_refusal(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"cannot reach the daemon at {self.url}: {exc}") from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    """The daemon's reason for an HTTP error (a JSON-RPC error body), else the status text."""
    try:
        message = json.loads(exc.read(4096))["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
    return str(message)


def _client_from(ns: argparse.Namespace) -> RPCClient:
    raw = ns.datadir or os.environ.get("VCOIN_DATADIR") or DEFAULT_DATADIR
    dd = DataDir(Path(raw))
    if ns.rpc:
        return RPCClient(ns.rpc, os.environ.get("VCOIN_RPC_COOKIE") or dd.read_cookie())
    info = dd.read_run_file()
    if not info or "rpc_url" not in info:
        raise ClientError(
            f"no daemon running on {dd.path} (no run.json); start `vcoind "
            f"--datadir {dd.path}` or pass --rpc URL"
        )
    return RPCClient(str(info["rpc_url"]), dd.read_cookie())


CLIENT_COMMANDS: dict[str, tuple[str, str, Callable[[Any], str]]] = {
    "node-info": (
        "vcoin_nodeInfo",
        "identity, addresses, device and health of the node",
        fmt_node_info,
    ),
    "peers": ("vcoin_peers", "the peer table", fmt_peers),
    "status": ("vcoin_clusterStatus", "cluster status: nodes, load, error rates", fmt_status),
    "dashboard": (
        "vcoin_dashboardUrl",
        "a fresh one-time link that opens the dashboard in a browser",
        lambda r: str(r["url"]),
    ),
}


def client_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcoin",
        description="Client of a local vcoind over JSON-RPC. Finds the daemon "
        "through DATADIR/run.json, or talks to --rpc URL.",
    )
    p.add_argument("--version", action="version", version=f"vcoin {__version__}")
    p.add_argument(
        "--datadir",
        type=Path,
        metavar="DIR",
        help=f"daemon data directory (default {DEFAULT_DATADIR})",
    )
    p.add_argument(
        "--rpc",
        metavar="URL",
        help="daemon RPC URL, e.g. http://127.0.0.1:8645 (auth cookie from env "
        "VCOIN_RPC_COOKIE, else DATADIR/rpc.cookie)",
    )
    p.add_argument("--json", action="store_true", help="print raw JSON for scripts")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, _) in CLIENT_COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if name == "peers":
            sp.add_argument("--all", action="store_true", help="include offline peers")
    s = sub.add_parser("submit", help="submit an inference task (this daemon is its origin)")
    s.add_argument("prompt", help="the input text")
    s.add_argument("--model", required=True, help="model name or id served in the network")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--priority", type=int, default=0, help="higher runs first")
    s.add_argument("--timeout", type=float, help="reassign after this long without progress")
    s.add_argument(
        "--mode",
        choices=("single", "consensus", "auto"),
        default="single",
        help="consensus: several nodes run it and vote; auto: consensus when 3+ nodes serve "
        "the model (default single)",
    )
    s.add_argument("--replicas", type=int, help="replicas in consensus mode, 2-5 (default 3)")
    s.add_argument("--pipeline", action="store_true",
                   help="run across nodes serving layer spans (--serve-layers); with --mode "
                   "consensus each replica is a pipeline, on routes sharing no node")  # fmt: skip
    s.add_argument("--customer", help="count the task under this customer's SLA")
    s.add_argument("--max-price", type=float, metavar="VCOIN",
                   help="pay at most this per generated token on a shared chain (the ticket's "
                   "cap; default the node's market.max_price_per_token, 0.001)")  # fmt: skip
    s.add_argument("--adapter", metavar="ID",
                   help="generate with this LoRA adapter merged in (vcoin adapters)")  # fmt: skip
    s.add_argument("--wait", action="store_true", help="show progress, then print the answer")
    s.add_argument("--stream", action="store_true",
                   help="print the answer as the worker generates it (a consensus task's "
                   "once it is agreed), then a summary line on stderr")  # fmt: skip
    t = sub.add_parser("task", help="one task: status, progress, node, route, timings")
    t.add_argument("task_id")
    t.add_argument("--wait", action="store_true", help="wait until it finishes")
    ts = sub.add_parser("tasks", help="tasks this daemon is origin of")
    ts.add_argument("--status", choices=("pending", "running", "completed", "failed", "cancelled"))
    ts.add_argument("--limit", type=int, default=20)
    c = sub.add_parser("cancel", help="cancel a task")
    c.add_argument("task_id")
    cs = sub.add_parser(
        "consensus",
        help="consensus mode: status, metrics, history, conflicts",
        description="status: replicas possible per model, rounds in flight; metrics: "
        "agreement and recompute rates, latency vs single mode; history: finished consensus "
        "tasks; conflicts: tasks where replicas disagreed, and why.",
    )
    cs.add_argument("view", choices=("status", "metrics", "history", "conflicts"))
    cs.add_argument("--limit", type=int, default=20, help="rows (history, conflicts)")
    add_client_commands(sub)
    add_oracle_commands(sub)
    add_train_commands(sub)
    sl = sub.add_parser("sla", help="SLAs: create, status, violations (per customer)")
    ss = sl.add_subparsers(dest="sla_action", metavar="ACTION", required=True)
    sc = ss.add_parser("create", help="create or replace a customer's SLA")
    sc.add_argument("--customer", required=True)
    sc.add_argument("--uptime", type=float, default=99.9, help="percent (default 99.9)")
    sc.add_argument("--max-latency", type=float, default=5.0, help="p95 seconds (default 5)")
    sc.add_argument("--min-throughput", default="0/day", help="completed tasks, e.g. 1000/day")
    sc.add_argument("--price", type=float, default=0.0)
    sc.add_argument("--penalty", type=float, default=10.0, help="percent of the price (10)")
    st_ = ss.add_parser("status", help="compliance now")
    st_.add_argument("customer")
    sv = ss.add_parser("violations", help="recorded violations")
    sv.add_argument("customer", nargs="?")
    al = sub.add_parser("alerts", help="alerts: active first, then resolved",
                        description="Alerts of this node's rules (peer offline, GPU "
                        "temperature, memory, error rate, consensus disagreement, stake, "
                        "oracle anomalies). --follow prints events as they happen.")  # fmt: skip
    al.add_argument("--active", action="store_true", help="only the ones holding now")
    al.add_argument("--follow", action="store_true", help="keep printing new events (Ctrl-C)")
    al.add_argument("--limit", type=int, default=50)
    return p


def _sla_command(ns: argparse.Namespace, client: RPCClient) -> tuple[Any, Callable[[Any], str]]:
    if ns.sla_action == "create":
        amount, _, unit = ns.min_throughput.partition("/")
        per_day = {"day": 1.0, "d": 1.0, "hour": 24.0, "h": 24.0, "": 1.0}.get(unit)
        try:
            throughput = float(amount) * (per_day or float("nan"))
        except ValueError:
            throughput = float("nan")
        if throughput != throughput:
            raise ClientError(
                f"--min-throughput: expected N/day or N/hour, got {ns.min_throughput}"
            )
        params = {"customer": ns.customer, "uptime_pct": ns.uptime,
                  "max_latency_s": ns.max_latency, "min_throughput_per_day": throughput,
                  "price": ns.price, "penalty_rate": ns.penalty / 100}  # fmt: skip
        return (
            client.call("vcoin_slaCreate", params),
            lambda r: (
                f"SLA for {r['customer']}: "
                + (", ".join(f"{k} {v}" for k, v in r["terms"].items() if k != "customer"))
            ),
        )
    if ns.sla_action == "status":
        return client.call("vcoin_slaStatus", {"customer": ns.customer}), fmt_sla
    return client.call("vcoin_slaViolations", {"customer": ns.customer}), fmt_violations


def _alerts_command(ns: argparse.Namespace, client: RPCClient) -> int:
    r = client.call("vcoin_alerts", {"active_only": ns.active, "limit": ns.limit})
    if ns.json and not ns.follow:
        print(json.dumps(r, indent=2))
        return 0
    rows = r["alerts"]
    if not ns.follow:
        print("\n".join(fmt_alert(a) for a in rows) or "no alerts")
        return 0
    # --follow: poll, printing each alert's changes once (fired, escalated, resolved)
    seen = {(a["id"], a["severity"], a["active"]) for a in rows}
    for a in reversed(rows):
        print(fmt_alert(a), flush=True)
    try:
        while True:
            time.sleep(1.0)
            for a in reversed(client.call("vcoin_alerts", {"limit": 200})["alerts"]):
                key = (a["id"], a["severity"], a["active"])
                if key not in seen:
                    seen.add(key)
                    print(fmt_alert(a, "fired" if a["active"] else "resolved"), flush=True)
    except KeyboardInterrupt:
        return 0


CONSENSUS_VIEWS: dict[str, tuple[str, Callable[[Any], str], bool]] = {
    "status": ("vcoin_consensusStatus", _fmt_kv, False),
    "metrics": ("vcoin_consensusMetrics", _fmt_kv, False),
    "history": ("vcoin_consensusHistory", fmt_consensus_tasks, True),
    "conflicts": ("vcoin_consensusConflicts", fmt_consensus_tasks, True),
}


def _wait_task(client: RPCClient, task_id: str, show_progress: bool) -> dict[str, Any]:
    last = ""
    while True:
        t: dict[str, Any] = client.call("vcoin_getTask", {"task_id": task_id})
        if show_progress and sys.stderr.isatty():
            line = (
                f"\r{t['status']:<9} {t['progress']:>5} tokens  "
                f"node {short_id(t['node_id'] or '-')}"
            )
            if line != last:
                print(line, end="", file=sys.stderr, flush=True)
                last = line
        if t["finished"]:
            if last:
                print(file=sys.stderr)
            return t
        time.sleep(0.2)


def _stream_task(client: RPCClient, task_id: str) -> dict[str, Any]:
    """Print the answer's text as it grows (the task's ``partial``), then the rest."""
    shown = ""

    def show(text: str) -> None:
        nonlocal shown
        if not text.startswith(shown):  # a retry wrote something else: say so, start over
            print("\n[the worker was replaced; the answer starts over]", file=sys.stderr)
            shown = ""
        print(text[len(shown) :], end="", flush=True)
        shown = text

    while True:
        t: dict[str, Any] = client.call("vcoin_getTask", {"task_id": task_id})
        if t["finished"]:
            show(t["result"] or "")
            print()
            print(f"{t['status']}: task {task_id}, {t['progress']} tokens, node "
                  f"{short_id(t['node_id'] or '-')}" + (f" ({t['error']})" if t["error"] else ""),
                  file=sys.stderr)  # fmt: skip
            return t
        if len(t.get("partial") or "") > len(shown):
            show(t["partial"])
        time.sleep(0.1)


def _task_command(ns: argparse.Namespace, client: RPCClient) -> tuple[Any, Callable[[Any], str]]:
    if ns.command == "submit":
        params = {
            "max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature,
            "top_p": ns.top_p, "top_k": ns.top_k, "seed": ns.seed, "stop": ns.stop,
        }  # fmt: skip
        req: dict[str, Any] = {"model": ns.model, "input": ns.prompt, "parameters": params,
                               "priority": ns.priority}  # fmt: skip
        if ns.timeout is not None:
            req["timeout_s"] = ns.timeout
        if ns.mode != "single" or ns.replicas is not None:
            req["mode"], req["replicas"] = ns.mode, ns.replicas
        if ns.pipeline:
            req["pipeline"] = True
        if ns.customer:
            req["customer"] = ns.customer
        if ns.max_price is not None:
            req["max_price"] = ns.max_price
        if ns.adapter:
            req["adapter"] = ns.adapter
        if ns.stream:
            req["stream"] = True
        task_id = client.call("vcoin_submitTask", req)["task_id"]
        if ns.stream:
            t = _stream_task(client, task_id)
            return t, lambda r: ""
        if not ns.wait:
            return {"task_id": task_id}, lambda r: f"submitted {r['task_id']}"
        _wait_task(client, task_id, show_progress=True)
        return client.call("vcoin_getTask", {"task_id": task_id}), fmt_task
    if ns.command == "task":
        if ns.wait:
            _wait_task(client, ns.task_id, show_progress=True)
        return client.call("vcoin_getTask", {"task_id": ns.task_id}), fmt_task
    if ns.command == "tasks":
        return client.call("vcoin_listTasks", {"status": ns.status, "limit": ns.limit}), fmt_tasks
    if ns.command == "consensus":
        method, fmt, paged = CONSENSUS_VIEWS[ns.view]
        return client.call(method, {"limit": ns.limit} if paged else {}), fmt
    r = client.call("vcoin_cancelTask", {"task_id": ns.task_id})
    return r, lambda r: f"task {r['task_id']}: {r['status']}"


def client_main(argv: Sequence[str] | None = None) -> int:
    ns = client_parser().parse_args(argv)
    try:
        client = _client_from(ns)
        if ns.command in CLIENT_COMMANDS:
            method, _, fmt = CLIENT_COMMANDS[ns.command]
            params = {"include_offline": True} if getattr(ns, "all", False) else {}
            result = client.call(method, params)
        elif ns.command in CHAIN_COMMANDS:
            result, fmt = run_client_command(ns, client)
        elif ns.command == "oracle":
            result, fmt = run_oracle_command(ns, client)
        elif ns.command in ("train", "adapters"):
            result, fmt = run_train_command(ns, client)
        elif ns.command == "alerts":
            return _alerts_command(ns, client)
        elif ns.command == "sla":
            result, fmt = _sla_command(ns, client)
        else:
            result, fmt = _task_command(ns, client)
    except ClientError as exc:
        print(f"vcoin: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out = json.dumps(result, indent=2) if ns.json else fmt(result)
    if out:
        print(out)
    if ns.command in ("submit", "task", "train") and isinstance(result, dict):
        waited = ns.wait or getattr(ns, "stream", False)
        return 0 if result.get("status", "completed") == "completed" or not waited else 1
    return 0

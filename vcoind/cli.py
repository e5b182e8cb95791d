"""Entry points: ``vcoind`` (the daemon) and ``vcoin`` (a client of its JSON-RPC)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from vcoind import __version__
from vcoind.chain.cli import (
    CHAIN_COMMANDS,
    add_client_commands,
    chain_main,
    run_client_command,
)
from vcoind.chain.cli import fmt_kv as _fmt_kv
from vcoind.config import (
    DEFAULT_DATADIR,
    DEVICES,
    FAULTS,
    LOG_LEVELS,
    Config,
    ConfigError,
    load,
    render_toml,
)
from vcoind.datadir import DataDir, DataDirError, Identity
from vcoind.market.selection import STRATEGIES
from vcoind.oracle.cli import add_oracle_commands, run_oracle_command
from vcoind.p2p.errors import P2PError
from vcoind.store import StoreError
from vcoind.train.cli import add_train_commands, fmt_training, run_train_command

EXIT_USAGE = 2

DAEMON_EPILOG = """\
configuration precedence: built-in defaults < DATADIR/config.toml < VCOIN_* environment
(e.g. VCOIN_P2P_HEARTBEAT_INTERVAL=2, VCOIN_RPC_ADDR=127.0.0.1:9000, lists comma-separated)
< command-line flags.

examples:
  vcoind init --datadir ~/.vcoin
  vcoind                                   # standalone node on ~/.vcoin
  vcoind --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...
  vcoind --datadir /tmp/n2 --listen /ip4/127.0.0.1/tcp/4002 --rpc-addr 127.0.0.1:8646
  vcoind --chain-rpc http://127.0.0.1:8546 --contracts contracts/deployments/devnet.json
  vcoind chain deploy --rpc http://127.0.0.1:8546 --out deployment.json   # see --help
"""


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("node")
    g.add_argument("--network", help="network name; nodes only talk within one (default devnet)")
    g.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default info)")
    g = p.add_argument_group("p2p")
    g.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="libp2p listen address, repeatable (default /ip4/127.0.0.1/tcp/4001; "
        "port 0 picks a free port)",
    )
    g.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="peer to join through, /ip4/H/tcp/P/p2p/<peer id>; repeatable",
    )
    g.add_argument(
        "--announce",
        action="append",
        metavar="MULTIADDR",
        help="address to advertise instead of the listen address (e.g. public IP)",
    )
    g.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="heartbeat gossip interval (default 5)",
    )
    g.add_argument(
        "--peer-timeout",
        type=float,
        metavar="SECONDS",
        help="drop peers silent for this long (default 30)",
    )
    g.add_argument(
        "--no-discover",
        action="store_true",
        help="dial only bootstrap peers, not peers learned through gossip",
    )
    g = p.add_argument_group("compute")
    g.add_argument(
        "--models-dir",
        metavar="DIR",
        help="serve every model directory found here (default DATADIR/models)",
    )
    g.add_argument("--device", choices=DEVICES, help="inference device (default auto)")
    g.add_argument(
        "--serve-layers",
        action="append",
        metavar="MODEL:START-END",
        help="serve layers START..END (inclusive) of MODEL to pipelines, repeatable; from a "
        "shard directory (`vcoind model split`) or the whole model in the models dir",
    )
    g.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 when several daemons share a box)",
    )
    g = p.add_argument_group("market")
    g.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="how this node picks workers for its tasks (default resource_aware)",
    )
    g.add_argument(
        "--bid-window",
        type=float,
        metavar="SECONDS",
        help="wait this long for more bids after the first (default 0.25)",
    )
    g.add_argument(
        "--task-timeout",
        type=float,
        metavar="SECONDS",
        help="reassign a task with no progress for this long (default 30)",
    )
    g.add_argument(
        "--fault",
        choices=FAULTS,
        help="TEST ONLY: misbehave as a consensus replica (refused outside devnet/test networks)",
    )
    g = p.add_argument_group(
        "chain",
        "By default an embedded in-process EVM: the contracts are deployed on first use after "
        "every start and its state (anchors, rewards, stake) lives only as long as the "
        "process. Point at a shared chain with --chain-rpc and --contracts.",
    )
    g.add_argument(
        "--chain-rpc",
        metavar="URL",
        help="Ethereum JSON-RPC of a shared chain, e.g. http://127.0.0.1:8546 (anvil)",
    )
    g.add_argument(
        "--contracts",
        metavar="FILE",
        help="deployment file of that chain (written by `vcoind chain deploy`)",
    )
    g.add_argument(
        "--no-chain", action="store_true", help="no chain: nothing is anchored or rewarded"
    )
    g = p.add_argument_group("rpc")
    g.add_argument(
        "--rpc-addr",
        metavar="HOST:PORT",
        help="JSON-RPC/HTTP bind address (default 127.0.0.1:8645; port 0 = any; "
        "a non-loopback host requires the auth cookie)",
    )


def _flags(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "datadir": ns.datadir,
        "network": ns.network,
        "log_level": ns.log_level,
        "p2p.listen": ns.listen,
        "p2p.bootstrap": ns.bootstrap,
        "p2p.announce": ns.announce,
        "p2p.heartbeat_interval": ns.heartbeat_interval,
        "p2p.peer_timeout": ns.peer_timeout,
        "p2p.discover": False if ns.no_discover else None,
        "rpc.addr": ns.rpc_addr,
        "compute.models_dir": ns.models_dir,
        "compute.device": ns.device,
        "compute.cpu_threads": ns.cpu_threads,
        "compute.serve_layers": ns.serve_layers,
        "market.strategy": ns.strategy,
        "market.bid_window_s": ns.bid_window,
        "market.task_timeout_s": ns.task_timeout,
        "market.fault": ns.fault,
        "chain.rpc": ns.chain_rpc,
        "chain.contracts": ns.contracts,
        "chain.enabled": False if ns.no_chain else None,
    }


def daemon_parser(command: str = "run") -> argparse.ArgumentParser:
    if command == "init":
        p = argparse.ArgumentParser(
            prog="vcoind init",
            description="Create the data directory: Ed25519 libp2p key "
            "(peer id), secp256k1 Ethereum key (node address), config.toml and the RPC auth "
            "cookie, all 0600. Never overwrites existing keys.",
        )
    else:
        p = argparse.ArgumentParser(
            prog="vcoind",
            usage="vcoind [init | model ... | chain ...] [options]",
            description="VCoin node daemon: joins the network over libp2p, gossips its "
            "capabilities, serves JSON-RPC on loopback. `vcoind init` only creates the data "
            "directory (the daemon also creates it on first start); `vcoind model --help` "
            "manages the model store; `vcoind chain --help` deploys the contracts.",
            epilog=DAEMON_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--version", action="version", version=f"vcoind {__version__}")
    p.add_argument(
        "--datadir",
        type=Path,
        metavar="DIR",
        help=f"data directory (default {DEFAULT_DATADIR}; env VCOIN_DATADIR)",
    )
    _add_node_flags(p)
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("libp2p", "multiaddr", "hypercorn", "async_service"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _die(msg: str, code: int = 1) -> int:
    print(f"vcoind: error: {msg}", file=sys.stderr)
    return code


def model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcoind model",
        description="Manage the model store: a directory of model directories, each with "
        "config.json, *.safetensors weights and a tokenizer. A model's id is a hash of its "
        "weight files, so nodes can prove they serve the same weights.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    mk = sub.add_parser(
        "make-test",
        help="write a small random-weight Qwen2 model (the DeepSeek-R1-Distill-Qwen-1.5B "
        "architecture at toy size) with a locally trained tokenizer",
    )
    mk.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory")
    mk.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    for name, help_text in (
        ("list", "list the models in the store"),
        ("info", "one model"),
        ("split", "split a model by layer range into shard directories (each holds only its "
         "tensors, plus shard.json with the layer range and tensor hashes)"),
    ):  # fmt: skip
        sp = sub.add_parser(name, help=help_text)
        if name in ("info", "split"):
            sp.add_argument("model", help="short name or model id")
        if name == "split":
            how = sp.add_mutually_exclusive_group(required=True)
            how.add_argument("--shards", type=int, help="N shards of (nearly) equal layers")
            how.add_argument("--ranges", help="inclusive layer ranges, e.g. 0-13,14-27")
            sp.add_argument(
                "--out", type=Path, metavar="DIR",
                help="where the shard directories go (default: the models dir)",
            )  # fmt: skip
        sp.add_argument("--datadir", type=Path, metavar="DIR", help="data directory")
        sp.add_argument("--models-dir", metavar="DIR", help="default DATADIR/models")
        sp.add_argument("--json", action="store_true", help="print JSON")
    return p


def model_main(args: list[str]) -> int:
    from vcoind.compute.models import ModelError, ModelStore, inspect_model

    ns = model_parser().parse_args(args)
    if ns.action == "make-test":
        from vcoind.compute.testmodel import TinyModelSpec, make_test_model

        out = make_test_model(ns.out, TinyModelSpec(seed=ns.seed))
        info = inspect_model(out)
        print(f"wrote {out}\nmodel id  {info.model_id}\nweights   {info.weight_bytes} bytes")
        return 0
    try:
        cfg = load(flags={"datadir": ns.datadir, "compute.models_dir": ns.models_dir})
    except ConfigError as exc:
        return _die(str(exc), EXIT_USAGE)
    store = ModelStore(cfg.models_dir)
    models = store.scan()
    if ns.action == "list":
        if ns.json:
            print(json.dumps([m.as_dict() for m in models], indent=2))
        elif not models:
            print(f"no models in {cfg.models_dir}")
        else:
            rows = [
                [
                    m.name,
                    m.model_id[:19] + "…",
                    m.architecture,
                    str(m.num_layers),
                    f"{m.weight_bytes / (1 << 20):.1f}",
                ]
                for m in models
            ]
            print(_table(rows, ["NAME", "MODEL ID", "ARCHITECTURE", "LAYERS", "MiB"]))
        return 0
    try:
        info = store.resolve(ns.model)
    except ModelError as exc:
        return _die(str(exc))
    if ns.action == "split":
        return _split(info, ns.shards, ns.ranges, ns.out or cfg.models_dir, ns.json)
    d = info.as_dict()
    print(json.dumps(d, indent=2) if ns.json else "\n".join(f"{k:<16}{v}" for k, v in d.items()))
    return 0


def _split(info: Any, shards: int | None, ranges: str | None, out: Path, as_json: bool) -> int:
    from vcoind.compute.shards import ShardError, even_ranges, parse_ranges, split_model

    try:
        spans = (
            parse_ranges(ranges, info.num_layers) if ranges
            else even_ranges(info.num_layers, shards or 0)
        )  # fmt: skip
        if not as_json:
            print(f"splitting {info.name} ({info.num_layers} layers) into {len(spans)} shards "
                  f"under {out}", flush=True)  # fmt: skip
        dirs = split_model(info.path, out, spans, name=info.name, model_id=info.model_id)
    except (ShardError, OSError) as exc:
        return _die(str(exc))
    rows: list[dict[str, Any]] = [{"path": str(d), "layers": f"{a}-{b}",
             "bytes": sum(f.stat().st_size for f in d.glob("*.safetensors"))}
            for d, (a, b) in zip(dirs, spans, strict=True)]  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=2))
    for r in [] if as_json else rows:
        print(f"  {r['path']}  layers {r['layers']}  {r['bytes'] / (1 << 20):.1f} MiB")
    return 0


def daemon_main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["model"]:
        return model_main(args[1:])
    if args[:1] == ["chain"]:
        return chain_main(args[1:])
    command = "init" if args[:1] == ["init"] else "run"
    if command == "init":
        args = args[1:]
    ns = daemon_parser(command).parse_args(args)
    try:
        cfg = load(flags=_flags(ns))
    except ConfigError as exc:
        return _die(str(exc), EXIT_USAGE)
    dd = DataDir(cfg.datadir)
    if command == "init":
        try:
            created = dd.init(render_toml(cfg))
        except (DataDirError, OSError) as exc:
            return _die(str(exc))
        ident = dd.load_identity()
        print(f"initialised {dd.path}")
        for f in created:
            print(f"  created {f}")
        print(f"peer id      {ident.peer_id}\neth address  {ident.eth_address}")
        return 0
    _setup_logging(cfg.log_level)
    try:
        dd.init(render_toml(cfg), exist_ok=True)  # first start initialises the datadir
        ident = dd.load_identity()
        with dd.lock():
            return trio.run(_serve, cfg, dd, ident)
    except DataDirError as exc:
        return _die(str(exc))
    except OSError as exc:
        return _die(f"{exc}")


async def _serve(cfg: Config, dd: DataDir, ident: Identity) -> int:
    from vcoind.node import Node, NodeError, first_leaf  # heavy imports only when actually running

    node = Node(cfg, dd, ident)
    try:
        # Signals are caught from the very start, so Ctrl-C during start-up is clean too.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
                info = await nursery.start(node.run)
                print(f"vcoind {__version__}  network {cfg.network}", flush=True)
                print(f"peer id  {info.peer_id}\neth      {info.eth_address}", flush=True)
                for a in info.p2p_addrs:
                    print(f"p2p      {a}", flush=True)
                print(f"rpc      {info.rpc_url}\ndatadir  {dd.path}", flush=True)
    except BaseExceptionGroup as group:
        leaf = first_leaf(group)
        if isinstance(leaf, OSError | NodeError | P2PError | StoreError):
            print(f"vcoind: error: {leaf}", file=sys.stderr)
            return 1
        raise
    print("vcoind stopped", flush=True)
    return 0


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        logging.getLogger("vcoind").info("received %s, shutting down", signal.Signals(signum).name)
        scope.cancel()
        return


# --- client -------------------------------------------------------------------


class ClientError(Exception):
    pass


class RPCClient:
    def __init__(self, url: str, cookie: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.cookie = cookie
        self.timeout = timeout
        self._id = 0

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._id += 1
        body = json.dumps(
            {"jsonrpc": "2.0", "id": self._id, "method": method, "params": params or {}}
        ).encode()
        req = urllib.request.Request(
            self.url + "/rpc",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if self.cookie:
            req.add_header("Authorization", f"Bearer {self.cookie}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"cannot reach the daemon at {self.url}: {exc}") from None
        if "error" in reply:
            err = reply["error"]
            raise ClientError(f"{method}: {err.get('message')} (code {err.get('code')})")
        return reply["result"]


def _client_from(ns: argparse.Namespace) -> RPCClient:
    if ns.rpc:
        cookie = os.environ.get("VCOIN_RPC_COOKIE")
        return RPCClient(ns.rpc, cookie)
    raw = ns.datadir or os.environ.get("VCOIN_DATADIR") or DEFAULT_DATADIR
    dd = DataDir(Path(raw))
    info = dd.read_run_file()
    if not info or "rpc_url" not in info:
        raise ClientError(
            f"no daemon running on {dd.path} (no run.json); start `vcoind "
            f"--datadir {dd.path}` or pass --rpc URL"
        )
    return RPCClient(str(info["rpc_url"]), dd.read_cookie())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def _short(pid: str) -> str:
    return pid if len(pid) <= 16 else f"{pid[:8]}…{pid[-6:]}"


def _fmt_node_info(r: dict[str, Any]) -> str:
    dev = r.get("device") or {}
    lines = [
        f"peer id      {r['peer_id']}",
        f"eth address  {r['eth_address']}",
        f"network      {r['network']}   version {r['version']}",
        f"rpc          {r['rpc_url']}",
        *[f"p2p          {a}" for a in r["p2p_addrs"]],
        f"uptime       {r['uptime_s']:.0f} s   peers {r['peer_count']}   "
        f"connections {r['connections']}   heartbeat every {r['heartbeat_interval']:g} s",
        f"device       {dev.get('kind', '?')} {dev.get('name', '')} "
        f"{dev.get('memory_used_mb', 0)}/{dev.get('memory_total_mb', 0)} MiB "
        f"util {dev.get('utilization', 0):.0f}%",
        f"health       {r['health']}",
    ]
    return "\n".join(lines)


def _fmt_peers(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers"
    now = time.time()
    rows = [
        [
            _short(p["peer_id"]),
            p.get("status", ""),
            "yes" if p.get("connected") else "no",
            f"{p['health']:.2f}" if p.get("health") is not None else "-",
            f"{p['latency_ms']:.1f}" if "latency_ms" in p else "-",
            f"{now - p['last_seen']:.1f}s" if p.get("last_seen") else "-",
            _fmt_stake(p.get("stake")),
            (p.get("device") or {}).get("name", "-"),
            (p.get("addrs") or ["-"])[0].split("/p2p/")[0],
        ]
        for p in peers
    ]
    head = ["PEER", "STATUS", "CONN", "HEALTH", "LAT(ms)", "SEEN", "STAKE", "DEVICE", "ADDR"]
    return _table(rows, head)


def _fmt_stake(st: dict[str, Any] | None) -> str:
    """Staked VCOIN, ``*`` when below the minimum (its bids are ignored on a shared chain)."""
    if not st:
        return "-"
    return f"{st['stake']:g}" + ("" if st["eligible"] else "*")


def _fmt_status(r: dict[str, Any]) -> str:
    rows = [
        [
            _short(n["peer_id"]) + (" (self)" if n["self"] else ""),
            f"{n['health']:.2f}",
            f"{n['cpu_percent']:.0f}%",
            f"{n['memory_percent']:.0f}%",
            f"{n['device_utilization']:.0f}%",
            str(n["queue_length"]),
            f"{n['error_rate']:.3f}",
        ]
        for n in r["load_distribution"]
    ]
    lat = r["gossip"]["latency"]
    head = (
        f"network {r['network']}: {r['active_nodes']} active nodes, queue "
        f"{r['queue_length']}, average health {r['average_health']}\n"
        f"gossip latency p50 {lat.get('p50_ms', '-')} ms, p95 {lat.get('p95_ms', '-')} ms "
        f"over {lat.get('count', 0)} heartbeats; rejected {r['gossip']['rejected'] or 0}\n"
    )
    return head + _table(rows, ["NODE", "HEALTH", "CPU", "MEM", "DEVICE", "QUEUE", "ERRORS"])


CLIENT_COMMANDS: dict[str, tuple[str, str, Callable[[Any], str]]] = {
    "node-info": (
        "vcoin_nodeInfo",
        "identity, addresses, device and health of the node",
        _fmt_node_info,
    ),
    "peers": ("vcoin_peers", "the peer table", _fmt_peers),
    "status": ("vcoin_clusterStatus", "cluster status: nodes, load, error rates", _fmt_status),
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
        help="daemon RPC URL, e.g. http://127.0.0.1:8645 (auth cookie from env VCOIN_RPC_COOKIE)",
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
    s.add_argument("--adapter", metavar="ID",
                   help="generate with this LoRA adapter merged in (vcoin adapters)")  # fmt: skip
    s.add_argument("--wait", action="store_true", help="show progress, then print the answer")
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
        return client.call("vcoin_slaStatus", {"customer": ns.customer}), _fmt_sla
    return client.call("vcoin_slaViolations", {"customer": ns.customer}), _fmt_violations


def _fmt_violations(r: dict[str, Any]) -> str:
    lines = []
    for v in r["violations"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created_at"]))
        lines.append(f"{when} {v['customer']} {v['kind']}: {v['measured']} vs {v['target']}, "
                     f"penalty {v['penalty']}")  # fmt: skip
    return "\n".join(lines) or "no violations"


def _fmt_sla(s: dict[str, Any]) -> str:
    t = s["terms"]
    state = "compliant" if s["compliant"] else "VIOLATED: " + ", ".join(s["violations"])
    lines = [f"{s['customer']}: {state}"
             + (f" (close: {', '.join(s['breach_imminent'])})" if s["breach_imminent"] else ""),
             f"  uptime       {s['uptime_pct']:.3f} %  (terms {t['uptime_pct']} %)",
             f"  p95 latency  {s['p95_latency_s']} s  (terms {t['max_latency_s']} s)",
             f"  throughput   {s['throughput_per_day']}/day  (terms {t['min_throughput_per_day']}"
             f"/day; {s['completed']} of {s['submitted']} completed)"]  # fmt: skip
    return "\n".join(lines)


def _fmt_alert(a: dict[str, Any], event: str = "") -> str:
    when = time.strftime("%H:%M:%S", time.localtime(a["resolved_at"] or a["started_at"]))
    state = event or ("ACTIVE" if a["active"] else "resolved")
    return f"{when} {state:<9} {a['severity']:<8} {a['rule']:<24} {a['message']}"


def _alerts_command(ns: argparse.Namespace, client: RPCClient) -> int:
    r = client.call("vcoin_alerts", {"active_only": ns.active, "limit": ns.limit})
    if ns.json and not ns.follow:
        print(json.dumps(r, indent=2))
        return 0
    rows = r["alerts"]
    if not ns.follow:
        print("\n".join(_fmt_alert(a) for a in rows) or "no alerts")
        return 0
    # --follow: poll, printing each alert's changes once (fired, escalated, resolved)
    seen = {(a["id"], a["severity"], a["active"]) for a in rows}
    for a in reversed(rows):
        print(_fmt_alert(a), flush=True)
    try:
        while True:
            time.sleep(1.0)
            for a in reversed(client.call("vcoin_alerts", {"limit": 200})["alerts"]):
                key = (a["id"], a["severity"], a["active"])
                if key not in seen:
                    seen.add(key)
                    print(_fmt_alert(a, "fired" if a["active"] else "resolved"), flush=True)
    except KeyboardInterrupt:
        return 0


def fmt_consensus(c: dict[str, Any]) -> list[str]:
    lines = [
        f"consensus {c['decision']}  confidence {c['confidence']:.3f}  share {c['share']:.3f}  "
        f"action {c['action']}  rounds {c.get('rounds', 1)}",
    ]
    if c.get("note"):
        lines.append(f"note      {c['note']}")
    for r in c.get("replicas", []):
        mark = "agreed" if r["agreed"] else "OUTVOTED"
        answer = "  <- answer" if r["node_id"] == c.get("answer_replica") else ""
        lines.append(f"  replica {_short(r['node_id'])}  similarity {r['similarity']:.3f}  "
                     f"weight {r['weight']:.3f}  {mark}{answer}")  # fmt: skip
    lines.append(f"signed by {len(c.get('signatures', []))} node(s); result hash "
                 f"{c['result_hash'][:16]}…")  # fmt: skip
    return lines


def fmt_anchor(a: dict[str, Any]) -> str:
    line = f"anchor    {a['status']}"
    if a.get("tx_hash"):
        line += f"  tx {a['tx_hash']}  block {a.get('block')}"
    if a.get("rewards"):
        line += "  rewards " + ", ".join(f"{r['node'][:10]}… {r['amount']:g}" for r in a["rewards"])
    if a.get("slashed"):
        line += "  slashed " + ", ".join(f"{r['node'][:10]}… {r['amount']:g}" for r in a["slashed"])
    if a.get("error"):
        line += f"  ({a['error']})"
    return line


def _fmt_consensus_tasks(r: dict[str, Any]) -> str:
    items = r.get("tasks", r.get("conflicts", []))
    rows = [
        [t["task_id"][:12], t["status"], str(t.get("decision") or "-"),
         f"{t['confidence']:.3f}" if t.get("confidence") is not None else "-",
         str(t.get("rounds") or "-"), t.get("why") or t.get("action") or t.get("error") or ""]
        for t in items
    ]  # fmt: skip
    if not rows:
        return "no consensus tasks"
    last = "WHY" if "conflicts" in r else "ACTION"
    head = ["TASK", "STATUS", "DECISION", "CONFIDENCE", "ROUNDS", last]
    return _table(rows, head) + f"\n{len(rows)} of {r['total']}"


CONSENSUS_VIEWS: dict[str, tuple[str, Callable[[Any], str], bool]] = {
    "status": ("vcoin_consensusStatus", _fmt_kv, False),
    "metrics": ("vcoin_consensusMetrics", _fmt_kv, False),
    "history": ("vcoin_consensusHistory", _fmt_consensus_tasks, True),
    "conflicts": ("vcoin_consensusConflicts", _fmt_consensus_tasks, True),
}


def _fmt_task(t: dict[str, Any]) -> str:
    if t.get("type") == "lora_training":
        return fmt_training(t)
    tm = t.get("timings") or {}
    lines = [
        f"task      {t['task_id']}",
        f"status    {t['status']} ({t['phase']})   progress {t['progress']} tokens   "
        f"attempts {t['attempts']}",
        f"model     {t['model']}   node {t.get('node_id') or '-'}",
    ]
    for hop in t.get("route", []):
        err = f" ({hop['error']})" if hop.get("error") else ""
        lines.append(f"attempt {hop['attempt']}  {hop['node_id']}  {hop['status']}{err}")
    if tm:
        keys = ("assigned_s", "total_s", "prefill_s", "decode_s", "tokens_per_s", "reroutes")
        lines.append("timings   " + "  ".join(f"{k}={tm[k]}" for k in keys if k in tm))
    for h in tm.get("hops", []):
        lines.append(f"hop       {h['node_id']}  layers {h['layers']}  {h['status']}  "
                     f"compute {h['compute_s']:.3f} s  transfer {h['transfer_s']:.3f} s  "
                     f"{h['bytes']} bytes")  # fmt: skip
    if t.get("error"):
        lines.append(f"error     {t['error']}")
    if t.get("consensus"):
        lines += fmt_consensus(t["consensus"])
    if t.get("anchor"):
        lines.append(fmt_anchor(t["anchor"]))
    if t.get("result") is not None:
        lines += ["", t["result"]]
    return "\n".join(lines)


def _fmt_tasks(r: dict[str, Any]) -> str:
    rows = [
        [t["task_id"][:12], t["status"], t["model"], str(t["progress"]),
         _short(t["node_id"]) if t.get("node_id") else "-", (t["input"] or "")[:40]]
        for t in r["tasks"]
    ]  # fmt: skip
    if not rows:
        return "no tasks"
    table = _table(rows, ["TASK", "STATUS", "MODEL", "TOKENS", "NODE", "INPUT"])
    return table + f"\n{len(rows)} of {r['total']}"


def _wait_task(client: RPCClient, task_id: str, show_progress: bool) -> dict[str, Any]:
    last = ""
    while True:
        t: dict[str, Any] = client.call("vcoin_getTask", {"task_id": task_id})
        if show_progress and sys.stderr.isatty():
            line = (
                f"\r{t['status']:<9} {t['progress']:>5} tokens  node {_short(t['node_id'] or '-')}"
            )
            if line != last:
                print(line, end="", file=sys.stderr, flush=True)
                last = line
        if t["finished"]:
            if last:
                print(file=sys.stderr)
            return t
        time.sleep(0.2)


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
        if ns.adapter:
            req["adapter"] = ns.adapter
        task_id = client.call("vcoin_submitTask", req)["task_id"]
        if not ns.wait:
            return {"task_id": task_id}, lambda r: f"submitted {r['task_id']}"
        _wait_task(client, task_id, show_progress=True)
        return client.call("vcoin_getTask", {"task_id": task_id}), _fmt_task
    if ns.command == "task":
        if ns.wait:
            _wait_task(client, ns.task_id, show_progress=True)
        return client.call("vcoin_getTask", {"task_id": ns.task_id}), _fmt_task
    if ns.command == "tasks":
        return client.call("vcoin_listTasks", {"status": ns.status, "limit": ns.limit}), _fmt_tasks
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
    print(json.dumps(result, indent=2) if ns.json else fmt(result))
    if ns.command in ("submit", "task", "train") and isinstance(result, dict):
        return 0 if result.get("status", "completed") == "completed" or not ns.wait else 1
    return 0

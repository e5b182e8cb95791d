"""``vcoind``: the daemon's flags, ``vcoind init``, and running the node."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

from vcoind import __version__
from vcoind.chain.cli import chain_main
from vcoind.cli.format import EXIT_USAGE, die
from vcoind.cli.model import model_main
from vcoind.config import (
    DEFAULT_DATADIR,
    DEVICES,
    LOG_LEVELS,
    STRATEGIES,
    Config,
    ConfigError,
    load,
    render_toml,
)
from vcoind.config_check import FAULTS
from vcoind.datadir import DataDir, DataDirError, Identity
from vcoind.p2p.errors import P2PError
from vcoind.store import StoreError

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
  vcoind apikey create my-app --rpm 60     # a key for /v1 (OpenAI clients), shown once
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
        "--relay",
        action="append",
        metavar="MULTIADDR",
        help="a circuit relay (/ip4/H/tcp/P/p2p/<peer id>) to hold a slot at, repeatable: "
        "peers reach this node at RELAY/p2p-circuit/p2p/<our id> (for a node behind NAT)",
    )
    g.add_argument(
        "--reachability",
        choices=("auto", "public", "private"),
        help="private: advertise only addresses through --relay (behind a NAT our own "
        "addresses reach nobody); default auto: our addresses and the relayed ones",
    )
    g.add_argument(
        "--relay-service",
        choices=("auto", "on", "off"),
        help="relay for nodes behind NAT (circuit relay v2, with limits); default auto: "
        "when an announce (else listen) address is public",
    )
    g.add_argument(
        "--dht",
        choices=("auto", "server", "client", "off"),
        help="Kademlia DHT mode (provider records: who serves a model or span); default "
        "auto: server once the node is found publicly reachable, client otherwise",
    )
    g.add_argument(
        "--mdns",
        action="store_true",
        help="find peers on the local network (mDNS); they pass the dial policy",
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
        metavar="MODEL:START-END|auto[:N]",
        help="serve layers START..END (inclusive) of MODEL to pipelines, repeatable; from a "
        "shard directory (`vcoind model split`), the whole model in the models dir, or "
        "fetched from peers that serve it. `auto` picks the span the fewest nodes serve (N "
        "layers, default as many as fit in memory; `MODEL:auto[:N]` for one model), fetches "
        "it and moves when span hosts leave",
    )
    g.add_argument(
        "--fetch-model",
        action="append",
        metavar="MODEL",
        help="fetch MODEL (short name or model id) from the peers that serve it if it is not "
        "in the models dir, then serve it; repeatable. Files are checked against the model id",
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
        "--price",
        type=float,
        metavar="VCOIN",
        help="as a worker on a shared chain, ask this much per generated token (default 0.0001)",
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
        "every request needs the auth cookie, DATADIR/rpc.cookie)",
    )


def _flags(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "datadir": ns.datadir,
        "network": ns.network,
        "log_level": ns.log_level,
        "p2p.listen": ns.listen,
        "p2p.bootstrap": ns.bootstrap,
        "p2p.announce": ns.announce,
        "p2p.relays": ns.relay,
        "p2p.reachability": ns.reachability,
        "p2p.relay_service": ns.relay_service,
        "p2p.dht": ns.dht,
        "p2p.mdns": True if ns.mdns else None,
        "p2p.heartbeat_interval": ns.heartbeat_interval,
        "p2p.peer_timeout": ns.peer_timeout,
        "p2p.discover": False if ns.no_discover else None,
        "rpc.addr": ns.rpc_addr,
        "compute.models_dir": ns.models_dir,
        "compute.device": ns.device,
        "compute.cpu_threads": ns.cpu_threads,
        "compute.serve_layers": ns.serve_layers,
        "compute.fetch_models": ns.fetch_model,
        "market.strategy": ns.strategy,
        "market.bid_window_s": ns.bid_window,
        "market.price_per_token": ns.price,
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
            usage="vcoind [init | model ... | chain ... | apikey ...] [options]",
            description="VCoin node daemon: joins the network over libp2p, gossips its "
            "capabilities, serves JSON-RPC on loopback. `vcoind init` only creates the data "
            "directory (the daemon also creates it on first start); `vcoind model --help` "
            "manages the model store; `vcoind chain --help` deploys the contracts; "
            "`vcoind apikey --help` manages the OpenAI gateway's API keys.",
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


def daemon_main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["model"]:
        return model_main(args[1:])
    if args[:1] == ["chain"]:
        return chain_main(args[1:])
    if args[:1] == ["apikey"]:
        from vcoind.cli.apikey import apikey_main

        return apikey_main(args[1:])
    command = "init" if args[:1] == ["init"] else "run"
    if command == "init":
        args = args[1:]
    ns = daemon_parser(command).parse_args(args)
    try:
        cfg = load(flags=_flags(ns))
    except ConfigError as exc:
        return die(str(exc), EXIT_USAGE)
    dd = DataDir(cfg.datadir)
    if command == "init":
        try:
            created = dd.init(render_toml(cfg))
        except (DataDirError, OSError) as exc:
            return die(str(exc))
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
        return die(str(exc))
    except OSError as exc:
        return die(f"{exc}")


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

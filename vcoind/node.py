"""Node: builds the services from ``Config``, mounts what they register, starts them.

Construction order follows the services' ports: transport (store, libp2p host, gossip,
streams, peer keeper, RPC server), then chain, presence, compute, settlement, training,
market, oracle, operations. Each service mounts its RPC methods, HTTP aliases, stream
protocols and gossip routes (``vcoind.service``), then ``run`` starts them in the same
order with ``nursery.start``. Shutdown is cancellation; the run file is removed and the
store closed on the way out. Feature logic lives in the services, never here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from vcoind import __version__
from vcoind.chain.api import register_chain_api
from vcoind.chain.contracts import ChainError
from vcoind.chain.service import ChainService
from vcoind.compute.service import ComputeError, ComputeService
from vcoind.config import Config
from vcoind.datadir import DataDir, Identity
from vcoind.discovery import DiscoveryService
from vcoind.gateway.service import GatewayService
from vcoind.market.payments import Payments
from vcoind.market.service import MarketService
from vcoind.market.settle import Settler
from vcoind.metrics import NodeMetrics
from vcoind.ops.service import OpsService
from vcoind.ops.status import NodeFacts
from vcoind.oracle.network import OracleNetwork
from vcoind.p2p.dht import Dht
from vcoind.p2p.dialback import DialBack
from vcoind.p2p.gossip import Gossip
from vcoind.p2p.host import P2PHost, build_host, running
from vcoind.p2p.keeper import PeerKeeper
from vcoind.p2p.mdns import LanDiscovery
from vcoind.p2p.relay import Relays
from vcoind.p2p.streams import StreamService
from vcoind.presence.service import PresenceService
from vcoind.rpc import MethodRegistry, RPCServer, RPCServerConfig
from vcoind.service import Mounts
from vcoind.signer import Signer
from vcoind.store import Store
from vcoind.train.api import register_train_api
from vcoind.train.service import TrainService

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.node")


class NodeError(Exception):
    """The node could not start (a port taken, ...)."""


@dataclass(frozen=True)
class RunInfo:
    pid: int
    peer_id: str
    eth_address: str
    network: str
    rpc_url: str
    p2p_addrs: tuple[str, ...]
    started_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "peer_id": self.peer_id,
            "eth_address": self.eth_address,
            "network": self.network,
            "rpc_url": self.rpc_url,
            "p2p_addrs": list(self.p2p_addrs),
            "started_at": self.started_at,
        }


class Node:
    def __init__(self, config: Config, datadir: DataDir, identity: Identity) -> None:
        self.config = cfg = config
        self.datadir = datadir
        self.identity = identity
        self.started_at = time.time()
        self.info: RunInfo | None = None
        me = identity.peer_id
        # --- transport -----------------------------------------------------------------
        self.metrics = metrics = NodeMetrics()
        self.store = store = Store(datadir.db_file)
        self.signer = signer = Signer(bytes(identity.eth.key), cfg.network)
        self.p2p: P2PHost = build_host(identity.key_pair, self._on_bad_signature)
        p2p_cfg = cfg.p2p
        self.gossip = gossip = Gossip(self.p2p, cfg.network, metrics,
                                      max_age_s=p2p_cfg.peer_timeout,
                                      max_invalid=p2p_cfg.max_invalid_messages,
                                      cfg=p2p_cfg)  # fmt: skip
        self.relays = Relays(self.p2p, p2p_cfg, verdict=lambda a: self.keeper.dialable(a),
                             seen_at=lambda: self.dialback.wan_ips,
                             protect=lambda r, on: self._hold(str(r), "relay", on))  # fmt: skip
        self.keeper = PeerKeeper(self.p2p, metrics, bootstrap=p2p_cfg.bootstrap,
                                 discover=p2p_cfg.discover, cfg=p2p_cfg,
                                 connect=self.relays.connect)  # fmt: skip
        self.streams = streams = StreamService(
            self.p2p, metrics, max_stream_bytes=p2p_cfg.max_stream_bytes,
            resolve=self.keeper.addresses, connect=self.relays.connect,
        )  # fmt: skip
        self.dialback = DialBack(self.p2p, streams, verdict=self.keeper.dialable,
                                 own_addrs=self.direct_addrs,
                                 on_private=self._unreachable)  # fmt: skip
        self.dialback.mount(streams)
        self.mdns = LanDiscovery(self.p2p, self.keeper.learn, self.direct_addrs)
        self.dht: Dht | None = None
        if p2p_cfg.dht != "off":
            self.dht = Dht(self.p2p, p2p_cfg, verdict=self.keeper.dialable,
                           own_addrs=self.advertised_addrs,
                           reachability=lambda: self.dialback.observed)  # fmt: skip
        self.registry = MethodRegistry()
        self.rpc = RPCServer(
            RPCServerConfig(host=cfg.rpc.host, port=cfg.rpc.port,
                            max_body_bytes=cfg.rpc.max_body_bytes,
                            cookie=datadir.read_cookie(), hosts=cfg.rpc.hosts,
                            origins=cfg.rpc.origins),
            self.registry, ready=self.is_ready, metrics=self.render_metrics, title="vcoind",
            version=__version__, on_call=metrics.rpc_call,
        )  # fmt: skip
        # --- services, in the order of their ports ---------------------------------------
        self.chain: ChainService | None = None
        if cfg.chain.enabled:
            self.chain = ChainService(cfg.chain, store, network=cfg.network,
                                      key=signer, metrics=metrics)  # fmt: skip
        chain = self.chain
        self.presence = presence = PresenceService(
            p2p_cfg, cfg.network, me, signer, store, gossip, metrics,
            addrs=self.advertised_addrs, connected=self._connected,
            # measured as a worker: failed attempts and time to first token (the market
            # exists by the first heartbeat)
            error_rate=lambda: self.market.worker.error_rate,
            response_s=lambda: self.market.worker.response_s,
            eligible=chain.bid_allowed if chain is not None else lambda address: True,
        )  # fmt: skip
        presence.on_seen(lambda hb: self.keeper.learn(hb.peer_id, hb.listen_addrs))
        if chain is not None:
            presence.on_seen(lambda hb: chain.watch(hb.eth_address))
        self.compute = compute = ComputeService(
            cfg.compute, cfg.models_dir, datadir.path / "shards", me, streams,
            announce=presence.announce, metrics=metrics, view=presence.view,
            penalise=self._penalise, heartbeat_s=p2p_cfg.heartbeat_interval,
        )  # fmt: skip
        # A provider the DHT names proves what it serves with its heartbeat, then joins
        # the peer table like a gossiped one; a model fetch with no provider in sight asks
        # the DHT.
        self.discovery = DiscoveryService(
            p2p_cfg, cfg.network, self.dht, streams, presence.view,
            proof=presence.heartbeat.build, admit=presence.peers.on_heartbeat,
            connect=self.relays.connect,
        )  # fmt: skip
        compute.supply.use_discovery(self.discovery.look_up)
        payments = Payments(cfg.market, signer, chain, presence.view)
        settler = None
        if chain is not None and cfg.chain.anchor:
            settler = Settler(cfg.chain, chain, presence.view, payments)
        self.train = TrainService(cfg.market, datadir.path, payments, streams, presence,
                                  compute, settler=settler, metrics=metrics)  # fmt: skip
        self.market = market = MarketService(
            cfg.market, cfg.network, payments, store, gossip, streams, metrics, presence,
            compute, publish=self.rpc.publish, settler=settler, trainer=self.train, chain=chain,
            hold=self._hold,
        )  # fmt: skip
        self.oracle = OracleNetwork(cfg.oracle, payments, store, metrics, presence, market,
                                    settler=settler)  # fmt: skip
        facts = NodeFacts(
            me,
            signer.address,
            cfg.network,
            self.started_at,
            datadir.path,
            self.advertised_addrs,
            lambda: self.info.rpc_url if self.info else None,
            lambda: {
                **self.relays.status(),
                **self.dialback.status(),
                "dht": self.dht.status() if self.dht else None,
            },
            self.p2p.relayed,
        )
        self.ops = OpsService(
            cfg.alerts, cfg.sla, facts, store, gossip, metrics, presence, compute, market,
            publish=self.rpc.publish, chain=chain, oracle=self.oracle.local,
        )  # fmt: skip
        # --- mount what they serve ---------------------------------------------------------
        m = Mounts(rpc=self.registry, http=self.rpc, gossip=gossip, streams=streams)
        self.gateway = GatewayService(market.origin, presence.view, self.registry, store,
                                      metrics)  # fmt: skip
        for service in (presence, compute, self.discovery, self.train, market, self.oracle,
                        self.ops, self.gateway):  # fmt: skip
            service.mount(m)
        register_chain_api(m.rpc, chain)
        register_train_api(m.rpc, self.train, market.origin, presence.view)
        self._p2p_listening = False

    # --- what the transport and the RPC server ask of the node ---------------------------

    def _on_bad_signature(self, forwarder: Any, msg: Any) -> None:
        self.gossip.on_bad_signature(forwarder, msg)

    def _penalise(self, peer: str, amount: float) -> None:
        """A peer that sent bad model bytes: its gossip score drops (see ``Gossip``)."""
        from libp2p.peer.id import ID

        self.gossip.penalise(ID.from_base58(peer), amount)

    def _connected(self) -> set[str]:
        return {p.to_base58() for p in self.p2p.connected_peers()}

    def _unreachable(self) -> None:
        """The dial-back found us unreachable: with no relay set, hold slots at the
        bootstrap peers (those that relay accept; the others are let go)."""
        p2p = self.config.p2p
        if p2p.reachability == "auto" and not p2p.relays:
            self.relays.add_relays(list(p2p.bootstrap))

    def direct_addrs(self) -> list[str]:
        """Our own addresses (announce, else listen): what a dial-back check tries."""
        pid = self.identity.peer_id
        if self.config.p2p.announce:
            return [f"{a}/p2p/{pid}" for a in self.config.p2p.announce]
        return self.p2p.addrs()

    def advertised_addrs(self) -> list[str]:
        """Where peers can reach us: our announce (else listen) addresses and our addresses
        through relays; with ``p2p.reachability = private`` only the latter."""
        relayed = self.relays.circuit_addrs()
        return relayed if self.relays.private else self.direct_addrs() + relayed

    def is_ready(self) -> bool:
        return self._p2p_listening and self.store.is_open

    def _hold(self, peer: str, tag: str, held: bool) -> None:
        """Work in progress with ``peer``: the connection manager keeps it connected."""
        if peer == self.identity.peer_id:
            return
        if held:
            self.keeper.protect(peer, tag)
        else:
            self.keeper.unprotect(peer, tag)

    def render_metrics(self) -> bytes:
        self.metrics.connections.set(len(self.p2p.connected_peers()))
        return self.metrics.render()

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[RunInfo] = trio.TASK_STATUS_IGNORED) -> None:
        await self.store.open()
        try:
            await self.store.mark_all_offline()
            async with running(self.p2p, self.config.p2p.listen), trio.open_nursery() as nursery:
                self._p2p_listening = True
                try:
                    await nursery.start(self.compute.run)
                except* ComputeError as group:
                    raise NodeError(str(first_leaf(group))) from None
                for row in await self.store.list_peers():
                    self.keeper.learn(row.peer_id, row.addrs)
                if self.chain is not None:
                    try:
                        await nursery.start(self.chain.run)
                    except* ChainError as group:
                        raise NodeError(f"chain: {first_leaf(group)}") from None
                await nursery.start(self.gossip.run)
                await nursery.start(self.relays.run)
                await nursery.start(self.presence.run)
                await nursery.start(self.keeper.run)
                await nursery.start(self.dialback.run)
                await nursery.start(self.discovery.run)
                if self.config.p2p.mdns:
                    await nursery.start(self.mdns.run)
                for service in (self.train, self.oracle, self.ops, self.market):
                    await nursery.start(service.run)
                try:
                    rpc_url = await nursery.start(self.rpc.run)
                except* OSError as group:
                    exc = first_leaf(group)
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    raise NodeError(
                        f"cannot serve RPC on {self.config.rpc.addr}: {reason}"
                    ) from None
                self.info = RunInfo(
                    pid=os.getpid(), peer_id=self.identity.peer_id,
                    eth_address=self.identity.eth_address, network=self.config.network,
                    rpc_url=rpc_url, p2p_addrs=tuple(self.p2p.addrs()),
                    started_at=self.started_at,
                )  # fmt: skip
                self.datadir.write_run_file(self.info.as_dict())
                log.info("vcoind %s up: peer %s, eth %s, network %s", __version__,
                         self.identity.peer_id, self.identity.eth_address,
                         self.config.network)  # fmt: skip
                task_status.started(self.info)
        finally:
            self._p2p_listening = False
            self.datadir.remove_run_file()
            with trio.CancelScope(shield=True):
                await self.oracle.aclose()
                await self.store.close()


def first_leaf(exc: BaseException) -> BaseException:
    """The first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc

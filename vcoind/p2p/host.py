"""The libp2p host: TCP, Noise only (no plaintext), yamux, GossipSub v1.1/v1.2."""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams
from libp2p.pubsub.validators import signature_validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from vcoind.p2p.errors import P2PError
from vcoind.p2p.policy import CIRCUIT

# GossipSub v1.1 only. py-libp2p's v1.2 sends an IDONTWANT to every mesh peer, awaited,
# before forwarding each message: measured with bench/gossip.py-style runs on 3 processes,
# relayed latency p50 7.0 -> 4.6 ms and p95 12 -> 7 ms without it. js-libp2p speaks 1.1
# (offering only /meshsub/1.3.0 would silently break interop).
GOSSIP_PROTOCOLS = (PROTOCOL_ID_V11,)
GOSSIP_HEARTBEAT_S = 1  # py-libp2p defaults to 120 s, far too slow to repair a mesh
MAX_PUBSUB_RPC_BYTES = 1 << 20
MAX_MESSAGES_PER_TOPIC_PER_S = 1000.0

# Peer scoring (GossipSub v1.1, py-libp2p's PeerScorer): our gossip layer charges a
# behaviour penalty (P5) for invalid and over-budget messages, decaying to half in about
# 10 s (one decay step per router heartbeat); our reputation of the peer is the
# application-specific score (P6). Mesh delivery scores (P1-P4) stay off: py-libp2p
# counts every validator refusal as invalid, stale relays included.
PENALTY_DECAY = 0.5 ** (GOSSIP_HEARTBEAT_S / 10.0)

BadSignatureHook = Callable[[ID, rpc_pb2.Message], None]
Gate = Callable[[ID, rpc_pb2.Message], bool]


def score_params(graylist_threshold: float, app_score: Callable[[ID], float] | None) -> ScoreParams:
    return ScoreParams(
        p5_behavior_penalty_weight=1.0,
        p5_behavior_penalty_decay=PENALTY_DECAY,
        p5_behavior_penalty_threshold=0.0,
        p6_appl_slack_weight=1.0,
        p6_appl_slack_decay=1.0,
        # Graylisted peers are not grafted, gossiped to, or published to.
        publish_threshold=graylist_threshold,
        gossip_threshold=graylist_threshold,
        graylist_threshold=graylist_threshold,
        # Never accept peer exchange: a PRUNE's peer list would make us dial whatever
        # addresses a peer names, bypassing the keeper's dial policy.
        accept_px_threshold=math.inf,
        app_specific_score_fn=app_score,
    )


class VerifyingPubsub(Pubsub):
    """Pubsub that reports unsigned or badly signed messages instead of dropping them silently.

    py-libp2p's strict signing drops such messages before topic validators run,
    so they would never be counted against the forwarder.
    """

    def __init__(self, host: IHost, router: GossipSub, on_bad_signature: BadSignatureHook) -> None:
        super().__init__(
            host, router, strict_signing=True, max_inbound_rpc_size=MAX_PUBSUB_RPC_BYTES
        )
        self._on_bad_signature = on_bad_signature
        self._gate: Gate = lambda forwarder, msg: True

    def set_gate(self, gate: Gate) -> None:
        """``gate(forwarder, msg)`` False: drop a peer's message before anything else
        (a graylisted peer); called for other peers' messages not seen before."""
        self._gate = gate

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder != self.my_id and not self._is_msg_seen(msg):
            if not self._gate(msg_forwarder, msg):
                return
            if not signature_validator(msg):
                self._on_bad_signature(msg_forwarder, msg)
                return
        await super().push_msg(msg_forwarder, msg)

    def _handle_dead_peer(self, peer_id: ID) -> None:
        # py-libp2p forgets a peer's subscriptions whenever one of its pubsub streams dies,
        # even when the peer is still connected over another connection: a daemon that
        # restarted before its old connection's end was read, a relayed connection closed
        # after DCUtR, a simultaneous dial. The peer does not send its subscriptions
        # again, so it would never hear from us. While it stays connected, keep them
        # (the stream itself is re-opened by py-libp2p); they go when it disconnects.
        if not self._peer_is_connected(peer_id):
            super()._handle_dead_peer(peer_id)
            return
        topics = [t for t, peers in self.peer_topics.items() if peer_id in peers]
        count = self._peer_subscription_count.get(peer_id)
        super()._handle_dead_peer(peer_id)
        for t in topics:
            self.peer_topics.setdefault(t, set()).add(peer_id)
        if count:
            self._peer_subscription_count[peer_id] = count


@dataclass
class P2PHost:
    host: IHost
    pubsub: VerifyingPubsub
    router: GossipSub

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> set[ID]:
        return set(self.host.get_connected_peers())

    def configure_scoring(
        self, graylist_threshold: float, app_score: Callable[[ID], float] | None
    ) -> None:
        if self.router.scorer is not None:
            self.router.scorer.params = score_params(graylist_threshold, app_score)

    def score(self, peer: ID) -> float:
        """The peer's GossipSub score (behaviour penalty, application score)."""
        scorer = self.router.scorer
        return scorer.score(peer, []) if scorer is not None else 0.0

    def penalise(self, peer: ID, amount: float) -> None:
        if self.router.scorer is not None:
            self.router.scorer.penalize_behavior(peer, amount)

    def remote(self, peer: ID) -> tuple[str | None, str | None]:
        """How we are connected to ``peer``: (its IP, None) over a direct connection;
        (None, the relay's peer id) when only through a relay (a circuit's transport
        address is the relay's, ``RELAY/p2p/RELAY_ID/p2p-circuit``, never the peer's);
        (None, None) when unknown."""
        relay: str | None = None
        try:
            conns = self.host.get_network().get_connections(peer)
            for conn in conns:
                for ma in conn.get_transport_addresses():
                    text = str(ma)
                    if CIRCUIT in text:
                        relay = relay or _relay_of(text)
                        continue
                    for proto in ("ip4", "ip6"):
                        with contextlib.suppress(Exception):
                            return str(ma.value_for_protocol(proto)), None
        except Exception:  # py-libp2p's connection objects differ by transport
            return None, None
        return None, relay

    def remote_ip(self, peer: ID) -> str | None:
        """The IP of our direct connection to ``peer``; None if unknown or relayed."""
        return self.remote(peer)[0]

    def relayed(self, peer: ID | str) -> str | None:
        """The relay's peer id when we reach ``peer`` only through a relay."""
        return self.remote(ID.from_base58(peer) if isinstance(peer, str) else peer)[1]


def _relay_of(addr: str) -> str:
    """The relay's peer id in ``.../p2p/RELAY_ID/p2p-circuit...`` ("?" when absent)."""
    head = addr.split(CIRCUIT, 1)[0]
    return head.rsplit("/p2p/", 1)[1] if "/p2p/" in head else "?"


def build_host(key_pair: KeyPair, on_bad_signature: BadSignatureHook) -> P2PHost:
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_preference="YAMUX")
    router = GossipSub(
        protocols=list(GOSSIP_PROTOCOLS),
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=GOSSIP_HEARTBEAT_S,
        # py-libp2p drops anything past 10 messages/s per peer and topic -- our own
        # publications included -- which silently loses a burst of task announcements.
        max_messages_per_topic_per_second=MAX_MESSAGES_PER_TOPIC_PER_S,
        score_params=score_params(-math.inf, None),
    )
    pubsub = VerifyingPubsub(host, router, on_bad_signature)
    # py-libp2p's auto-connector dials whatever the peerstore holds (identify fills it with
    # the addresses peers claim) to keep 50+ connections: that would bypass the keeper's
    # dial policy. Only the keeper dials.
    swarm = cast(Any, host.get_network())
    if getattr(swarm, "auto_connector", None) is not None:
        swarm.auto_connector.maybe_connect = _no_auto_dial
    return P2PHost(host=host, pubsub=pubsub, router=router)


async def _no_auto_dial() -> None:
    return None


def check_listen_free(listen: Sequence[str]) -> None:
    """Fail clearly if a fixed listen port is taken.

    py-libp2p binds with SO_REUSEPORT (for hole punching), so a second daemon on
    the same port would silently share it with the first. A plain bind probe
    (no SO_REUSEPORT) fails with EADDRINUSE in that case.
    """
    for addr in listen:
        ma = multiaddr.Multiaddr(addr)
        protos = {p.name for p in ma.protocols()}
        if "tcp" not in protos or not ({"ip4", "ip6"} & protos):
            continue
        port = int(ma.value_for_protocol("tcp"))
        if port == 0:
            continue
        family, host = (
            (socket.AF_INET6, ma.value_for_protocol("ip6"))
            if "ip6" in protos
            else (socket.AF_INET, ma.value_for_protocol("ip4"))
        )
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR: TIME_WAIT leftovers of our own previous run are fine; a live
            # listener still makes the bind fail.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise P2PError(f"cannot listen on {addr}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def running(p2p: P2PHost, listen: Sequence[str]) -> AsyncIterator[P2PHost]:
    """Listen on ``listen`` and run pubsub; yields once pubsub is ready."""
    check_listen_free(listen)
    addrs = [multiaddr.Multiaddr(a) for a in listen]
    async with (
        p2p.host.run(listen_addrs=addrs),
        background_trio_service(p2p.pubsub),
        background_trio_service(p2p.router),
    ):
        await p2p.pubsub.wait_until_ready()
        yield p2p

"""Circuit relay v2 (py-libp2p's ``libp2p.relay.circuit_v2``): reaching nodes behind NAT.

Every node accepts relayed connections (the "stop" side). A node with a public address
(or ``p2p.relay_service = on``) also relays for others ("hop"), within ``RelayLimits``:
reservations, concurrent circuits, bytes and seconds per circuit. A node configured with
relays (``p2p.relays`` / ``--relay``) keeps a reservation at each (re-reserving after a
relay restarts or drops it) and advertises ``RELAY/p2p-circuit/p2p/<our id>`` in its
heartbeats; with ``p2p.reachability = private`` only those addresses.

py-libp2p's ``host.connect`` refuses circuit addresses, so dialling goes through ``dial``
here: the keeper and the stream service dial a peer that advertises circuit addresses
through its relays first, its own addresses after (each circuit address passes the dial
policy on its relay's address).

Every node also runs DCUtR (``/libp2p/dcutr``): two peers on a relayed connection
exchange the addresses they were seen at and dial each other at once, so a TCP hole
punch through port-preserving NATs gives them a direct connection and the relay steps
out. The addresses a peer names pass the same dial policy as any learned address
before they are dialled (a hostile peer cannot make the node dial what it never would).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from vcoind.config import P2PConfig
from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import CIRCUIT, DIAL_OK, is_circuit, is_public_node

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.relay")

RESERVE_TIMEOUT_S = 10.0
RESERVE_CHECK_S = 5.0  # how often a lost reservation (relay gone, connection cut) is noticed
RETRY_MAX_S = 60.0
GIVE_UP_AFTER = 4  # refusals in a row before an automatic relay is let go
HOLE_PUNCH_DIAL_S = 3  # DEPENDENCIES.md: 3 s punched through port-preserving NATs 9/9


def split_addrs(addrs: list[Any]) -> tuple[list[Any], list[Any]]:
    """(direct, circuit) addresses."""
    return [a for a in addrs if not is_circuit(a)], [a for a in addrs if is_circuit(a)]


class PolicedDCUtR(DCUtRProtocol):
    """DCUtR that dials only what the dial policy allows, and counts its upgrades."""

    def __init__(self, host: Any, verdict: Callable[[str], str],
                 seen_at: Callable[[], list[str]] = list) -> None:  # fmt: skip
        super().__init__(host, dial_timeout=HOLE_PUNCH_DIAL_S)
        self._verdict = verdict
        self._seen_at = seen_at
        self.upgraded: set[ID] = set()
        self.refused = 0

    async def _dial_peer(self, peer_id: ID, addr: Any, source: tuple[str, int] | None = None,
                         as_responder: bool = False) -> None:  # fmt: skip
        full = str(addr) if "/p2p/" in str(addr) else f"{addr}/p2p/{peer_id}"
        why = self._verdict(full)
        if why != DIAL_OK:
            self.refused += 1
            log.debug("hole punch: not dialling %s at %s (%s address)", peer_id, addr, why)
            return
        log.debug("hole punch: dialling %s at %s from %s", peer_id, addr, source)
        await super()._dial_peer(peer_id, addr, source=source, as_responder=as_responder)

    async def _get_observed_addrs(self) -> list[bytes]:
        """The addresses we tell the peer to dial: first the IPs peers see us at (the
        dial-back's answers: a NAT's public address) with our listen ports, since the
        punch leaves from the listen port and NATs mostly keep it; then py-libp2p's own."""
        ports = {
            a.value_for_protocol("tcp")
            for a in self.host.get_addrs()
            if not is_circuit(a) and "tcp" in {p.name for p in a.protocols()}
        }
        ours = [
            multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}").to_bytes()
            for ip in self._seen_at()
            if ":" not in ip
            for port in sorted(ports)
        ]
        rest = [b for b in await super()._get_observed_addrs() if b not in ours]
        return (ours + rest)[:8]

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        ok = await super().initiate_hole_punch(peer_id)
        log.debug("hole punch to %s: %s", peer_id, "direct" if ok else "failed")
        if ok and peer_id not in self.upgraded:
            self.upgraded.add(peer_id)
            log.info("direct connection to %s: the relayed one was upgraded (DCUtR)", peer_id)
        return ok


class Relays:
    def __init__(self, p2p: P2PHost, cfg: P2PConfig,
                 verdict: Callable[[str], str] = lambda addr: DIAL_OK,
                 seen_at: Callable[[], list[str]] = list,
                 protect: Callable[[ID, bool], None] = lambda relay, on: None) -> None:  # fmt: skip
        self._p2p = p2p
        self._protect = protect  # the connection manager keeps a relay we hold a slot at
        self._cfg = cfg
        own = cfg.announce or cfg.listen
        self.hop = cfg.relay_service == "on" or (cfg.relay_service == "auto" and
                                                 is_public_node(own))  # fmt: skip
        limits = RelayLimits(duration=cfg.relay_circuit_s, data=cfg.relay_circuit_mb << 20,
                             max_circuit_conns=cfg.relay_max_circuits,
                             max_reservations=cfg.relay_max_reservations)  # fmt: skip
        self.protocol = CircuitV2Protocol(p2p.host, limits=limits, allow_hop=self.hop)
        self.transport = CircuitV2Transport(
            p2p.host, self.protocol, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT)
        )
        self._relays = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in cfg.relays]
        self._relay_addrs = {i.peer_id: a for i, a in zip(self._relays, cfg.relays, strict=True)}
        self.reserved: dict[ID, float] = {}  # relay -> when the reservation was made
        self.dcutr = PolicedDCUtR(p2p.host, verdict, seen_at)
        self._nursery: trio.Nursery | None = None

    @property
    def private(self) -> bool:
        return self._cfg.reachability == "private"

    def circuit_addrs(self) -> list[str]:
        """Our addresses through the relays we hold a reservation at."""
        me = self._p2p.peer_id.to_base58()
        return [f"{self._relay_addrs[r]}{CIRCUIT}/p2p/{me}" for r in self.reserved]

    def status(self) -> dict[str, Any]:
        return {
            "relay_service": self.hop,
            "reachability": self._cfg.reachability,
            "relays": [self._relay_addrs[r.peer_id] for r in self._relays],
            "reservations": [self._relay_addrs[r] for r in self.reserved],
            "hole_punched": len(self.dcutr.upgraded),
        }

    async def dial(self, addr: Any) -> None:
        """Connect through a relay (``RELAY/p2p-circuit/p2p/ID``)."""
        await self.transport.dial(multiaddr.Multiaddr(str(addr)))

    async def connect(self, info: PeerInfo, timeout_s: float) -> None:
        """Connect to a peer. One that advertises relayed addresses is behind a NAT: its
        own addresses most likely lead nowhere (or time out), so through its relays first
        (DCUtR then upgrades the connection to a direct one), its own addresses last."""
        direct, circuit = split_addrs(list(info.addrs))
        errors: list[str] = []
        for addr in circuit:
            full = str(addr)
            if full.endswith(CIRCUIT):  # a PeerInfo's addresses lack the final /p2p/ID
                full += f"/p2p/{info.peer_id}"
            try:
                with trio.fail_after(timeout_s):
                    await self.dial(full)
                log.info("connected to %s through a relay", info.peer_id)
                return
            except Exception as exc:  # the relay may be gone, its slot expired...
                errors.append(f"{addr}: {exc or type(exc).__name__}")
        if direct:
            try:
                with trio.fail_after(timeout_s):
                    await self._p2p.host.connect(PeerInfo(info.peer_id, direct))
                return
            except Exception as exc:  # py-libp2p raises many unrelated types on dial failure
                if not circuit:
                    raise
                errors.append(f"direct: {exc or type(exc).__name__}")
        raise ConnectionError("; ".join(errors) or "no address")

    def add_relays(self, addrs: list[str]) -> None:
        """Hold slots at these relays too (a node found to be unreachable uses its
        bootstrap peers); one that refuses ``GIVE_UP_AFTER`` times in a row is let go."""
        for a in addrs:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(a))
            except Exception:  # multiaddr raises assorted types for bad input
                continue
            if info.peer_id in self._relay_addrs or self._nursery is None:
                continue
            self._relays.append(info)
            self._relay_addrs[info.peer_id] = a
            self._nursery.start_soon(self._keep_reservation, info, GIVE_UP_AFTER)

    async def _keep_reservation(self, relay: PeerInfo, give_up: int = 0) -> None:
        host = self._p2p.host
        failures = 0
        while not give_up or failures < give_up:
            if relay.peer_id in self.reserved and relay.peer_id in host.get_connected_peers():
                await trio.sleep(RESERVE_CHECK_S)
                continue
            if self.reserved.pop(relay.peer_id, None) is not None:
                self._protect(relay.peer_id, False)
            try:
                with trio.fail_after(RESERVE_TIMEOUT_S):
                    await host.connect(relay)
                    stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL])
                    assert self._nursery is not None
                    ok = await self.transport.reserve(stream, relay.peer_id, self._nursery)
                if not ok:
                    raise ConnectionError("the relay refused the reservation")
            except Exception as exc:  # a relay down or refusing: try again later
                failures += 1
                wait = min(RETRY_MAX_S, 2.0 ** min(failures, 6))
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "no reservation at relay %s (%s); retrying in %.0f s",
                        relay.peer_id, exc or type(exc).__name__, wait)  # fmt: skip
                await trio.sleep(wait)
                continue
            failures = 0
            self.reserved[relay.peer_id] = trio.current_time()
            self._protect(relay.peer_id, True)
            log.info(
                "reserved a slot at relay %s: reachable at %s",
                relay.peer_id,
                f"{self._relay_addrs[relay.peer_id]}{CIRCUIT}/p2p/{self._p2p.peer_id}",
            )

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with (
            background_trio_service(self.protocol),
            background_trio_service(self.dcutr),
            trio.open_nursery() as nursery,
        ):
            self._nursery = nursery
            if self.hop:
                log.info("relaying for others (circuit relay v2): %d reservations, %d "
                         "circuits at most", self._cfg.relay_max_reservations,
                         self._cfg.relay_max_circuits)  # fmt: skip
            for relay in self._relays:
                nursery.start_soon(self._keep_reservation, relay)
            task_status.started()
            await trio.sleep_forever()

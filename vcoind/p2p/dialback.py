"""Is this node publicly dialable? A dial-back check (AutoNAT's question, asked our way).

py-libp2p's AutoNAT v1 answers PUBLIC wrongly (its dial-back reuses the connection that
already exists) and its ``ReachabilityChecker`` only looks at address ranges. So a node
asks a few connected peers over ``/vcoin/dialback/1.0.0`` to dial its advertised direct
addresses over a fresh connection (``swarm.dial_addr``: a new TCP connection and a full
handshake proving our peer id), and to say which worked. One confirmation makes the node
``public``; answers from peers that all failed make it ``private`` (behind a NAT or a
firewall: it needs a relay, ``--relay``); no answer leaves it ``unknown``.

A peer asking us to dial is bounded: only addresses at the IP its connection comes
from (so we cannot be used to dial third parties), only those the dial policy allows,
at most ``MAX_ADDRS`` a request and one request a peer every ``PER_PEER_S``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import multiaddr
import trio
from libp2p.peer.id import ID

from vcoind.p2p.codec import Message, lim, message
from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import DIAL_OK, is_circuit
from vcoind.p2p.streams import StreamProtocol, StreamProtocolError, StreamService

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.reach")

DIALBACK_PROTOCOL = "/vcoin/dialback/1.0.0"
MAX_ADDRS = 4
PER_PEER_S = 60.0
DIAL_S = 5.0
ASK_PEERS = 3
CHECK_EVERY_S = 600.0
FIRST_CHECK_S = 2.0  # after start: the bootstrap connections are up by then


@message
@dataclass(frozen=True)
class DialBackRequest(Message):
    KIND: ClassVar[str] = "dialback_request"
    MAX_BYTES: ClassVar[int] = 2048

    addrs: tuple[str, ...] = field(metadata=lim(max_len=MAX_ADDRS, items={"max_len": 256}))


@message
@dataclass(frozen=True)
class DialBackReply(Message):
    KIND: ClassVar[str] = "dialback_reply"
    MAX_BYTES: ClassVar[int] = 2048

    reachable: tuple[str, ...] = field(metadata=lim(max_len=MAX_ADDRS, items={"max_len": 256}))
    observed_ip: str = field(default="", metadata=lim(max_len=64))  # where we see the asker


DIALBACK_STREAM = StreamProtocol(DIALBACK_PROTOCOL, (DialBackRequest,),
                                 max_request_bytes=DialBackRequest.MAX_BYTES,
                                 timeout_s=3 * DIAL_S)  # fmt: skip


class DialBack:
    def __init__(self, p2p: P2PHost, streams: StreamService, *, verdict: Callable[[str], str],
                 own_addrs: Callable[[], list[str]],
                 on_private: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self._p2p = p2p
        self._streams = streams
        self._verdict = verdict
        self._own = own_addrs
        self._on_private = on_private
        self._asked: dict[str, float] = {}  # peer -> when it last asked us
        self.observed = "unknown"  # public | private | unknown
        self.confirmed: list[str] = []  # our addresses some peer reached
        self.checked_at: float | None = None
        # The IPs peers see us at: behind a NAT, its public address (DCUtR predicts our
        # hole-punch address from it and our listen port).
        self.wan_ips: list[str] = []

    def status(self) -> dict[str, Any]:
        return {"observed": self.observed, "confirmed": self.confirmed,
                "checked_at": self.checked_at, "seen_at": self.wan_ips}  # fmt: skip

    # --- answering ---------------------------------------------------------------

    def mount(self, streams: StreamService) -> None:
        streams.serve(DIALBACK_STREAM, self._answer)

    async def _answer(self, peer: ID, req: DialBackRequest) -> DialBackReply:
        who = peer.to_base58()
        now = time.monotonic()
        if now - self._asked.get(who, -PER_PEER_S) < PER_PEER_S:
            raise StreamProtocolError(f"one dial-back a peer every {PER_PEER_S:.0f} s")
        self._asked[who] = now
        if len(self._asked) > 4096:  # forget the oldest
            for k in sorted(self._asked, key=self._asked.__getitem__)[:1024]:
                del self._asked[k]
        ip = self._p2p.remote_ip(peer)
        reached = []
        for addr in req.addrs:
            if ip is None or not self._dialable(addr, ip, who):
                continue
            if await self._dial(addr, peer):
                reached.append(addr)
        return DialBackReply(tuple(reached), ip or "")

    def _dialable(self, addr: str, ip: str, who: str) -> bool:
        """At the asking peer's own IP, ending in its own id, allowed by the dial policy."""
        try:
            ma = multiaddr.Multiaddr(addr)
            host = ma.value_for_protocol("ip4") if "ip4" in {
                p.name for p in ma.protocols()} else ma.value_for_protocol("ip6")  # fmt: skip
        except Exception:  # multiaddr raises assorted types for bad input
            return False
        return host == ip and addr.endswith(f"/p2p/{who}") and self._verdict(addr) == DIAL_OK

    async def _dial(self, addr: str, peer: ID) -> bool:
        swarm: Any = self._p2p.host.get_network()
        direct = multiaddr.Multiaddr(addr).decapsulate_code(multiaddr.protocols.P_P2P)
        try:
            with trio.fail_after(DIAL_S):
                conn = await swarm.dial_addr(direct, peer)
        except Exception as exc:  # unreachable: the answer, not an error
            log.debug("dial-back to %s at %s failed: %s", peer, addr, exc)
            return False
        with trio.move_on_after(1):
            try:
                await conn.close()
            except Exception as exc:  # closing a probe connection: nothing to do about it
                log.debug("closing the dial-back connection: %s", exc)
        return True

    # --- asking --------------------------------------------------------------------

    async def check(self, peers: list[ID]) -> str:
        """Ask up to ``ASK_PEERS`` of ``peers`` to dial our direct addresses back."""
        mine = [a for a in self._own() if not is_circuit(a)][:MAX_ADDRS]
        if not mine or not peers:
            return self.observed
        answers: list[tuple[str, ...]] = []

        async def ask(peer: ID) -> None:
            try:
                r = await self._streams.request(peer, DIALBACK_STREAM, DialBackRequest(
                    tuple(mine)), DialBackReply)  # fmt: skip
            except StreamProtocolError as exc:
                log.debug("dial-back check by %s: %s", peer, exc)
                return
            answers.append(tuple(a for a in r.reachable if a in mine))
            if r.observed_ip and r.observed_ip not in self.wan_ips:
                self.wan_ips = [*self.wan_ips[-3:], r.observed_ip]

        async with trio.open_nursery() as nursery:
            for p in peers[:ASK_PEERS]:
                nursery.start_soon(ask, p)
        if answers:
            confirmed = sorted({a for ans in answers for a in ans})
            before, self.observed = self.observed, "public" if confirmed else "private"
            self.confirmed, self.checked_at = confirmed, time.time()
            if self.observed == "private":
                self._on_private()
            if self.observed != before:
                log.log(logging.INFO if confirmed else logging.WARNING,
                        "reachability: %s (%d of %d peers asked reached us%s)", self.observed,
                        sum(1 for a in answers if a), len(answers),
                        "" if confirmed else "; behind a NAT or firewall: use --relay")  # fmt: skip
        return self.observed

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(FIRST_CHECK_S)
        while True:
            peers = [p for p in self._p2p.connected_peers()]
            if peers:
                await self.check(sorted(peers, key=lambda p: p.to_base58()))
            await trio.sleep(CHECK_EVERY_S if self.observed != "unknown" else 10.0)

"""mDNS (``--mdns``): find peers on the local network segment (py-libp2p's
``libp2p.discovery.mdns``, on zeroconf).

We announce our direct addresses in the spec's ``dnsaddr`` TXT records and hear
others'. py-libp2p writes what it hears straight into the peerstore (from zeroconf's
own thread); here the listener sees a peerstore stand-in that hands each find to the
peer keeper on the trio thread instead (``learn``): the keeper takes only addresses
that end in the announcing peer's own id and pass the dial policy, remembers at most
its bounded number of learned peers, and dials them under the connection manager.
Zeroconf's blocking calls (register, unregister, close) run in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import is_circuit

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.mdns")

MAX_ADDRS = 8
CLEANUP_S = 60.0
TTL_S = 120

Learn = Callable[[str, tuple[str, ...]], None]


class _HandOver:
    """The peerstore py-libp2p's mDNS listener writes to, on zeroconf's thread."""

    def __init__(self, token: trio.lowlevel.TrioToken, learn: Learn) -> None:
        self._token = token
        self._learn = learn
        self.heard = 0

    def add_addrs(self, peer_id: ID, addrs: list[Any], ttl: int) -> None:
        pid = peer_id.to_base58()
        full = tuple(f"{a}/p2p/{pid}" for a in addrs[:MAX_ADDRS] if "/p2p/" not in str(a))
        self.heard += 1
        with contextlib.suppress(trio.RunFinishedError):  # shutting down
            self._token.run_sync_soon(self._learn, pid, full)

    def clear_addrs(self, peer_id: ID) -> None:
        return None  # the keeper forgets learned peers itself


class _Swarm:
    def __init__(self, p2p: P2PHost, peerstore: _HandOver) -> None:
        self._p2p = p2p
        self.peerstore = peerstore

    def get_peer_id(self) -> ID:
        return self._p2p.peer_id


class LanDiscovery:
    def __init__(self, p2p: P2PHost, learn: Learn, addrs: Callable[[], list[str]]) -> None:
        self._p2p = p2p
        self._learn = learn
        self._addrs = addrs
        self._handover: _HandOver | None = None
        self.error: str | None = None

    def status(self) -> dict[str, Any]:
        return {"heard": self._handover.heard if self._handover else 0, "error": self.error}

    def _start(self, token: trio.lowlevel.TrioToken) -> Any:
        from libp2p.discovery.mdns.mdns import MDNSDiscovery

        direct = [a.rsplit("/p2p/", 1)[0] for a in self._addrs() if not is_circuit(a)]
        port = int(direct[0].split("/tcp/")[1].split("/")[0]) if direct else 0
        self._handover = _HandOver(token, self._learn)
        mdns = MDNSDiscovery(_Swarm(self._p2p, self._handover), port=port,  # type: ignore[arg-type]
                             listen_addrs=direct[:MAX_ADDRS], ttl=TTL_S)  # fmt: skip
        mdns.broadcaster.register()
        return mdns

    @staticmethod
    def _stop(mdns: Any) -> None:
        mdns.broadcaster.unregister()
        mdns.listener.stop()
        mdns.zeroconf.close()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        try:
            mdns = await trio.to_thread.run_sync(self._start, token)
        except Exception as exc:  # no multicast-capable interface, port 5353 refused...
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("mDNS unavailable: %s", self.error)
            task_status.started()
            return
        log.info("mDNS: announcing on the local network, listening for peers")
        task_status.started()
        try:
            while True:
                await trio.sleep(CLEANUP_S)
                await trio.to_thread.run_sync(mdns.listener.cleanup_stale_entries, 2 * TTL_S)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop, mdns)

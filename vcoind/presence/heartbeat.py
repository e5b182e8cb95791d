"""Heartbeat publisher: presence every interval, capability when it changes.

A beat whose capability is unchanged goes out small (a :class:`Beat`: liveness, load and
the digest of the full state); the full :class:`Heartbeat` goes out when the capability
changes (at once, not at the next beat) and every ``FULL_EVERY`` beats, so a receiver that
missed a change learns it within that many beats even if it never asks.

The interval grows with the network: for N nodes (the peer table + us) it is
max(configured, s x N / (PRESENCE_RATE x log2 N)) seconds, with s = 1 at the default 5 s
interval (or slower), so each node takes about PRESENCE_RATE x log2 N presence messages a
second (plus GossipSub's duplicates, a constant factor): logarithmic in N, where a fixed
interval is linear. A faster configured interval (a devnet's 1 s, tests' 0.3 s) scales the
budget up in proportion (s = configured / 5 s), so small fast networks keep their pace.
Receivers expire a peer after a multiple of the interval it announces
(``PeerTable.expiry_for``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from vcoind import __version__
from vcoind.compute.telemetry import HostSample, Telemetry, package_version
from vcoind.p2p.gossip import Gossip
from vcoind.presence.messages import (
    Beat,
    DeviceInfo,
    Heartbeat,
    LayerSpan,
    ModelServed,
    NumericProfile,
    beat_of,
    binding_text,
    capability_digest,
    recover_binding,
)
from vcoind.signer import Signer

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.heartbeat")
# Presence messages a node takes per second, per log2 of the network's size (N = 1000:
# about 10 a second, the interval 100 s).
PRESENCE_RATE = 1.0
# The interval PRESENCE_RATE is stated for (the daemon's default); a faster configured one
# raises the budget in proportion.
REFERENCE_INTERVAL_S = 5.0
# A full heartbeat at least every this many beats (the rest are Beats, unless it changed).
FULL_EVERY = 10


@dataclass(frozen=True)
class Capabilities:
    """What the node serves; the compute layer fills this in as models load."""

    models: tuple[ModelServed, ...] = ()
    spans: tuple[LayerSpan, ...] = ()
    queue_length: int = 0
    services: tuple[str, ...] = ()  # e.g. "oracle"
    adapters: tuple[str, ...] = ()  # LoRA adapter ids held


def adaptive_interval(base: float, peer_count: int) -> float:
    """The heartbeat interval for a node that knows ``peer_count`` peers:
    max(base, s x N / (PRESENCE_RATE x log2 N)) with N = peer_count + 1 nodes and
    s = min(base, REFERENCE_INTERVAL_S) / REFERENCE_INTERVAL_S."""
    n = peer_count + 1
    if n < 2:
        return base
    scale = min(base, REFERENCE_INTERVAL_S) / REFERENCE_INTERVAL_S
    return max(base, scale * n / (PRESENCE_RATE * math.log2(n)))


class HeartbeatService:
    def __init__(
        self,
        gossip: Gossip,
        signer: Signer,
        peer_id: str,
        network: str,
        *,
        base_interval: float,
        telemetry: Telemetry,
        peer_count: Callable[[], int],
        addrs: Callable[[], list[str]],
        health: Callable[[HostSample], float],
    ) -> None:
        self._gossip = gossip
        self._address = signer.address
        self._network = network
        self._base = base_interval
        self._telemetry = telemetry
        self._peer_count = peer_count
        self._addrs = addrs
        self._health = health
        self._peer_id = peer_id
        self._binding = signer.sign_text(binding_text(network, peer_id, signer.address))
        self._wake = trio.Event()
        self.capabilities = Capabilities()
        self.last: Heartbeat | None = None  # what we announced last (either form)
        self.last_full: Heartbeat | None = None  # the last full heartbeat we published
        self._sent_digest = b""
        self._since_full = 0
        self._profile = NumericProfile(
            device_kind="cuda" if telemetry.has_gpu else "cpu",
            dtype="float16" if telemetry.has_gpu else "float32",
            torch=package_version("torch"),
            transformers=package_version("transformers"),
        )

    @property
    def interval(self) -> float:
        return adaptive_interval(self._base, self._peer_count())

    def set_capabilities(self, caps: Capabilities) -> None:
        """Change what we announce; it is gossiped at once, not at the next beat."""
        self.capabilities = caps
        self.announce_now()

    def announce_now(self) -> None:
        self._wake.set()

    async def build(self) -> Heartbeat:
        sample = await trio.to_thread.run_sync(self._telemetry.sample)
        d = sample.device
        caps = self.capabilities
        return Heartbeat(
            network=self._network,
            peer_id=self._peer_id,
            eth_address=self._address,
            eth_sig=self._binding,
            seq=0,  # stamped by Gossip.publish
            timestamp=time.time(),
            interval=float(self.interval),
            listen_addrs=tuple(self._addrs()[:8]),
            device=DeviceInfo(
                kind=d.kind,
                name=d.name[:128],
                count=d.count,
                memory_total_mb=d.memory_total_mb,
                memory_used_mb=d.memory_used_mb,
                utilization=min(100.0, d.utilization),
                temperature_c=d.temperature_c,
                cuda_version=d.cuda_version,
            ),
            cpu_percent=min(100.0, sample.cpu_percent),
            memory_percent=min(100.0, sample.memory_percent),
            models=caps.models,
            spans=caps.spans,
            services=caps.services,
            adapters=caps.adapters,
            profile=self._profile,
            queue_length=caps.queue_length,
            health=self._health(sample),
            software=f"vcoind/{__version__}",
        )

    def next_message(self, hb: Heartbeat) -> Heartbeat | Beat:
        """What to publish for ``hb``: itself when the capability changed or a full one is
        due, else its :class:`Beat`."""
        digest = capability_digest(hb)
        if digest != self._sent_digest or self._since_full >= FULL_EVERY - 1:
            return hb
        return beat_of(hb, digest)

    async def beat(self) -> None:
        """Build and publish one beat (full or small)."""
        hb = await self.build()
        msg = self.next_message(hb)
        await self._gossip.publish("heartbeat", msg)
        if isinstance(msg, Heartbeat):
            self._sent_digest, self._since_full = capability_digest(hb), 0
            self.last_full = hb
        else:
            self._since_full += 1
        self.last = hb

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            try:
                await self.beat()
            except Exception:  # a failed beat is logged and retried at the next one
                log.exception("heartbeat failed")
            with trio.move_on_after(self.interval):
                await self._wake.wait()


class BindingCheck:
    """Gossip check: the heartbeat's eth signature must bind its peer id to its address.

    Results are cached per (peer id, address, signature): a node signs its binding
    once, so steady-state heartbeats cost no signature recovery.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._ok: dict[tuple[str, str, bytes], bool] = {}
        self._max = max_entries

    def __call__(self, hb: Heartbeat) -> str | None:
        key = (hb.peer_id, hb.eth_address, hb.eth_sig)
        ok = self._ok.get(key)
        if ok is None:
            signer = recover_binding(hb.network, hb.peer_id, hb.eth_address, hb.eth_sig)
            ok = signer is not None and signer.lower() == hb.eth_address.lower()
            if len(self._ok) >= self._max:
                self._ok.clear()
            self._ok[key] = ok
        return None if ok else "forged"

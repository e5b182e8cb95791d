"""Heartbeat publisher: presence + capability every interval, and at once on a change.

The interval adapts to the network size: max(configured, N / 50 s) for N known
peers, so each node receives a bounded ~50 presence messages per second however
large the network grows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from vcoind import __version__
from vcoind.compute.telemetry import HostSample, Telemetry, package_version
from vcoind.p2p.gossip import Gossip
from vcoind.presence.messages import (
    DeviceInfo,
    Heartbeat,
    LayerSpan,
    ModelServed,
    NumericProfile,
    binding_text,
    recover_binding,
)
from vcoind.signer import Signer

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.heartbeat")
PRESENCE_BUDGET_PER_S = 50.0


@dataclass(frozen=True)
class Capabilities:
    """What the node serves; the compute layer fills this in as models load."""

    models: tuple[ModelServed, ...] = ()
    spans: tuple[LayerSpan, ...] = ()
    queue_length: int = 0
    services: tuple[str, ...] = ()  # e.g. "oracle"
    adapters: tuple[str, ...] = ()  # LoRA adapter ids held


def adaptive_interval(base: float, peer_count: int) -> float:
    return max(base, peer_count / PRESENCE_BUDGET_PER_S)


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
        self.last: Heartbeat | None = None
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

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            try:
                hb = await self.build()
                await self._gossip.publish("heartbeat", hb)
                self.last = hb
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

"""Inference executor: models loaded once and kept warm, generation in a worker thread.

One ``trio.CapacityLimiter`` per device serialises GPU/CPU work; the trio thread
never blocks. Models are kept in an LRU bounded by a memory budget; a model in
use is never evicted. Progress (tokens generated) is reported from the worker
thread back into trio; cancelling the awaiting task stops generation at the next
token boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch
import trio

from vcoind.compute.generate import (
    GenerationParams,
    GenerationResult,
    LoadedModel,
    generate,
    load_model,
    pick_device,
)
from vcoind.compute.models import ModelError, ModelInfo, ModelStore

log = logging.getLogger("vcoind.executor")
EWMA_ALPHA = 0.3
PROGRESS_EVERY_S = 0.05


@dataclass(frozen=True)
class ExecutorConfig:
    device: str = "auto"  # auto | cpu | cuda
    memory_budget_mb: int = 0  # 0 = 80 % of GPU memory, or 50 % of RAM on CPU


@dataclass
class _Slot:
    info: ModelInfo
    lm: LoadedModel
    in_use: int = 0


class Executor:
    def __init__(self, store: ModelStore, config: ExecutorConfig | None = None) -> None:
        config = config or ExecutorConfig()
        self.store = store
        self.device, self.dtype = pick_device(config.device)
        self.budget_bytes = config.memory_budget_mb * (1 << 20) or self._default_budget()
        self._limiter = trio.CapacityLimiter(1)  # one per device
        self._loaded: OrderedDict[str, _Slot] = OrderedDict()  # model id -> slot, LRU order
        self._loading: dict[str, trio.Event] = {}
        self.tokens_per_s: dict[str, float] = {}  # model id -> measured decode speed (EWMA)
        self.running = 0

    def _default_budget(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory * 0.8)
        return int(psutil.virtual_memory().total * 0.5)

    def loaded(self) -> list[ModelInfo]:
        return [s.info for s in self._loaded.values()]

    async def load(self, ref: str) -> ModelInfo:
        """Load a model by name or id (no-op when warm)."""
        slot = await self._acquire(ref)
        slot.in_use -= 1
        return slot.info

    async def _acquire(self, ref: str) -> _Slot:
        info = self.store.resolve(ref)
        while True:
            slot = self._loaded.get(info.model_id)
            if slot is not None:
                self._loaded.move_to_end(info.model_id)
                slot.in_use += 1
                return slot
            pending = self._loading.get(info.model_id)
            if pending is None:
                break
            await pending.wait()  # someone else is loading it; then take theirs
        done = self._loading[info.model_id] = trio.Event()
        try:
            self._make_room(info)
            log.info("loading model %s (%s) on %s", info.name, info.model_id[:19], self.device)
            lm = await trio.to_thread.run_sync(
                load_model, info.path, self.device, self.dtype, limiter=self._limiter
            )
            slot = _Slot(info=info, lm=lm, in_use=1)
            self._loaded[info.model_id] = slot
            return slot
        finally:
            del self._loading[info.model_id]
            done.set()

    def _make_room(self, info: ModelInfo) -> None:
        if info.weight_bytes > self.budget_bytes:
            raise ModelError(
                f"model {info.name} needs {info.weight_bytes >> 20} MiB, more than the "
                f"memory budget of {self.budget_bytes >> 20} MiB"
            )
        used = sum(s.info.weight_bytes for s in self._loaded.values())
        for model_id, slot in list(self._loaded.items()):  # least recently used first
            if used + info.weight_bytes <= self.budget_bytes:
                break
            if slot.in_use == 0:
                log.info("evicting model %s to make room for %s", slot.info.name, info.name)
                del self._loaded[model_id]
                used -= slot.info.weight_bytes
        if used + info.weight_bytes > self.budget_bytes:
            raise ModelError(f"no room for model {info.name}: the loaded models are all busy")

    async def generate(
        self,
        ref: str,
        prompt: str,
        params: GenerationParams,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Run one request; cancelling the caller stops the worker at the next token."""
        slot = await self._acquire(ref)
        cancel = threading.Event()
        token = trio.lowlevel.current_trio_token()

        last_report = 0.0

        def progress(n: int) -> None:
            # A trip into trio per token would starve the trio thread on fast models.
            nonlocal last_report
            now = time.monotonic()
            if on_progress is None or cancel.is_set() or now - last_report < PROGRESS_EVERY_S:
                return
            last_report = now
            try:
                trio.from_thread.run_sync(on_progress, n, trio_token=token)
            except trio.RunFinishedError:
                cancel.set()

        def work() -> GenerationResult:
            return generate(slot.lm, prompt, params, on_token=progress, cancel=cancel)

        self.running += 1
        try:
            # (trio-typing's stale stubs predate abandon_on_cancel)
            result = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                work, limiter=self._limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            cancel.set()  # the abandoned thread stops at its next token
            raise
        finally:
            self.running -= 1
            slot.in_use -= 1
        if on_progress is not None and result.token_ids:
            on_progress(len(result.token_ids))  # the final count, whatever the throttle skipped
        if result.token_ids:
            old = self.tokens_per_s.get(slot.info.model_id)
            tps = result.tokens_per_s
            self.tokens_per_s[slot.info.model_id] = (
                tps if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * tps
            )
        return result

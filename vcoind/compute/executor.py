"""Inference executor: models loaded once and kept warm, generation off the trio thread.

Each loaded model has an engine (``vcoind.compute.engine``) behind a ``Batcher``:
concurrent requests decode together in one batch, joining and leaving at token
boundaries, higher priority admitted first. Models the engine does not run generate
with transformers in a worker thread, one at a time per device (a
``trio.CapacityLimiter``). The trio thread never blocks. Models are kept in an LRU
bounded by a memory budget; a model in use is never evicted. Progress (tokens
generated) is reported back into trio without blocking the engine; cancelling the
awaiting task stops its request at the next token boundary.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import trio

from vcoind.compute.batcher import PREFILL_CHUNK, Batcher
from vcoind.compute.engine import DEFAULT_MAX_CONTEXT
from vcoind.compute.generate import (
    GenerationParams,
    GenerationResult,
    LoadedModel,
    Prompt,
    default_slots,
    encode_prompt,
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
    batch_slots: int = 0  # concurrent requests per model; 0 = 32 on a GPU, 4 on CPU
    max_context: int = DEFAULT_MAX_CONTEXT  # positions per request (prompt + new tokens)
    compile_decode: bool = False  # CUDA: torch.compile the decode step (experimental)
    triton_kernels: bool = True  # CUDA: the engine's triton kernels where they pass
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens between decode steps; 0 = whole
    reuse_prefix: bool = True  # a prompt's start found in a slot's cache is copied


@dataclass
class _Slot:
    info: ModelInfo
    lm: LoadedModel
    in_use: int = 0
    batcher: Batcher | None = None

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


class Executor:
    def __init__(self, store: ModelStore, config: ExecutorConfig | None = None) -> None:
        config = config or ExecutorConfig()
        self.store = store
        self.device, self.dtype = pick_device(config.device)
        self.budget_bytes = config.memory_budget_mb * (1 << 20) or self._default_budget()
        self.slots = config.batch_slots or default_slots(self.device)
        self.max_context = config.max_context
        self.compile_decode = config.compile_decode
        self.kernels = None if config.triton_kernels else False
        self.prefill_chunk = config.prefill_chunk
        self.reuse_prefix = config.reuse_prefix
        self._limiter = trio.CapacityLimiter(1)  # one per device
        self._loaded: OrderedDict[str, _Slot] = OrderedDict()  # model id -> slot, LRU order
        self._loading: dict[str, trio.Event] = {}
        self.tokens_per_s: dict[str, float] = {}  # model id -> measured decode speed (EWMA)
        self.running = 0

    def _default_budget(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory * 0.8)
        return int(psutil.virtual_memory().total * 0.5)

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """One job at a time on the device for work outside the engines (HF generate,
        LoRA training rounds)."""
        return self._limiter

    def loaded(self) -> list[ModelInfo]:
        return [s.info for s in self._loaded.values()]

    def engines(self) -> list[dict[str, Any]]:
        """Each warm model's inference engine and batcher, as figures (for
        ``vcoin_nodeInfo``)."""
        out = []
        for key, slot in self._loaded.items():
            b = slot.batcher
            if b is None:
                continue
            e = b.engine
            out.append({
                "model": slot.info.name,
                "adapter": key.partition("+")[2] or None,
                "device": str(e.device),
                "slots": e.n_slots,
                "busy_slots": e.n_slots - e.free_slots,
                "max_context": e.max_context,
                "cuda_graphs": e.cuda_graphs,
                "graphs": dict(zip(("decode", "prefill"), e.graph_counts, strict=True)),
                "triton_kernels": e.kernels is not None,
                "peak_batch": b.peak_batch,
                "peak_prefill": b.peak_prefill,
                "prefill_chunks": b.prefill_chunks,
                "reused_tokens": b.reused_tokens,
            })  # fmt: skip
        return out

    async def load(self, ref: str) -> ModelInfo:
        """Load a model by name or id (no-op when warm)."""
        slot = await self._acquire(ref)
        slot.in_use -= 1
        return slot.info

    async def _acquire(self, ref: str, adapter: tuple[str, Path] | None = None) -> _Slot:
        """The model's slot (loaded if need be); with ``adapter`` (id, path) a copy of the
        model with that LoRA adapter merged in, kept like a model of its own."""
        info = self.store.resolve(ref)
        key = info.model_id if adapter is None else f"{info.model_id}+{adapter[0]}"
        while True:
            slot = self._loaded.get(key)
            if slot is not None:
                self._loaded.move_to_end(key)
                slot.in_use += 1
                return slot
            pending = self._loading.get(key)
            if pending is None:
                break
            await pending.wait()  # someone else is loading it; then take theirs
        done = self._loading[key] = trio.Event()
        try:
            self._make_room(info)
            with_adapter = f" with adapter {adapter[0][:12]}" if adapter else ""
            log.info("loading model %s (%s)%s on %s", info.name, info.model_id[:19],
                     with_adapter, self.device)  # fmt: skip
            load = functools.partial(load_model, slots=self.slots, max_context=self.max_context,
                                     compile_decode=self.compile_decode,
                                     kernels=self.kernels,
                                     adapter=adapter[1] if adapter else None,
                                     model_id=info.model_id)  # fmt: skip
            # Abandoned on cancel: a node shutting down does not wait for a load to finish.
            lm = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                load, info.path, self.device, self.dtype, limiter=self._limiter,
                abandon_on_cancel=True,
            )  # fmt: skip
            slot = _Slot(info=info, lm=lm, in_use=1)
            if lm.engine is not None:
                slot.batcher = Batcher(lm.engine, lm.tokenizer, name=f"engine-{info.name}",
                                       prefill_chunk=self.prefill_chunk,
                                       reuse_prefix=self.reuse_prefix)  # fmt: skip
            self._loaded[key] = slot
            return slot
        finally:
            del self._loading[key]
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
                slot.close()
                used -= slot.info.weight_bytes
        if used + info.weight_bytes > self.budget_bytes:
            raise ModelError(f"no room for model {info.name}: the loaded models are all busy")

    async def generate(
        self,
        ref: str,
        prompt: Prompt,
        params: GenerationParams,
        *,
        on_progress: Callable[[int], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        priority: int = 0,
        adapter: tuple[str, Path] | None = None,
        scope: str = "",
    ) -> GenerationResult:
        """Run one request (on the model with ``adapter`` (id, path) merged in, if given);
        cancelling the caller stops it at the next token. ``scope`` (the requester):
        cached prompt starts are shared within one scope only. ``on_progress`` gets the
        token count and ``on_text`` the text decoded so far, at most every
        ``PROGRESS_EVERY_S``, on the trio thread."""
        slot = await self._acquire(ref, adapter)
        cancel = threading.Event()
        token = trio.lowlevel.current_trio_token()
        last_report = 0.0
        tokenizer = slot.lm.tokenizer

        def progress(ids: Sequence[int]) -> None:
            # Called on the engine's thread after every token: hand the count (and the
            # text) to trio without waiting for it, and not more often than
            # PROGRESS_EVERY_S.
            nonlocal last_report
            now = time.monotonic()
            if cancel.is_set() or now - last_report < PROGRESS_EVERY_S:
                return
            last_report = now
            try:
                if on_progress is not None:
                    token.run_sync_soon(on_progress, len(ids))
                if on_text is not None:
                    text = tokenizer.decode(list(ids), skip_special_tokens=True)
                    token.run_sync_soon(on_text, text)
            except trio.RunFinishedError:
                cancel.set()

        self.running += 1
        try:
            work: Callable[[], GenerationResult]
            if slot.batcher is not None:
                ids = await trio.to_thread.run_sync(encode_prompt, slot.lm, prompt)
                future = slot.batcher.submit(ids, params, priority=priority, on_token=progress,
                                             cancel=cancel, scope=scope)  # fmt: skip
                work, limiter = future.result, None
            else:
                work = functools.partial(generate, slot.lm, prompt, params, on_token=progress,
                                         cancel=cancel)  # fmt: skip
                limiter = self._limiter
            # (trio-typing's stale stubs predate abandon_on_cancel)
            result = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                work, limiter=limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            cancel.set()  # the engine drops the request at its next token
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

    def close(self) -> None:
        """Stop the engines' threads (their queued requests fail)."""
        for slot in self._loaded.values():
            slot.close()

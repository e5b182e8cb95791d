"""The engine's static K/V cache as slots: a request owns a slot, its length the next
position; a slot's cache outlives its request, so a later prompt with the same start
has those positions copied in (prefix reuse) instead of prefilled."""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Sequence

import torch

from vcoind.compute.engine.stack import EngineError

log = logging.getLogger("vcoind.engine")

REUSE_MIN = 16  # prompt tokens found in some slot's cache worth copying from there


class SlotCache:
    """The slots part of ``Engine`` (whose ``__init__`` allocates the caches)."""

    n_slots: int
    max_context: int
    first: bool  # the engine takes token ids (embeddings here): slots keep their ids
    k: list[torch.Tensor]  # per layer: [slots, kv_heads, positions, head_dim]
    v: list[torch.Tensor]
    length: list[int]  # per slot: the positions its cache holds (the next position)
    # per slot: the token ids whose K/V its cache holds, position by position
    _ids: list[list[int]]
    _scope: list[str]  # per slot: whose request it was last allocated to
    _free: list[int]  # a heap: the lowest free slot first
    lock: threading.RLock  # one step at a time, from whichever thread

    def alloc(self, prompt: Sequence[int] = (), scope: str = "") -> int:
        """The lowest free slot. On an engine that takes token ids, where some slot's
        cache holds the start of ``prompt`` (at least ``REUSE_MIN`` tokens; a slot's
        cache outlives its request, and a running request's prompt is there too), those
        positions' K/V are copied into the new slot (a device copy instead of their
        prefill). The slot's ``length`` is how many of ``prompt``'s positions are in
        place, at most all but the last (whose logits a prefill must give): prefill goes
        on from there. Only slots last allocated in the same ``scope`` count: a requester
        cannot tell from a faster first token what another scope's prompts began with."""
        with self.lock:
            if not self._free:
                raise EngineError(f"all {self.n_slots} engine slots are busy")
            slot = heapq.heappop(self._free)
            self._place(slot, prompt, 0, scope)
            self._scope[slot] = scope
            return slot

    def reuse(self, slot: int, prompt: Sequence[int]) -> int:
        """``alloc``'s copy again, for a slot allocated for ``prompt`` whose prefill has
        not begun: where some slot's cache now holds more of the prompt's start (another
        request sharing it was prefilled since), those positions are copied in. Returns
        the slot's ``length``, the positions in place."""
        with self.lock:
            return self._place(slot, prompt, self.length[slot], self._scope[slot])

    def _place(self, slot: int, prompt: Sequence[int], held: int, scope: str) -> int:
        """Copy what some slot of ``scope`` holds of ``prompt``'s start past the ``held``
        positions ``slot`` has of it already; set the slot's ids and length."""
        src, have = self._cached(prompt, scope, slot)
        if have > held and src != slot:
            try:
                with torch.inference_mode():
                    for cache in (*self.k, *self.v):
                        cache[slot, :, held:have] = cache[src, :, held:have]
            except Exception as exc:  # out of memory, say: prefill it instead
                log.warning("copying a prompt's cached start failed (%s); prefilling it",
                            exc)  # fmt: skip
                have = held
            else:
                self._ids[slot] = list(prompt[:have])
        have = max(have, held)
        if have > held:
            log.debug("slot %d: %d of the prompt's %d tokens in place (from slot %d)",
                      slot, have, len(prompt), src)  # fmt: skip
        del self._ids[slot][have:]
        self.length[slot] = have
        return have

    def _cached(self, prompt: Sequence[int], scope: str, prefer: int = -1) -> tuple[int, int]:
        """The slot of ``scope`` whose cache holds the longest start of ``prompt``
        (``prefer`` on a tie: no copy where it is) and how many of its positions are
        usable: at most all but the last, 0 below ``REUSE_MIN``."""
        src, have = -1, 0
        if self.first and len(prompt) > REUSE_MIN:
            want = list(prompt)
            for s, ids in enumerate(self._ids):
                if self._scope[s] != scope:
                    continue
                n = common_prefix(ids, want)
                if n > have or (n == have and s == prefer):
                    src, have = s, n
            have = min(have, len(prompt) - 1)
        return (src, have) if have >= REUSE_MIN else (-1, 0)

    def release(self, slot: int) -> None:
        with self.lock:
            if slot not in self._free:
                heapq.heappush(self._free, slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.max_context:
            raise EngineError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens exceeds the model's "
                f"context of {self.max_context} (compute.max_context)"
            )

    def check_fits(self, tokens: int) -> None:
        if tokens > self.max_context:
            raise EngineError(
                f"{tokens} positions exceed the engine's context of {self.max_context} "
                f"(compute.max_context)"
            )


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items ``a`` and ``b`` share (by halving: list slices compare
    in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo

"""Continuous batching: ``Batcher`` puts an engine (``vcoind.compute.engine``) behind a
thread that serves many requests at once. Requests join the running batch at token
boundaries and leave when done, each with its own sampling parameters; waiting requests
are admitted by priority, then arrival.

* **Prefill.** The prompts admitted together are prefilled together
  (``Engine.prefill_batch``: one padded forward pass of up to ``PREFILL_TOKENS``
  tokens), so a burst reaches its first tokens at once.
* **Chunked prefill.** While other requests are decoding, prompts are prefilled in
  chunks of ``prefill_chunk`` tokens between their decode steps: a long prompt joining
  delays the running streams' next tokens by one chunk's pass, not by its whole prefill.
* **Prefix reuse.** A slot's cache outlives its request: a prompt that starts as an
  earlier or a running one does (a system prompt, the previous turn of a conversation)
  gets those positions' K/V copied into its slot (``Engine.alloc``) and is prefilled
  only from where the two part; one whose prompt is all there but its last token (a
  repeated prompt) joins the next decode step with that token, no prefill of its own.
  Prompts admitted together that share a start no cache holds yet (a burst with one
  system prompt): the first prefills it, the others wait for that, copy it
  (``Engine.reuse``) and prefill the rest together (``Engine.prefill_batch`` from the
  shared position).

Free of the daemon (no trio, no network): only torch.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vcoind.compute.engine import REUSE_MIN, Engine, EngineError, common_prefix
from vcoind.compute.params import GenerationParams
from vcoind.compute.sampling import (
    GenerationCancelled,
    GenerationResult,
    OnToken,
    TokenStream,
    sample_rows,
)

log = logging.getLogger("vcoind.engine")

PREFILL_TOKENS = 8192  # padded prompt tokens per batched prefill pass
PREFILL_CHUNK = 512  # prompt tokens prefilled between two decode steps of running streams


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    stream: TokenStream
    priority: int
    on_token: OnToken | None
    cancel: threading.Event | None
    future: concurrent.futures.Future[GenerationResult]
    scope: str = ""
    slot: int = -1
    last: int = 0
    done: int = 0  # prompt tokens in the slot's cache (chunked prefill)
    reused: int = 0  # of which were there already (a prefix another request left)
    t_admit: float = 0.0
    t_first: float = 0.0


@dataclass(order=True)
class _Waiting:
    key: tuple[int, int]
    req: _Request = field(compare=False)


class Batcher:
    """Serves requests on an engine from its own thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        name: str = "engine",
        prefill_chunk: int = PREFILL_CHUNK,
        reuse_prefix: bool = True,
    ) -> None:
        """``prefill_chunk``: prompt tokens prefilled between two decode steps while
        other requests are decoding (0: every admitted prompt whole before the next
        step). ``reuse_prefix``: a prompt's start found in some slot's cache is copied,
        not prefilled (``Engine.alloc``)."""
        if not engine.first or not engine.last:
            raise ValueError("a batcher needs an engine over the whole model")
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 = whole prompts)")
        self.engine = engine
        self.prefill_chunk = prefill_chunk
        self.reuse_prefix = reuse_prefix
        self.tokenizer = tokenizer
        self.name = name
        self._cv = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._seq = itertools.count()
        self._active: list[_Request] = []
        self._pending: list[_Request] = []  # admitted, prompt not all in the cache yet
        self._thread: threading.Thread | None = None
        self._closed = False
        self.peak_batch = 0  # the most requests decoded in one step
        self.peak_prefill = 0  # the most prompts prefilled in one pass
        self.prefill_padding = 0  # pad tokens run by batched prefills, all told
        self.prefill_chunks = 0  # passes over part of a prompt (chunked prefill)
        self.reused_tokens = 0  # prompt tokens found in a slot's cache, not prefilled

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        *,
        priority: int = 0,
        on_token: OnToken | None = None,
        cancel: threading.Event | None = None,
        scope: str = "",
    ) -> concurrent.futures.Future[GenerationResult]:
        """Queue one request; the future holds its ``GenerationResult`` (or the error).
        ``scope``: prompt starts are reused between requests of one scope only (the
        daemon's: the task's origin), so a faster first token tells a requester nothing
        of another's prompts."""
        stream = TokenStream(prompt_ids, params, self.tokenizer)
        self.engine.check_request(len(prompt_ids), params.max_new_tokens)
        fut: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        req = _Request(list(prompt_ids), stream, priority, on_token, cancel, fut, scope)
        with self._cv:
            if self._closed:
                raise EngineError("the engine is shut down")
            heapq.heappush(self._waiting, _Waiting((-priority, next(self._seq)), req))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while (not self._waiting and not self._active and not self._pending
                       and not self._closed):  # fmt: skip
                    self._cv.wait()
                if self._closed:
                    break
                while self._waiting and self.engine.free_slots:
                    req = heapq.heappop(self._waiting).req
                    prompt = req.prompt_ids if self.reuse_prefix else ()
                    req.slot = self.engine.alloc(prompt, req.scope)
                    req.done = req.reused = self.engine.length[req.slot]
                    self.reused_tokens += req.reused
                    self._pending.append(req)
            try:
                self._prefill()
                self._step()
            except Exception as exc:  # a broken step fails its requests, not the thread
                log.exception("engine step failed")
                for req in [*self._active, *self._pending]:
                    self._finish(req, exc)
                self._active, self._pending = [], []
        for req in [*self._active, *self._pending, *(w.req for w in self._waiting)]:
            self._finish(req, EngineError("the engine is shut down"))

    def _prefill(self) -> None:
        """Prompts of admitted requests. With no request decoding (nobody waits on a
        next token) every prompt runs whole, before the first step. Otherwise at most
        ``prefill_chunk`` prompt tokens run before the next step, in admission order: a
        prompt begun earlier goes on first, a prompt that fits what is left runs whole,
        and a longer one starts with a chunk of what is left (``Engine.prefill`` from
        the position its last chunk reached).

        A prompt that starts as an earlier admitted one does, further than any slot's
        cache holds yet (a burst sharing a system prompt), waits for that one: once its
        prefill has passed the shared start, those positions are copied in
        (``Engine.reuse``) and only the rest is prefilled, with the other followers of
        the same start in one pass."""
        pending = self._uncancelled(self._pending)
        budget = self.prefill_chunk if self._active and self.prefill_chunk else None
        leaders: list[_Request] = []
        followers: list[_Request] = []
        for i, req in enumerate(pending):
            if self._fresh(req) and self._behind(req, pending[:i]):
                followers.append(req)
            else:
                leaders.append(req)
        rest, budget = self._prefill_round(leaders, budget)
        ready: list[_Request] = []
        waits = {id(r) for r in followers}
        for i, req in enumerate(pending):
            if id(req) not in waits or req.slot < 0:
                continue
            if self._behind(req, pending[:i]):  # its leader's prefill is not that far yet
                rest.append(req)
            else:
                self._fresh(req)
                ready.append(req)
        more, _ = self._prefill_round(ready, budget)
        keep = {id(r) for r in (*rest, *more)}
        self._pending = [r for r in pending if id(r) in keep]  # admission order

    def _fresh(self, req: _Request) -> bool:
        """Whether the request's prefill has not begun; if so, any more of its prompt's
        start that some slot's cache holds now is copied into its slot first."""
        if not self.reuse_prefix or req.done != req.reused:
            return False
        have = self.engine.reuse(req.slot, req.prompt_ids)
        self.reused_tokens += have - req.reused
        req.done = req.reused = have
        return True

    def _behind(self, req: _Request, others: list[_Request]) -> bool:
        """Another admitted request of its scope shares more of this one's start than its
        slot holds (``REUSE_MIN`` tokens at least), and its prefill has not got that far
        yet: worth waiting for, then copying."""
        cap = len(req.prompt_ids) - 1
        for o in others:
            if o is req or o.slot < 0 or o.done >= cap or o.scope != req.scope:
                continue
            n = min(common_prefix(o.prompt_ids, req.prompt_ids), cap)
            if n >= REUSE_MIN and n > req.done and o.done < n:
                return True
        return False

    def _prefill_round(
        self, pending: list[_Request], budget: int | None
    ) -> tuple[list[_Request], int | None]:
        """``_prefill``'s pass over ``pending`` with ``budget`` prompt tokens (None: no
        limit): the requests still to come or to go on after the next step, and what is
        left of the budget."""
        whole: list[_Request] = []
        rest: list[_Request] = []
        for req in pending:  # admission order: what was begun first goes on first
            need = len(req.prompt_ids) - req.done
            if budget is not None and budget <= 0:
                rest.append(req)
            elif need == 1 and req.done == req.reused:
                self._join_step(req)
            elif req.done == req.reused and (budget is None or need <= budget):
                whole.append(req)
            else:
                self._prefill_part(req, need if budget is None else min(need, budget))
                if req.slot >= 0 and req.done < len(req.prompt_ids):
                    rest.append(req)
            if budget is not None:
                budget -= need
        self._prefill_whole(whole)
        return rest, budget

    def _join_step(self, req: _Request) -> None:
        """A request whose prompt is in the cache but for its last token (the rest was
        found there, ``Engine.alloc``): that token is one more row of the next decode
        step, whose logits give its first token (one prefill pass of its own each cost
        a burst of repeated prompts a pass per request)."""
        req.t_admit = time.perf_counter()
        req.last = req.prompt_ids[-1]
        req.done = len(req.prompt_ids)
        self._active.append(req)

    def _prefill_part(self, req: _Request, n: int) -> None:
        """The next ``n`` tokens of the request's prompt; its first token once the
        prompt is all in."""
        if req.done == req.reused:
            req.t_admit = time.perf_counter()
        try:
            chunk = torch.tensor(req.prompt_ids[req.done : req.done + n])
            out = self.engine.prefill(req.slot, chunk, start=req.done)
            req.done += n
            self.prefill_chunks += n < len(req.prompt_ids) - req.reused
            nxt = req.stream.push(out) if req.done == len(req.prompt_ids) else None
        except Exception as exc:
            self._finish(req, exc)
            return
        if req.done == len(req.prompt_ids):
            self._started(req, nxt)

    def _started(self, req: _Request, nxt: int | None) -> None:
        """The request's prompt is in and ``nxt`` its first token (None: done)."""
        req.t_first = time.perf_counter()
        self._advance(req, nxt)
        if nxt is not None:
            self._active.append(req)

    def _prefill_whole(self, admitted: list[_Request]) -> None:
        """Whole prompts (all of each but the start its slot holds), several per forward
        pass (those from the same position, up to ``PREFILL_TOKENS`` padded tokens): a
        burst of requests reaches its first tokens together instead of one prefill after
        another. Shortest first, so a pass pads its prompts to a length near their own
        (and short prompts see their first tokens soonest)."""
        group: list[_Request] = []
        for req in sorted(admitted, key=lambda r: (r.done, len(r.prompt_ids))):
            n = len(req.prompt_ids) - req.done
            if group and (req.done != group[0].done or n * (len(group) + 1) > PREFILL_TOKENS):
                self._prefill_group(group)
                group = []
            group.append(req)
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[_Request]) -> None:
        t0 = time.perf_counter()
        for req in group:
            req.t_admit = t0
        picks: list[int] = []  # each request's first token, sampled together
        start = group[0].done  # every prompt's from here (its slot holds the rest)
        if len(group) > 1:
            try:
                prompts = [torch.tensor(r.prompt_ids[start:]) for r in group]
                logits = self.engine.prefill_batch([r.slot for r in group], prompts, start)
            except Exception as exc:  # out of memory, say: one at a time instead
                log.warning("batched prefill of %d requests failed (%s); one by one",
                            len(group), exc)  # fmt: skip
            else:
                self.peak_prefill = max(self.peak_prefill, len(group))
                longest = max(len(r.prompt_ids) for r in group)
                self.prefill_padding += sum(longest - len(r.prompt_ids) for r in group)
                try:
                    picks = self._sample(group, logits)
                except Exception as exc:  # the prompts are in: no second prefill
                    for req in group:
                        self._finish(req, exc)
                    return
        for i, req in enumerate(group):
            req.done = len(req.prompt_ids)
            try:
                if picks:
                    nxt = req.stream.accept(picks[i])
                else:
                    tail = torch.tensor(req.prompt_ids[start:])
                    out = self.engine.prefill(req.slot, tail, start)
                    nxt = req.stream.push(out)
            except Exception as exc:
                self._finish(req, exc)
                continue
            self._started(req, nxt)

    def _uncancelled(self, reqs: list[_Request]) -> list[_Request]:
        """``reqs`` less those cancelled, which are finished here."""
        live = []
        for req in reqs:
            if req.cancel is not None and req.cancel.is_set():
                self._finish(req, GenerationCancelled())
            else:
                live.append(req)
        return live

    @staticmethod
    def _sample(reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """Each request's next token from its row of ``logits``, by its own parameters."""
        return sample_rows(logits, [r.stream.params for r in reqs], [r.stream.rng for r in reqs])

    def _advance(self, req: _Request, nxt: int | None) -> None:
        if req.on_token is not None and req.stream.out:
            req.on_token(req.stream.out)
        if nxt is None:
            self._finish(req, None)
        else:
            req.last = nxt

    def _step(self) -> None:
        live = self._active = self._uncancelled(self._active)
        if not live:
            return
        self.peak_batch = max(self.peak_batch, len(live))
        x = torch.tensor([r.last for r in live])
        logits = self.engine.decode([r.slot for r in live], x)
        picks = self._sample(live, logits)
        still = []
        now = time.perf_counter()
        for req, pick in zip(live, picks, strict=True):
            req.t_first = req.t_first or now  # a request that joined at its last prompt token
            nxt = req.stream.accept(pick)
            self._advance(req, nxt)
            if nxt is not None:
                still.append(req)
        self._active = still

    def _finish(self, req: _Request, error: BaseException | None) -> None:
        """Release the request's slot and settle its future (callers drop it from
        ``_active``)."""
        if req.slot >= 0:
            self.engine.release(req.slot)
            req.slot = -1
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            now = time.perf_counter()
            first = req.t_first or now
            req.future.set_result(req.stream.result(first - req.t_admit, now - first))

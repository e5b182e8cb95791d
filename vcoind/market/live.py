"""The origin's record of a task it is driving, shared by its parts.

``vcoind.market.origin`` (the lifecycle), ``bidding``, ``assign`` and ``rounds`` all read
and change the same :class:`LiveTask`; this module is below all of them, so none of them
imports another's home to get it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from vcoind.market.deltas import StreamedText
from vcoind.market.messages import GenParams, TaskBid, TaskResult
from vcoind.market.payments import SignedTicket
from vcoind.store import TaskRow


@dataclass
class LiveTask:
    row: TaskRow
    attempt: int = 0
    bids: list[TaskBid] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    attempt_peers: dict[int, str] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    last_progress: float = 0.0
    # The current attempt may wait this long for its first progress when that is longer
    # than the task timeout (a long prompt's prefill on a slow worker; 0: the timeout).
    first_progress_s: float = 0.0
    attempt_progress: dict[int, float] = field(default_factory=dict)  # attempt -> last seen
    progress: int = 0
    result: TaskResult | None = None
    attempt_error: str | None = None
    cancelled: bool = False
    scope: trio.CancelScope | None = None
    submitted_mono: float = field(default_factory=time.monotonic)
    final: dict[str, Any] | None = None  # a consensus task's concluding row changes
    streamed: StreamedText = field(default_factory=StreamedText)  # what clients were shown
    # When (s after submit) the current attempt's dispatch reached each step: announced,
    # bids closed, assignment sent; kept in the row's timings with assigned_s.
    dispatch: dict[str, float] = field(default_factory=dict)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @functools.cached_property
    def ticket(self) -> SignedTicket | None:
        """The requester's signed ticket (settlement v2); None for an unpaid task. Set when
        the task is submitted, never changed: read once."""
        raw = self.row.payment.get("ticket")
        return SignedTicket.from_json(raw) if raw else None


class Update(Protocol):
    """``TaskOrigin._update``: change a live task's row on disk, in memory, and notify."""

    async def __call__(self, live: LiveTask, **changes: Any) -> None: ...


def since(row: TaskRow) -> float:
    return round(time.time() - row.created_at, 6)


def params_dict(p: GenParams) -> dict[str, Any]:
    out = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
           "top_k": p.top_k, "seed": p.seed, "stop": list(p.stop)}  # fmt: skip
    if p.defaults:  # left to the model's generation_config.json
        out["defaults"] = list(p.defaults)
    return out


def params_from_dict(d: dict[str, Any]) -> GenParams:
    """The sampling parameters of a task's stored parameters (which may hold more)."""
    names = {f.name for f in dataclasses.fields(GenParams)}
    return GenParams(**{**{k: v for k, v in d.items() if k in names},
                        "stop": tuple(d.get("stop", ())),
                        "defaults": tuple(d.get("defaults", ()))})  # fmt: skip

"""What this node offered to do, so that it signs only its own work.

A worker accepts an assignment (and a trainer a training join) only for a task it bid
on, from the origin whose announce it bid on. The pairs are kept by (task id, origin):
a peer that re-announces another origin's public task id adds its own pair and blocks
nothing. Bounded in number and age (a ticket's default life).
"""

from __future__ import annotations

from collections import OrderedDict

import trio

KEPT = 8192
MAX_AGE_S = 3600.0


class Offered:
    def __init__(self, kept: int = KEPT, max_age_s: float = MAX_AGE_S) -> None:
        self._pairs: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> trio time
        self._kept = kept
        self._max_age_s = max_age_s

    def add(self, task_id: str, origin: str) -> None:
        now = trio.current_time()
        self._pairs[(task_id, origin)] = now
        self._pairs.move_to_end((task_id, origin))
        oldest = now - self._max_age_s
        while self._pairs and (
            len(self._pairs) > self._kept or next(iter(self._pairs.values())) < oldest
        ):
            self._pairs.popitem(last=False)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        when = self._pairs.get(pair)
        return when is not None and when >= trio.current_time() - self._max_age_s

"""Progress of long steps: model pull and fetch, split, load, CUDA graph capture, LoRA rounds.

Work that takes more than a moment opens a ``Step`` on the process's ``BOARD``::

    with BOARD.step("fetch", "qwen-1.5b from 2 peers", total=nbytes, unit="B") as step:
        for chunk in ...:
            step.advance(len(chunk))

Each step shows itself where someone can see it: a bar on a terminal (``tqdm`` on
stderr, when stderr is a tty and ``bars`` is on), log lines otherwise (at most one every
``LOG_EVERY_S`` seconds, plus the start and the end). ``BOARD.snapshot()`` lists the
steps in flight with their fraction for ``vcoin_nodeInfo`` and the dashboard.
Thread-safe: steps advance on worker threads (file work, torch) while trio reads them.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("vcoind.progress")

LOG_EVERY_S = 5.0
# Finished steps stay listed this long (a dashboard polling every few seconds sees them end).
KEEP_DONE_S = 10.0


def _fmt(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:,.0f} {unit}".rstrip()
    for u in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or u == "GiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover (the loop returns)


class Step:
    """One long step; ``advance``/``set`` from any thread."""

    def __init__(self, board: ProgressBoard, sid: int, kind: str, label: str,
                 total: float, unit: str, bar: bool) -> None:  # fmt: skip
        self._board = board
        self.id = sid
        self.kind = kind
        self.label = label
        self.total = float(total)
        self.unit = unit
        self.done = 0.0
        self.started = time.monotonic()
        self.ended: float | None = None
        self.outcome = "running"
        self._lock = threading.Lock()
        self._logged = self.started
        self._bar: Any = None
        if bar:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=self.total or None, desc=f"{kind} {label}", unit=unit,
                             unit_scale=unit == "B", unit_divisor=1024, leave=True,
                             file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        else:
            log.info("%s %s: started (%s)", kind, label, _fmt(self.total, unit))

    @property
    def fraction(self) -> float:
        if self.total <= 0:
            return 1.0 if self.ended is not None else 0.0
        return min(1.0, self.done / self.total)

    def advance(self, n: float = 1) -> None:
        self.set(self.done + n)

    def set(self, done: float, total: float | None = None) -> None:
        with self._lock:
            delta = done - self.done
            self.done = done
            if total is not None:
                self.total = float(total)
                if self._bar is not None:
                    self._bar.total = self.total
            if self._bar is not None:
                self._bar.update(delta)
                return
            now = time.monotonic()
            if now - self._logged < LOG_EVERY_S:
                return
            self._logged = now
        log.info("%s %s: %.0f%% (%s of %s, %s/s)", self.kind, self.label, 100 * self.fraction,
                 _fmt(self.done, self.unit), _fmt(self.total, self.unit),
                 _fmt(self.rate, self.unit))  # fmt: skip

    @property
    def rate(self) -> float:
        elapsed = (self.ended or time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def end(self, outcome: str = "done") -> None:
        with self._lock:
            if self.ended is not None:
                return
            self.ended = time.monotonic()
            self.outcome = outcome
            if self._bar is not None:
                self._bar.close()
        took = self.ended - self.started
        level = logging.INFO if outcome == "done" else logging.WARNING
        log.log(level, "%s %s: %s after %.1f s (%s, %s/s)", self.kind, self.label, outcome,
                took, _fmt(self.done, self.unit), _fmt(self.rate, self.unit))  # fmt: skip
        self._board._ended(self)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "label": self.label,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "fraction": round(self.fraction, 4),
            "rate": round(self.rate, 3),
            "elapsed_s": round((self.ended or time.monotonic()) - self.started, 3),
            "outcome": self.outcome,
        }


class ProgressBoard:
    """The long steps of this process, in flight and just ended."""

    def __init__(self) -> None:
        self.bars = False  # a terminal bar instead of log lines (the CLI turns it on)
        self._ids = itertools.count(1)
        self._steps: dict[int, Step] = {}
        self._lock = threading.Lock()

    def open(self, kind: str, label: str, total: float = 0, unit: str = "") -> Step:
        """A step to ``end()`` yourself (``step()`` is the context-manager form)."""
        bar = self.bars and sys.stderr.isatty()
        with self._lock:
            s = Step(self, next(self._ids), kind, label, total, unit, bar)
            self._steps[s.id] = s
        return s

    @contextmanager
    def step(self, kind: str, label: str, total: float = 0, unit: str = "") -> Iterator[Step]:
        s = self.open(kind, label, total, unit)
        try:
            yield s
        except BaseException as exc:
            s.end("cancelled" if not isinstance(exc, Exception) else f"failed: {exc}"[:200])
            raise
        s.end("done")

    def _ended(self, step: Step) -> None:
        cutoff = time.monotonic() - KEEP_DONE_S
        with self._lock:
            for sid, s in list(self._steps.items()):
                if s.ended is not None and s.ended < cutoff:
                    del self._steps[sid]

    def snapshot(self) -> list[dict[str, Any]]:
        """Steps running now, and those that ended in the last ``KEEP_DONE_S`` seconds."""
        cutoff = time.monotonic() - KEEP_DONE_S
        with self._lock:
            steps = [s for s in self._steps.values() if s.ended is None or s.ended >= cutoff]
        return [s.as_dict() for s in steps]


BOARD = ProgressBoard()

"""A trio instrument that measures how long the event loop waits for I/O (is idle)."""

from __future__ import annotations

import time

import trio


class IdleMeter(trio.abc.Instrument):
    """Time the trio loop waits for I/O: a loop never idle is saturated, however
    little CPU the process gets on a shared box (process CPU alone misreads that)."""

    def __init__(self) -> None:
        self.idle = 0.0
        self._t = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._t = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self.idle += time.perf_counter() - self._t

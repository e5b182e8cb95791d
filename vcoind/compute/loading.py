"""A model load's progress on the board, tensor by tensor.

transformers loads the weights in one loop over the checkpoint's tensors ("Loading
weights") and draws it with its own tqdm, which the daemon turns off. Its
``set_tqdm_hook`` lets us see that loop instead: while ``weights_progress(step)`` is on
in a thread, the loop's tensors advance ``step`` (total = the checkpoint's tensors). The
hook is process-wide, so it is installed once and looks the step up per thread: loads
on other threads, and every other bar transformers makes, are left as they were.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any

from transformers.utils import logging as hf_logging

from vcoind.progress import Step

WEIGHTS_LOOP = "Loading weights"  # the desc of transformers' loop over the tensors

_current = threading.local()
_installed = False
_install_lock = threading.Lock()


class _Counted:
    """The loop's iterable, advancing the step as each tensor is done (when the loop asks
    for the next one); the rest of tqdm's interface goes to ``bar``."""

    def __init__(self, items: Iterable[Any], step: Step, bar: Any) -> None:
        self._items = items
        self._step = step
        self._bar = bar

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self._items, Sized):
            self._step.set(self._step.done, total=self._step.done + len(self._items))
        for item in self._items:
            yield item
            self._step.advance()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bar = factory(*args, **kwargs)
    step: Step | None = getattr(_current, "step", None)
    items = args[0] if args else kwargs.get("iterable")
    if step is None or kwargs.get("desc") != WEIGHTS_LOOP or items is None:
        return bar
    return _Counted(items, step, bar)


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        setter = getattr(hf_logging, "set_tqdm_hook", None)
        if setter is None:  # an older transformers: the step shows its phases only
            return
        previous = setter(None)
        if previous is not None:  # someone else's hook: leave it, and ours out
            setter(previous)
            return
        setter(_hook)
        _installed = True


@contextmanager
def weights_progress(step: Step) -> Iterator[None]:
    """While it lasts, transformers' weight loading on this thread advances ``step``."""
    _install()
    outer = getattr(_current, "step", None)
    _current.step = step
    try:
        yield
    finally:
        _current.step = outer

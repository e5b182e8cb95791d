"""The progress board: steps, their fraction, log lines when no terminal shows a bar."""

from __future__ import annotations

import logging
import threading

import pytest

from vcoind import progress
from vcoind.progress import ProgressBoard


def test_a_step_reports_its_fraction_and_ends(caplog: pytest.LogCaptureFixture) -> None:
    board = ProgressBoard()
    caplog.set_level(logging.INFO, logger="vcoind.progress")
    with board.step("fetch", "m1", total=1000, unit="B") as s:
        s.advance(250)
        (snap,) = board.snapshot()
        assert snap["kind"] == "fetch" and snap["fraction"] == 0.25
        assert snap["outcome"] == "running"
    (snap,) = board.snapshot()  # still listed a while after it ended
    assert snap["outcome"] == "done" and snap["done"] == 250
    text = caplog.text
    assert "fetch m1: started (1000 B)" in text and "fetch m1: done after" in text


def test_a_failed_step_says_why(caplog: pytest.LogCaptureFixture) -> None:
    board = ProgressBoard()
    with pytest.raises(ValueError), board.step("load", "m2", total=3):
        raise ValueError("bad tensor")
    (snap,) = board.snapshot()
    assert snap["outcome"] == "failed: bad tensor"


def test_log_lines_are_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = ProgressBoard()
    caplog.set_level(logging.INFO, logger="vcoind.progress")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    s = board.open("split", "m3", total=4, unit="shards")
    s.advance()
    assert "split m3: 25% (1 shards of 4 shards" in caplog.text
    monkeypatch.setattr(progress, "LOG_EVERY_S", 3600.0)
    caplog.clear()
    s.advance()
    assert caplog.text == ""  # within the interval: no line
    s.end()


def test_steps_advance_from_threads() -> None:
    board = ProgressBoard()
    s = board.open("pull", "m4", total=4000)

    def work() -> None:
        for _ in range(1000):
            s.advance(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.done == 4000 and s.fraction == 1.0
    s.end()


def test_ended_steps_are_dropped_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    board = ProgressBoard()
    monkeypatch.setattr(progress, "KEEP_DONE_S", 0.0)
    board.open("a", "x").end()
    board.open("b", "y").end()
    assert board.snapshot() == []
    running = board.open("c", "z")
    assert [s["kind"] for s in board.snapshot()] == ["c"]
    running.end()

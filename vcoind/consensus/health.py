"""Node health score (the seeds' HealthMonitor), a pure function.

    health = 0.30 * (1 - cpu/100)
           + 0.30 * (1 - memory/100)
           + 0.25 * response_score
           + 0.15 * (1 - error_rate)

``response_score`` is 1 at or below ``RESPONSE_GOOD_S`` (100 ms), 0 at or above
``RESPONSE_BAD_S`` (5 s) and linear in between. Inputs are clamped to their
ranges, so the result is always in [0, 1]. A node with no response-time sample
yet scores its response part as 1 (innocent until measured).
"""

from __future__ import annotations

W_CPU = 0.30
W_MEMORY = 0.30
W_RESPONSE = 0.25
W_ERRORS = 0.15
RESPONSE_GOOD_S = 0.1
RESPONSE_BAD_S = 5.0


def _clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def response_score(response_s: float | None) -> float:
    """1 for fast (<= 100 ms), 0 for slow (>= 5 s), linear in between; None -> 1."""
    if response_s is None:
        return 1.0
    return _clamp(1.0 - (response_s - RESPONSE_GOOD_S) / (RESPONSE_BAD_S - RESPONSE_GOOD_S))


def health_score(
    cpu_percent: float, memory_percent: float, response_s: float | None, error_rate: float
) -> float:
    """Weighted health in [0, 1]; see the module docstring for the formula."""
    score = (
        W_CPU * (1.0 - _clamp(cpu_percent / 100.0))
        + W_MEMORY * (1.0 - _clamp(memory_percent / 100.0))
        + W_RESPONSE * response_score(response_s)
        + W_ERRORS * (1.0 - _clamp(error_rate))
    )
    return round(_clamp(score), 6)

"""Node reputation: a bounded score that moves with every vote, pure functions.

A node starts at ``DEFAULT_REPUTATION`` (100) and each consensus event adds a fixed delta;
the result is clamped to [``MIN_REPUTATION``, ``MAX_REPUTATION``] = [0, 1000] and rounded to
6 dp. The cap keeps a long-lived node from banking so much reputation that it could cheat
for a long time before it matters; the floor keeps the arithmetic simple (0 = no trust).

Deltas (why): losing must cost more than winning earns, or a node that is right 80 % of
the time and wrong otherwise would still climb.

- "agreed"     +1   in the winning cluster.
- "outvoted"   -5   answered, but outside the winning cluster: breaks even at 5 right
                    answers per wrong one (83 % agreement).
- "timeout"    -2   accepted the task but never revealed in time (cheaper than a wrong
                    answer: an overloaded node is not lying).
- "late_commit" -3  committed after the commit window closed (its answer is ignored).
- "bad_reveal" -10  revealed a result that does not match its commitment: provable
                    misbehaviour.

``reputation_factor(rep) = rep / (rep + 100)`` maps reputation into [0, 1): 0.5 for a new
node, 0.909091 at the cap; it is used in bid selection and vote weights.
"""

from __future__ import annotations

import math

DEFAULT_REPUTATION = 100.0
MIN_REPUTATION = 0.0
MAX_REPUTATION = 1000.0
REPUTATION_HALF = 100.0

REPUTATION_DELTAS: dict[str, float] = {
    "agreed": 1.0,
    "outvoted": -5.0,
    "timeout": -2.0,
    "late_commit": -3.0,
    "bad_reveal": -10.0,
}


def _clamp_reputation(rep: float) -> float:
    if math.isnan(rep):
        raise ValueError("reputation is NaN")
    return min(MAX_REPUTATION, max(MIN_REPUTATION, rep))


def updated_reputation(current: float, event: str) -> float:
    """``round(clamp(clamp(current) + REPUTATION_DELTAS[event]), 6)`` with clamp to [0, 1000].

    An unknown event or a NaN reputation raises ValueError.
    """
    try:
        delta = REPUTATION_DELTAS[event]
    except KeyError:
        raise ValueError(f"unknown reputation event {event!r}") from None
    return round(_clamp_reputation(_clamp_reputation(current) + delta), 6)


def reputation_factor(rep: float) -> float:
    """``round(r / (r + 100), 6)`` with ``r = clamp(rep, 0, 1000)``; in [0, 0.909091]."""
    r = _clamp_reputation(rep)
    return round(r / (r + REPUTATION_HALF), 6)

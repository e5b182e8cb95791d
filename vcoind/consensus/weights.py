"""Voting weight of a node from its track record, a pure function.

    weight = 0.4 * accuracy + 0.2 * response + 0.2 * health + 0.2 * complexity

summed left to right in IEEE-754 doubles and rounded with ``round(x, 6)``:

- accuracy = (agreed + 1) / (validations + 2): Laplace's rule of succession, so a node
  with no history starts at 0.5 and one vote moves it only a little. ``agreed`` is clamped
  to [0, validations] and ``validations`` to >= 0 first.
- response = 1 at or below ``RESPONSE_GOOD_S`` (1 s), 0 at or above ``RESPONSE_BAD_S``
  (60 s), ``1 - (t - 1) / 59`` in between; no sample yet (None) -> 0.5 (neutral).
- health = the node's health score (``consensus.health``) clamped to [0, 1].
- complexity = min(1, log2(1 + max(0, max_tokens_handled)) / log2(1 + 4096)): the largest
  task (tokens) the node has completed, on a log scale that saturates at 4096 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

W_ACCURACY = 0.4
W_RESPONSE = 0.2
W_HEALTH = 0.2
W_COMPLEXITY = 0.2
RESPONSE_GOOD_S = 1.0
RESPONSE_BAD_S = 60.0
RESPONSE_UNKNOWN = 0.5
COMPLEXITY_FULL_TOKENS = 4096


@dataclass(frozen=True)
class NodeRecord:
    """What the network knows about a node when it weighs its vote."""

    agreed: int  # validations in which the node was in the winning cluster
    validations: int  # consensus rounds the node took part in
    mean_response_s: float | None  # mean task response time; None before the first task
    health: float  # health score in [0, 1]
    max_tokens_handled: int  # largest prompt + output (tokens) it completed


def _clamp01(x: float) -> float:
    # NaN -> 0: a broken measurement must not win weight.
    return 0.0 if not x >= 0.0 else 1.0 if x > 1.0 else x


def accuracy_score(agreed: int, validations: int) -> float:
    """(agreed + 1) / (validations + 2) after clamping; 0.5 for a new node."""
    validations = max(0, validations)
    agreed = min(max(0, agreed), validations)
    return (agreed + 1) / (validations + 2)


def response_score(mean_response_s: float | None) -> float:
    """1 at <= 1 s, 0 at >= 60 s, ``1 - (t - 1) / 59`` in between; None -> 0.5."""
    if mean_response_s is None:
        return RESPONSE_UNKNOWN
    t = mean_response_s
    return _clamp01(1.0 - (t - RESPONSE_GOOD_S) / (RESPONSE_BAD_S - RESPONSE_GOOD_S))


def complexity_score(max_tokens_handled: int) -> float:
    """min(1, log2(1 + max(0, tokens)) / log2(1 + 4096))."""
    tokens = max(0, max_tokens_handled)
    return min(1.0, math.log2(1 + tokens) / math.log2(1 + COMPLEXITY_FULL_TOKENS))


def node_weight(r: NodeRecord) -> float:
    """Weight in [0, 1], rounded to 6 dp; see the module docstring for the formula."""
    w = (
        W_ACCURACY * accuracy_score(r.agreed, r.validations)
        + W_RESPONSE * response_score(r.mean_response_s)
        + W_HEALTH * _clamp01(r.health)
        + W_COMPLEXITY * complexity_score(r.max_tokens_handled)
    )
    return round(_clamp01(w), 6)

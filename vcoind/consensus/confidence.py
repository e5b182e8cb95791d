"""Confidence in a consensus result and what to do with it, pure functions.

    confidence = 0.6 * share + 0.25 * consistency
               + 0.15 * (0.5 * relevance + 0.5 * completeness)

summed left to right and rounded with ``round(x, 6)``; every input is clamped to [0, 1].

Why these weights: agreement between independent replicas is the evidence consensus can
act on (recomputing with more replicas changes it), so share and consistency carry
0.6 + 0.25 = 0.85 = ``ACCEPT``. Unanimous identical answers (share 1, consistency 1) are
therefore always accepted, whatever the relevance: a model's answer is what it is, and a
small or random-weight model whose text looks unrelated to the prompt (relevance near 0)
still computed it correctly; more replicas would only repeat it. Relevance (prompt/answer
embedding cosine) and completeness only lift confidence, moving a split vote between
"recompute" and "accept_with_note". For example 2 of 3 equal replicas agreeing exactly
(share 0.666667, consistency 1) give 0.65 + 0.15 * q: with q = 1 0.8 (accept with note),
with q = 0.5 0.725 (recompute).

Actions: conf >= 0.85 "accept"; >= 0.75 "accept_with_note"; >= 0.60 "recompute" (with more
replicas); below "fallback" (return the conservative fallback answer and mark it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vcoind.consensus.voting import consistency as _consistency

ACCEPT = 0.85
ACCEPT_WITH_NOTE = 0.75
RECOMPUTE = 0.60

W_SHARE = 0.6
W_CONSISTENCY = 0.25
W_QUALITY = 0.15

# An answer cut off by max_new_tokens is probably fine so far but unfinished.
TRUNCATED_COMPLETENESS = 0.7


@dataclass(frozen=True)
class Quality:
    """Quality signals of the winning answer, each in [0, 1]."""

    relevance: float  # cosine(prompt embedding, answer embedding)
    consistency: float  # mean pairwise similarity inside the winning cluster
    completeness: float  # see ``completeness``


def _clamp01(x: float) -> float:
    return 0.0 if not x >= 0.0 else 1.0 if x > 1.0 else x


def completeness(text: str, finish_reason: str) -> float:
    """0.0 for an empty or whitespace-only answer; 0.7 if ``finish_reason == "length"``
    (generation stopped at max_new_tokens, the answer is truncated); 1.0 otherwise
    (e.g. "stop": the model ended it)."""
    if not text.strip():
        return 0.0
    if finish_reason == "length":
        return TRUNCATED_COMPLETENESS
    return 1.0


def quality(
    relevance: float, sim: Sequence[Sequence[float]], winner: Sequence[int], completeness: float
) -> Quality:
    """``Quality(round(clamp(relevance), 6), consistency, round(clamp(completeness), 6))``.

    consistency = ``round(fsum(sim[i][j] for i < j in winner) / (k * (k - 1) / 2), 6)``
    for k = len(winner) >= 2 (pairs in ``winner`` order), 1.0 for a single member.
    ``clamp`` maps to [0, 1] (NaN -> 0).
    """
    return Quality(
        relevance=round(_clamp01(relevance), 6),
        consistency=_consistency(sim, winner),
        completeness=round(_clamp01(completeness), 6),
    )


def confidence(share: float, q: Quality) -> float:
    """Confidence in [0, 1], rounded to 6 dp:

        round(0.6 * s + 0.25 * c + 0.15 * (0.5 * r + 0.5 * p), 6)

    with s, c, r, p = share, consistency, relevance, completeness, each clamped to [0, 1].
    See the module docstring for why relevance cannot pull unanimous answers below accept.
    """
    s, c = _clamp01(share), _clamp01(q.consistency)
    r, p = _clamp01(q.relevance), _clamp01(q.completeness)
    conf = W_SHARE * s + W_CONSISTENCY * c + W_QUALITY * (0.5 * r + 0.5 * p)
    return round(_clamp01(conf), 6)


def action(conf: float) -> str:
    """ "accept" if conf >= 0.85, "accept_with_note" if >= 0.75, "recompute" if >= 0.60,
    else "fallback". ``conf`` is rounded to 6 dp first."""
    c = round(conf, 6)
    if c >= ACCEPT:
        return "accept"
    if c >= ACCEPT_WITH_NOTE:
        return "accept_with_note"
    if c >= RECOMPUTE:
        return "recompute"
    return "fallback"

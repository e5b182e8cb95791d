"""Weighted vote over replica answers, a pure function of their similarity matrix and weights.

1. ``clusters``: group answers that agree (similarity >= ``AGREE_THRESHOLD`` with *every*
   member of the group, complete linkage, so a chain of near neighbours cannot merge two
   answers that disagree).
2. ``vote``: the share of a cluster is its members' weight over the total weight; the
   cluster with the largest share wins. Share strictly above ``SUPERMAJORITY`` (0.67, the
   "> 67 %" of the design; 2 of 3 equal weights, 0.666667, is therefore only a majority)
   -> "supermajority"; strictly above ``MAJORITY`` (0.5) -> "majority"; two or more clusters
   with the same largest share -> "tie"; otherwise "none" (the plurality winner is still
   reported).

All shares are rounded with ``round(x, 6)`` before they are compared, so nodes agree on
ties and thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

AGREE_THRESHOLD = 0.8
MAJORITY = 0.5
SUPERMAJORITY = 0.67

DECISIONS = ("none", "tie", "majority", "supermajority")


@dataclass(frozen=True)
class VoteResult:
    """Outcome of one vote. Indices refer to the replicas in input order."""

    decision: str  # "supermajority" | "majority" | "tie" | "none"
    share: float  # weighted share of the winning cluster, 6 dp
    winner: tuple[int, ...]  # members of the winning cluster, ascending
    answer: int  # the winning cluster's medoid: the answer to return
    agreed: tuple[bool, ...]  # agreed[i]: replica i is in the winning cluster
    clusters: tuple[tuple[int, ...], ...]  # all clusters, see ``clusters``
    shares: tuple[float, ...]  # share of each cluster, same order, 6 dp


def clusters(sim: Sequence[Sequence[float]], threshold: float = AGREE_THRESHOLD) -> list[list[int]]:
    """Deterministic agreement clusters (greedy complete linkage in index order).

    For i = 0, 1, ..., n-1: put i into the first existing cluster (in creation order) whose
    every member j has ``sim[i][j] >= threshold``; if there is none, start a new cluster
    ``[i]``. Members are therefore ascending and clusters are ordered by their smallest
    index. ``sim`` must be an n x n symmetric matrix (ValueError if it is not square).
    """
    n = len(sim)
    for row in sim:
        if len(row) != n:
            raise ValueError("similarity matrix is not square")
    out: list[list[int]] = []
    for i in range(n):
        for c in out:
            if all(sim[i][j] >= threshold for j in c):
                c.append(i)
                break
        else:
            out.append([i])
    return out


def consistency(sim: Sequence[Sequence[float]], members: Sequence[int]) -> float:
    """Mean pairwise similarity inside a cluster, rounded to 6 dp.

    ``round(fsum(sim[i][j] for i < j in members) / (k * (k - 1) / 2), 6)`` for k >= 2
    members (pairs taken with i before j in ``members`` order); 1.0 for k <= 1.
    """
    k = len(members)
    if k <= 1:
        return 1.0
    total = math.fsum(sim[members[a]][members[b]] for a in range(k) for b in range(a + 1, k))
    return round(total / (k * (k - 1) / 2), 6)


def medoid(sim: Sequence[Sequence[float]], weights: Sequence[float], members: Sequence[int]) -> int:
    """The member most similar to the rest of its cluster, by weight.

    Score of member i: ``round(fsum(w[j] * s(i, j) for j in members), 6)`` with
    ``s(i, i) = 1`` and ``s(i, j) = sim[i][j]`` otherwise (counting its own weight makes the
    heavier of two members win). The largest score wins; equal scores -> smallest index.
    ``weights`` here are the effective weights of ``vote`` (all-zero replaced by ones).
    """
    best, best_score = -1, -math.inf
    for i in sorted(members):
        score = round(math.fsum(weights[j] * (1.0 if j == i else sim[i][j]) for j in members), 6)
        if score > best_score:
            best, best_score = i, score
    return best


def vote(
    sim: Sequence[Sequence[float]], weights: Sequence[float], threshold: float = AGREE_THRESHOLD
) -> VoteResult:
    """Weighted vote over n >= 1 answers with similarity matrix ``sim`` (n x n).

    - Weights must be finite and >= 0 (ValueError otherwise); if they sum to 0 every
      replica gets weight 1.
    - ``cs = clusters(sim, threshold)``; share of cluster c =
      ``round(fsum(w[i] for i in c) / fsum(w), 6)``.
    - Winner: the cluster with the largest share. If several clusters have that share
      (equal after rounding) the decision is "tie" and the winner among them is the one
      with the largest ``consistency`` (mean pairwise similarity, 1.0 for a single
      member), then the smallest first index.
    - Decision (no tie): "supermajority" if share > 0.67, "majority" if share > 0.5, else
      "none".
    - ``answer = medoid(sim, w, winner)``; ``agreed[i] = i in winner``.

    A single replica gives "supermajority" with share 1.0.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("no replicas to vote on")
    if len(sim) != n:
        raise ValueError(f"similarity matrix has {len(sim)} rows for {n} weights")
    for w in weights:
        if not (math.isfinite(w) and w >= 0.0):
            raise ValueError(f"weights must be finite and >= 0, got {w!r}")
    total = math.fsum(weights)
    eff: list[float] = [float(w) for w in weights] if total > 0.0 else [1.0] * n
    if total <= 0.0:
        total = float(n)
    cs = clusters(sim, threshold)
    shares = tuple(round(math.fsum(eff[i] for i in c) / total, 6) for c in cs)
    top = max(shares)
    tied = [k for k, s in enumerate(shares) if s == top]
    # max() keeps the first maximum, and clusters are ordered by smallest index.
    win = max(tied, key=lambda k: consistency(sim, cs[k]))
    share = shares[win]
    if len(tied) > 1:
        decision = "tie"
    elif share > SUPERMAJORITY:
        decision = "supermajority"
    elif share > MAJORITY:
        decision = "majority"
    else:
        decision = "none"
    winner = tuple(cs[win])
    members = set(winner)
    return VoteResult(
        decision=decision,
        share=share,
        winner=winner,
        answer=medoid(sim, eff, winner),
        agreed=tuple(i in members for i in range(n)),
        clusters=tuple(tuple(c) for c in cs),
        shares=shares,
    )

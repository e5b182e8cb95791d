"""The outcome of one consensus round, computed the same way by every participant.

Input: the prompt, the revealed results in the order the origin listed their
commitments, and the weights it listed. Output: similarity matrix, decision,
confidence, the chosen answer and its hash. Pure: the caller embeds the texts
(``vcoind.market.tallying.tally_async``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vcoind.consensus.confidence import action, completeness, confidence, quality
from vcoind.consensus.outcome import result_hash
from vcoind.consensus.similarity import cosine, similarity_matrix
from vcoind.consensus.voting import vote


@dataclass(frozen=True)
class Revealed:
    peer_id: str
    attempt: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str


@dataclass(frozen=True)
class Outcome:
    decision: str
    share: float
    confidence: float
    action: str
    answer: int  # index into the revealed results
    agreed: tuple[bool, ...]
    similarity: tuple[tuple[float, ...], ...]
    weights: tuple[float, ...]
    result_hash: bytes

    def view(self, results: Sequence[Revealed]) -> dict[str, Any]:
        """The public shape (``consensus`` in ``vcoin_getTask``), without the texts."""
        return {
            "decision": self.decision,
            "share": self.share,
            "confidence": self.confidence,
            "action": self.action,
            "answer_replica": results[self.answer].peer_id,
            "similarity_matrix": [[round(x, 4) for x in row] for row in self.similarity],
            "result_hash": self.result_hash.hex(),
            "replicas": [
                {
                    "node_id": r.peer_id,
                    "attempt": r.attempt,
                    "result_hash": result_hash(r.text).hex(),
                    "similarity": self.similarity[i][self.answer],
                    "weight": self.weights[i],
                    "agreed": self.agreed[i],
                }
                for i, r in enumerate(results)
            ],
        }


def tally(
    results: Sequence[Revealed],
    weights: Sequence[float],
    prompt_vec: Sequence[float],
    answer_vecs: Sequence[Sequence[float]],
    compare: Sequence[str] | None = None,
) -> Outcome:
    """Vote over ``results`` (at least one) with ``weights``; see ``vcoind.consensus``.
    ``prompt_vec`` and ``answer_vecs`` are the sentence embeddings of the prompt and of
    each result's text. ``compare``: the parts of the texts to compare instead (a reasoning
    model's final answers), then without their token streams (which hold the reasoning)."""
    if compare is None:
        sim = similarity_matrix([r.text for r in results], answer_vecs,
                                [r.token_ids for r in results])  # fmt: skip
    else:
        sim = similarity_matrix(compare, answer_vecs)
    v = vote(sim, weights)
    chosen = results[v.answer]
    q = quality(
        cosine(prompt_vec, answer_vecs[v.answer]),
        sim,
        v.winner,
        completeness(chosen.text, chosen.finish_reason),
    )
    conf = confidence(v.share, q)
    return Outcome(
        decision=v.decision,
        share=v.share,
        confidence=conf,
        action=action(conf),
        answer=v.answer,
        agreed=v.agreed,
        similarity=tuple(tuple(row) for row in sim),
        weights=tuple(weights),
        result_hash=result_hash(chosen.text),
    )

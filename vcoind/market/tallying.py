"""The tally of a consensus round as every participant computes it: the revealed results
in the origin's order with their weights, their embeddings, the vote, and the outcome the
agreeing replicas sign (``vcoind.market.consensus`` runs the rounds)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from vcoind.chain.typed import Outcome as TypedOutcome
from vcoind.consensus.tally import Outcome, Revealed, tally
from vcoind.market.chat import final_answer
from vcoind.market.payments import outcome_of
from vcoind.market.votes import CommitsClosed, ResultReveal

__all__ = ["ordered_results", "settled_outcome", "tally_async"]


def ordered_results(
    closed: CommitsClosed, reveals: dict[str, ResultReveal]
) -> tuple[list[Revealed], list[float]]:
    """The revealed results and their weights, in the order the origin listed them."""
    results, weights = [], []
    for c in closed.committers:
        r = reveals.get(c.peer_id)
        if r is not None:
            results.append(Revealed(c.peer_id, c.attempt, r.text, r.token_ids, r.finish_reason))
            weights.append(c.weight)
    return results, weights


def settled_outcome(
    o: Outcome, results: Sequence[Revealed], reveals: dict[str, ResultReveal],
    deterministic: bool,
) -> TypedOutcome:  # fmt: skip
    """What the agreeing replicas sign for the chain: the agreed result, the decision, the
    agreed answer's tokens (what each is paid for) and, for a deterministic task, the
    numeric profile its author revealed (a slash needs the same profile)."""
    chosen = results[o.answer]
    profile = reveals[chosen.peer_id].profile if chosen.peer_id in reveals else bytes(32)
    return outcome_of(o.result_hash, o.decision, len(chosen.token_ids), profile, deterministic)


async def tally_async(
    prompt: str,
    results: Sequence[Revealed],
    weights: Sequence[float],
    embed: Callable[[Sequence[str]], Awaitable[list[tuple[float, ...]]]],
    prompt_vec: Sequence[float] | None = None,
) -> Outcome:
    """``tally`` with the embeddings: the prompt's alone (``prompt_vec`` when the caller
    has it already: the origin embeds it while the replicas compute), then each distinct
    answer once, together (identical answers are similar 1.0 without their vectors). Every
    participant embeds the same batches, so their vectors, and outcomes, match."""
    # A reasoning model's answers are compared on what follows its reasoning: two replicas
    # that think differently but answer alike agree (what they sign is the whole text).
    answers = [final_answer(r.text) for r in results]
    compare = answers if answers != [r.text for r in results] else None
    if prompt_vec is None:
        prompt_vec = (await embed([prompt]))[0]
    distinct = list(dict.fromkeys(answers))
    vectors = dict(zip(distinct, await embed(distinct), strict=True))
    return tally(results, weights, prompt_vec, [vectors[a] for a in answers], compare)

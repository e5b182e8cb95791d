"""How long an origin waits for work whose length it can estimate.

The task timeout (``market.task_timeout_s``, 30 s) is right for *no progress for this
long*: a decoding worker reports progress several times a second. It is wrong for *the
whole answer by then*: a consensus round waits for every replica's commitment, which
comes only after the last token, and a 2,000-token answer at 20 tokens/s takes 100 s.
So the waits that cover a whole generation (or a prefill) scale with its size and with
the slowest worker's speed as this origin measured it (``vcoind.market.observed``)::

    work     = (max_new_tokens + prompt_tokens / PREFILL_SPEEDUP) / tokens_per_s
    deadline = allowance_s + safety * work, within [floor_s, max(cap_s, floor_s)]

``floor_s`` is the task's own timeout (``market.task_timeout_s`` unless the request set
one): a deadline is never shorter than it was with the flat timeout. A worker never
measured counts at ``market.reference_tokens_per_s`` (20: the low end of a T4 running
DeepSeek-R1-Distill-Qwen-1.5B in fp16), never at what it claims: a bidder claiming to
be slow could otherwise stretch every round it joins up to the cap.

Pure functions over a frozen policy, so the rule can be checked without a network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from vcoind.config import MarketConfig

# Prompts arrive as text: count them as more tokens than BPE usually makes (about 4
# characters per token in English), so the estimate errs towards waiting longer.
CHARS_PER_TOKEN = 3.0
# A prompt token costs at most this fraction of a generated one: prefill runs every
# position of a chunk in one forward pass (hundreds of times faster on a GPU, still
# several times on a CPU).
PREFILL_SPEEDUP = 10.0
# Below this a measured speed is noise (or a stall): the cap decides instead.
MIN_TOKENS_PER_S = 0.01


@dataclass(frozen=True)
class DeadlinePolicy:
    """The rule's settings: the floor (the task's timeout), the cap and the margins."""

    floor_s: float = 30.0
    cap_s: float = 1800.0
    reference_tokens_per_s: float = 20.0
    safety: float = 2.0
    allowance_s: float = 10.0

    @classmethod
    def of(cls, cfg: MarketConfig, task_timeout_s: float | None = None) -> DeadlinePolicy:
        """The node's policy for a task whose own timeout is ``task_timeout_s`` (None:
        the node's ``market.task_timeout_s``)."""
        return cls(
            floor_s=cfg.task_timeout_s if task_timeout_s is None else task_timeout_s,
            cap_s=cfg.max_deadline_s,
            reference_tokens_per_s=cfg.reference_tokens_per_s,
            safety=cfg.deadline_safety,
            allowance_s=cfg.deadline_allowance_s,
        )

    def clamp(self, seconds: float) -> float:
        return min(max(seconds, self.floor_s), max(self.cap_s, self.floor_s))


def prompt_tokens(text: str) -> int:
    """A generous estimate of the tokens in ``text`` (a prompt or a chat's JSON)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def slowest(speeds: Iterable[float | None], reference: float) -> float:
    """The slowest of the workers' measured speeds (tokens/s); one never measured (None)
    counts at ``reference``. No workers: ``reference``."""
    known = [reference if s is None else s for s in speeds]
    return max(min(known, default=reference), MIN_TOKENS_PER_S)


def work_s(max_new_tokens: int, n_prompt_tokens: int, tokens_per_s: float) -> float:
    """Seconds a worker at ``tokens_per_s`` needs for the prompt and the whole answer."""
    tps = max(tokens_per_s, MIN_TOKENS_PER_S)
    return (max(max_new_tokens, 0) + max(n_prompt_tokens, 0) / PREFILL_SPEEDUP) / tps


def commit_deadline_s(
    policy: DeadlinePolicy, max_new_tokens: int, n_prompt_tokens: int, tokens_per_s: float
) -> float:
    """How long a consensus round waits for its replicas' commitments after assigning
    them: the whole answer of the slowest replica (``tokens_per_s``), with margins."""
    work = work_s(max_new_tokens, n_prompt_tokens, tokens_per_s)
    return policy.clamp(policy.allowance_s + policy.safety * work)


def first_progress_s(policy: DeadlinePolicy, n_prompt_tokens: int, tokens_per_s: float) -> float:
    """How long an attempt may go without its first progress report: the task timeout,
    or the prefill of a long prompt on a slow worker, with margins, if that is longer."""
    work = work_s(0, n_prompt_tokens, tokens_per_s)
    return policy.clamp(policy.allowance_s + policy.safety * work)

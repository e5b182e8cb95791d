"""Sampling and stop conditions: the batched draw of a decode step's rows
(``sample_rows``), one request's token stream (``TokenStream``: its draws, EOS, stop
strings, the result) and the loop that runs one request over a forward function
(``decode_loop``).

Free of the daemon (no trio, no network): only torch.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vcoind.compute.params import GenerationError, GenerationParams


def sample_next(logits: torch.Tensor, p: GenerationParams, rng: random.Random | None) -> int:
    """Pick the next token from 1-D logits (fp32 math whatever the model dtype)."""
    return sample_rows(logits.unsqueeze(0), [p], [rng])[0]


CANDIDATES = 1024  # tokens a row with top-p but no top-k is first drawn from


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    rngs: Sequence[random.Random | None],
) -> list[int]:
    """The next token of each row of ``logits`` ``[B, V]``, each by its own parameters,
    with one device-to-host copy for the batch (two where a row's cut reaches past its
    candidates). Greedy rows take the argmax. A sampled row is scaled by its temperature,
    cut to its top-k (ties with the k-th value kept, as transformers does), renormalised,
    cut to its top-p nucleus (the smallest prefix, largest first and ties by token id,
    whose mass reaches top_p), and drawn by inverse CDF over the kept tokens, largest
    first (a row without cuts: the whole row in token order, no sort), at one uniform
    from the request's own ``random.Random`` (seeded from its seed; None: a fresh one
    from ``params.seed``). The uniforms come from the host, so no kernel runs per row and a
    seed draws the same on any device and in any batch.

    Rows with a cut are drawn from their largest logits only (``topk`` of k + 1, or
    ``CANDIDATES`` for top-p alone), not from a sort of the whole vocabulary; a row whose
    kept tokens reach the end of its candidates (a tie run or a wide nucleus) is drawn
    again from the whole sorted row."""
    logits = logits.float()
    picks = torch.argmax(logits, dim=-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0.0]
    if not hot:
        return [int(t) for t in picks.tolist()]
    dev, v = logits.device, logits.shape[-1]
    us = [(rngs[i] or random.Random(params[i].seed)).random() for i in hot]
    ks = [params[i].top_k if 0 < params[i].top_k < v else 0 for i in hot]
    tops = [params[i].top_p if params[i].top_p < 1.0 else 2.0 for i in hot]
    host = torch.tensor([[params[i].temperature for i in hot], ks, tops, us],
                        dtype=torch.float64)  # fmt: skip
    cols = host.to(dev).unsqueeze(-1)  # [4, n, 1]: one copy for every row's parameters
    temp, kcol, pcol, ucol = cols[0].float(), cols[1].long(), cols[2].float(), cols[3].float()
    rows = torch.tensor(hot, device=dev)
    x = _take(logits, hot, rows) / temp
    cut = [j for j, (k, t) in enumerate(zip(ks, tops, strict=True)) if k or t < 1.0]
    plain = [j for j in range(len(hot)) if not (ks[j] or tops[j] < 1.0)]
    tokens = torch.empty(len(hot), dtype=torch.long, device=dev)
    overflow = torch.zeros(len(hot), dtype=torch.bool, device=dev)
    if plain:  # the whole row in token order: no sort at all
        at = torch.tensor(plain, device=dev)
        cum = torch.cumsum(torch.softmax(_take(x, plain, at), dim=-1), dim=-1)
        tokens[at] = _inverse_cdf(cum, ucol[at]).squeeze(1)
    if cut:
        at = torch.tensor(cut, device=dev)
        width = max(k + 1 if k else CANDIDATES for k in (ks[j] for j in cut))
        whole = not all(ks[j] for j in cut)
        got, over = _draw_cut(_take(x, cut, at), kcol[at], pcol[at], ucol[at], min(width, v),
                              whole)  # fmt: skip
        tokens[at], overflow[at] = got, over
    nan = torch.isnan(x).any(dim=-1)
    back = torch.cat([picks.index_copy(0, rows, tokens), overflow.long(), nan.long()]).tolist()
    if any(back[-len(hot) :]):
        raise GenerationError("the model's logits hold NaN: nothing to sample from")
    out = [int(t) for t in back[: len(params)]]
    again = [j for j in range(len(hot)) if back[len(params) + j]]
    if again:  # the kept tokens may go on past the candidates: the whole row, sorted
        at = torch.tensor(again, device=dev)
        got, _ = _draw_cut(x[at], kcol[at], pcol[at], ucol[at], v)
        for j, t in zip(again, got.tolist(), strict=True):
            out[hot[j]] = int(t)
    return out


def _take(x: torch.Tensor, rows: list[int], index: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``x`` (``index``: the same on its device): ``x`` itself when they
    are all of its rows in order (no copy of a [B, vocabulary] tensor)."""
    return x if rows == list(range(x.shape[0])) else x[index]


def _draw_cut(
    x: torch.Tensor,
    k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    width: int,
    whole_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of scaled logits ``x`` ``[n, V]`` cut to top-k (``k`` ``[n, 1]``, 0: none) and
    top-p (``[n, 1]``, 2: none), drawn at ``u`` ``[n, 1]`` among the ``width`` largest:
    the token ids ``[n]``, and whether each row's kept tokens reach the last candidate
    (then the draw may be wrong unless ``width`` is the whole row). ``whole_rows``: some
    row has no top-k (False saves a pass over every row)."""
    v = x.shape[-1]
    if width >= v:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    else:  # topk's order among equal values is its own: make it the stable sort's
        vals, idx = torch.topk(x, width, dim=-1)
        by_id = torch.argsort(idx, dim=-1)
        vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
        order = torch.argsort(vals, dim=-1, descending=True, stable=True)
        vals, idx = vals.gather(1, order), idx.gather(1, order)
    has_k = k > 0
    kth = vals.gather(1, (k.clamp(min=1) - 1).clamp(max=width - 1))
    keep = (vals >= kth) | ~has_k
    # renormalised over the top-k set (within the candidates), or over the whole row
    masked = vals.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    if whole_rows:  # rows without a top-k: over the whole row, candidates or not
        lse = torch.where(has_k, lse, torch.logsumexp(x, dim=-1, keepdim=True))
    probs = torch.exp(masked - lse)
    keep &= torch.cumsum(probs, dim=-1) - probs < top_p  # a prefix, at least one token
    probs = probs.masked_fill(~keep, 0.0)
    drawn = _inverse_cdf(torch.cumsum(probs, dim=-1), u)
    last = keep.sum(dim=-1, keepdim=True) - 1  # the last kept candidate
    over = vals.gather(1, last) == vals[:, -1:] if width < v else torch.zeros_like(has_k)
    return idx.gather(1, drawn).squeeze(1), over.squeeze(1)


def _inverse_cdf(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Where each row's cumulative mass ``cum`` ``[n, m]`` first passes ``u`` ``[n, 1]``
    of its total: never an entry of zero mass, even where ``u`` rounds to 1."""
    total = cum[:, -1:]
    drawn = torch.searchsorted(cum, u * total, right=True)
    return drawn.clamp(max=(cum < total).sum(dim=-1, keepdim=True))


def _find_stop(text: str, stops: tuple[str, ...]) -> int:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "length" | "eos" | "stop"
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids)
        return n / self.decode_s if self.decode_s > 0 and n else 0.0


class TokenStream:
    """One request's sampling and stop state: feed it each step's logits, it answers the
    next token to run, or None when the request is finished."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        tokenizer: Any,
    ) -> None:
        if not prompt_ids:
            raise GenerationError("the prompt encodes to no tokens")
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.tokenizer = tokenizer
        # the model's EOS ids (``vcoind.compute.params.eos_ids``), set where it was loaded
        self.eos = getattr(tokenizer, "vcoin_eos_ids", None) or frozenset(
            {tokenizer.eos_token_id} - {None}
        )
        # the request's draws: one uniform per sampled token, from its seed
        self.rng = random.Random(params.seed) if params.temperature > 0 else None
        self.out: list[int] = []
        self.finish = "length"
        self.text: str | None = None

    def push(self, logits: torch.Tensor) -> int | None:
        return self.accept(sample_next(logits, self.params, self.rng))

    def accept(self, nxt: int) -> int | None:
        p = self.params
        if nxt in self.eos:
            self.finish = "eos"
            return None
        self.out.append(nxt)
        if p.stop:
            text = self.tokenizer.decode(self.out, skip_special_tokens=True)
            cut = _find_stop(text, p.stop)
            if cut >= 0:
                self.text, self.finish = text[:cut], "stop"
                return None
        return nxt if len(self.out) < p.max_new_tokens else None

    def result(self, prefill_s: float, decode_s: float) -> GenerationResult:
        text = self.text
        if text is None:
            text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        return GenerationResult(text=text, token_ids=tuple(self.out),
                                prompt_tokens=self.prompt_tokens, finish_reason=self.finish,
                                prefill_s=prefill_s, decode_s=decode_s)  # fmt: skip


# Called after each sampled token with the ids generated so far: the stream's own list,
# which grows on: copy it to keep it.
OnToken = Callable[[Sequence[int]], None]


class GenerationCancelled(Exception):
    """The request was cancelled between two tokens."""


def decode_loop(
    prompt_ids: Sequence[int],
    params: GenerationParams,
    forward: Callable[[list[int]], torch.Tensor],
    tokenizer: Any,
    max_positions: int,
    *,
    on_token: OnToken | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Prefill then decode with ``forward(new token ids) -> logits of the last position``
    (an engine slot, or a model with its own KV cache): sampling, EOS, stop strings."""
    stream = TokenStream(prompt_ids, params, tokenizer)
    if len(prompt_ids) + params.max_new_tokens > max_positions:
        raise GenerationError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens exceeds the model's "
            f"context of {max_positions}"
        )
    t0 = time.perf_counter()
    nxt = stream.push(forward(list(prompt_ids)))
    t1 = time.perf_counter()
    while nxt is not None:
        if on_token is not None:
            on_token(stream.out)
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        nxt = stream.push(forward([nxt]))
    if on_token is not None and stream.out:
        on_token(stream.out)
    return stream.result(t1 - t0, time.perf_counter() - t1)

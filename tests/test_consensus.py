"""Consensus math: golden vectors plus properties.

The vectors in ``tests/vectors/consensus/`` were written once from the formulas in the
module docstrings, with an independent reference calculation, not by running these
modules: exact ``fractions.Fraction`` arithmetic rounded once at the end, the textbook
O(n*m) dynamic programme for the longest common subsequence, line-by-line regexes for the
structure profile, and for ``outcome.json`` pycryptodome's keccak, the ABI words laid out
by hand (domain || 16 zero bytes || task id || result hash || model id || uint256(decision))
and ``eth_keys.PrivateKey.sign_msg_hash`` over
``keccak256(b"\\x19Ethereum Signed Message:\\n32" || digest)`` with v = 27 + recovery id.
Each case carries a short note with its arithmetic. Floats are compared exactly: every
function rounds to 6 dp.

``tally.json`` is different: it composes the functions above (similarity matrix, vote,
quality, confidence, result hash) and its expected outcomes were captured from
``vcoind.consensus.tally`` itself when it moved there from ``vcoind/market/``, with fixed
4-dimensional embeddings in place of the model's. It pins that composition: a change to
any of it changes consensus, and every node must tally alike.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from vcoind.consensus import confidence as conf_mod
from vcoind.consensus import outcome, reputation, similarity, voting, weights
from vcoind.consensus.tally import Outcome, Revealed, tally

VECTORS = Path(__file__).parent / "vectors" / "consensus"


def _load(name: str) -> Any:
    return json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))


def _cases(name: str) -> pytest.MarkDecorator:
    cases = _load(name)
    return pytest.mark.parametrize("case", cases, ids=[c["name"] for c in cases])


# --- golden vectors -------------------------------------------------------------------


@_cases("similarity")
def test_similarity_vectors(case: dict[str, Any]) -> None:
    fn = getattr(similarity, case["fn"])
    assert fn(**case["input"]) == case["expected"]


@_cases("weights")
def test_weights_vectors(case: dict[str, Any]) -> None:
    assert weights.node_weight(weights.NodeRecord(**case["input"])) == case["expected"]


@_cases("voting")
def test_voting_vectors(case: dict[str, Any]) -> None:
    r = voting.vote(**case["input"])
    e = case["expected"]
    assert r == voting.VoteResult(
        decision=e["decision"],
        share=e["share"],
        winner=tuple(e["winner"]),
        answer=e["answer"],
        agreed=tuple(e["agreed"]),
        clusters=tuple(tuple(c) for c in e["clusters"]),
        shares=tuple(e["shares"]),
    )
    assert r.decision in voting.DECISIONS


@_cases("confidence")
def test_confidence_vectors(case: dict[str, Any]) -> None:
    args, expected = case["input"], case["expected"]
    if case["fn"] == "quality":
        assert conf_mod.quality(**args) == conf_mod.Quality(**expected)
    elif case["fn"] == "confidence":
        q = conf_mod.Quality(**args["quality"])
        assert conf_mod.confidence(args["share"], q) == expected
    else:
        assert getattr(conf_mod, case["fn"])(**args) == expected


@_cases("reputation")
def test_reputation_vectors(case: dict[str, Any]) -> None:
    fn = getattr(reputation, case["fn"])
    if "error" in case:
        with pytest.raises(ValueError):
            fn(**case["input"])
    else:
        assert fn(**case["input"]) == case["expected"]


def test_outcome_vector() -> None:
    v = _load("outcome")
    rh = outcome.result_hash(v["text"])
    assert rh.hex() == v["result_hash"]
    salt = bytes.fromhex(v["salt"])
    c = outcome.commitment(v["task_id"], v["committer"], v["attempt"], rh, salt)
    assert c.hex() == v["commitment"]
    # bound to its committer and attempt: another peer or attempt commits differently
    assert outcome.commitment(v["task_id"], v["committer"][:-1] + "x", v["attempt"], rh,
                              salt) != c  # fmt: skip
    assert outcome.commitment(v["task_id"], v["committer"], v["attempt"] + 1, rh, salt) != c
    assert outcome.task_id_bytes32(v["task_id"]).hex() == v["task_id_bytes32"]
    assert outcome.model_id_bytes32(v["model_id"]).hex() == v["model_id_bytes32"]


@_cases("tally")
def test_tally_vectors(case: dict[str, Any]) -> None:
    args = case["input"]
    results = [
        Revealed(r["peer_id"], r["attempt"], r["text"], tuple(r["token_ids"]), r["finish_reason"])
        for r in args["results"]
    ]
    if "error" in case:
        with pytest.raises(ValueError):
            tally(results, args["weights"], args["prompt_vec"], args["answer_vecs"])
        return
    got = tally(results, args["weights"], args["prompt_vec"], args["answer_vecs"])
    e = case["expected"]
    assert got == Outcome(
        decision=e["decision"],
        share=e["share"],
        confidence=e["confidence"],
        action=e["action"],
        answer=e["answer"],
        agreed=tuple(e["agreed"]),
        similarity=tuple(tuple(row) for row in e["similarity"]),
        weights=tuple(e["weights"]),
        result_hash=bytes.fromhex(e["result_hash"]),
    )
    assert got.view(results) == e["view"]


# --- similarity properties ------------------------------------------------------------

_WORDS = ["the", "cat", "sat", "mat", "Paris", "France", "is", "42", "über", "code", "a"]


def _random_text(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(0, 25)):
        parts.append(rng.choice(_WORDS))
        parts.append(rng.choice([" ", " ", ". ", "\n", "\n\n", "\n- ", "\n```\n", "! ", ", "]))
    return "".join(parts)


def _random_vec(rng: random.Random) -> list[float] | None:
    if rng.random() < 0.2:
        return None
    return [rng.uniform(-1, 1) for _ in range(4)]


def _lcs_dp(a: list[str], b: list[str]) -> int:
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
    return m[-1][-1]


def test_lcs_matches_dynamic_programme() -> None:
    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert similarity.lcs_length(a, b) == _lcs_dp(a, b) == similarity.lcs_length(b, a)


def test_similarity_symmetric_and_bounded() -> None:
    rng = random.Random(1)
    for _ in range(300):
        a, b = _random_text(rng), _random_text(rng)
        ea, eb = _random_vec(rng), _random_vec(rng)
        s = similarity.similarity(a, b, ea, eb)
        assert s == similarity.similarity(b, a, eb, ea)
        assert 0.0 <= s <= 1.0
        assert s == round(s, 6)
        for f in (similarity.lexical_similarity, similarity.structure_similarity):
            assert 0.0 <= f(a, b) == f(b, a) <= 1.0
        if ea is not None and eb is not None:
            assert 0.0 <= similarity.cosine(ea, eb) == similarity.cosine(eb, ea) <= 1.0


def test_similarity_matrix_shape() -> None:
    rng = random.Random(2)
    texts = [_random_text(rng) for _ in range(5)]
    embs = [_random_vec(rng) for _ in range(5)]
    m = similarity.similarity_matrix(texts, embs)
    assert all(m[i][i] == 1.0 for i in range(5))
    assert all(m[i][j] == m[j][i] for i in range(5) for j in range(5))
    with pytest.raises(ValueError):
        similarity.similarity_matrix(texts, embs[:4])
    with pytest.raises(ValueError):
        similarity.cosine([1.0, 2.0], [1.0])


def test_long_answers_are_cheap() -> None:
    rng = random.Random(3)
    a = " ".join(rng.choice(_WORDS) for _ in range(5000))
    b = " ".join(rng.choice(_WORDS) for _ in range(5000))
    assert 0.0 < similarity.lexical_similarity(a, b) < 1.0


# --- voting properties ----------------------------------------------------------------


def test_vote_invariant_under_weight_scaling() -> None:
    rng = random.Random(4)
    for _ in range(200):
        n = rng.randint(1, 6)
        sim = [[1.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                sim[i][j] = sim[j][i] = round(rng.random(), 6)
        w = [round(rng.uniform(0.1, 1.0), 6) for _ in range(n)]
        base = voting.vote(sim, w)
        for k in (2.0, 0.5, 3.0, 1000.0):
            assert voting.vote(sim, [x * k for x in w]) == base
        assert voting.vote(sim, w) == base  # no hidden state


def test_junk_of_three_answers() -> None:
    texts = [
        "The capital of France is Paris.",
        "Paris is the capital of France.",
        "zxq blorp 42 !!",
    ]
    embs = [[0.6, 0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]]
    sim = similarity.similarity_matrix(texts, embs)
    equal = voting.vote(sim, [0.5, 0.5, 0.5])
    assert equal.decision == "majority"
    assert equal.winner == (0, 1) and equal.agreed == (True, True, False)
    heavy = voting.vote(sim, [0.6, 0.5, 0.4])
    assert heavy.decision == "supermajority" and heavy.answer == 0


def test_unanimous_identical_answers_are_accepted_whatever_the_relevance() -> None:
    sim = similarity.similarity_matrix(["ggg xq"] * 3, [None] * 3, [[5, 9, 9]] * 3)
    v = voting.vote(sim, [0.2, 0.9, 0.5])
    assert v.decision == "supermajority" and v.share == 1.0
    for relevance in (0.0, 0.01, 0.5):
        for comp in (0.0, 0.7, 1.0):
            q = conf_mod.quality(relevance, sim, v.winner, comp)
            assert conf_mod.action(conf_mod.confidence(v.share, q)) == "accept"


def test_vote_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        voting.vote([], [])
    with pytest.raises(ValueError):
        voting.vote([[1.0]], [-1.0])
    with pytest.raises(ValueError):
        voting.vote([[1.0]], [float("nan")])
    with pytest.raises(ValueError):
        voting.vote([[1.0, 0.0]], [1.0, 1.0])


# --- outcome properties ---------------------------------------------------------------

_TASK = "0123456789abcdef0123456789abcdef"


def test_outcome_input_validation() -> None:
    rh = outcome.result_hash("x")
    with pytest.raises(ValueError):
        outcome.commitment(_TASK, "peer", 1, rh, b"\x00" * 31)
    with pytest.raises(ValueError):
        outcome.commitment(_TASK, "peer", 1, rh[:31], b"\x00" * 32)
    with pytest.raises(ValueError):
        outcome.commitment(_TASK, "", 1, rh, b"\x00" * 32)
    with pytest.raises(ValueError):
        outcome.commitment(_TASK, "peer", -1, rh, b"\x00" * 32)
    for bad in ("0123", _TASK.upper(), _TASK + "00", "g" * 32):
        with pytest.raises(ValueError):
            outcome.task_id_bytes32(bad)
    for bad in ("ab" * 32, "sha256:" + "AB" * 32, "sha256:" + "ab" * 31, "sha1:" + "ab" * 32):
        with pytest.raises(ValueError):
            outcome.model_id_bytes32(bad)


# --- the real embedding model ---------------------------------------------------------


def test_embedder_paraphrase_beats_unrelated() -> None:
    from vcoind.consensus.embedding import Embedder

    e = Embedder(cache_size=8)
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue fell by ten percent.",
    ]
    a, b, c = e.embed(texts)
    assert len(a) == 384 and all(x == round(x, 6) for x in a)
    assert similarity.cosine(a, b) > similarity.cosine(a, c) + 0.3
    assert e.cache_info().misses == 3 and e.cache_info().hits == 0
    again = e.embed([texts[1], texts[1]])
    assert again == [b, b]
    assert e.cache_info().hits == 1 and e.cache_info().misses == 3
    assert e.embed([]) == []

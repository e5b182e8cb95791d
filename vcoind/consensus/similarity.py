"""Similarity of two replica answers, a pure function of their texts, embeddings and tokens.

    similarity = W_SEMANTIC * cosine(emb_a, emb_b)
               + W_LEXICAL * lexical_similarity(a, b)
               + W_STRUCTURE * structure_similarity(a, b)

with a short cut to 1.0 for identical token streams or identical texts. Every public
function returns a float in [0, 1] rounded with ``round(x, 6)`` (IEEE-754 double, Python's
correctly rounded ``round``), so every node computes the same value. Sums are written in
the order they appear in the docstrings; the final rounding hides any last-bit difference
in practice.

Tokenizer (lexical part): ``re.findall(r"\\w+", text.lower())`` with Python's Unicode
``\\w`` (letters, digits, underscore of any script). Texts are compared as given (no Unicode
normalisation); replicas decode the same tokens into the same text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

W_SEMANTIC = 0.5
W_LEXICAL = 0.3
W_STRUCTURE = 0.2

# Without embeddings the semantic weight is shared out in proportion: 0.3/0.5 and 0.2/0.5.
W_LEXICAL_NO_EMBEDDING = 0.6
W_STRUCTURE_NO_EMBEDDING = 0.4

# Lexical similarity: equal parts set overlap (Jaccard) and order-aware overlap (ROUGE-L F1).
W_JACCARD = 0.5
W_ROUGE_L = 0.5

# Structure profile weights, in summation order.
W_STRUCT_LENGTH = 0.3
W_STRUCT_PARAGRAPHS = 0.2
W_STRUCT_LIST_ITEMS = 0.2
W_STRUCT_CODE_BLOCKS = 0.15
W_STRUCT_SENTENCES = 0.15

_WORD = re.compile(r"\w+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+\S", re.MULTILINE)
_CODE_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def _clamp01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def tokenize(text: str) -> list[str]:
    """Word tokens: ``re.findall(r"\\w+", text.lower())`` (Unicode ``\\w``)."""
    return _WORD.findall(text.lower())


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    """Cosine similarity clamped to [0, 1], rounded to 6 dp.

    ``dot = fsum(u[i] * v[i])``, ``nu = fsum(u[i]**2)``, ``nv = fsum(v[i]**2)`` (``math.fsum``:
    correctly rounded sums), ``c = dot / (sqrt(nu) * sqrt(nv))``; the result is
    ``round(min(1, max(0, c)), 6)``: opposite or orthogonal meaning counts as 0. If either
    vector is all zeros (or empty) the result is 0.0. Vectors of different lengths raise
    ValueError.
    """
    if len(u) != len(v):
        raise ValueError(f"vector lengths differ: {len(u)} != {len(v)}")
    nu = math.fsum(x * x for x in u)
    nv = math.fsum(y * y for y in v)
    if nu == 0.0 or nv == 0.0:
        return 0.0
    dot = math.fsum(x * y for x, y in zip(u, v, strict=True))
    return round(_clamp01(dot / (math.sqrt(nu) * math.sqrt(nv))), 6)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Crochemore et al. 2001): O(len(b)) big-integer steps, so long answers stay
    cheap. Equal to the textbook dynamic programme; the tests check that.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def lexical_similarity(a: str, b: str) -> float:
    """Word overlap in [0, 1], rounded to 6 dp.

    With ``A = tokenize(a)``, ``B = tokenize(b)`` (token lists, see the module docstring):
    both empty -> 1.0; exactly one empty -> 0.0; otherwise

        jaccard = |set(A) & set(B)| / |set(A) | set(B)|
        rouge_l = 2 * LCS(A, B) / (len(A) + len(B))      (ROUGE-L F1 with beta = 1)
        result  = round(0.5 * jaccard + 0.5 * rouge_l, 6)

    where LCS is the length of the longest common subsequence of the token lists.
    """
    ta, tb = tokenize(a), tokenize(b)
    if not ta and not tb:
        return 1.0
    if not ta or not tb:
        return 0.0
    sa, sb = set(ta), set(tb)
    jaccard = len(sa & sb) / len(sa | sb)
    rouge_l = 2 * lcs_length(ta, tb) / (len(ta) + len(tb))
    return round(W_JACCARD * jaccard + W_ROUGE_L * rouge_l, 6)


def structure_profile(text: str) -> tuple[int, int, int, int, int]:
    """The counts compared by ``structure_similarity``, in this order:

    - length: ``len(text.strip())`` in code points;
    - paragraphs: parts of ``re.split(r"\\n[ \\t\\r\\f\\v]*\\n", text)`` that contain a
      non-whitespace character (blocks separated by blank lines);
    - list items: lines matching ``^[ \\t]*(?:[-*+•]|\\d+[.)])[ \\t]+\\S`` (bullets ``- * + •``
      or ``1.`` / ``1)`` followed by content);
    - code blocks: ``(f + 1) // 2`` where ``f`` counts lines starting (after spaces/tabs) with
      three backticks; an unclosed fence (truncated answer) still counts as a block;
    - sentences: parts of ``re.split(r"[.!?]+(?=\\s|$)", text)`` that contain a ``\\w``
      character (so "3.14" does not end a sentence).
    """
    length = len(text.strip())
    paragraphs = sum(1 for p in _PARAGRAPH_BREAK.split(text) if p.strip())
    list_items = len(_LIST_ITEM.findall(text))
    code_blocks = (len(_CODE_FENCE.findall(text)) + 1) // 2
    sentences = sum(1 for s in _SENTENCE_END.split(text) if _WORD.search(s))
    return length, paragraphs, list_items, code_blocks, sentences


def _count_ratio(x: int, y: int) -> float:
    if x == y:
        return 1.0
    return min(x, y) / max(x, y)


def structure_similarity(a: str, b: str) -> float:
    """Similarity of the shape of two answers in [0, 1], rounded to 6 dp.

    For the profiles ``(length, paragraphs, list_items, code_blocks, sentences)`` of
    ``structure_profile``, each pair of counts ``(x, y)`` gives ``r = min(x, y) / max(x, y)``,
    with ``r = 1`` when ``x == y`` (including both 0). The result is

        round(0.3 * r_length + 0.2 * r_paragraphs + 0.2 * r_list_items
              + 0.15 * r_code_blocks + 0.15 * r_sentences, 6)

    summed left to right. Two empty texts give 1.0.
    """
    pa, pb = structure_profile(a), structure_profile(b)
    weights = (
        W_STRUCT_LENGTH,
        W_STRUCT_PARAGRAPHS,
        W_STRUCT_LIST_ITEMS,
        W_STRUCT_CODE_BLOCKS,
        W_STRUCT_SENTENCES,
    )
    total = 0.0
    for w, x, y in zip(weights, pa, pb, strict=True):
        total += w * _count_ratio(x, y)
    return round(_clamp01(total), 6)


def similarity(
    a: str,
    b: str,
    emb_a: Sequence[float] | None,
    emb_b: Sequence[float] | None,
    tokens_a: Sequence[int] | None = None,
    tokens_b: Sequence[int] | None = None,
) -> float:
    """Similarity of two answers in [0, 1], rounded to 6 dp.

    1.0 if both token streams are given and equal element by element, or if ``a == b``.
    Otherwise, with ``cos = cosine(emb_a, emb_b)``, ``lex = lexical_similarity(a, b)`` and
    ``st = structure_similarity(a, b)`` (each already rounded to 6 dp):

        both embeddings given:  round(0.5 * cos + 0.3 * lex + 0.2 * st, 6)
        an embedding missing:   round(0.6 * lex + 0.4 * st, 6)

    An embedding is missing when it is None or empty.
    """
    if tokens_a is not None and tokens_b is not None and list(tokens_a) == list(tokens_b):
        return 1.0
    if a == b:
        return 1.0
    lex = lexical_similarity(a, b)
    st = structure_similarity(a, b)
    if emb_a is None or emb_b is None or len(emb_a) == 0 or len(emb_b) == 0:
        return round(_clamp01(W_LEXICAL_NO_EMBEDDING * lex + W_STRUCTURE_NO_EMBEDDING * st), 6)
    cos = cosine(emb_a, emb_b)
    return round(_clamp01(W_SEMANTIC * cos + W_LEXICAL * lex + W_STRUCTURE * st), 6)


def similarity_matrix(
    texts: Sequence[str],
    embeddings: Sequence[Sequence[float] | None],
    token_streams: Sequence[Sequence[int] | None] | None = None,
) -> list[list[float]]:
    """The n x n matrix ``m[i][j] = similarity(texts[i], texts[j], embeddings[i], ...)``.

    Symmetric by construction (each pair i < j is computed once and mirrored), diagonal 1.0.
    ``embeddings`` (and ``token_streams`` when given) must have one entry per text, else
    ValueError.
    """
    n = len(texts)
    if len(embeddings) != n:
        raise ValueError(f"{len(embeddings)} embeddings for {n} texts")
    if token_streams is not None and len(token_streams) != n:
        raise ValueError(f"{len(token_streams)} token streams for {n} texts")
    tokens: Sequence[Sequence[int] | None] = (
        token_streams if token_streams is not None else [None] * n
    )
    m = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            s = similarity(texts[i], texts[j], embeddings[i], embeddings[j], tokens[i], tokens[j])
            m[i][j] = m[j][i] = s
    return m

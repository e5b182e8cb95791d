"""Sentiment of news and posts, and one index over a time range.

Per text: VADER's compound score (its own lexicon, from PyPI), averaged with a
FinBERT-style transformers classifier (p(positive) - p(negative)) when one is configured
from a local directory, then blended 70/30 with a crypto keyword dictionary when the text
has any of its words. Per article: title 40 %, body 60 %.

Over a range: each article weighs ``credibility(source) * 0.5 ** (age / half_life)``
(half-life a quarter of the range: recent news counts more). The index is the weighted
mean in [-1, 1]; volatility the weighted standard deviation; confidence grows with the
effective number of articles and shrinks with volatility.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcoind.oracle.news import Article

TITLE_WEIGHT = 0.4
KEYWORD_BLEND = 0.3
RANGES = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}

# Crypto-market words VADER's general lexicon misses or misreads.
KEYWORDS: dict[str, float] = {
    "partnership": 0.5, "listing": 0.4, "listed": 0.4, "mainnet": 0.3, "launch": 0.3,
    "upgrade": 0.3, "adoption": 0.5, "integration": 0.3, "all-time high": 0.7,
    "rally": 0.5, "surge": 0.5, "bullish": 0.6, "record high": 0.6, "breakout": 0.4,
    "hack": -0.8, "hacked": -0.8, "exploit": -0.8, "scam": -0.9, "fraud": -0.9,
    "rug pull": -0.9, "lawsuit": -0.6, "sec charges": -0.7, "delist": -0.7,
    "delisted": -0.7, "outage": -0.5, "bearish": -0.6, "sell-off": -0.5, "crash": -0.6,
    "plunge": -0.6, "dump": -0.5, "ponzi": -0.9, "vulnerability": -0.5,
}  # fmt: skip

# Source credibility (case-insensitive prefix match on the source name); others 0.6.
CREDIBILITY: dict[str, float] = {
    "reuters": 1.0, "bloomberg": 1.0, "associated press": 1.0, "financial times": 1.0,
    "coindesk": 0.9, "the block": 0.85, "decrypt": 0.8, "cointelegraph": 0.8,
    "reddit/": 0.5,
}  # fmt: skip
DEFAULT_CREDIBILITY = 0.6

_WORDS = {k: re.compile(r"\b" + re.escape(k) + r"\b", re.IGNORECASE) for k in KEYWORDS}


def keyword_hits(text: str) -> list[tuple[str, float]]:
    return [(k, KEYWORDS[k]) for k, rx in _WORDS.items() if rx.search(text)]


def credibility(source: str) -> float:
    s = source.lower()
    return next((w for k, w in CREDIBILITY.items() if s.startswith(k)), DEFAULT_CREDIBILITY)


class Classifier:
    """A sequence classifier from a local directory whose labels include positive and
    negative (FinBERT's are positive/negative/neutral)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if "positive" not in labels or "negative" not in labels:
            raise ValueError(f"{path}: labels {sorted(labels)} lack positive/negative")
        self.pos, self.neg = labels["positive"], labels["negative"]

    def score(self, texts: Sequence[str]) -> list[float]:
        import torch

        if not texts:
            return []
        with torch.inference_mode():
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")  # fmt: skip
            probs = torch.softmax(self.model(**enc).logits.float(), dim=-1)
        return [float(p[self.pos] - p[self.neg]) for p in probs]


@dataclass(frozen=True)
class Scored:
    article: Article
    score: float  # [-1, 1]
    title: float
    body: float | None
    keywords: tuple[str, ...]


class SentimentModel:
    def __init__(self, classifier: Classifier | None = None) -> None:
        from vaderSentiment.vaderSentiment import (  # type: ignore[import-untyped]
            SentimentIntensityAnalyzer,
        )

        self.vader = SentimentIntensityAnalyzer()
        self.classifier = classifier

    def text_scores(self, texts: Sequence[str]) -> list[tuple[float, tuple[str, ...]]]:
        vader = [float(self.vader.polarity_scores(t)["compound"]) for t in texts]
        if self.classifier is not None:
            model = [(v + c) / 2 for v, c in zip(vader, self.classifier.score(texts), strict=True)]
        else:
            model = vader
        out = []
        for t, m in zip(texts, model, strict=True):
            hits = keyword_hits(t)
            if hits:
                kw = sum(w for _, w in hits) / len(hits)
                m = (1 - KEYWORD_BLEND) * m + KEYWORD_BLEND * kw
            out.append((max(-1.0, min(1.0, m)), tuple(k for k, _ in hits)))
        return out

    def score(self, articles: Sequence[Article]) -> list[Scored]:
        titles = self.text_scores([a.title for a in articles])
        bodies = self.text_scores([a.body or a.title for a in articles])
        out = []
        for a, (t, tk), (b, bk) in zip(articles, titles, bodies, strict=True):
            s = TITLE_WEIGHT * t + (1 - TITLE_WEIGHT) * b if a.body else t
            out.append(Scored(a, s, t, b if a.body else None, tuple(sorted(set(tk + bk)))))
        return out


def aggregate(scored: Sequence[Scored], now: float, range_s: float) -> dict[str, Any]:
    """The index over articles published in ``(now - range_s, now]``; see the module doc."""
    half_life = range_s / 4
    rows = [s for s in scored if now - range_s < s.article.published_at <= now + 300]
    if not rows:
        return {"sentiment_score": 0.0, "confidence": 0.0, "volatility": 0.0, "articles": 0,
                "factors": {"note": "no articles in range"}}  # fmt: skip
    w = [credibility(s.article.source) * 0.5 ** (max(0.0, now - s.article.published_at)
                                                  / half_life) for s in rows]  # fmt: skip
    total = sum(w)
    index = sum(wi * s.score for wi, s in zip(w, rows, strict=True)) / total
    var = sum(wi * (s.score - index) ** 2 for wi, s in zip(w, rows, strict=True)) / total
    vol = math.sqrt(var)
    n_eff = total**2 / sum(wi * wi for wi in w)  # Kish's effective sample size
    confidence = (1 - math.exp(-n_eff / 5)) * max(0.0, 1 - vol)
    kw: dict[str, int] = {}
    for s in rows:
        for k in s.keywords:
            kw[k] = kw.get(k, 0) + 1
    by_source: dict[str, int] = {}
    for s in rows:
        by_source[s.article.source] = by_source.get(s.article.source, 0) + 1
    ranked = sorted(rows, key=lambda s: s.score)
    return {
        "sentiment_score": round(index, 4),
        "label": "positive" if index > 0.15 else "negative" if index < -0.15 else "neutral",
        "confidence": round(confidence, 4),
        "volatility": round(vol, 4),
        "articles": len(rows),
        "effective_articles": round(n_eff, 2),
        "factors": {
            "keywords": dict(sorted(kw.items(), key=lambda kv: -kv[1])[:10]),
            "sources": by_source,
            "most_negative": {"title": ranked[0].article.title, "score": round(ranked[0].score, 4)},
            "most_positive": {"title": ranked[-1].article.title,
                              "score": round(ranked[-1].score, 4)},
        },
    }  # fmt: skip

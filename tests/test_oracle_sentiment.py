"""News connectors, text cleaning, the sentiment model (VADER exact, keywords, a real
transformers classifier built locally) and the time- and credibility-weighted index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_oracle import Sleeps, replay
from vcoind.oracle.news import Article, NewsAPI, Reddit, clean_text
from vcoind.oracle.sentiment import Classifier, SentimentModel, aggregate, credibility
from vcoind.oracle.service import OracleService, OracleSettings
from vcoind.oracle.sources import SourceError
from vcoind.store import OracleStore, Store

NEWS = Path(__file__).parent / "vectors" / "news"
EVERYTHING = json.loads((NEWS / "newsapi_everything_qubic.json").read_text())
LISTING = json.loads((NEWS / "reddit_search_qubic.json").read_text())
NOW = 1795608000.0  # 2026-11-25T12:00Z


def client(routes: dict[str, Any]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=replay(routes))


def test_clean_text() -> None:
    raw = "Big <b>news</b> &amp; more https://x.example/a?b=1 here… [+2311 chars]"
    assert clean_text(raw) == "Big news & more here"
    assert clean_text(None) == "" and clean_text("  a \n\t b ") == "a b"


async def test_newsapi_and_reddit_parse_documented_responses() -> None:
    api = NewsAPI(
        "newsapi",
        client({"/everything": EVERYTHING}),
        "https://n.example/v2",
        api_key="k",
        key_header="x-api-key",
        sleep=Sleeps(),
    )
    arts = await api.articles("Qubic")
    assert len(arts) == 6  # the [Removed] one is skipped
    assert arts[1].source == "Reuters" and arts[1].title.startswith("Exchange announces")
    assert "&amp;" not in arts[1].body and "[+" not in arts[0].body
    assert "https://" not in arts[0].body and "<p>" not in arts[0].body
    assert arts[0].published_at == pytest.approx(1795597200.0)
    posts = await Reddit(
        "reddit", client({"/search.json": LISTING}), "https://r.example", sleep=Sleeps()
    ).posts("Qubic")
    assert [p.source for p in posts] == ["reddit/r/CryptoCurrency"] * 2
    assert posts[0].url.endswith("/comments/p0/post/")


async def test_newsapi_errors_are_clear() -> None:
    err = httpx.Response(401, json=json.loads((NEWS / "newsapi_error_401.json").read_text()))
    api = NewsAPI(
        "newsapi",
        client({"/everything": err}),
        "https://n.example/v2",
        api_key="bad",
        key_header="x-api-key",
        sleep=Sleeps(),
    )
    with pytest.raises(SourceError, match=r"refused \(HTTP 401\).*apiKeyInvalid"):
        await api.articles("Qubic")
    keyless = NewsAPI("newsapi", client({}), "https://n.example/v2", sleep=Sleeps())
    with pytest.raises(SourceError, match=r"no API key \(oracle.newsapi_key\)"):
        await keyless.articles("Qubic")


def test_vader_path_is_exact_and_keywords_blend() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    model = SentimentModel()
    arts = [
        Article(
            "Decrypt",
            "Qubic price dips as the market cools",
            "Analysts called the move a routine correction.",
            "u1",
            NOW,
        ),
        Article("Some Blog", "Is Qubic a scam?", "Critics warn of a rug pull.", "u2", NOW),
    ]
    plain, scam = model.score(arts)
    assert plain.keywords == ()
    want = (
        0.4 * vader.polarity_scores(arts[0].title)["compound"]
        + 0.6 * vader.polarity_scores(arts[0].body)["compound"]
    )
    assert plain.score == pytest.approx(want, abs=1e-12)
    assert set(scam.keywords) == {"scam", "rug pull"}
    t = vader.polarity_scores(arts[1].title)["compound"]
    assert scam.title == pytest.approx(0.7 * t + 0.3 * -0.9)  # VADER 70 %, keywords 30 %
    assert scam.score < 0


def scored(items: list[tuple[str, float, float]]) -> list[Any]:
    """(source, score, age in hours) -> Scored rows."""
    from vcoind.oracle.sentiment import Scored

    return [
        Scored(Article(src, f"t{i}", "", f"u{i}", NOW - age * 3600), s, s, None, ())
        for i, (src, s, age) in enumerate(items)
    ]


def test_index_weights_recent_news_and_credible_sources() -> None:
    recent = aggregate(scored([("Decrypt", 0.8, 1), ("Decrypt", -0.8, 20)]), NOW, 86400)
    assert recent["sentiment_score"] > 0.3  # 1 h old outweighs 20 h old (half-life 6 h)
    credible = aggregate(scored([("Reuters", -0.6, 2), ("reddit/r/x", 0.6, 2)]), NOW, 86400)
    assert credible["sentiment_score"] == pytest.approx((-0.6 * 1.0 + 0.6 * 0.5) / 1.5, abs=1e-4)
    agree = aggregate(scored([("Reuters", 0.5, h) for h in range(8)]), NOW, 86400)
    mixed = aggregate(scored([("Reuters", (-1) ** h * 0.5, h) for h in range(8)]), NOW, 86400)
    assert agree["volatility"] == 0 and mixed["volatility"] > 0.4
    assert agree["confidence"] > mixed["confidence"] > 0
    old = aggregate(scored([("Reuters", 0.5, 30)]), NOW, 86400)
    assert old["articles"] == 0 and old["confidence"] == 0  # outside the range
    assert credibility("CoinDesk") == 0.9 and credibility("Nobody Times") == 0.6


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT sequence classifier (positive/negative/neutral) with its own
    WordPiece tokenizer, saved like a FinBERT checkout."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("finbert-tiny")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [a["title"] or "" for a in EVERYTHING["articles"]] * 3
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(out))
    cfg = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "positive", 1: "negative", 2: "neutral"},
        label2id={"positive": 0, "negative": 1, "neutral": 2},
    )
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    return out


def test_classifier_path_runs_end_to_end(classifier_dir: Path) -> None:
    clf = Classifier(classifier_dir)
    got = clf.score(["Qubic listing announced", "Qubic hacked, funds lost"])
    assert len(got) == 2 and all(-1 <= g <= 1 for g in got) and got[0] != got[1]
    with_clf, vader_only = SentimentModel(clf), SentimentModel()
    art = [Article("Reuters", "Qubic listing announced", "A good day.", "u", NOW)]
    a, b = (
        with_clf.text_scores(["A good day."])[0][0],
        vader_only.text_scores(["A good day."])[0][0],
    )
    assert a == pytest.approx((b + clf.score(["A good day."])[0]) / 2)
    assert with_clf.score(art)[0].score != vader_only.score(art)[0].score


async def test_sentiment_service_caches_and_survives_a_dead_source(
    tmp_path: Path, classifier_dir: Path
) -> None:
    calls: list[str] = []
    store = Store(tmp_path / "vcoin.db")
    await store.open()
    clock = {"t": 0.0}
    svc = OracleService(
        OracleSettings(
            "https://cg.example/api/v3",
            retries=0,
            newsapi_url="https://n.example/v2",
            newsapi_key="k",
            min_interval_s=0,
            reddit_url="https://r.example",
            classifier_dir=str(classifier_dir),
        ),
        OracleStore(store),
        transport=replay(
            {"/everything": EVERYTHING, "/search.json": httpx.ConnectError("down")}, calls
        ),
        clock=lambda: NOW + clock["t"],
        monotonic=lambda: clock["t"],
    )
    a = await svc.sentiment("24h")
    assert a["articles"] == 4  # four NewsAPI stories in the last 24 h; Reddit is down
    assert a["method"].startswith("VADER + classifier")
    assert [s["status"] for s in a["sources"]] == ["ok", "source unreachable: ConnectError: down"]
    assert -1 <= a["sentiment_score"] <= 1 and 0 < a["confidence"] < 1
    assert "scam" in a["factors"]["keywords"] and a["factors"]["sources"]["Reuters"] == 1
    week = await svc.sentiment("7d")  # the news fetched for 24h serves 7d too
    assert week["articles"] == 6 and len(calls) == 2
    clock["t"] += 599
    assert await svc.sentiment("24h") == a and len(calls) == 2  # cached
    clock["t"] += 1300  # past the news cache (30 min): fetched again, duplicates ignored
    b = await svc.sentiment("24h")
    assert len(calls) == 4 and b["articles"] == 4
    with pytest.raises(Exception, match="range must be one of"):
        await svc.sentiment("1y")
    await svc.aclose()

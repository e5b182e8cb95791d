"""News and social sources (NewsAPI ``/v2/everything``, Reddit search listings) and the
cleaning of their text. Same HTTP behaviour as the market connector (``HttpSource``)."""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vcoind.oracle.sources import HttpSource, SourceError

NEWSAPI_URL = "https://newsapi.org/v2"
REDDIT_URL = "https://www.reddit.com"

_TAG = re.compile(r"<[^>]+>")
_URL = re.compile(r"https?://\S+")
_TRUNCATED = re.compile(r"\s*(…|\.\.\.)?\s*\[\+\d+ chars\]\s*$")  # NewsAPI's content cut
_SPACE = re.compile(r"\s+")


def clean_text(text: str | None) -> str:
    """HTML tags and entities, links, NewsAPI's ``[+123 chars]`` tail, runs of space."""
    if not text:
        return ""
    t = html.unescape(_TAG.sub(" ", text))
    t = _TRUNCATED.sub("", _URL.sub(" ", t))
    return _SPACE.sub(" ", t).strip()


@dataclass(frozen=True)
class Article:
    source: str  # e.g. "Reuters", "reddit/r/CryptoCurrency"
    title: str
    body: str
    url: str
    published_at: float  # unix seconds

    @property
    def key(self) -> str:
        """Duplicates (the same story from two queries, or reposted) share this."""
        ident = self.url or f"{self.source}|{self.title.lower()}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _time(v: Any) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise SourceError(f"malformed response: bad time {v!r}")


class NewsAPI(HttpSource):
    async def articles(self, query: str, page_size: int = 50) -> list[Article]:
        if not self.api_key:
            self._fail("no API key (oracle.newsapi_key)")
        data = await self.get_json("/everything", {"q": query, "sortBy": "publishedAt",
                                                   "pageSize": str(page_size),
                                                   "language": "en"})  # fmt: skip
        if not isinstance(data, dict) or data.get("status") != "ok":
            msg = data.get("message") if isinstance(data, dict) else None
            self._fail(f"refused: {msg or 'no status ok'}")
        items = data.get("articles")
        if not isinstance(items, list):
            self._fail("malformed response: no articles list")
        out = []
        for a in items:
            if not isinstance(a, dict) or not isinstance(a.get("title"), str):
                continue  # a removed article ("[Removed]") or junk: skipped, not fatal
            src = a["source"] if isinstance(a.get("source"), dict) else {}
            body = " ".join(clean_text(a.get(k)) for k in ("description", "content"))
            try:
                when = _time(a.get("publishedAt"))
            except SourceError:
                continue
            out.append(Article(str(src.get("name") or "unknown"), clean_text(a["title"]),
                               body.strip(), str(a.get("url") or ""), when))  # fmt: skip
        return out


class Reddit(HttpSource):
    async def posts(self, query: str, subreddit: str = "CryptoCurrency") -> list[Article]:
        data = await self.get_json(f"/r/{subreddit}/search.json",
                                   {"q": query, "restrict_sr": "1", "sort": "new",
                                    "limit": "50"})  # fmt: skip
        try:
            children = data["data"]["children"]
            assert isinstance(children, list)
        except (KeyError, TypeError, AssertionError):
            self._fail("malformed response: no listing")
        out = []
        for c in children:
            d = c.get("data") if isinstance(c, dict) else None
            if not isinstance(d, dict) or not isinstance(d.get("title"), str):
                continue
            try:
                when = _time(d.get("created_utc"))
            except SourceError:
                continue
            link = "https://www.reddit.com" + str(d.get("permalink") or "")
            out.append(Article(f"reddit/r/{d.get('subreddit') or subreddit}",
                               clean_text(d["title"]), clean_text(d.get("selftext")),
                               link, when))  # fmt: skip
        return out

"""The devnet's chat demo: a streamed chat completion through a node's OpenAI API (/v1).

Plain HTTP and Server-Sent Events, as any OpenAI client would see them: the tokens are
printed as they arrive, then the task the request became.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vcoind.datadir import DataDir

if TYPE_CHECKING:
    from devnet.__main__ import DevNode


class ChatDemoError(Exception):
    pass


def sse_chunks(
    url: str, cookie: str | None, body: dict[str, Any], timeout: float = 120.0
) -> Iterator[dict[str, Any]]:
    """POST ``body`` with ``stream: true`` to ``url`` (a node's /v1 endpoint) and yield
    its Server-Sent Events' chunks as they arrive, up to ``[DONE]``."""
    headers = {"Authorization": f"Bearer {cookie}", "Content-Type": "application/json"}
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue  # blank separators and keep-alive comments
            if line == "data: [DONE]":
                break
            yield json.loads(line[6:])


def stream_chat(
    node: DevNode, body: dict[str, Any], timeout: float = 120.0
) -> list[dict[str, Any]]:
    """POST a streamed chat completion to ``node``; its chunks, printing the text as it
    comes."""
    url = node.info["rpc_url"].rstrip("/") + "/v1/chat/completions"
    chunks: list[dict[str, Any]] = []
    for ch in sse_chunks(url, DataDir(node.datadir).read_cookie(), body, timeout):
        if "error" in ch:
            raise ChatDemoError(ch["error"]["message"])
        chunks.append(ch)
        for choice in ch.get("choices", []):
            delta = choice.get("delta", {})
            text = delta.get("reasoning_content") or delta.get("content") or ""
            print(text, end="", flush=True)
    print(flush=True)
    return chunks


def demo_chat(origin: DevNode, question: str) -> None:
    """A chat through node ``origin``'s /v1 API, streamed; then who answered it."""
    print(f'\nchat (OpenAI API, streamed): "{question}" -> {origin.info["rpc_url"]}/v1',
          flush=True)  # fmt: skip
    t0 = time.monotonic()
    print("  ", end="", flush=True)
    chunks = stream_chat(origin, {
        "model": "tiny-qwen2", "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": question}],
    })  # fmt: skip
    last = next((ch for ch in reversed(chunks) if ch.get("vcoin")), None)
    if last is None:
        raise ChatDemoError("the stream ended without its task")
    v = last["vcoin"]
    print(f"  {len(chunks)} chunks in {time.monotonic() - t0:.2f} s; task {v['task_id']} "
          f"{v['status']} on {', '.join(v['workers'])}", flush=True)  # fmt: skip

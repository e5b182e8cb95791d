"""Chat tasks: messages as a task's input, and a reasoning model's answer split in two.

A chat task's ``input`` is its messages as canonical JSON (``messages_json``); the worker
that runs it applies its model's own chat template (``vcoind.compute.generate``), since
the origin may not hold the model. A reasoning model (DeepSeek-R1 and its distills)
writes its reasoning first and closes it with ``END_THINK`` (the chat template opens the
``<think>`` section itself); ``vcoind.gateway.openai.split_text`` splits the two.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256
END_THINK = "</think>"


class ChatError(ValueError):
    """Messages that are not a list of {"role", "content"} with known roles."""


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as plain {"role", "content"} dicts; ChatError says what is wrong.
    Content given as OpenAI's list of parts keeps its text parts."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: a non-empty list of {role, content}")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"messages: at most {MAX_MESSAGES}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}]: an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role: one of {', '.join(ROLES)} (got {role!r})")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(t, str) for t in parts) or len(parts) != len(content):
                raise ChatError(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(t) for t in parts)
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content: a string")
        out.append({"role": role, "content": content})
    return out


def messages_json(messages: Any) -> str:
    """A chat task's input: the checked messages as compact JSON."""
    return json.dumps(check_messages(messages), ensure_ascii=False, separators=(",", ":"))


def parse_messages(text: str) -> list[dict[str, str]]:
    """A chat task's messages back from its input; ChatError if they do not check out."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ChatError(f"chat input is not JSON: {exc}") from None
    return check_messages(raw)


def final_answer(text: str) -> str:
    """The text after a reasoning model's ``</think>``, or all of it (without one): what
    consensus compares."""
    _, sep, tail = text.partition(END_THINK)
    return tail.strip() if sep and tail.strip() else text

"""OpenAI's chat and completions API, translated to and from the network's tasks.

``parse_request`` turns a ``/v1/chat/completions`` or ``/v1/completions`` body into the
parameters of ``vcoin_submitTask`` (or an ``APIError`` in OpenAI's error shape); the
``*_response`` and ``*_chunk`` builders turn a finished or growing task back into
OpenAI's objects. Pure functions: ``vcoind.gateway.service`` does the I/O.

What differs from OpenAI, on purpose:

- ``n`` is 1 (anything else: 400); ``logprobs``, tools and response formats: 400.
- A parameter the request leaves out (``temperature``, ``top_p``) comes from the model's
  ``generation_config.json`` on the worker, as the model's authors meant it to run.
- ``max_tokens`` defaults to ``DEFAULT_MAX_TOKENS`` (the network prices work up front).
- The network's own options ride in ``vcoin`` (``mode``, ``replicas``, ``pipeline``,
  ``adapter``, ``strategy``, ``priority``, ``timeout_s``); the answer carries ``vcoin``
  too (the task id, its workers, the consensus verdict and the anchor).
- A reasoning model's ``<think>`` section comes as ``reasoning_content`` (as DeepSeek's
  API does): a model whose chat template opens one writes reasoning until ``</think>``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vcoind.market.chat import END_THINK, ChatError, check_messages

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 8192
VCOIN_OPTIONS = {"mode", "replicas", "pipeline", "adapter", "priority", "timeout_s", "strategy"}
# Accepted and ignored when they ask for nothing (their default), refused otherwise.
NEUTRAL: dict[str, Any] = {
    "user": None, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
    "logprobs": False, "parallel_tool_calls": None, "store": False, "metadata": None,
    "service_tier": None, "echo": False, "best_of": 1, "suffix": None,
    "top_logprobs": None, "tool_choice": "none", "tools": [], "response_format": None,
}  # fmt: skip
KNOWN = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
         "top_p", "seed", "stop", "n", "stream", "stream_options", "vcoin", *NEUTRAL}  # fmt: skip


class APIError(Exception):
    """An OpenAI-shaped error: HTTP ``status``, ``type`` and ``code``."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class Request:
    """A checked request: what to submit and how to answer."""

    chat: bool
    model: str
    submit: dict[str, Any]  # vcoin_submitTask's parameters
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(body: Any, *, chat: bool) -> Request:
    """The request, checked; APIError (400) names the first thing wrong."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(f"{unknown[0]}: not supported by this server", unknown[0])
    for name, neutral in NEUTRAL.items():
        value = body.get(name, neutral)
        if value not in (neutral, None) and name not in ("user", "metadata"):
            raise bad(f"{name}: not supported by this server", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model: a model name (GET /v1/models lists them)", "model")
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad("n: only 1 choice per request is supported", "n")
    submit: dict[str, Any] = {"model": model}
    if chat:
        try:
            submit["messages"] = check_messages(body.get("messages"))
        except ChatError as exc:
            raise bad(str(exc), "messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise bad("prompt: a non-empty string (one prompt per request)", "prompt")
        submit["input"] = prompt
    submit["parameters"] = _sampling(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream: true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options: {include_usage: true|false}", "stream_options")
    submit.update(_vcoin_options(body.get("vcoin")))
    submit["stream"] = stream and submit.get("mode", "single") == "single"
    return Request(chat, model, submit, stream, bool(options.get("include_usage")))


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if limit is None:
        limit = DEFAULT_MAX_TOKENS
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_TOKENS_LIMIT:
        raise bad(f"{name}: an integer 1..{MAX_TOKENS_LIMIT}", name)
    params["max_new_tokens"] = limit
    defaults = []
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(key)
        if value is None:
            defaults.append(key)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise bad(f"{key}: a number {lo:g}..{hi:g}", key)
        if key == "top_p" and value == 0:
            raise bad("top_p: above 0", key)
        params[key] = value
    if defaults:
        params["defaults"] = defaults
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad("seed: an integer", "seed")
        params["seed"] = seed % (1 << 63)  # OpenAI allows negatives; ours are unsigned
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop: a string or a list of up to 8 strings", "stop")
        params["stop"] = stop
    return params


def _vcoin_options(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad("vcoin: an object of the network's options", "vcoin")
    unknown = sorted(set(raw) - VCOIN_OPTIONS)
    if unknown:
        raise bad(f"vcoin.{unknown[0]}: unknown option (known: "
                  f"{', '.join(sorted(VCOIN_OPTIONS))})", "vcoin")  # fmt: skip
    return dict(raw)


# --- answers ---------------------------------------------------------------------------


def split_text(text: str, reasoning: bool) -> tuple[str | None, str]:
    """(reasoning_content, content) of an answer: a reasoning model's text up to
    ``</think>`` is its reasoning (all of it, while ``</think>`` has not come)."""
    if not reasoning:
        return None, text
    head, _, tail = text.partition(END_THINK)
    return head, tail.lstrip()


def finish_reason(task: dict[str, Any]) -> str:
    why = (task.get("timings") or {}).get("finish_reason")
    return "length" if why == "length" else "stop"


def usage(task: dict[str, Any]) -> dict[str, int]:
    timings = task.get("timings") or {}
    prompt = int(timings.get("prompt_tokens") or 0)
    completion = int(timings.get("tokens") or task.get("progress") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def vcoin_info(task: dict[str, Any]) -> dict[str, Any]:
    """The network's side of an answer: which task, who ran it, how it was agreed."""
    workers = [w for w in (task.get("node_id") or "").split(",") if w]
    consensus = task.get("consensus") or None
    verdict = None
    if consensus:  # every replica ran it; the verdict without the similarity matrix
        workers = [r["node_id"] for r in consensus.get("replicas", [])] or workers
        verdict = {k: consensus.get(k) for k in ("decision", "share", "confidence", "action",
                                                 "answer_replica", "result_hash")}  # fmt: skip
        verdict["agreed"] = [r["node_id"] for r in consensus.get("replicas", []) if r["agreed"]]
    return {
        "task_id": task["task_id"], "status": task["status"], "mode": task.get("mode"),
        "workers": workers, "model_id": task.get("model_id"),
        "consensus": verdict, "anchor": task.get("anchor"),
        "payment": task.get("payment"),
    }  # fmt: skip


def response(req: Request, task: dict[str, Any], reasoning: bool) -> dict[str, Any]:
    """The whole answer of a finished task (``chat.completion`` or ``text_completion``)."""
    text = task.get("result") or ""
    base = {"id": _id(req, task), "created": req.created, "model": req.model,
            "usage": usage(task), "vcoin": vcoin_info(task)}  # fmt: skip
    if not req.chat:
        return {
            **base,
            "object": "text_completion",
            "choices": [
                {"index": 0, "text": text, "finish_reason": finish_reason(task), "logprobs": None}
            ],
        }
    thought, content = split_text(text, reasoning)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thought is not None:
        message["reasoning_content"] = thought
    return {**base, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": finish_reason(task),
         "logprobs": None}]}  # fmt: skip


def chunk(
    req: Request, task_id: str, delta: dict[str, Any] | str | None,
    finish: str | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk: a chat ``delta`` (dict) or a completion's text (str)."""
    base = {"id": _id(req, {"task_id": task_id}), "created": req.created, "model": req.model,
            **extra}  # fmt: skip
    if req.chat:
        choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
    return {**base, "object": "text_completion", "choices": [choice]}


class ThinkSplitter:
    """Streamed text to chat deltas, split as ``split_text`` splits the whole: a reasoning
    model's text goes to ``reasoning_content`` until ``</think>``, the rest to ``content``."""

    def __init__(self, reasoning: bool) -> None:
        self._reasoning = reasoning
        self._text = ""  # all text seen
        self._done = 0  # characters of it turned into reasoning deltas
        self._answered = 0  # characters of the answer sent

    def feed(self, new: str) -> list[dict[str, str]]:
        self._text += new
        return self._deltas(final=False)

    def flush(self) -> list[dict[str, str]]:
        """At the end: what was kept back (a possible start of ``</think>``)."""
        return self._deltas(final=True)

    def _deltas(self, final: bool) -> list[dict[str, str]]:
        text, out = self._text, []
        if not self._reasoning:
            answer, start = text, 0
        else:
            end = text.find(END_THINK)
            if end < 0:
                safe = len(text) if final else len(text) - _partial_suffix(text, END_THINK)
                if safe > self._done:
                    out.append({"reasoning_content": text[self._done : safe]})
                    self._done = safe
                return out
            if self._done < end:
                out.append({"reasoning_content": text[self._done : end]})
                self._done = end
            start = end + len(END_THINK)
            answer = text[start:].lstrip()
        if len(answer) > self._answered:
            out.append({"content": answer[self._answered :]})
            self._answered = len(answer)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that starts ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _id(req: Request, task: dict[str, Any]) -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + str(task["task_id"])

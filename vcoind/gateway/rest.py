"""The planning documents' REST paths, with their field names, over the same tasks.

    POST /api/v1/inference        {model_id, input, parameters: {max_length, ...}, priority}
                                  -> {task_id, status}
    GET  /api/v1/task/{id}/status -> {task_id, status, progress, result, node_id}
    POST /api/ai/query            consensus when enough nodes serve the model (mode auto),
    POST /api/ai/analyze          the same, for an analysis request
    POST /api/ai/consensus_query  always consensus
    POST /api/ai/single_query     always one node
                                  {model_id | model, input | query, parameters?} -> the
                                  finished task (result, node, consensus verdict)

A body is read as JSON whatever its Content-Type says: ``curl -d`` sends
``application/x-www-form-urlencoded`` by default, and the seeds' curl lines do just that.
``parameters.max_length`` is ``max_new_tokens``; the other parameters are
``vcoin_submitTask``'s.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vcoind.rpc import RPCError

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]
Endpoint = Callable[[Request], Awaitable[Response]]
MAX_BODY_BYTES = 1 << 20
AI_MODES = {"query": "auto", "analyze": "auto", "consensus_query": "consensus",
            "single_query": "single"}  # fmt: skip
STATUS_FIELDS = ("task_id", "status", "progress", "result", "node_id")


class RestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


async def read_json(request: Request, empty: bytes = b"") -> Any:
    """The body as JSON, whatever its Content-Type (``empty``: what an empty body reads
    as); RestError 413 over ``MAX_BODY_BYTES``, 400 when it is not JSON."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RestError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw or empty)
    except ValueError as exc:
        raise RestError(400, f"the body is not JSON: {exc}") from None


async def _body(request: Request) -> dict[str, Any]:
    body = await read_json(request, b"{}")
    if not isinstance(body, dict):
        raise RestError(400, "the body must be a JSON object")
    return body


def submit_params(body: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    """``vcoin_submitTask``'s parameters from a seed-shaped body."""
    model = body.get("model_id", body.get("model"))
    text = body.get("input", body.get("query"))
    if not isinstance(model, str) or not model:
        raise RestError(400, "model_id: the model's name or id")
    if not isinstance(text, str) or not text:
        raise RestError(400, "input: the prompt")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise RestError(400, "parameters: an object")
    params = dict(params)
    if "max_length" in params:
        params.setdefault("max_new_tokens", params.pop("max_length"))
    out: dict[str, Any] = {"model": model, "input": text, "parameters": params}
    if "priority" in body:
        out["priority"] = body["priority"]
    if mode is not None:
        out["mode"] = mode
    return out


class SeedREST:
    """The endpoints; ``call`` runs a JSON-RPC method with its checks."""

    def __init__(self, call: Call, finished: Callable[[str], Awaitable[dict[str, Any]]]) -> None:
        self._call = call
        self._finished = finished

    def routes(self) -> list[tuple[str, Endpoint, str]]:
        out: list[tuple[str, Endpoint, str]] = [("/api/v1/inference", self.inference, "POST"),
               ("/api/v1/task/{task_id}/status", self.status, "GET")]  # fmt: skip
        for name in AI_MODES:
            out.append((f"/api/ai/{name}", self.ai, "POST"))
        return out

    async def _submit(self, params: dict[str, Any]) -> str:
        try:
            return str((await self._call("vcoin_submitTask", params))["task_id"])
        except RPCError as exc:
            raise RestError(404 if "unknown model" in exc.message else 400, exc.message) from None

    async def inference(self, request: Request) -> Response:
        try:
            task_id = await self._submit(submit_params(await _body(request)))
        except RestError as exc:
            return _error(exc.status, str(exc))
        return JSONResponse({"task_id": task_id, "status": "pending"}, status_code=202)

    async def status(self, request: Request) -> Response:
        try:
            task = await self._call("vcoin_getTask", {"task_id": request.path_params["task_id"]})
        except RPCError as exc:
            return _error(404 if "no task" in exc.message else 400, exc.message)
        return JSONResponse({k: task[k] for k in STATUS_FIELDS})

    async def ai(self, request: Request) -> Response:
        mode = AI_MODES[request.url.path.rsplit("/", 1)[-1]]
        try:
            task_id = await self._submit(submit_params(await _body(request), mode))
        except RestError as exc:
            return _error(exc.status, str(exc))
        task = await self._finished(task_id)
        out = {k: task[k] for k in STATUS_FIELDS} | {"mode": task["mode"], "error": task["error"]}
        if task.get("consensus"):
            c = task["consensus"]
            out["consensus"] = {k: c.get(k) for k in ("decision", "confidence", "action", "note")}
        return JSONResponse(out, status_code=200 if task["status"] == "completed" else 502)

"""The OpenAI-compatible API on the daemon's HTTP server (``/v1``).

    GET  /v1/models                 every model the network serves
    GET  /v1/models/{model}
    POST /v1/chat/completions       messages -> a chat task (the worker's chat template)
    POST /v1/completions            prompt -> a task
    and the planning documents' REST paths (``vcoind.gateway.rest``)

Each request is submitted through ``vcoin_submitTask`` (the same checks, the same task:
it shows in ``vcoin tasks``, the dashboard and the metrics) and answered when the task
ends, or streamed as Server-Sent Events while it runs: a single-mode task's worker sends
its text as it grows (``vcoind.market.deltas``); a consensus task streams its agreed
answer once the vote is in (there is nothing to agree on before); a pipeline streams
from the origin's own decode loop (``vcoind.market.routes``). If the worker dies and a
retry on another one writes something else than what was streamed, a chunk with
``vcoin.restarted: true`` says so and the answer starts over.

Credentials: an API key (``vcoind apikey``; limits and usage in ``vcoind.gateway.keys``)
as ``Authorization: Bearer`` (the ``openai`` clients' ``api_key``), or from this machine
the RPC cookie.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from vcoind.gateway.keys import KeyLimits, retry_after
from vcoind.gateway.openai import (
    APIError,
    Request,
    ThinkSplitter,
    bad,
    chunk,
    finish_reason,
    parse_request,
    response,
    usage,
    vcoin_info,
)
from vcoind.gateway.rest import Endpoint, RestError, SeedREST, read_json
from vcoind.metrics import NodeMetrics
from vcoind.rpc import RPCError, RPCMethod
from vcoind.rpc.methods import bind_params
from vcoind.store import Store
from vcoind.store.apikeys import ApiKeyStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.market.origin import TaskOrigin
    from vcoind.presence.view import NetworkView
    from vcoind.rpc import MethodRegistry
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.gateway")

KEEPALIVE_S = 15.0  # an SSE comment while a task is quiet (bidding, a long prefill)


class GatewayService:
    def __init__(
        self, origin: TaskOrigin, view: NetworkView, registry: MethodRegistry, store: Store,
        metrics: NodeMetrics,
    ) -> None:  # fmt: skip
        self._origin = origin
        self._view = view
        self._registry = registry
        self.keys = ApiKeyStore(store)
        self.limits = KeyLimits(self.keys, metrics)

    def mount(self, m: Mounts) -> None:
        m.http.api_keys = self.limits.check
        m.http.add_route("/v1/models", self._limited(self._models), ["GET"])
        m.http.add_route("/v1/models/{model:path}", self._limited(self._model), ["GET"])
        m.http.add_route("/v1/chat/completions", self._chat, ["POST"])
        m.http.add_route("/v1/completions", self._completions, ["POST"])
        for path, endpoint, method in SeedREST(self._rpc, self._finished).routes():
            m.http.add_route(path, self._limited(endpoint), [method])

        async def api_keys(_: dict[str, Any]) -> dict[str, Any]:
            return {"keys": [k.view() for k in await self.keys.list()]}

        async def network_models(_: dict[str, Any]) -> dict[str, Any]:
            return {"models": self.model_list()}

        m.rpc.add(RPCMethod("vcoin_networkModels", "Every model served in the network, as "
                            "GET /v1/models lists them (nodes, spans, reasoning).", (),
                            {"type": "object"}, network_models))  # fmt: skip
        m.rpc.add(RPCMethod("vcoin_apiKeys", "The gateway's API keys (`vcoind apikey`): "
                            "limits and usage; never the keys themselves.", (),
                            {"type": "object"}, api_keys))  # fmt: skip

    def _limited(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind its API key's request limit, counted."""

        async def run(request: HTTPRequest) -> Response:
            key_id = _key_of(request)
            if (refused := self._admit(key_id)) is not None:
                return refused
            response = await endpoint(request)
            await self.limits.done(key_id, response.status_code < 400, 0)
            return response

        return run

    def _admit(self, key_id: str | None) -> Response | None:
        """None if the key may make a request now, else the 429 answer."""
        wait = self.limits.admit(key_id) if key_id is not None else None
        if wait is None:
            return None
        exc = APIError(429, f"API key {key_id} is over its limit: try again in {wait:.1f} s",
                       type="rate_limit_error", code="rate_limit_exceeded")  # fmt: skip
        return JSONResponse(exc.body(), status_code=429,
                            headers={"Retry-After": retry_after(wait)})  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    # --- models ----------------------------------------------------------------------

    def model_list(self) -> list[dict[str, Any]]:
        """Every model served in the network we know of: by name, with its id, how many
        nodes serve it whole and how many serve layer spans of it."""
        view = self._view
        served = view.served()
        spans = [sp for peer_spans in view.spans_by_peer().values() for sp in peer_spans]
        out = []
        for name, nodes in view.serving_count_by_model().items():
            model_id = view.model_id_of(name)
            mine = [sp for sp in spans if sp.model in (name, model_id)]
            out.append({
                "id": name, "object": "model", "created": 0, "owned_by": "vcoin-network",
                "vcoin": {
                    "model_id": model_id, "nodes": nodes,
                    "span_hosts": len(mine), "spans_cover": _covered(mine),
                    "reasoning": any(m.reasoning for m in served if m.name == name),
                },
            })  # fmt: skip
        return out

    async def _models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": self.model_list()})

    async def _model(self, request: HTTPRequest) -> Response:
        name = request.path_params["model"]
        for m in self.model_list():
            if name in (m["id"], m["vcoin"]["model_id"]):
                return JSONResponse(m)
        return _error(_unknown_model(name))

    # --- completions -----------------------------------------------------------------

    async def _chat(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def _completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: HTTPRequest, *, chat: bool) -> Response:
        key_id = _key_of(request)
        if (refused := self._admit(key_id)) is not None:
            return refused
        try:
            try:
                body = await read_json(request)
            except RestError as exc:
                raise APIError(exc.status, str(exc)) from None
            req = parse_request(body, chat=chat)
            if not req.submit.get("pipeline") and req.model not in self._view.models():
                raise _unknown_model(req.model)
            task_id = await self._submit(req)
        except APIError as exc:
            await self.limits.done(key_id, False, 0)
            return _error(exc)
        reasoning = self._reasoning(req.model)
        if req.stream:
            return StreamingResponse(
                self._events(req, task_id, reasoning, key_id), media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )  # fmt: skip
        task = await self._finished(task_id)
        ok = task["status"] == "completed"
        await self.limits.done(key_id, ok, usage(task)["completion_tokens"])
        return JSONResponse(response(req, task, reasoning)) if ok else _error(_task_error(task))

    async def _rpc(self, name: str, params: dict[str, Any]) -> Any:
        """A JSON-RPC method of this node, with its parameter checks (RPCError)."""
        method = self._registry.get(name)
        assert method is not None, name  # the market registered it
        return await method.handler(bind_params(method, params))

    async def _submit(self, req: Request) -> str:
        try:
            result = await self._rpc("vcoin_submitTask", req.submit)
        except RPCError as exc:
            message = str(exc.message)
            if message.startswith("model: unknown model"):
                raise _unknown_model(req.model) from None
            param = message.partition(":")[0] if ":" in message else None
            raise bad(message, param) from None
        task_id = str(result["task_id"])
        log.info("gateway: %s task %s for %s", "chat" if req.chat else "completion", task_id,
                 req.model)  # fmt: skip
        return task_id

    def _reasoning(self, model: str) -> bool:
        """Whether a node serves ``model`` (by name) as a reasoning model."""
        return any(m.reasoning for m in self._view.served() if m.name == model)

    async def _task(self, task_id: str) -> dict[str, Any]:
        task: dict[str, Any] = await self._rpc("vcoin_getTask", {"task_id": task_id})
        return task

    async def _finished(self, task_id: str) -> dict[str, Any]:
        """The task once it has ended (its final row)."""
        while (live := self._origin.live(task_id)) is not None:
            await live.changed.wait()
        return await self._task(task_id)

    async def _events(
        self, req: Request, task_id: str, reasoning: bool, key_id: str | None
    ) -> AsyncIterator[str]:
        """The SSE stream: deltas while the task runs, then its end and ``[DONE]``."""
        splitter = ThinkSplitter(reasoning)
        sent = ""  # the answer's text streamed so far
        restarts = 0

        def deltas(text: str) -> list[str]:
            if not text:
                return []
            if not req.chat:
                return [_sse(chunk(req, task_id, text))]
            return [_sse(chunk(req, task_id, d)) for d in splitter.feed(text)]

        if req.chat:
            yield _sse(chunk(req, task_id, {"role": "assistant", "content": ""}))
        while (live := self._origin.live(task_id)) is not None:
            changed = live.changed
            st = live.streamed
            if st.restarts != restarts:  # a retry wrote something else: start over
                restarts, sent, splitter = st.restarts, "", ThinkSplitter(reasoning)
                yield _sse(chunk(req, task_id, None, vcoin={"restarted": True}))
            if len(st.shown) > len(sent):
                for line in deltas(st.shown[len(sent) :]):
                    yield line
                sent = st.shown
            timed_out = True
            with trio.move_on_after(KEEPALIVE_S):
                await changed.wait()
                timed_out = False
            if timed_out:
                yield ": keep-alive\n\n"
        task = await self._task(task_id)
        await self.limits.done(key_id, task["status"] == "completed",
                               usage(task)["completion_tokens"])  # fmt: skip
        if task["status"] != "completed":
            yield _sse(_task_error(task).body() | {"vcoin": vcoin_info(task)})
            yield "data: [DONE]\n\n"
            return
        final = task.get("result") or ""
        if not final.startswith(sent):
            sent, splitter = "", ThinkSplitter(reasoning)
            yield _sse(chunk(req, task_id, None, vcoin={"restarted": True}))
        for line in deltas(final[len(sent) :]):
            yield line
        if req.chat:
            for d in splitter.flush():
                yield _sse(chunk(req, task_id, d))
        yield _sse(chunk(req, task_id, {} if req.chat else "", finish_reason(task),
                         vcoin=vcoin_info(task)))  # fmt: skip
        if req.include_usage:
            end = chunk(req, task_id, None, usage=usage(task))
            yield _sse({**end, "choices": []})
        yield "data: [DONE]\n\n"


def _key_of(request: HTTPRequest) -> str | None:
    """The id of the API key the request came with (None: the RPC cookie)."""
    key: str | None = request.scope.get("state", {}).get("api_key")
    return key


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} is not served in the network (GET /v1/models "
                    "lists those that are)", param="model", code="model_not_found")  # fmt: skip


def _task_error(task: dict[str, Any]) -> APIError:
    """A task that did not complete, as an HTTP error: nobody to run it is 503."""
    why = str(task.get("error") or task["status"])
    message = f"task {task['task_id']} {task['status']}: {why}"
    if "no bid" in why or "no node" in why:
        return APIError(503, message, type="service_unavailable", code="no_worker")
    if task["status"] == "cancelled":
        return APIError(499, message, type="cancelled", code="cancelled")
    return APIError(500, message, type="server_error", code="task_failed")


def _covered(spans: list[Any]) -> bool:
    """Whether layer spans join up from layer 0 to the last one any of them holds."""
    reach = -1
    for sp in sorted(spans, key=lambda sp: sp.start):
        if sp.start > reach + 1:
            return False
        reach = max(reach, sp.end)
    return reach >= 0

"""The RPC HTTP/WebSocket server: JSON-RPC, health, readiness and metrics."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket, WebSocketDisconnect

from vcoind.rpc.dispatch import Dispatcher, OnCall, encode_error
from vcoind.rpc.errors import (
    INVALID_REQUEST,
    LIMIT_EXCEEDED,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    RPCConfigError,
    RPCError,
)
from vcoind.rpc.guard import WILDCARD_BINDS, AccessGuard, AccessPolicy
from vcoind.rpc.methods import (
    DISCOVER,
    MethodRegistry,
    Param,
    RPCMethod,
    bind_params,
    discover_method,
)
from vcoind.rpc.sessions import Sessions

if TYPE_CHECKING:
    # libp2p depends on trio-typing, whose stale trio-stubs shadow trio's own
    # annotations for mypy; trio.TaskStatus only exists in the latter.
    from hypercorn.typing import Framework
    from trio_typing import TaskStatus

logger = logging.getLogger("vcoind.rpc")

SUBSCRIBE = "vcoin_subscribe"
UNSUBSCRIBE = "vcoin_unsubscribe"
NOTIFICATION = "vcoin_subscription"
CHANNEL_SCHEMA: dict[str, Any] = {"type": "string", "pattern": r"[A-Za-z0-9_.:-]{1,64}"}
MAX_SUBSCRIPTIONS_PER_CONNECTION = 64
# Notifications queued per WebSocket client; beyond this they are dropped.
NOTIFICATION_QUEUE = 256
# A frame this many times the body limit is abuse, not a mistake: close the socket (1009).
WS_FRAME_HARD_LIMIT_FACTOR = 4
SHUTDOWN_GRACE_S = 1.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class RPCServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    max_body_bytes: int = 1_048_576
    max_batch: int = 100
    cookie: str | None = field(default=None, repr=False)
    # Host names served besides loopback and the bound address ("name" or "name:port").
    hosts: tuple[str, ...] = ()
    # Web origins allowed to call from a browser, with CORS headers (none by default).
    origins: tuple[str, ...] = ()


class _BodyTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _WSClient:
    """One WebSocket connection: its subscriptions and its outgoing notifications."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.subscriptions: dict[str, str] = {}  # subscription id -> channel
        self.outbox, self._inbox = trio.open_memory_channel[str](NOTIFICATION_QUEUE)
        self.dropped = 0
        self.send_lock = trio.Lock()

    async def send(self, text: str) -> None:
        async with self.send_lock:
            await self.websocket.send_text(text)

    async def pump_notifications(self) -> None:
        async for text in self._inbox:
            await self.send(text)


class RPCServer:
    """Serves the registry over HTTP POST and WebSocket, plus /health /ready /metrics.

    Every request passes `AccessGuard` first: Host, Origin, then the cookie or a session.
    """

    def __init__(
        self,
        config: RPCServerConfig,
        registry: MethodRegistry,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        title: str = "vcoind",
        version: str = "0.0.0",
        on_call: OnCall | None = None,
    ) -> None:
        if not config.cookie:
            raise RPCConfigError(
                "the RPC needs an auth cookie, loopback included (DATADIR/rpc.cookie, "
                "written by `vcoind init`)"
            )
        try:
            self._policy = AccessPolicy(config.host, config.port, config.hosts, config.origins)
        except ValueError as exc:
            raise RPCConfigError(str(exc)) from None
        self._cookie = config.cookie
        self._sessions = Sessions()
        self._pages: set[str] = set()
        self._config = config
        self._registry = registry
        self._ready = ready
        self._metrics = metrics
        self._dispatcher = Dispatcher(registry, max_batch=config.max_batch, on_call=on_call)
        self._extra_routes: list[BaseRoute] = []
        # The gateway's API key check (``AccessGuard.api_keys``), set before run()
        self.api_keys: Callable[[str], Awaitable[str | None]] | None = None
        self._channels: dict[str, dict[str, _WSClient]] = {}  # channel -> sub id -> client
        self._bound_url: str | None = None
        self._running = False
        self._stopping = trio.Event()
        if registry.get(DISCOVER) is None:
            registry.add(discover_method(registry, title=title, version=version))
        for name, summary, params in (
            (
                SUBSCRIBE,
                "Subscribe to a notification channel (WebSocket only).",
                (Param("channel", CHANNEL_SCHEMA, required=True),),
            ),
            (
                UNSUBSCRIBE,
                "Cancel a subscription (WebSocket only).",
                (Param("subscription", {"type": "string"}, required=True),),
            ),
        ):
            if registry.get(name) is None:
                # Listed for rpc.discover; on HTTP the call explains why it fails.
                registry.add(RPCMethod(name, summary, params, {}, _needs_websocket))

    @property
    def url(self) -> str:
        if self._bound_url is None:
            raise RuntimeError("RPC server is not running")
        return self._bound_url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def add_route(self, path: str, endpoint: Endpoint, methods: list[str]) -> None:
        if self._running:
            raise RuntimeError("routes must be added before the RPC server runs")
        self._extra_routes.append(Route(path, endpoint, methods=methods))

    def add_page(self, path: str, endpoint: Endpoint) -> None:
        """Serve ``GET path`` as a browser page: besides the cookie, a session opened by
        ``GET path?token=...`` with a token from `login_url` reaches it (and every call
        the page makes from the same origin)."""
        self.add_route(path, endpoint, ["GET"])
        self._pages.add(path)

    def login_url(self, path: str) -> str:
        """A fresh one-time URL that opens the page ``path`` in a browser session."""
        if path not in self._pages:
            raise ValueError(f"{path!r} is not a page (add_page)")
        base = self.url
        if self._config.host.lower() in WILDCARD_BINDS:  # reach it through loopback
            base = f"http://127.0.0.1:{self.port}"
        return f"{base}{path}?token={self._sessions.mint_token()}"

    def add_method(self, method: RPCMethod) -> None:
        """Register an RPC method that belongs to the server's own HTTP features."""
        self._registry.add(method)

    def add_get_alias(self, path: str, method: str, *, query: bool = False) -> None:
        """Serve ``GET path`` as a thin REST alias of RPC ``method`` called with its defaults
        (with ``query``: the query string's parameters, as strings, override them).

        The planning documents' REST paths (e.g. ``/api/cluster/status``) work this way.
        """
        rpc_method = self._registry.get(method)
        if rpc_method is None:
            raise ValueError(f"no RPC method {method!r} to alias")

        async def endpoint(request: Request) -> Response:
            args = dict(request.query_params) if query and request.query_params else None
            try:
                result = await rpc_method.handler(bind_params(rpc_method, args))
            except RPCError as exc:
                return JSONResponse({"error": exc.to_json()}, status_code=400)
            return JSONResponse(result)

        self.add_route(path, endpoint, ["GET"])

    async def run(self, *, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        if self._running:
            raise RuntimeError("an RPCServer runs only once")
        self._running = True
        # Shielded so that our own cancellation becomes a graceful shutdown,
        # bounded by the deadline set in `finally`.
        serve_scope = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    binds = await nursery.start(
                        partial(self._serve, serve_scope, self._stopping.wait)
                    )
                    self._bound_url = binds[0]
                    self._policy.port = self.port
                    logger.info("RPC listening on %s", self._bound_url)
                    task_status.started(self._bound_url)
                    await trio.sleep_forever()
                finally:
                    self._stopping.set()
                    serve_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S + 1.0
        finally:
            self._bound_url = None

    async def publish(self, channel: str, payload: Any) -> None:
        """Queue `payload` (JSON-serialisable) for every subscriber of `channel`.

        Never waits on a client: a subscriber whose queue is full loses the notification.
        """
        subscribers = self._channels.get(channel)
        if subscribers:
            result = json.dumps(payload, allow_nan=False)
            head = json.dumps(channel)
            for sub_id, client in list(subscribers.items()):
                text = (
                    f'{{"jsonrpc":"2.0","method":"{NOTIFICATION}","params":'
                    f'{{"subscription":"{sub_id}","channel":{head},"result":{result}}}}}'
                )
                try:
                    client.outbox.send_nowait(text)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    client.dropped += 1
                    logger.debug("dropped %s notification for slow client %s", channel, sub_id)
        await trio.lowlevel.checkpoint()

    async def _serve(
        self,
        scope: trio.CancelScope,
        shutdown_trigger: Callable[[], Awaitable[None]],
        *,
        task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await hypercorn.trio.serve(
                cast("Framework", self._app()),
                self._hypercorn_config(),
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )

    def _hypercorn_config(self) -> hypercorn.config.Config:
        host = self._config.host
        config = hypercorn.config.Config()
        config.bind = [
            f"[{host}]:{self._config.port}" if ":" in host else f"{host}:{self._config.port}"
        ]
        config.accesslog = None
        config.errorlog = logging.getLogger("vcoind.rpc.hypercorn")
        config.keep_alive_timeout = 30
        config.graceful_timeout = SHUTDOWN_GRACE_S
        config.include_server_header = False
        config.websocket_max_message_size = self._config.max_body_bytes * WS_FRAME_HARD_LIMIT_FACTOR
        return config

    def _app(self) -> ASGIApp:
        routes: list[BaseRoute] = [
            Route("/", self._http_rpc, methods=["POST"]),
            Route("/rpc", self._http_rpc, methods=["POST"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/ready", self._ready_endpoint, methods=["GET"]),
            Route("/metrics", self._metrics_endpoint, methods=["GET"]),
            WebSocketRoute("/ws", self._websocket),
            WebSocketRoute("/", self._websocket),
            *self._extra_routes,
        ]
        guard = AccessGuard(
            Starlette(routes=routes), self._policy, self._cookie, self._sessions, self._pages
        )
        guard.api_keys = self.api_keys
        return guard

    async def _http_rpc(self, request: Request) -> Response:
        try:
            body = await self._read_body(request)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        except _BodyTooLarge as exc:
            error = RPCError(INVALID_REQUEST, self._too_large(exc.size))
            return Response(
                encode_error(None, error),
                status_code=413,
                media_type="application/json",
                headers={"Connection": "close"},
            )
        reply = await self._dispatcher.handle(body)
        if reply is None:
            return Response(status_code=204)
        return Response(reply, media_type="application/json")

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge(int(declared))
        # The header may be absent (chunked) or lie, so count while reading too.
        chunks: list[bytes] = []
        size = 0
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise _BodyTooLarge(size)
                chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int) -> str:
        return f"request body too large ({size} bytes > {self._config.max_body_bytes})"

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready_endpoint(self, request: Request) -> Response:
        ready = bool(self._ready())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def _metrics_endpoint(self, request: Request) -> Response:
        return Response(self._metrics(), media_type=METRICS_CONTENT_TYPE)

    async def _websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        client = _WSClient(websocket)
        session = {
            SUBSCRIBE: self._session_method(SUBSCRIBE, partial(self._subscribe, client)),
            UNSUBSCRIBE: self._session_method(UNSUBSCRIBE, partial(self._unsubscribe, client)),
        }
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.pump_notifications)
                nursery.start_soon(self._close_on_shutdown, client, nursery.cancel_scope)
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    text, data = message.get("text"), message.get("bytes")
                    frame = text.encode() if text is not None else data or b""
                    if len(frame) > self._config.max_body_bytes:
                        error = RPCError(INVALID_REQUEST, self._too_large(len(frame)))
                        reply: str | None = encode_error(None, error)
                    else:
                        reply = await self._dispatcher.handle(frame, session)
                    if reply is not None:
                        await client.send(reply)
                nursery.cancel_scope.cancel()
        except* WebSocketDisconnect:
            logger.debug("WebSocket client went away while we were sending")
        finally:
            for sub_id, channel in client.subscriptions.items():
                self._forget(channel, sub_id)
            client.outbox.close()

    async def _close_on_shutdown(self, client: _WSClient, scope: trio.CancelScope) -> None:
        await self._stopping.wait()
        async with client.send_lock:
            await client.websocket.close(code=1001)  # going away
        scope.cancel()

    def _session_method(
        self, name: str, handler: Callable[[dict[str, Any]], Awaitable[Any]]
    ) -> RPCMethod:
        described = self._registry.get(name)
        params = described.params if described is not None else ()
        return RPCMethod(name, "", params, {}, handler)

    async def _subscribe(self, client: _WSClient, params: dict[str, Any]) -> str:
        if len(client.subscriptions) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise RPCError(
                LIMIT_EXCEEDED,
                "too many subscriptions on this connection "
                f"(max {MAX_SUBSCRIPTIONS_PER_CONNECTION})",
            )
        channel: str = params["channel"]
        sub_id = secrets.token_hex(8)
        client.subscriptions[sub_id] = channel
        self._channels.setdefault(channel, {})[sub_id] = client
        return sub_id

    async def _unsubscribe(self, client: _WSClient, params: dict[str, Any]) -> bool:
        sub_id: str = params["subscription"]
        channel = client.subscriptions.pop(sub_id, None)
        if channel is None:
            raise RPCError(NOT_FOUND, f"unknown subscription: {sub_id[:64]}")
        self._forget(channel, sub_id)
        return True

    def _forget(self, channel: str, sub_id: str) -> None:
        subscribers = self._channels.get(channel, {})
        subscribers.pop(sub_id, None)
        if not subscribers:
            self._channels.pop(channel, None)


async def _needs_websocket(_: dict[str, Any]) -> Any:
    raise RPCError(METHOD_NOT_FOUND, "subscriptions need a WebSocket connection (/ws)")

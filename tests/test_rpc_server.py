"""The RPC server over real HTTP and WebSocket connections on loopback."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from vcoind.config import ConfigError, load
from vcoind.rpc import (
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
    UNAUTHORIZED,
    MethodRegistry,
    Param,
    RPCConfigError,
    RPCError,
    RPCMethod,
    RPCServer,
    RPCServerConfig,
)
from vcoind.rpc.guard import AccessPolicy, parse_authority
from vcoind.rpc.sessions import MAX_TOKENS, SESSION_TTL_S, TOKEN_TTL_S, Sessions

COOKIE = "s3cret-cookie"
AUTH = {"Authorization": f"Bearer {COOKIE}"}
WS_AUTH = [(b"Authorization", f"Bearer {COOKIE}".encode())]
METRICS = b"# TYPE vcoin_up gauge\nvcoin_up 1\n"
MAX_BODY = 4096


async def _echo(params: dict[str, Any]) -> Any:
    return {"text": params["text"], "times": params["times"]}


async def _add(params: dict[str, Any]) -> Any:
    return params["a"] + params["b"]


async def _boom(params: dict[str, Any]) -> Any:
    raise ValueError("secret internals")


async def _fail(params: dict[str, Any]) -> Any:
    raise RPCError(NOT_FOUND, "not found", {"task": "abc"})


def sample_registry() -> MethodRegistry:
    registry = MethodRegistry()
    registry.add(
        RPCMethod(
            "echo",
            "Echo a text.",
            (
                Param("text", {"type": "string", "maxLength": 100}, required=True),
                Param("times", {"type": "integer", "minimum": 1}, default=1),
            ),
            {"type": "object"},
            _echo,
        )
    )
    non_negative = {"type": "integer", "minimum": 0}
    registry.add(
        RPCMethod(
            "add",
            "Add two integers.",
            (Param("a", non_negative, required=True), Param("b", non_negative, required=True)),
            {"type": "integer"},
            _add,
        )
    )
    registry.add(RPCMethod("boom", "Always crashes.", (), {}, _boom))
    registry.add(RPCMethod("fail", "Always fails cleanly.", (), {}, _fail))
    registry.add(
        RPCMethod(
            "pick",
            "Pick a colour.",
            (Param("colour", {"enum": ["red", "green"]}, required=True),),
            {"type": "string"},
            _echo,
        )
    )
    return registry


@dataclass
class Harness:
    server: RPCServer
    url: str
    http: httpx.AsyncClient
    is_ready: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def ws(self, path: str = "/ws") -> AbstractAsyncContextManager[WebSocketConnection]:
        url = self.url.replace("http://", "ws://") + path
        return trio_websocket.open_websocket_url(url, extra_headers=WS_AUTH)

    async def post(self, payload: Any) -> httpx.Response:
        return await self.http.post(self.url + "/rpc", json=payload)

    async def call(self, method: str, params: Any = None, request_id: Any = 1) -> dict[str, Any]:
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            request["params"] = params
        response = await self.post(request)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
async def rpc(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    holder: list[Harness] = []
    server = RPCServer(
        RPCServerConfig(max_body_bytes=MAX_BODY, max_batch=5, cookie=COOKIE),
        sample_registry(),
        ready=lambda: holder[0].is_ready,
        metrics=lambda: METRICS,
        title="vcoind-test",
        version="9.9.9",
        on_call=lambda method, outcome: holder[0].calls.append((method, outcome)),
    )
    url = await nursery.start(server.run)
    async with httpx.AsyncClient(timeout=10, headers=AUTH) as http:
        holder.append(Harness(server, url, http))
        yield holder[0]


def error_of(body: dict[str, Any]) -> tuple[int, str]:
    return body["error"]["code"], body["error"]["message"]


async def test_call_returns_result_with_defaults_filled(rpc: Harness) -> None:
    assert rpc.url.startswith("http://127.0.0.1:")
    assert await rpc.call("echo", {"text": "hi"}, request_id="a") == {
        "jsonrpc": "2.0",
        "result": {"text": "hi", "times": 1},
        "id": "a",
    }
    assert (await rpc.call("add", [2, 3]))["result"] == 5
    # "/" is an alias of "/rpc".
    response = await rpc.http.post(
        rpc.url + "/", json={"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": None}
    )
    assert response.json() == {"jsonrpc": "2.0", "result": 2, "id": None}


async def test_batch_mixes_results_errors_and_notifications(rpc: Harness) -> None:
    response = await rpc.post(
        [
            {"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 2}, "id": 1},
            {"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 2}},
            {"jsonrpc": "2.0", "method": "nope", "id": 2},
            {"jsonrpc": "2.0", "method": "fail"},
            42,
        ]
    )
    assert response.status_code == 200
    replies = response.json()
    assert replies[0] == {"jsonrpc": "2.0", "result": 3, "id": 1}
    assert error_of(replies[1]) == (METHOD_NOT_FOUND, "method not found: nope")
    assert replies[1]["id"] == 2
    assert replies[2]["error"]["code"] == INVALID_REQUEST
    assert len(replies) == 3


async def test_notifications_only_get_204(rpc: Harness) -> None:
    single = await rpc.post({"jsonrpc": "2.0", "method": "add", "params": [1, 2]})
    batch = await rpc.post([{"jsonrpc": "2.0", "method": "echo", "params": ["x"]}] * 2)
    assert (single.status_code, single.content) == (204, b"")
    assert (batch.status_code, batch.content) == (204, b"")
    assert rpc.calls == [("add", "ok"), ("echo", "ok"), ("echo", "ok")]


async def test_parse_errors(rpc: Harness) -> None:
    for body in (b'{"jsonrpc": "2.0", "method": ', b"NaN", b"\xff\xfe{", b"[" * 100_000):
        response = await rpc.http.post(rpc.url + "/rpc", content=body[:MAX_BODY])
        assert response.status_code == 200
        code, message = error_of(response.json())
        assert code == PARSE_ERROR
        assert message.startswith("parse error: ")
        assert response.json()["id"] is None


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ([], "empty batch"),
        ([{"jsonrpc": "2.0", "method": "add"}] * 6, "batch too large (6 > 5)"),
        ("hello", "request must be an object"),
        ({"jsonrpc": "1.0", "method": "add", "id": 1}, 'jsonrpc must be "2.0"'),
        ({"method": "add", "id": 1}, 'jsonrpc must be "2.0"'),
        ({"jsonrpc": "2.0", "method": 7, "id": 1}, "method must be a string"),
        ({"jsonrpc": "2.0", "id": 1}, "method must be a string"),
        ({"jsonrpc": "2.0", "method": "add", "id": 1.5}, "id must be"),
        ({"jsonrpc": "2.0", "method": "add", "id": True}, "id must be"),
        ({"jsonrpc": "2.0", "method": "add", "id": {}}, "id must be"),
        ({"jsonrpc": "2.0", "method": "add", "params": 3, "id": 1}, "params must be"),
        ({"jsonrpc": "2.0", "method": "add", "params": "x"}, "params must be"),
    ],
)
async def test_invalid_requests(rpc: Harness, payload: Any, problem: str) -> None:
    response = await rpc.post(payload)
    assert response.status_code == 200
    code, message = error_of(response.json())
    assert code == INVALID_REQUEST
    assert problem in message
    assert rpc.calls == [("<invalid>", "error")]


async def test_unknown_method_uses_a_bounded_metrics_label(rpc: Harness) -> None:
    body = await rpc.call("vcoin_doesNotExist", request_id=7)
    assert error_of(body) == (METHOD_NOT_FOUND, "method not found: vcoin_doesNotExist")
    assert body["id"] == 7
    assert rpc.calls == [("<unknown>", "error")]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("echo", {}, "missing required param 'text'"),
        ("echo", [], "missing required param 'text'"),
        ("echo", {"text": 5}, "param 'text' must be string"),
        ("echo", {"text": "x" * 101}, "param 'text' must be at most 100 characters"),
        ("echo", {"text": "x", "times": 0}, "param 'times' must be >= 1"),
        ("echo", {"text": "x", "loud": True}, "unknown param 'loud'"),
        ("add", {"a": True, "b": 1}, "param 'a' must be integer"),
        ("add", {"a": 1.5, "b": 1}, "param 'a' must be integer"),
        ("add", {"a": -1, "b": 1}, "param 'a' must be >= 0"),
        ("add", [1, 2, 3], "too many params: add takes at most 2, got 3"),
        ("pick", ["blue"], "param 'colour' must be one of"),
        ("rpc.discover", [1], "too many params"),
    ],
)
async def test_invalid_params(rpc: Harness, method: str, params: Any, message: str) -> None:
    code, text = error_of(await rpc.call(method, params))
    assert code == INVALID_PARAMS
    assert text.startswith(message)
    assert rpc.calls == [(method, "error")]


async def test_handler_errors(rpc: Harness, caplog: pytest.LogCaptureFixture) -> None:
    failed = await rpc.call("fail")
    assert failed["error"] == {"code": NOT_FOUND, "message": "not found", "data": {"task": "abc"}}

    with caplog.at_level(logging.ERROR, logger="vcoind.rpc"):
        crashed = await rpc.call("boom", request_id="b")
    assert crashed == {
        "jsonrpc": "2.0",
        "error": {"code": INTERNAL_ERROR, "message": "internal error"},
        "id": "b",
    }
    assert "secret internals" not in json.dumps(crashed)
    logged = [r for r in caplog.records if r.name == "vcoind.rpc"]
    assert logged and logged[0].exc_info is not None
    # The server keeps serving after a handler crash.
    assert (await rpc.call("add", [20, 22]))["result"] == 42
    assert rpc.calls == [("fail", "error"), ("boom", "error"), ("add", "ok")]


async def test_oversized_body_with_content_length(rpc: Harness) -> None:
    response = await rpc.http.post(rpc.url + "/rpc", content=b" " * (MAX_BODY + 1))
    assert response.status_code == 413
    code, message = error_of(response.json())
    assert code == INVALID_REQUEST
    assert message == f"request body too large ({MAX_BODY + 1} bytes > {MAX_BODY})"


async def test_oversized_chunked_body_is_cut_off_while_streaming(rpc: Harness) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(8):
            sent += 1024
            yield b" " * 1024

    request = rpc.http.build_request("POST", rpc.url + "/rpc", content=chunks())
    assert "content-length" not in request.headers
    response = await rpc.http.send(request)
    assert response.status_code == 413
    code, message = error_of(response.json())
    assert code == INVALID_REQUEST
    assert message.startswith("request body too large (")
    # A body under the limit streamed the same way is served.
    small = [json.dumps({"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1}).encode()]

    async def one_chunk() -> AsyncIterator[bytes]:
        for piece in small:
            yield piece

    ok = await rpc.http.post(rpc.url + "/rpc", content=one_chunk())
    assert ok.json()["result"] == 3


async def test_health_ready_and_metrics(rpc: Harness) -> None:
    health = await rpc.http.get(rpc.url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})

    not_ready = await rpc.http.get(rpc.url + "/ready")
    assert (not_ready.status_code, not_ready.json()) == (503, {"ready": False})
    rpc.is_ready = True
    ready = await rpc.http.get(rpc.url + "/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})

    metrics = await rpc.http.get(rpc.url + "/metrics")
    assert metrics.status_code == 200
    assert metrics.content == METRICS
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


async def test_discover_describes_every_method(rpc: Harness) -> None:
    doc = (await rpc.call("rpc.discover"))["result"]
    assert doc["openrpc"] == "1.2.6"
    assert doc["info"] == {"title": "vcoind-test", "version": "9.9.9"}
    methods = {m["name"]: m for m in doc["methods"]}
    assert {"echo", "add", "boom", "fail", "rpc.discover", "vcoin_subscribe"} <= set(methods)
    echo = methods["echo"]
    assert echo["summary"] == "Echo a text."
    assert echo["params"] == [
        {"name": "text", "required": True, "schema": {"type": "string", "maxLength": 100}},
        {
            "name": "times",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "default": 1},
        },
    ]
    assert echo["result"] == {"name": "result", "schema": {"type": "object"}}


async def test_subscribe_over_http_explains_it_needs_a_websocket(rpc: Harness) -> None:
    code, message = error_of(await rpc.call("vcoin_subscribe", {"channel": "tasks"}))
    assert code == METHOD_NOT_FOUND
    assert "WebSocket" in message


def test_registry_rejects_duplicates_and_unsupported_schemas() -> None:
    registry = sample_registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.add(RPCMethod("add", "again", (), {}, _add))
    with pytest.raises(ValueError, match="unsupported schema keywords"):
        registry.add(RPCMethod("x", "", (Param("p", {"format": "uri"}),), {}, _add))
    assert registry.names() == ["add", "boom", "echo", "fail", "pick"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "0.0.0.0", "example.com"])
def test_every_bind_needs_a_cookie(host: str) -> None:
    with pytest.raises(RPCConfigError, match="needs an auth cookie, loopback included") as raised:
        RPCServer(
            RPCServerConfig(host=host), MethodRegistry(), ready=lambda: True, metrics=lambda: b""
        )
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, RPCError)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_cookie_is_required_on_every_bind(nursery: trio.Nursery, host: str) -> None:
    server = RPCServer(
        RPCServerConfig(host=host, cookie=COOKIE),
        sample_registry(),
        ready=lambda: True,
        metrics=lambda: METRICS,
    )
    await nursery.start(server.run)
    # Bound on loopback or on all interfaces, but only ever talk to loopback.
    base = f"http://127.0.0.1:{server.port}"
    request = {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1}
    async with httpx.AsyncClient(timeout=10) as http:
        denied = await http.post(base + "/rpc", json=request)
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == UNAUTHORIZED
        assert "Bearer" in denied.json()["error"]["message"]
        wrong = await http.post(
            base + "/rpc", json=request, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        for path in ("/metrics", "/ready", "/"):
            assert (await http.get(base + path)).status_code == 401, path
        # /health stays open for probes: it tells nothing but liveness.
        health = await http.get(base + "/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})

        bearer = await http.post(
            base + "/rpc", json=request, headers={"Authorization": f"Bearer {COOKIE}"}
        )
        assert (bearer.status_code, bearer.json()["result"]) == (200, 3)
        header = await http.get(base + "/metrics", headers={"X-VCoin-Cookie": COOKIE})
        assert (header.status_code, header.content) == (200, METRICS)

        # A WebSocket upgrade without the cookie is denied with a plain HTTP 401.
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        rejected = await http.get(base + "/ws", headers=upgrade)
        assert (rejected.status_code, "error" in rejected.json()) == (401, True)

    ws_url = f"ws://127.0.0.1:{server.port}/ws"
    async with trio_websocket.open_websocket_url(ws_url, extra_headers=WS_AUTH) as ws:
        await ws.send_message(json.dumps(request))
        assert json.loads(await ws.get_message())["result"] == 3


async def ws_call(ws: trio_websocket.WebSocketConnection, request: Any) -> Any:
    await ws.send_message(json.dumps(request))
    return json.loads(await ws.get_message())


async def test_websocket_request_response(rpc: Harness) -> None:
    async with rpc.ws() as ws:
        single = {"jsonrpc": "2.0", "method": "add", "params": [4, 5], "id": "w"}
        assert await ws_call(ws, single) == {"jsonrpc": "2.0", "result": 9, "id": "w"}
        batch = [single, {"jsonrpc": "2.0", "method": "boom", "id": 2}]
        replies = await ws_call(ws, batch)
        assert [r.get("result") for r in replies] == [9, None]
        assert replies[1]["error"]["code"] == INTERNAL_ERROR
        await ws.send_message("{not json")
        assert json.loads(await ws.get_message())["error"]["code"] == PARSE_ERROR
        # An oversized frame is answered with an error, the connection stays up.
        await ws.send_message(" " * (MAX_BODY + 1))
        too_large = json.loads(await ws.get_message())
        assert too_large["error"]["code"] == INVALID_REQUEST
        assert "too large" in too_large["error"]["message"]
        assert (await ws_call(ws, single))["result"] == 9
    # The root path accepts WebSocket upgrades too.
    async with rpc.ws("/") as ws:
        assert (await ws_call(ws, single))["result"] == 9


async def test_grossly_oversized_websocket_frame_closes_with_1009(rpc: Harness) -> None:
    # Own the TCP stream: trio-websocket leaves a client socket unclosed when
    # the server closes first, which filterwarnings=error would report later.
    port = int(rpc.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery, stream, f"127.0.0.1:{port}", "/ws", extra_headers=WS_AUTH
        )
        await ws.send_message(b" " * (MAX_BODY * 8))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        nursery.cancel_scope.cancel()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1009


async def test_subscriptions_deliver_to_subscribers_of_the_channel(rpc: Harness) -> None:
    def subscribe(channel: str) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": "vcoin_subscribe", "params": [channel], "id": 1}

    async with (
        rpc.ws() as tasks_ws,
        rpc.ws() as peers_ws,
    ):
        sub_id = (await ws_call(tasks_ws, subscribe("tasks")))["result"]
        peers_sub = (await ws_call(peers_ws, subscribe("peers:new")))["result"]
        assert isinstance(sub_id, str) and sub_id != peers_sub
        bad = await ws_call(tasks_ws, subscribe("bad channel!"))
        assert bad["error"]["code"] == INVALID_PARAMS

        await rpc.server.publish("tasks", {"task": "t1", "state": "done"})
        await rpc.server.publish("peers:new", {"peer": "p1"})
        assert json.loads(await tasks_ws.get_message()) == {
            "jsonrpc": "2.0",
            "method": "vcoin_subscription",
            "params": {
                "subscription": sub_id,
                "channel": "tasks",
                "result": {"task": "t1", "state": "done"},
            },
        }
        # The peers client got only its own channel's notification.
        peers_note = json.loads(await peers_ws.get_message())
        assert peers_note["params"]["result"] == {"peer": "p1"}

        unsubscribe = {
            "jsonrpc": "2.0",
            "method": "vcoin_unsubscribe",
            "params": {"subscription": sub_id},
            "id": 2,
        }
        assert (await ws_call(tasks_ws, unsubscribe))["result"] is True
        assert (await ws_call(tasks_ws, unsubscribe))["error"]["code"] == NOT_FOUND
        await rpc.server.publish("tasks", {"task": "t2"})
        # Nothing for t2 arrives: the next message is the reply to this call.
        ping = {"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": 3}
        assert await ws_call(tasks_ws, ping) == {"jsonrpc": "2.0", "result": 2, "id": 3}
    assert ("vcoin_subscribe", "ok") in rpc.calls
    assert ("vcoin_unsubscribe", "error") in rpc.calls


async def test_add_route_serves_extra_endpoints(nursery: trio.Nursery) -> None:
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    async def cluster_status(request: Request) -> Response:
        return JSONResponse({"nodes": 3})

    server = RPCServer(
        RPCServerConfig(cookie=COOKIE), MethodRegistry(), ready=lambda: True, metrics=bytes
    )
    server.add_route("/api/cluster/status", cluster_status, methods=["GET"])
    url = await nursery.start(server.run)
    async with httpx.AsyncClient(timeout=10, headers=AUTH) as http:
        assert (await http.get(url + "/api/cluster/status")).json() == {"nodes": 3}
    with pytest.raises(RuntimeError, match="before"):
        server.add_route("/late", cluster_status, methods=["GET"])


async def test_cancellation_shuts_down_promptly(caplog: pytest.LogCaptureFixture) -> None:
    server = RPCServer(
        RPCServerConfig(cookie=COOKIE), sample_registry(), ready=lambda: True, metrics=bytes
    )
    stopped = trio.Event()

    async def run_server(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await server.run(task_status=task_status)
        stopped.set()

    server_scope = trio.CancelScope()
    with caplog.at_level(logging.DEBUG), trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_server)
            ws_url = url.replace("http", "ws") + "/ws"
            async with trio_websocket.open_websocket_url(ws_url, extra_headers=WS_AUTH) as ws:
                reply = await ws_call(
                    ws, {"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": 1}
                )
                assert reply["result"] == 2
                started = trio.current_time()
                server_scope.cancel()
                await stopped.wait()
                # Connected clients are told the server is going away.
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
        assert trio.current_time() - started < 0.5
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1001
    with pytest.raises(RuntimeError):
        _ = server.url
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(url + "/health")


# --- the access guard: Host, Origin, cookie, browser sessions ------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:8645", ("127.0.0.1", 8645)),
        ("LocalHost:80", ("localhost", 80)),
        ("[::1]:8645", ("[::1]", 8645)),
        ("node.lan", ("node.lan", None)),
        ("evil.example:0", None),
        ("a:b:c", None),
        ("[not-v6]:1", None),
        ("user@127.0.0.1:1", None),
        ("127.0.0.1:99999", None),
        ("", None),
    ],
)
def test_parse_authority(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert parse_authority(value) == parsed


def test_hosts_a_daemon_answers_to() -> None:
    loop = AccessPolicy("127.0.0.1", 8645, (), ())
    for ok in ("127.0.0.1:8645", "localhost:8645", "[::1]:8645"):
        assert loop.host_ok(ok), ok
    for bad in ("evil.example:8645", "127.0.0.1:9999", "127.0.0.1", "10.0.0.5:8645", None):
        assert not loop.host_ok(bad), bad
    assert not AccessPolicy("127.0.0.1", None, (), ()).host_ok("127.0.0.1:8645")  # not bound
    lan = AccessPolicy("10.0.0.5", 8645, ("vcoin.lan", "ops.lan:443"), ())
    assert lan.host_ok("10.0.0.5:8645") and lan.host_ok("127.0.0.1:8645")
    assert lan.host_ok("vcoin.lan:1234") and lan.host_ok("ops.lan:443")
    assert not lan.host_ok("10.0.0.6:8645") and not lan.host_ok("ops.lan:80")
    # A wildcard bind answers to any IP literal (an IP cannot be rebound), never to a name.
    anywhere = AccessPolicy("0.0.0.0", 8645, (), ())
    assert anywhere.host_ok("192.168.1.7:8645") and anywhere.host_ok("[fd00::1]:8645")
    assert not anywhere.host_ok("rebind.evil.example:8645")
    with pytest.raises(ValueError, match=r"rpc\.hosts"):
        AccessPolicy("127.0.0.1", 1, ("bad/name",), ())


def test_origins_a_daemon_accepts() -> None:
    loop = AccessPolicy("127.0.0.1", 8645, ("vcoin.lan",), ("https://ops.example",))
    host = "127.0.0.1:8645"
    for ok in ("http://127.0.0.1:8645", "http://localhost:8645", "http://[::1]:8645",
               "https://ops.example", "HTTPS://OPS.EXAMPLE"):  # fmt: skip
        assert loop.origin_ok(ok, host), ok
    for bad in ("https://evil.example", "null", "http://127.0.0.1:9999",
                "http://localhost", "file://", "http://evil.example:8645"):  # fmt: skip
        assert not loop.origin_ok(bad, host), bad
    # The origin a request was sent to (its Host, already allowed) is its own.
    assert loop.origin_ok("http://vcoin.lan:8645", "vcoin.lan:8645")
    assert loop.origin_ok("https://vcoin.lan", "vcoin.lan")
    assert not loop.origin_ok("http://vcoin.lan:8645", "127.0.0.1:8645")
    anywhere = AccessPolicy("0.0.0.0", 8645, (), ())
    assert anywhere.origin_ok("http://192.168.1.7:8645", "192.168.1.7:8645")
    assert not anywhere.origin_ok("http://192.168.1.8:8645", "192.168.1.7:8645")


async def test_foreign_origin_and_rebinding_host_are_refused_before_any_method(
    rpc: Harness,
) -> None:
    request = {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1}
    port = int(rpc.url.rsplit(":", 1)[1])
    # Even with the cookie: a page elsewhere (or a rebound name) may not use it.
    for headers in (
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},
        {"Origin": "null"},
        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
        {"Host": f"evil.example:{port}"},
    ):
        refused = await rpc.http.post(rpc.url + "/rpc", content=json.dumps(request),
                                      headers=headers)  # fmt: skip
        assert refused.status_code == 403, headers
        assert refused.json()["error"]["code"] == FORBIDDEN
        assert "access-control-allow-origin" not in refused.headers
    assert rpc.calls == []  # no method ran
    for own in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        ok = await rpc.http.post(rpc.url + "/rpc", json=request, headers={"Origin": own})
        assert (ok.status_code, ok.json()["result"]) == (200, 3)
        assert "access-control-allow-origin" not in ok.headers  # no CORS by default
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(
            rpc.ws_url, extra_headers=[*WS_AUTH, (b"Origin", b"https://evil.example")]
        ):
            pass
    assert rejected.value.status_code == 403
    assert rpc.calls == [("add", "ok"), ("add", "ok")]


async def test_a_dashboard_link_opens_one_session_once(nursery: trio.Nursery) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response

    async def page(request: Request) -> Response:
        return PlainTextResponse("the page")

    server = RPCServer(
        RPCServerConfig(cookie=COOKIE), sample_registry(), ready=lambda: True, metrics=bytes
    )
    server.add_page("/page", page)
    url = await nursery.start(server.run)
    with pytest.raises(ValueError, match="not a page"):
        server.login_url("/rpc")
    link = server.login_url("/page")
    assert link.startswith(url + "/page?token=")
    own = {"Origin": url}
    request = {"jsonrpc": "2.0", "method": "add", "params": [2, 2], "id": 1}
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(url + "/page")).status_code == 401
        opened = await http.get(link)
        assert (opened.status_code, opened.headers["location"]) == (303, "/page")
        name, _, rest = opened.headers["set-cookie"].partition("=")
        session, *attrs = [a.strip() for a in rest.split(";")]
        assert name == f"vcoin_session_{server.port}"
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attrs)
        again = await http.get(link)  # spent
        assert again.status_code == 401 and "already used" in again.json()["error"]["message"]
        assert "set-cookie" not in again.headers
        jar = {"Cookie": f"{name}={session}"}
        assert (await http.get(url + "/page", headers=jar)).text == "the page"
        assert (
            await http.get(url + "/page", headers={"Cookie": f"{name}=forged"})
        ).status_code == 401
        other_port = {"Cookie": f"vcoin_session_1={session}"}
        assert (await http.get(url + "/page", headers=other_port)).status_code == 401
        # The page's own calls: with the Origin that proves they come from it.
        ok = await http.post(url + "/rpc", json=request, headers={**jar, **own})
        assert ok.json()["result"] == 4
        blind = await http.post(url + "/rpc", json=request, headers=jar)
        assert blind.status_code == 401
    ws_url = url.replace("http://", "ws://") + "/ws"
    cookie = [(b"Cookie", f"{name}={session}".encode())]
    async with trio_websocket.open_websocket_url(
        ws_url, extra_headers=[*cookie, (b"Origin", url.encode())]
    ) as ws:
        assert (await ws_call(ws, request))["result"] == 4
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(ws_url, extra_headers=cookie):
            pass
    assert rejected.value.status_code == 401


async def test_cors_only_for_configured_origins(nursery: trio.Nursery) -> None:
    ops = "https://ops.example"
    server = RPCServer(
        RPCServerConfig(cookie=COOKIE, origins=(ops,), hosts=("vcoin.lan",)),
        sample_registry(),
        ready=lambda: True,
        metrics=bytes,
    )
    url = await nursery.start(server.run)
    request = {"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": 1}
    async with httpx.AsyncClient(timeout=10) as http:
        preflight = await http.options(url + "/rpc", headers={
            "Origin": ops, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == ops
        assert "authorization" in preflight.headers["access-control-allow-headers"]
        assert "access-control-allow-credentials" not in preflight.headers
        ok = await http.post(url + "/rpc", json=request, headers={**AUTH, "Origin": ops})
        assert ok.json()["result"] == 2 and ok.headers["access-control-allow-origin"] == ops
        # A configured origin still needs the cookie.
        assert (
            await http.post(url + "/rpc", json=request, headers={"Origin": ops})
        ).status_code == 401
        lan = await http.post(url + "/rpc", json=request,
                              headers={**AUTH, "Host": "vcoin.lan:8645"})  # fmt: skip
        assert lan.json()["result"] == 2


def test_login_tokens_are_spent_once_and_expire() -> None:
    now = [0.0]
    sessions = Sessions(clock=lambda: now[0])
    token = sessions.mint_token()
    session = sessions.redeem(token)
    assert session is not None and sessions.valid(session)
    assert sessions.redeem(token) is None  # spent
    assert not sessions.valid(token) and not sessions.valid("guess")
    late = sessions.mint_token()
    now[0] += TOKEN_TTL_S + 1
    assert sessions.redeem(late) is None  # expired unused
    assert sessions.valid(session)
    now[0] += SESSION_TTL_S
    assert not sessions.valid(session)
    tokens = [sessions.mint_token() for _ in range(MAX_TOKENS + 1)]
    assert sessions.redeem(tokens[0]) is None  # the oldest was forgotten
    assert sessions.redeem(tokens[-1]) is not None


def test_rpc_hosts_and_origins_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={"VCOIN_RPC_HOSTS": "vcoin.lan,ops.lan:8645",
                              "VCOIN_RPC_ORIGINS": "https://ops.example"}, flags={})  # fmt: skip
    assert cfg.rpc.hosts == ("vcoin.lan", "ops.lan:8645")
    assert cfg.rpc.origins == ("https://ops.example",)
    assert load(tmp_path, env={}, flags={}).rpc.origins == ()  # no CORS by default
    for key, bad in (("ORIGINS", "ops.example"), ("ORIGINS", "https://ops.example/app"),
                     ("HOSTS", "http://vcoin.lan")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"rpc.{key.lower()}"):
            load(tmp_path, env={f"VCOIN_RPC_{key}": bad}, flags={})


async def test_gateway_paths_take_api_keys_and_the_cookie_only_from_loopback() -> None:
    from vcoind.rpc.guard import AccessGuard
    from vcoind.rpc.sessions import Sessions

    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope.get("state", {}).get("api_key", "cookie"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = AccessGuard(app, AccessPolicy("0.0.0.0", 8645, (), ()), "c00kie", Sessions(), ())

    async def check(key: str | None) -> str | None:
        return "k1" if key == "vk-k1-good" else None

    guard.api_keys = check

    async def status(path: str, token: str, client: str) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"",
                 "client": (client, 5000), "headers": [
                     (b"host", b"203.0.113.7:8645"),
                     (b"authorization", b"Bearer " + token.encode())]}  # fmt: skip
        await guard(scope, receive, send)
        return int(sent[0]["status"])

    assert await status("/v1/models", "c00kie", "127.0.0.1") == 200
    assert await status("/v1/models", "c00kie", "203.0.113.9") == 401  # not off loopback
    assert await status("/v1/models", "vk-k1-good", "203.0.113.9") == 200
    assert await status("/api/v1/task/x/status", "vk-k1-good", "203.0.113.9") == 200
    assert await status("/v1/models", "vk-k1-revoked", "127.0.0.1") == 401
    assert await status("/rpc", "vk-k1-good", "127.0.0.1") == 401  # keys open nothing else
    assert await status("/rpc", "c00kie", "203.0.113.9") == 200  # JSON-RPC: as before
    assert reached == ["cookie", "k1", "k1", "cookie"]

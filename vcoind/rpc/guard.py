"""Who may talk to the RPC port, checked before any route runs.

In order, for every HTTP request and WebSocket upgrade:

1. ``Host`` must name this daemon: a loopback name (127.0.0.1, localhost, [::1]) or the
   bound address, with its port; an IP literal on a wildcard bind (an IP cannot be
   rebound); or a name configured in ``rpc.hosts``. Anything else is a DNS-rebinding
   page: 403.
2. ``Origin``, when present, must be one of the daemon's own origins (a loopback name or
   the bound address with its port, or the origin the request was sent to) or one
   configured in ``rpc.origins``: a foreign web page gets 403. Only configured origins
   get CORS headers; there are none by default.
3. Credentials: the RPC cookie (``Authorization: Bearer <cookie>``), or a dashboard
   session cookie (for a WebSocket or any non-GET request only together with an allowed
   ``Origin``). The gateway's paths (``KEY_PATHS``: ``/v1/``, the seeds' task paths)
   take an API key instead, from anywhere, and the cookie from loopback clients only;
   an API key opens nothing else. ``GET <page>?token=...`` trades a one-time login token
   for that session. ``/health`` alone is open; it says nothing but "ok". Otherwise 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import string
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vcoind.rpc.errors import FORBIDDEN, UNAUTHORIZED
from vcoind.rpc.sessions import SESSION_TTL_S, Sessions

logger = logging.getLogger("vcoind.rpc")

OPEN_PATHS = frozenset({"/health"})
# The gateway's paths: API keys work here (and only here); the cookie from loopback only.
KEY_PATHS = ("/v1/", "/api/v1/", "/api/ai/")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
CORS_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST"),
    (b"access-control-allow-headers", b"authorization, content-type"),
    (b"access-control-max-age", b"600"),
    (b"vary", b"Origin"),
]
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-._")
_MAX_SHOWN = 80  # characters of a refused Host/Origin quoted back
_LOGGED_LIMIT = 64  # distinct refusals logged as warnings (then debug)
UNAUTHORIZED_HINT = (
    "unauthorized: send the RPC cookie as 'Authorization: Bearer <DATADIR/rpc.cookie>'; "
    "for the dashboard open the link `vcoin dashboard` prints"
)


def parse_authority(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` (``[v6][:port]``) -> (lowercase name, port or None); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    else:
        name, sep, port_s = value.partition(":")
        rest = sep + port_s
        if not name or not set(name) <= _NAME_CHARS:
            return None
    if not rest:
        return name, None
    port_s = rest[1:]
    if not rest.startswith(":") or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        return None
    return name, int(port_s)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _bracketed(host: str) -> str:
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class AccessPolicy:
    """The Host and Origin rules for one server. ``port`` is set once it is bound."""

    def __init__(
        self, bind_host: str, port: int | None, hosts: Iterable[str], origins: Iterable[str]
    ) -> None:
        self.port = port or None
        self._wildcard = bind_host.lower() in WILDCARD_BINDS
        self._own = set(LOOPBACK_NAMES)
        if not self._wildcard:
            self._own.add(_bracketed(bind_host))
        self._hosts: set[tuple[str, int | None]] = set()
        for entry in hosts:
            parsed = parse_authority(entry)
            if parsed is None:
                raise ValueError(f"rpc.hosts: not a host name or HOST:PORT: {entry!r}")
            self._hosts.add(parsed)
        self.origins = frozenset(o.strip().lower().rstrip("/") for o in origins)

    def host_ok(self, host: str | None) -> bool:
        parsed = parse_authority(host) if host is not None else None
        if parsed is None or self.port is None:
            return False
        name, port = parsed
        if (name, None) in self._hosts or (name, port) in self._hosts:
            return True
        if (port or 80) != self.port:
            return False
        return name in self._own or (self._wildcard and _is_ip(name))

    def origin_ok(self, origin: str, host: str | None) -> bool:
        """Whether ``origin`` may call (``host`` has passed `host_ok`)."""
        origin = origin.strip().lower()
        if origin in self.origins:
            return True
        scheme, sep, authority = origin.partition("://")
        parsed = parse_authority(authority) if sep else None
        if parsed is None or scheme not in ("http", "https"):
            return False
        name, port = parsed
        default = 443 if scheme == "https" else 80
        if scheme == "http" and name in self._own and (port or 80) == self.port:
            return True
        # Same origin as the request: the Host it was sent to, which is already allowed.
        sent_to = parse_authority(host) if host is not None else None
        return sent_to is not None and (sent_to[0], sent_to[1] or default) == (
            name,
            port or default,
        )


class AccessGuard:
    """ASGI middleware enforcing `AccessPolicy`, the RPC cookie and dashboard sessions."""

    def __init__(
        self,
        app: ASGIApp,
        policy: AccessPolicy,
        cookie: str,
        sessions: Sessions,
        pages: Iterable[str],
    ) -> None:
        self._app = app
        self._policy = policy
        self._cookie = cookie.encode()
        self._sessions = sessions
        self._pages = frozenset(pages)
        self._logged: set[tuple[str, str]] = set()
        # API key -> its id, or None (unknown, revoked): set by the gateway
        self.api_keys: Callable[[str], Awaitable[str | None]] | None = None

    @property
    def session_cookie(self) -> str:
        """Per port: browsers send a host's cookies to every port of it."""
        return f"vcoin_session_{self._policy.port}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        hosts = _values(scope, b"host")
        host = hosts[0] if len(hosts) == 1 else None
        if not self._policy.host_ok(host):
            shown = "none" if host is None and not hosts else repr(",".join(hosts)[:_MAX_SHOWN])
            self._log("host", shown)
            message = (f"forbidden: Host {shown} is not served by this daemon (DNS rebinding "
                       "guard; add the name to rpc.hosts)")  # fmt: skip
            await self._deny(scope, receive, send, 403, FORBIDDEN, message)
            return
        origins = _values(scope, b"origin")
        origin = origins[0] if origins else None
        if len(origins) > 1 or (origin is not None and not self._policy.origin_ok(origin, host)):
            shown = repr(",".join(origins)[:_MAX_SHOWN])
            self._log("origin", shown)
            message = (f"forbidden: Origin {shown} may not call this daemon (add it to "
                       "rpc.origins to allow a web page there)")  # fmt: skip
            await self._deny(scope, receive, send, 403, FORBIDDEN, message)
            return
        if origin is not None and origin.strip().lower() in self._policy.origins:
            send = _with_headers(send, [(b"access-control-allow-origin", origin.encode()),
                                        *CORS_HEADERS])  # fmt: skip
            if scope["type"] == "http" and scope["method"] == "OPTIONS":
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        if scope["path"] in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        if scope["path"].startswith(KEY_PATHS):
            await self._gateway(scope, receive, send)
            return
        if self._bearer_ok(scope):
            await self._app(scope, receive, send)
            return
        is_get = scope["type"] == "http" and scope["method"] in ("GET", "HEAD")
        if is_get and scope["path"] in self._pages:
            token = parse_qs(scope["query_string"].decode("latin-1")).get("token")
            if token:
                await self._login(scope, receive, send, token[0])
                return
        # A session cookie rides along with any request the browser makes; where that
        # could change state it must come with the Origin that proves the page is ours.
        if self._session_ok(scope) and (is_get or origin is not None):
            await self._app(scope, receive, send)
            return
        self._log("auth", scope["path"][:_MAX_SHOWN], level=logging.DEBUG)
        await self._deny(scope, receive, send, 401, UNAUTHORIZED, UNAUTHORIZED_HINT)

    async def _gateway(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The OpenAI and REST gateway's paths: an API key from anywhere (its id goes in
        ``scope["state"]["api_key"]``), the cookie from loopback only."""
        bearer = _bearer(scope)
        if bearer is not None and bearer.startswith(b"vk-") and self.api_keys is not None:
            key_id = await self.api_keys(bearer.decode("latin-1"))
            if key_id is None:
                await self._deny(scope, receive, send, 401, UNAUTHORIZED,
                                 "unauthorized: unknown or revoked API key")  # fmt: skip
                return
            scope.setdefault("state", {})["api_key"] = key_id
            await self._app(scope, receive, send)
            return
        if self._bearer_ok(scope):
            if _loopback_client(scope):
                await self._app(scope, receive, send)
                return
            message = ("unauthorized: off loopback the gateway takes an API key "
                       "(`vcoind apikey create NAME` on the node), not the RPC cookie")  # fmt: skip
        else:
            message = ("unauthorized: send an API key (`vcoind apikey create NAME`) or, from "
                       "this machine, the RPC cookie, as 'Authorization: Bearer ...'")  # fmt: skip
        await self._deny(scope, receive, send, 401, UNAUTHORIZED, message)

    def _bearer_ok(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = _bearer_token(value) or b""
            elif name == b"x-vcoin-cookie":
                presented = value.strip()
            else:
                continue
            if hmac.compare_digest(presented, self._cookie):
                return True
        return False

    def _session_ok(self, scope: Scope) -> bool:
        wanted = self.session_cookie
        for header in _values(scope, b"cookie"):
            for part in header.split(";"):
                name, _, value = part.strip().partition("=")
                if name == wanted and self._sessions.valid(value):
                    return True
        return False

    async def _login(self, scope: Scope, receive: Receive, send: Send, token: str) -> None:
        session = self._sessions.redeem(token)
        if session is None:
            message = ("this dashboard link was already used or has expired: run "
                       "`vcoin dashboard` for a new one")  # fmt: skip
            await self._deny(scope, receive, send, 401, UNAUTHORIZED, message)
            return
        cookie = (f"{self.session_cookie}={session}; Path=/; Max-Age={int(SESSION_TTL_S)}; "
                  "HttpOnly; SameSite=Strict")  # fmt: skip
        # To the same path without the token, so it leaves the address bar and history.
        headers = [(b"location", scope["path"].encode()), (b"set-cookie", cookie.encode()),
                   (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
                   (b"content-length", b"0")]  # fmt: skip
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _deny(
        self, scope: Scope, receive: Receive, send: Send, status: int, code: int, message: str
    ) -> None:
        if scope.get("path", "").startswith("/v1/"):  # the OpenAI API's error shape
            kind = "authentication_error" if status == 401 else "permission_error"
            error = {"message": message, "type": kind, "param": None, "code": kind}
            body = json.dumps({"error": error}).encode()
        else:
            body = json.dumps({"jsonrpc": "2.0", "error": {"code": code, "message": message},
                               "id": None}).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": headers})  # fmt: skip
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})

    def _log(self, kind: str, what: str, level: int = logging.WARNING) -> None:
        key = (kind, what)
        if level >= logging.WARNING and (key in self._logged or len(self._logged) >= _LOGGED_LIMIT):
            level = logging.DEBUG  # said once per distinct value: a page cannot flood the log
        if len(self._logged) < _LOGGED_LIMIT:
            self._logged.add(key)
        logger.log(level, "RPC refused a request: %s %s", kind, what)


def _values(scope: Scope, header: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope["headers"] if k == header]


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _bearer_token(authorization: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header's value (None: another
    scheme)."""
    scheme, _, token = bytes(authorization).partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def _bearer(scope: Scope) -> bytes | None:
    """The first bearer token among the Authorization headers."""
    for name, value in scope["headers"]:
        if name == b"authorization" and (token := _bearer_token(value)) is not None:
            return token
    return None


def _loopback_client(scope: Scope) -> bool:
    client = scope.get("client")
    try:
        return client is not None and ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False

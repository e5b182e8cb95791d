"""Transport-independent JSON-RPC 2.0 request handling."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from vcoind.rpc.errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RPCError,
)
from vcoind.rpc.methods import MethodRegistry, RPCMethod, bind_params

logger = logging.getLogger("vcoind.rpc")

OnCall = Callable[[str, str], None]

INVALID_LABEL = "<invalid>"
UNKNOWN_LABEL = "<unknown>"
_MAX_NAME_IN_MESSAGE = 64


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _valid_id(value: object) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, int) and not isinstance(value, bool))
    )


def encode_error(request_id: Any, error: RPCError) -> str:
    body = {"jsonrpc": "2.0", "error": error.to_json(), "id": request_id}
    try:
        return json.dumps(body, allow_nan=False)
    except (TypeError, ValueError):
        # Unserialisable error data from a handler: report the error without it.
        body["error"] = RPCError(error.code, error.message).to_json()
        return json.dumps(body)


class Dispatcher:
    """Decodes a request body, runs the methods it names and encodes the reply."""

    def __init__(self, registry: MethodRegistry, *, max_batch: int, on_call: OnCall | None) -> None:
        self._registry = registry
        self._max_batch = max_batch
        self._on_call = on_call

    async def handle(
        self, body: bytes | str, session_methods: Mapping[str, RPCMethod] | None = None
    ) -> str | None:
        """Return the JSON response text, or None when nothing must be sent back.

        `session_methods` are connection-bound methods (WebSocket subscriptions)
        that take precedence over the registry.
        """
        extra = session_methods or {}
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            self._count(INVALID_LABEL, "error")
            return encode_error(None, RPCError(PARSE_ERROR, f"parse error: {exc}"))
        if not isinstance(payload, list):
            return await self._handle_one(payload, extra)
        if not payload:
            self._count(INVALID_LABEL, "error")
            return encode_error(None, RPCError(INVALID_REQUEST, "invalid request: empty batch"))
        if len(payload) > self._max_batch:
            self._count(INVALID_LABEL, "error")
            message = f"invalid request: batch too large ({len(payload)} > {self._max_batch})"
            return encode_error(None, RPCError(INVALID_REQUEST, message))
        replies = [await self._handle_one(item, extra) for item in payload]
        answered = [reply for reply in replies if reply is not None]
        return "[" + ",".join(answered) + "]" if answered else None

    async def _handle_one(self, request: Any, extra: Mapping[str, RPCMethod]) -> str | None:
        if not isinstance(request, dict):
            return self._invalid(None, "request must be an object")
        request_id = request.get("id")
        if not _valid_id(request_id):
            return self._invalid(None, "id must be a string, an integer or null")
        if request.get("jsonrpc") != "2.0":
            return self._invalid(request_id, 'jsonrpc must be "2.0"')
        name = request.get("method")
        if not isinstance(name, str):
            return self._invalid(request_id, "method must be a string")
        params = request.get("params")
        if "params" in request and not isinstance(params, list | dict):
            return self._invalid(request_id, "params must be an object or an array")

        method = extra.get(name) or self._registry.get(name)
        if method is None:
            self._count(UNKNOWN_LABEL, "error")
            error = RPCError(METHOD_NOT_FOUND, f"method not found: {name[:_MAX_NAME_IN_MESSAGE]}")
            return encode_error(request_id, error) if "id" in request else None

        try:
            result = await method.handler(bind_params(method, params))
            reply = None
            if "id" in request:
                reply = json.dumps(
                    {"jsonrpc": "2.0", "result": result, "id": request_id}, allow_nan=False
                )
        except RPCError as exc:
            self._count(name, "error")
            return encode_error(request_id, exc) if "id" in request else None
        except Exception:
            logger.exception("RPC method %s failed", name)
            self._count(name, "error")
            error = RPCError(INTERNAL_ERROR, "internal error")
            return encode_error(request_id, error) if "id" in request else None
        self._count(name, "ok")
        return reply

    def _invalid(self, request_id: Any, problem: str) -> str:
        self._count(INVALID_LABEL, "error")
        return encode_error(request_id, RPCError(INVALID_REQUEST, f"invalid request: {problem}"))

    def _count(self, label: str, outcome: str) -> None:
        if self._on_call is not None:
            self._on_call(label, outcome)

"""JSON-RPC error codes and the package's exception types."""

from __future__ import annotations

from typing import Any

# JSON-RPC 2.0 standard codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application range (-32000 .. -32099).
UNAUTHORIZED = -32001
FORBIDDEN = -32003  # a foreign Origin or an unknown Host (the HTTP status is 403)
NOT_FOUND = -32004
LIMIT_EXCEEDED = -32005
CHAIN_ERROR = -32010  # no chain, chain unreachable, or the contract refused
ORACLE_ERROR = -32020  # oracle off, unknown symbol, or no data from the source nor stored


class RPCError(Exception):
    """An error that is reported to the client as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: object | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class RPCConfigError(RPCError, ValueError):
    """The RPC server was configured in a way that is unsafe or unusable."""

    def __init__(self, message: str) -> None:
        super().__init__(INTERNAL_ERROR, message)

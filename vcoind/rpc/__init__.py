"""JSON-RPC 2.0 over HTTP and WebSocket, plus /health, /ready and /metrics."""

from vcoind.rpc.errors import (
    CHAIN_ERROR,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LIMIT_EXCEEDED,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    ORACLE_ERROR,
    PARSE_ERROR,
    UNAUTHORIZED,
    RPCConfigError,
    RPCError,
)
from vcoind.rpc.methods import MethodRegistry, Param, RPCMethod
from vcoind.rpc.server import RPCServer, RPCServerConfig

__all__ = [
    "CHAIN_ERROR",
    "FORBIDDEN",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LIMIT_EXCEEDED",
    "METHOD_NOT_FOUND",
    "NOT_FOUND",
    "ORACLE_ERROR",
    "PARSE_ERROR",
    "UNAUTHORIZED",
    "MethodRegistry",
    "Param",
    "RPCConfigError",
    "RPCError",
    "RPCMethod",
    "RPCServer",
    "RPCServerConfig",
]

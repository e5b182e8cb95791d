"""JSON-RPC methods of operations: alerts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vcoind.rpc import MethodRegistry, Param, RPCError
from vcoind.rpc import RPCMethod as M
from vcoind.rpc.errors import INVALID_REQUEST

if TYPE_CHECKING:
    from vcoind.node import Node


def register_ops_api(reg: MethodRegistry, node: Node) -> None:
    async def alerts(params: dict[str, Any]) -> dict[str, Any]:
        if node.alerts is None:
            raise RPCError(INVALID_REQUEST, "alerts are off on this node (alerts.enabled)")
        rows = node.alerts.list(params["active_only"], params["limit"])
        return {
            "active": len(node.alerts.active),
            "alerts": rows,
            "rules": sorted(node.alerts.rules),
        }

    reg.add(M(
        "vcoin_alerts",
        "Alerts: active ones first (newest first), then resolved ones. Live events (fired, "
        "escalated, resolved) on the WebSocket channel `alerts`.",
        (
            Param("active_only", {"type": "boolean"}, default=False),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, default=100),
        ),
        {"type": "object"}, alerts,
    ))  # fmt: skip

"""JSON-RPC methods of operations: alerts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vcoind.rpc import MethodRegistry, Param, RPCError
from vcoind.rpc import RPCMethod as M
from vcoind.rpc.errors import INVALID_REQUEST

if TYPE_CHECKING:
    from vcoind.node import Node


DASHBOARD = Path(__file__).resolve().parent / "dashboard"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip


def add_dashboard_routes(server: Any) -> None:
    """``GET /``: the dashboard; ``GET /dashboard/<file>``: its assets (no CDN)."""
    from starlette.requests import Request
    from starlette.responses import Response

    def serve(name: str) -> Response:
        path = DASHBOARD / name
        if path.parent != DASHBOARD or path.suffix not in _TYPES or not path.is_file():
            return Response("not found", status_code=404)
        return Response(path.read_bytes(), media_type=_TYPES[path.suffix],
                        headers={"cache-control": "no-cache"})  # fmt: skip

    async def index(request: Request) -> Response:
        return serve("index.html")

    async def asset(request: Request) -> Response:
        return serve(request.path_params["name"])

    server.add_route("/", index, ["GET"])
    server.add_route("/dashboard/{name}", asset, ["GET"])


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

"""JSON-RPC methods of operations: alerts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vcoind.ops.sla import SLATerms
from vcoind.rpc import INVALID_PARAMS, NOT_FOUND, MethodRegistry, Param, RPCError
from vcoind.rpc import RPCMethod as M
from vcoind.rpc.errors import INVALID_REQUEST
from vcoind.rpc.sessions import TOKEN_TTL_S

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from vcoind.ops.alerts import AlertEngine
    from vcoind.rpc import RPCServer
    from vcoind.store import SLAStore


DASHBOARD = Path(__file__).resolve().parent / "dashboard"
# The page runs only its own scripts and is never framed by another site.
_PAGE_HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data:; "
                 "frame-ancestors 'none'", "x-frame-options": "DENY",
                 "referrer-policy": "no-referrer"}  # fmt: skip
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}  # fmt: skip


def add_dashboard_routes(server: RPCServer) -> None:
    """``GET /dashboard``: the dashboard (a page: it opens from the one-time link
    ``vcoin_dashboardUrl`` mints); ``GET /dashboard/<file>``: its assets (no CDN);
    ``GET /``: a redirect to it."""
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response

    def serve(name: str) -> Response:
        path = DASHBOARD / name
        if path.parent != DASHBOARD or path.suffix not in _TYPES or not path.is_file():
            return Response("not found", status_code=404)
        return Response(path.read_bytes(), media_type=_TYPES[path.suffix],
                        headers={"cache-control": "no-cache", **_PAGE_HEADERS})  # fmt: skip

    async def index(request: Request) -> Response:
        return serve("index.html")

    async def asset(request: Request) -> Response:
        return serve(request.path_params["name"])

    async def root(request: Request) -> Response:
        return RedirectResponse("/dashboard", status_code=303)

    async def dashboard_url(params: dict[str, Any]) -> dict[str, Any]:
        return {"url": server.login_url("/dashboard"), "expires_in_s": TOKEN_TTL_S}

    server.add_page("/dashboard", index)
    server.add_route("/", root, ["GET"])
    server.add_route("/dashboard/{name}", asset, ["GET"])
    server.add_method(M(
        "vcoin_dashboardUrl",
        "A fresh one-time link to the dashboard: opening it sets an HttpOnly, SameSite=Strict "
        "session cookie for this browser, and the link is spent.",
        (), {"type": "object"}, dashboard_url,
    ))  # fmt: skip


def register_ops_api(
    reg: MethodRegistry,
    alerts_: AlertEngine | None,
    slas: SLAStore,
    sla_evaluate: Callable[[str | None], Awaitable[list[dict[str, Any]]]],
) -> None:
    async def alerts(params: dict[str, Any]) -> dict[str, Any]:
        if alerts_ is None:
            raise RPCError(INVALID_REQUEST, "alerts are off on this node (alerts.enabled)")
        rows = alerts_.list(params["active_only"], params["limit"])
        return {
            "active": len(alerts_.active),
            "alerts": rows,
            "rules": sorted(alerts_.rules),
        }

    async def sla_create(params: dict[str, Any]) -> dict[str, Any]:
        try:
            terms = SLATerms(params["customer"], params["uptime_pct"], params["max_latency_s"],
                             params["min_throughput_per_day"], params["price"],
                             params["penalty_rate"])  # fmt: skip
        except ValueError as exc:
            raise RPCError(INVALID_PARAMS, str(exc)) from None
        await slas.put_terms(terms)
        return {"customer": terms.customer, "terms": dataclasses.asdict(terms)}

    async def sla_status(params: dict[str, Any]) -> dict[str, Any]:
        rows = await sla_evaluate(params["customer"])
        if not rows:
            raise RPCError(NOT_FOUND, f"customer: no SLA for {params['customer']!r}")
        return rows[0]

    async def sla_list(params: dict[str, Any]) -> dict[str, Any]:
        return {"slas": await sla_evaluate(None)}

    async def sla_violations(params: dict[str, Any]) -> dict[str, Any]:
        rows = await slas.violations(params["customer"], params["limit"])
        return {"violations": rows, "total_penalty": round(sum(r["penalty"] for r in rows), 9)}

    customer = {"type": "string", "pattern": "[A-Za-z0-9_.-]{1,64}"}
    reg.add(M(
        "vcoin_slaCreate", "Create or replace a customer's SLA terms.",
        (
            Param("customer", customer, required=True),
            Param("uptime_pct", {"type": "number", "minimum": 0.001, "maximum": 100},
                  default=99.9),
            Param("max_latency_s", {"type": "number", "minimum": 0.000001}, default=5.0,
                  description="p95 of submit-to-completion"),
            Param("min_throughput_per_day", {"type": "number", "minimum": 0}, default=0.0),
            Param("price", {"type": "number", "minimum": 0}, default=0.0),
            Param("penalty_rate", {"type": "number", "minimum": 0, "maximum": 1}, default=0.1,
                  description="share of the price owed to the customer per violation (the "
                  "seeds' compensation; recorded, the workers' signed prices are not cut)"),
        ),
        {"type": "object"}, sla_create,
    ))  # fmt: skip
    reg.add(M("vcoin_slaStatus", "A customer's compliance now: uptime of the nodes serving "
              "it, p95 latency, throughput, violations, breaches imminent.",
              (Param("customer", customer, required=True),), {"type": "object"},
              sla_status))  # fmt: skip
    reg.add(M("vcoin_slaList", "Every customer's compliance now.", (), {"type": "object"},
              sla_list))  # fmt: skip
    reg.add(M("vcoin_slaViolations", "Recorded violations with evidence and penalty, newest "
              "first.", (Param("customer", customer, default=None),
                         Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                               default=50)), {"type": "object"}, sla_violations))  # fmt: skip
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

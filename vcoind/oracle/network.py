"""The oracle as a network service: the local oracle (when enabled), its replica side on
``/vcoin/task/1.0.0`` (queries and confirmations from other origins), and replicated
queries this node is origin of (combined, signed and, with a chain, anchored)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vcoind.chain.typed import DECISIONS, Outcome
from vcoind.config import subset
from vcoind.market.payments import Payments
from vcoind.market.settle import Settled, Settler, Vote
from vcoind.metrics import NodeMetrics
from vcoind.oracle import OracleError
from vcoind.oracle.api import ORACLE_GET_PATHS, register_oracle_api
from vcoind.oracle.replicated import (
    OracleConfirm,
    OracleQuery,
    OracleReplica,
    new_task_id,
    replicated_query,
)
from vcoind.p2p.streams import StreamProtocolError
from vcoind.store import OracleStore, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.config import OracleConfig
    from vcoind.market.service import MarketService
    from vcoind.oracle.service import OracleService
    from vcoind.presence.service import PresenceService
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.oracle")


class OracleNetwork:
    def __init__(
        self,
        cfg: OracleConfig,
        payments: Payments,
        store: Store,
        metrics: NodeMetrics,
        presence: PresenceService,
        market: MarketService,
        *,
        settler: Settler | None = None,
    ) -> None:
        self._view = presence.view
        self._market = market
        self._settler = settler
        self._payments = payments
        self.local: OracleService | None = None
        self._replica: OracleReplica | None = None
        if cfg.enabled:
            from vcoind.oracle.service import OracleService, OracleSettings  # httpx, numpy

            coins = tuple((a.strip(), b.strip())
                          for a, _, b in (c.partition("=") for c in cfg.coins))  # fmt: skip
            classifier = str(Path(cfg.classifier_dir).expanduser()) if cfg.classifier_dir else ""
            settings = subset(OracleSettings, cfg, coins=coins, classifier_dir=classifier)
            self.local = OracleService(
                settings, OracleStore(store),
                on_cache=lambda cache, hit: metrics.oracle_cache.labels(
                    cache=cache, result="hit" if hit else "miss").inc(),
            )  # fmt: skip
            self._replica = OracleReplica(
                self.local, payments, eth_address_of=presence.view.eth_address_of,
                on_refused=lambda reason: metrics.sign_refused.labels(
                    kind="oracle", reason=reason).inc(),
            )  # fmt: skip
            presence.announce(services=("oracle",))

    async def query(self, kind: str, symbol: str, window: str, replicas: int) -> dict[str, Any]:
        """An oracle answer from ``replicas`` oracle nodes (this one first), combined,
        signed and, with a chain, anchored; see ``vcoind.oracle.replicated``."""
        view, market = self._view, self._market
        mine = [view.peer_id] if self.local is not None else []
        others = view.with_service("oracle")
        reps = await market.reputations(others)
        others.sort(key=lambda p: (-reps[p], p))
        chosen = (mine + others)[:replicas]
        if len(chosen) < 2:
            raise OracleError(f"{len(chosen)} oracle node(s) known; a replicated answer needs 2")
        q = OracleQuery(new_task_id(), kind, symbol.upper() if kind == "price" else "", window)
        pay = self._payments
        answer, sigs, out, decision = await replicated_query(
            q, chosen, market.protocol.send, market.reputations,
            market.consensus_store.adjust_reputation,
            lambda model_id: pay.unpaid_ticket(q.task_id, model_id, "oracle", len(chosen),
                                               False).hash(),
        )  # fmt: skip
        answer["anchor"] = None
        if self._settler is not None and decision != "none":
            votes = [Vote(p, view.eth_address_of(p) or "", s) for p, s in sigs]
            outcome = Outcome(bytes.fromhex(answer["result_hash"]), DECISIONS[decision], 0)
            await self._settler.settle(Settled(
                q.task_id, answer["model_id"], "oracle", outcome, votes, len(chosen), False,
            ))  # fmt: skip
            answer["anchor"] = f"anchor:{q.task_id} (vcoin_getAnchor)"
        log.info("oracle %s %s %s: %s, %d signed, outliers %s", kind, q.symbol, window,
                 decision, len(sigs), [p[-6:] for p in out] or "none")  # fmt: skip
        return answer

    async def _on_query(self, peer: str, q: OracleQuery) -> Any:
        if self._replica is None:
            raise StreamProtocolError("this node does not run the oracle")
        return await self._replica.on_query(peer, q)

    async def _on_confirm(self, peer: str, c: OracleConfirm) -> Any:
        if self._replica is None:
            raise StreamProtocolError("this node does not run the oracle")
        return await self._replica.on_confirm(peer, c)

    def mount(self, m: Mounts) -> None:
        self._market.protocol.handle(OracleQuery, self._on_query)
        self._market.protocol.handle(OracleConfirm, self._on_confirm)
        register_oracle_api(m.rpc, self.local, self.query)
        for path, method in ORACLE_GET_PATHS.items():
            m.http.add_get_alias(path, method, query=True)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.local is None:
            task_status.started()
            return
        await self.local.run(task_status=task_status)

    async def aclose(self) -> None:
        """Close the local oracle's HTTP clients (whether or not it ran)."""
        if self.local is not None:
            await self.local.aclose()

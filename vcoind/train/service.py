"""The training service: LoRA training as a worker, as an origin, and adapters.

It serves ``/vcoin/train/1.0.0`` (``TrainHost``: shards, rounds, blobs), runs the
FedAvg rounds of the ``lora_training`` tasks this node is origin of (the market's
``Trainer`` port: ``run_training``), keeps the adapters trained or fetched here and
announces them, fetches an adapter from the peers that announce it (checked by its
hash), and settles a finished training (its signers anchor the adapter; unpaid for now).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from vcoind.chain.typed import Outcome
from vcoind.market.payments import Payments, unpaid_ticket_of
from vcoind.market.ports import OnView
from vcoind.market.settle import Settled, Settler, Vote
from vcoind.metrics import NodeMetrics
from vcoind.p2p.streams import ErrorReply, StreamProtocol, StreamProtocolError, StreamService
from vcoind.presence.service import PresenceService
from vcoind.store import TaskRow
from vcoind.train.adapters import AdapterStore, BlobCache, Refusal, pull_blob
from vcoind.train.host import TrainHost
from vcoind.train.run import TrainingRun
from vcoind.train.spec import LoraSettings, TrainError, parse_jsonl, sha256_hex
from vcoind.train.wire import TRAIN_PROTOCOL, TRAIN_REQUESTS, TrainJoin, TrainProgress

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.compute.service import ComputeService
    from vcoind.config import MarketConfig
    from vcoind.market.messages import TaskBid
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.train")

# A training round answers when its steps are done: the serving side allows a day (the
# origin's own limit, market.train_round_timeout_s, is what counts).
TRAIN_STREAM = StreamProtocol(
    TRAIN_PROTOCOL, TRAIN_REQUESTS, max_request_bytes=TrainJoin.MAX_BYTES, timeout_s=86_400.0
)


class TrainService:
    def __init__(
        self,
        cfg: MarketConfig,
        datadir: Path,
        payments: Payments,
        streams: StreamService,
        presence: PresenceService,
        compute: ComputeService,
        *,
        settler: Settler | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics or NodeMetrics()
        self._datadir = datadir
        self.datasets_dir = datadir / "train"
        self._payments = payments
        self._streams = streams
        self._presence = presence
        self._view = presence.view
        self._compute = compute
        self._settler = settler
        cc = compute.cfg
        self.adapters = AdapterStore(
            datadir / "adapters", quota_bytes=int(cc.adapter_quota_mb_per_peer * (1 << 20)),
            capacity_bytes=int(cc.adapter_store_mb * (1 << 20)),
        )  # fmt: skip
        self.blobs = BlobCache()
        self._rates: dict[str, float] = {}  # model id -> measured samples per second
        self.host = TrainHost(
            compute.models, self.adapters, self.blobs, self.send,
            device=lambda: str(compute.executor_now().device),
            limiter=self._limiter, lora=self.lora, sign=self._sign_adapter,
            ticket=self._ticket_hash, on_adapters=self._announce_adapters,
            on_rate=self._rates.__setitem__, on_refused=self._refused,
            slots=cc.train_slots, slots_per_peer=cc.train_slots_per_peer,
        )  # fmt: skip
        self._lora_lock = trio.Lock()
        self._trainings: dict[str, TrainingRun] = {}
        self._adapter_fetches: dict[str, trio.Event] = {}

    # --- the market's Trainer port -------------------------------------------

    def can_train(self) -> bool:
        return importlib.util.find_spec("peft") is not None

    def samples_per_s(self, model_id: str) -> float | None:
        return self._rates.get(model_id)

    def offered(self, task_id: str, origin: str) -> None:
        self.host.offered(task_id, origin)

    def adapter_known(self, adapter_id: str) -> bool:
        return self.adapters.has(adapter_id) or bool(self._view.holders(adapter_id))

    async def adapter_path(self, adapter_id: str) -> Path:
        """The adapter's file here, pulled (and checked by hash) from a holder first if
        need be; TrainError when no holder hands over the right bytes."""
        path = self.adapters.path(adapter_id)
        while adapter_id in self._adapter_fetches:  # one fetch per adapter at a time
            await self._adapter_fetches[adapter_id].wait()
        if path.is_file():
            return path
        done = self._adapter_fetches[adapter_id] = trio.Event()
        errors = []
        try:
            for peer in self._view.holders(adapter_id):
                try:
                    data = await pull_blob(self.send, peer, adapter_id)
                    await trio.to_thread.run_sync((await self.lora()).adapter_from_bytes, data)
                    # kept on the holder's quota: a peer that announces adapters cannot
                    # fill our disk with them
                    await trio.to_thread.run_sync(self.adapters.put, adapter_id, data, peer)
                except (StreamProtocolError, TrainError) as exc:
                    if isinstance(exc, Refusal):
                        self._refused(exc)
                    errors.append(f"{peer[-8:]}: {exc}")
                    continue
                log.info("adapter %s fetched from %s", adapter_id[:12], peer)
                self._announce_adapters()
                return path
        finally:
            del self._adapter_fetches[adapter_id]
            done.set()
        raise TrainError(f"adapter {adapter_id[:12]}: no node handed it over "
                         f"({'; '.join(errors) or 'no holder known'})")  # fmt: skip

    async def run_training(
        self, row: TaskRow, bids: list[TaskBid], on_view: OnView
    ) -> dict[str, Any]:
        p = row.parameters
        settings = LoraSettings.from_dict(p["lora"])
        data = await trio.to_thread.run_sync(Path(p["dataset_file"]).read_bytes)
        examples = parse_jsonl(data, "dataset")
        peers = [b.peer_id for b in bids]
        n = int(p["nodes"])
        if len(peers) < n:
            log.info("task %s: %d node(s) asked for, %d bid; training on %d", row.id, n,
                     len(peers), len(peers))  # fmt: skip
        n = min(n, len(peers))
        saved = AdapterStore(self.datasets_dir / row.id)  # the last round's average
        resume = None
        if row.training.get("history"):
            last = await trio.to_thread.run_sync(saved.get, row.training["global_adapter"])
            shards = len(row.training.get("shards", ()))
            if last is None:
                log.warning("task %s: the earlier run's adapter is gone; training from the "
                            "start", row.id)  # fmt: skip
            elif shards > len(peers) * self.host.slots_per_peer:
                log.warning("task %s: %d node(s) bid, too few for the earlier run's %d shards; "
                            "training from the start", row.id, len(peers), shards)  # fmt: skip
            else:
                resume = {"view": row.training, "adapter": last}

        async def on_round(adapter: bytes) -> None:
            """The round's average on disk, then its history in the task: a restarted
            origin goes on from here."""
            h = sha256_hex(adapter)
            await trio.to_thread.run_sync(saved.put, h, adapter)
            await on_view(run.view())
            for old in saved.ids():
                if old != h:
                    saved.path(old).unlink(missing_ok=True)

        run = TrainingRun(
            row.id, row.model, bids[0].model_id, settings, examples,
            peers if resume else peers[:n], peers[n:],
            self.send, self.blobs, self.lora,
            round_timeout_s=self._cfg.train_round_timeout_s,
            max_retries=self._cfg.max_retries, alive=self._view.alive,
            on_round=on_round, resume=resume,
        )  # fmt: skip
        self._trainings[row.id] = run
        dirty = trio.Event()
        run.on_change = dirty.set

        async def publish() -> None:  # at most twice a second
            nonlocal dirty
            while True:
                await dirty.wait()
                dirty = trio.Event()
                run.on_change = dirty.set
                await on_view(run.view())
                await trio.sleep(0.5)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                final, summary = await run.run()
                adapter_id = sha256_hex(final)
                await trio.to_thread.run_sync(self.adapters.put, adapter_id, final)
                self._announce_adapters()
                survivors = sum(1 for x in run.nodes.values() if x.status != "failed")
                ticket = self._payments.unpaid_ticket(row.id, run.model_id, "lora_training",
                                                      survivors, False)  # fmt: skip
                signed = await run.finish(adapter_id, ticket.hash(), ticket.replicas)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await run.abort()
                if isinstance(exc, TrainError):  # for good: nothing to resume from
                    await trio.to_thread.run_sync(_forget_training, saved.root, p["dataset_file"])
            raise
        finally:
            run.drop_blobs()
            del self._trainings[row.id]
        await trio.to_thread.run_sync(_forget_training, saved.root, p["dataset_file"])
        sigs = [(peer, s.eth_address, s.signature) for peer, s in signed if s.signature]
        view = {**run.view(), "adapter_id": adapter_id, "summary": summary,
                "signatures": [{"node_id": peer, "eth_address": a, "signature": sig.hex()}
                               for peer, a, sig in sigs]}  # fmt: skip
        log.info("task %s trained: adapter %s, %d rounds, loss %.4f -> %.4f, %d signatures",
                 row.id, adapter_id[:12], summary["rounds"], summary["first_loss"],
                 summary["final_loss"], len(sigs))  # fmt: skip
        if self._settler is not None:
            await self._settler.settle(Settled(
                row.id, run.model_id, "lora_training", _adapter_outcome(adapter_id),
                [Vote(peer, a, sig) for peer, a, sig in sigs], replicas=ticket.replicas,
                deterministic=False, customer=row.customer,
            ))  # fmt: skip
        return {"adapter_id": adapter_id, "model_id": run.model_id, "summary": summary,
                "view": view}  # fmt: skip

    # --- the protocol -------------------------------------------------------------

    async def lora(self) -> Any:
        """``vcoind.train.lora`` (peft, transformers): imported once, in a worker thread,
        after the executor's own import of transformers (two threads importing it at once
        break it)."""
        mod = sys.modules.get("vcoind.train.lora")
        if mod is None:
            await self._compute.executor()
            async with self._lora_lock:
                mod = await trio.to_thread.run_sync(importlib.import_module, "vcoind.train.lora")
        return mod

    async def _limiter(self) -> trio.CapacityLimiter:
        return (await self._compute.executor()).limiter

    async def _dispatch(self, peer: str, record: Any) -> Any:
        if isinstance(record, TrainProgress):
            run = self._trainings.get(record.task_id)
            if run is None:
                raise StreamProtocolError(f"no training task {record.task_id} here")
            return run.on_progress(peer, record)
        return await self.host.handle(peer, record)

    async def send(
        self, peer: str, record: Any, reply_type: type[Any], timeout_s: float | None = None
    ) -> Any:
        """A /vcoin/train/1.0.0 request to ``peer``; to ourselves a plain call."""
        if peer == self._view.peer_id:
            reply = await self._dispatch(peer, record)
            if isinstance(reply, ErrorReply):
                raise StreamProtocolError(f"{peer} answered {reply.code}: {reply.message}")
            return reply
        return await self._streams.request(ID.from_base58(peer), TRAIN_STREAM, record,
                                           reply_type, timeout_s=timeout_s)  # fmt: skip

    def _sign_adapter(self, task_id: str, adapter_id: str, ticket_hash: bytes) -> tuple[str, bytes]:
        """Our signature of a training's outcome: its adapter, under the origin's unpaid
        ticket (training is not paid for yet)."""
        outcome = _adapter_outcome(adapter_id)
        return self._payments.address, self._payments.sign_outcome_for(task_id, ticket_hash,
                                                                       outcome)  # fmt: skip

    def _ticket_hash(self, origin: str, task_id: str, model_id: str, replicas: int) -> bytes | None:
        """The struct hash of ``origin``'s unpaid ticket of a training task
        (``Payments.unpaid_ticket`` as that origin makes it), from what this node knows:
        the origin's Ethereum address from its heartbeats (None: not known)."""
        requester = self._view.eth_address_of(origin)
        if not requester:
            return None
        return unpaid_ticket_of(requester, task_id, model_id, "lora_training", replicas).hash()

    def _refused(self, r: Refusal) -> None:
        if r.code == "over_budget":
            self._metrics.budget_refused.labels(resource=r.label).inc()
        else:
            self._metrics.sign_refused.labels(kind="training", reason=r.label).inc()

    def _announce_adapters(self) -> None:
        self._presence.announce(adapters=tuple(self.adapters.newest(16)))

    # --- the service ----------------------------------------------------------------

    def mount(self, m: Mounts) -> None:
        m.streams.serve(TRAIN_STREAM, lambda peer, r: self._dispatch(peer.to_base58(), r))

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._announce_adapters()
        task_status.started()
        while True:
            await trio.sleep(60)
            self.host.sweep()


def _forget_training(saved: Path, dataset: str) -> None:
    """A finished training task's files: its saved rounds and its copy of the dataset."""
    shutil.rmtree(saved, ignore_errors=True)
    Path(dataset).unlink(missing_ok=True)


def _adapter_outcome(adapter_id: str) -> Outcome:
    """A training's outcome: the adapter's hash agreed by its signers (no units paid)."""
    return Outcome(bytes.fromhex(adapter_id), 2, 0)

"""Node: owns the root nursery and wires the services together.

Start-up order (each service signals readiness through ``nursery.start``):
store -> libp2p host + pubsub -> gossip -> peer table -> peer keeper ->
heartbeat -> RPC server -> run.json. Shutdown is cancellation; the run file
is removed and the store closed on the way out.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from vcoind import __version__
from vcoind.api import (
    REST_ALIASES,
    register_consensus_api,
    register_node_api,
    register_task_api,
)
from vcoind.chain.api import register_chain_api
from vcoind.chain.contracts import ChainError
from vcoind.chain.service import AnchorRequest, ChainService, vcoin, wei
from vcoind.compute.models import ModelStore
from vcoind.compute.params import GenerationError
from vcoind.compute.telemetry import HostSample, Telemetry
from vcoind.config import Config
from vcoind.consensus.health import health_score
from vcoind.consensus.outcome import (
    DECISION_CODES,
    outcome_digest,
    recover_outcome_signer,
    result_hash,
    sign_outcome,
)
from vcoind.consensus.reputation import DEFAULT_REPUTATION
from vcoind.datadir import DataDir, Identity
from vcoind.market.consensus import Coordinator, Replica, VoteContext
from vcoind.market.messages import (
    TASK_PROTOCOL,
    Assignments,
    Bid,
    Cancel,
    GenParams,
    Progress,
    TaskAnnounce,
    TaskResult,
)
from vcoind.market.origin import Settled, TaskOrigin, generation_timings, params_from_dict
from vcoind.market.pipeline import (
    SESSION_IDLE_S,
    LocalChannel,
    PipelineError,
    PipelineRun,
    ServedSpan,
    ShardHost,
    disjoint_routes,
    generate_pipelined,
    parse_serve_spec,
)
from vcoind.market.shardwire import SHARD_PROTOCOL, ShardClose, ShardOpen, ShardStep
from vcoind.market.votes import CommitsClosed, OutcomeVote, ResultCommitment, ResultReveal
from vcoind.market.worker import TaskWorker
from vcoind.metrics import NodeMetrics
from vcoind.ops.alerts import AlertEngine, Snapshot, Thresholds
from vcoind.ops.api import add_dashboard_routes, register_ops_api
from vcoind.ops.sla import SLATerms
from vcoind.ops.sla import evaluate as sla_evaluate
from vcoind.oracle import OracleError
from vcoind.oracle.api import ORACLE_GET_PATHS, register_oracle_api
from vcoind.oracle.replicated import (
    OracleConfirm,
    OracleQuery,
    OracleReplica,
    new_task_id,
    replicated_query,
)
from vcoind.p2p.gossip import Gossip
from vcoind.p2p.heartbeat import BindingCheck, HeartbeatService
from vcoind.p2p.host import P2PHost, build_host, running
from vcoind.p2p.keeper import PeerKeeper
from vcoind.p2p.messages import Heartbeat, LayerSpan, ModelServed
from vcoind.p2p.peers import PeerTable
from vcoind.p2p.streams import StreamProtocol, StreamProtocolError, StreamService
from vcoind.rpc import MethodRegistry, RPCServer, RPCServerConfig
from vcoind.store import AlertStore, ConsensusStore, OracleStore, SLAStore, Store, TaskStore
from vcoind.train.adapters import AdapterStore, BlobCache, pull_blob
from vcoind.train.api import register_train_api
from vcoind.train.host import MAX_SHARDS, TrainHost
from vcoind.train.run import TrainingRun
from vcoind.train.spec import LoraSettings, TrainError, parse_jsonl, sha256_hex
from vcoind.train.wire import (
    TRAIN_PROTOCOL,
    TRAIN_REQUESTS,
    TrainJoin,
    TrainProgress,
)

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

    from vcoind.compute.executor import Executor
    from vcoind.oracle.service import OracleService

log = logging.getLogger("vcoind.node")

TASK_STREAM = StreamProtocol(
    TASK_PROTOCOL,
    (Assignments, Cancel, Progress, TaskResult, OracleQuery, OracleConfirm),
    max_request_bytes=max(TaskResult.MAX_BYTES, Assignments.MAX_BYTES),
)


SHARD_STREAM = StreamProtocol(
    SHARD_PROTOCOL,
    (ShardOpen, ShardStep, ShardClose),
    max_request_bytes=ShardStep.MAX_BYTES,
    keep_open_s=SESSION_IDLE_S,
)

# A training round answers when its steps are done: the serving side allows a day (the
# origin's own limit, market.train_round_timeout_s, is what counts).
TRAIN_STREAM = StreamProtocol(
    TRAIN_PROTOCOL, TRAIN_REQUESTS, max_request_bytes=TrainJoin.MAX_BYTES, timeout_s=86_400.0
)


class NodeError(Exception):
    """The node could not start (a port taken, ...)."""


@dataclass(frozen=True)
class RunInfo:
    pid: int
    peer_id: str
    eth_address: str
    network: str
    rpc_url: str
    p2p_addrs: tuple[str, ...]
    started_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "peer_id": self.peer_id,
            "eth_address": self.eth_address,
            "network": self.network,
            "rpc_url": self.rpc_url,
            "p2p_addrs": list(self.p2p_addrs),
            "started_at": self.started_at,
        }


class RPCStats:
    """Own response time (EWMA) and error rate, for the node's self-assessed health."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics
        self.calls = 0
        self.errors = 0

    def on_call(self, method: str, outcome: str) -> None:
        self.calls += 1
        self.errors += outcome != "ok"
        self._metrics.rpc_call(method, outcome)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


class Node:
    def __init__(self, config: Config, datadir: DataDir, identity: Identity) -> None:
        self.config = config
        self.datadir = datadir
        self.identity = identity
        self.metrics = NodeMetrics()
        self.store = Store(datadir.db_file)
        self.telemetry = Telemetry()
        self.models = ModelStore(config.models_dir)
        self._executor: Executor | None = None
        self.started_at = time.time()
        self.info: RunInfo | None = None
        self._rpc_stats = RPCStats(self.metrics)
        p2p_cfg = config.p2p
        self.p2p: P2PHost = build_host(identity.key_pair, self._on_bad_signature)
        self.gossip = Gossip(
            self.p2p,
            config.network,
            self.metrics,
            max_age_s=p2p_cfg.peer_timeout,
            max_invalid=p2p_cfg.max_invalid_messages,
        )
        # Direct protocols (/vcoin/task/1.0.0, /vcoin/shard/1.0.0) register here.
        self.streams = StreamService(self.p2p, self.metrics)
        self.peers = PeerTable(
            self.store,
            self.metrics,
            peer_timeout=p2p_cfg.peer_timeout,
            base_interval=p2p_cfg.heartbeat_interval,
            error_rate=self.gossip.error_rate,
        )
        self.keeper = PeerKeeper(
            self.p2p, self.metrics, bootstrap=p2p_cfg.bootstrap, discover=p2p_cfg.discover
        )
        self.heartbeat = HeartbeatService(
            self.gossip,
            identity,
            config.network,
            base_interval=p2p_cfg.heartbeat_interval,
            telemetry=self.telemetry,
            peer_count=lambda: len(self.peers),
            addrs=self.advertised_addrs,
            health=self._self_health,
        )
        self.gossip.on("heartbeat", Heartbeat, self.peers.on_heartbeat, check=BindingCheck())
        self.peers.on_seen.append(lambda hb: self.keeper.learn(hb.peer_id, hb.listen_addrs))
        self._wire_market()
        self.chain: ChainService | None = None
        if config.chain.enabled:
            self._wire_chain()
        host, port = config.rpc.host, config.rpc.port
        self.registry = MethodRegistry()
        register_node_api(self.registry, self)
        register_task_api(self.registry, self)
        register_consensus_api(self.registry, self)
        register_chain_api(self.registry, self)
        self.oracle: OracleService | None = None
        self.oracle_replica: OracleReplica | None = None
        if config.oracle.enabled:
            self._wire_oracle()
        register_oracle_api(self.registry, self)
        register_train_api(self.registry, self)
        self.alerts: AlertEngine | None = None
        if config.alerts.enabled:
            self.alerts = AlertEngine(_subset(Thresholds, config.alerts))
            self.alert_store = AlertStore(self.store)
        self.slas = SLAStore(self.store)
        self.sla_status: dict[str, dict[str, Any]] = {}  # customer -> latest evaluation
        self.peers.on_presence.append(self._on_presence)
        register_ops_api(self.registry, self)
        self.rpc = RPCServer(
            RPCServerConfig(
                host=host,
                port=port,
                max_body_bytes=config.rpc.max_body_bytes,
                cookie=datadir.read_cookie(),
            ),
            self.registry,
            ready=self.is_ready,
            metrics=self.render_metrics,
            title="vcoind",
            version=__version__,
            on_call=self._rpc_stats.on_call,
        )
        for path, method in REST_ALIASES.items():
            self.rpc.add_get_alias(path, method)
        for path, method in ORACLE_GET_PATHS.items():
            self.rpc.add_get_alias(path, method, query=True)
        add_dashboard_routes(self.rpc)
        self._p2p_listening = False
        self._nursery: trio.Nursery | None = None

    def _wire_market(self) -> None:
        cfg = self.config
        self.tasks = TaskStore(self.store)
        pid = self.identity.peer_id
        self.worker = TaskWorker(
            self.models,
            lambda: self.executor,
            self.tasks,
            peer_id=pid,
            network=cfg.network,
            publish_bid=lambda bid: self.gossip.publish("tasks", bid),
            send=self.task_send,
            health=lambda: self.heartbeat.last.health if self.heartbeat.last else 1.0,
        )
        self.origin = TaskOrigin(
            self.tasks,
            self.metrics,
            cfg.market,
            peer_id=pid,
            network=cfg.network,
            publish_announce=lambda ann: self.gossip.publish("tasks", ann),
            local_bid=self.worker.make_bid,
            publish_bid=lambda bid: self.gossip.publish("tasks", bid),
            send=self.task_send,
            notify=self._notify_task,
            peer_alive=lambda peer: peer == pid or self.peers.get(peer) is not None,
            expected_bidders=self._serving,
        )
        self.worker.on_change = self._worker_changed
        self._wire_consensus()
        self.gossip.on("tasks", TaskAnnounce, self.worker.on_announce)
        self.gossip.on("tasks", Bid, self.origin.on_bid)
        self.streams.serve(TASK_STREAM, self._task_request)
        cc = self.config.compute
        self.shard_host = ShardHost(cc.device, budget_bytes=cc.memory_budget_mb << 20,
                                    slots=cc.batch_slots, max_context=cc.max_context,
                                    kernels=None if cc.triton_kernels else False)  # fmt: skip
        self.streams.serve(SHARD_STREAM, lambda peer, r: self.shard_host.handle(
            peer.to_base58(), r))  # fmt: skip
        self.origin.run_pipeline = self._run_pipeline
        self.origin.disjoint_routes = self._disjoint_routes
        self.worker.run_route = self._run_route
        self._pipeline_tokenizers: dict[str, Any] = {}
        self._wire_training()

    def _wire_training(self) -> None:
        self.adapters = AdapterStore(self.datadir.path / "adapters")
        self.blobs = BlobCache()
        self.train_host = TrainHost(
            self.models, self.adapters, self.blobs, self.train_send,
            device=lambda: str(self.executor.device),
            limiter=self._train_limiter, lora=self.lora, sign=self._sign_adapter,
        )  # fmt: skip
        self._lora_lock = trio.Lock()
        self.train_host.on_adapters = self._announce_adapters
        self.train_host.on_rate = self.worker.train_samples_per_s.__setitem__
        self._trainings: dict[str, TrainingRun] = {}
        self._adapter_fetches: dict[str, trio.Event] = {}
        self.worker.can_train = _peft_available
        self.worker.adapter_known = lambda a: self.adapters.has(a) or bool(self._holders(a))
        self.worker.get_adapter = self.adapter_path
        self.origin.run_training = self._run_training
        self.streams.serve(TRAIN_STREAM, self._train_request)

    def _wire_consensus(self) -> None:
        cfg, ident = self.config, self.identity
        self.consensus_store = ConsensusStore(self.store)
        self._embedder: Any = None
        self._embed_limiter = trio.CapacityLimiter(1)
        self._local_votes: trio.MemorySendChannel[Any]
        self._local_votes, self._local_votes_rx = trio.open_memory_channel[Any](256)
        ctx = VoteContext(
            ident.peer_id, cfg.network, bytes(ident.eth.key), ident.eth_address,
            self._publish_vote, self.embed, self.metrics.consensus_rejected,
        )  # fmt: skip
        self.replica = Replica(ctx, fault=cfg.market.fault)
        self.coordinator = Coordinator(
            ctx, self.consensus_store, eth_address_of=self._eth_address_of,
            health_of=self._health_of,
        )  # fmt: skip
        self.worker.commit_result = self.replica.commit
        self.origin.coordinator = self.coordinator
        self.origin.profile_of = self._profile_of
        self.origin.idle_nodes = self._idle_serving
        self.origin.reputations = lambda peers: self.consensus_store.reputations(
            peers, DEFAULT_REPUTATION
        )
        self.gossip.on("votes", ResultCommitment, self._on_vote_record)
        self.gossip.on("votes", CommitsClosed, self._on_vote_record)
        self.gossip.on("votes", ResultReveal, self._on_vote_record)
        self.gossip.on("votes", OutcomeVote, self._on_vote_record)

    def _wire_oracle(self) -> None:
        from vcoind.oracle.service import OracleService, OracleSettings  # httpx, numpy

        o = self.config.oracle
        coins = tuple((a.strip(), b.strip()) for a, _, b in (c.partition("=") for c in o.coins))
        classifier = str(Path(o.classifier_dir).expanduser()) if o.classifier_dir else ""
        settings = _subset(OracleSettings, o, coins=coins, classifier_dir=classifier)
        self.oracle = OracleService(
            settings, OracleStore(self.store),
            on_cache=lambda cache, hit: self.metrics.oracle_cache.labels(
                cache=cache, result="hit" if hit else "miss").inc(),
        )  # fmt: skip
        self.oracle_replica = OracleReplica(self.oracle, self.config.network,
                                            bytes(self.identity.eth.key))  # fmt: skip
        caps = dataclasses.replace(self.heartbeat.capabilities, services=("oracle",))
        self.heartbeat.capabilities = caps

    def _wire_chain(self) -> None:
        cfg, ident = self.config, self.identity
        chain = self.chain = ChainService(
            cfg.chain, self.store, network=cfg.network, eth_key=bytes(ident.eth.key),
            metrics=self.metrics,
        )  # fmt: skip
        self.peers.on_seen.append(lambda hb: chain.watch(hb.eth_address))
        self.origin.bid_allowed = lambda peer: chain.bid_allowed(self._eth_address_of(peer))
        if cfg.chain.anchor:
            self.worker.sign_result = self._sign_result
            self.origin.on_settled = self._on_settled

    def _sign_result(self, r: TaskResult) -> TaskResult:
        """A single-mode result signed as a one-replica "majority" outcome, for the anchor."""
        try:
            digest = outcome_digest(self.config.network, r.task_id, result_hash(r.text),
                                    r.model_id, "majority")  # fmt: skip
        except ValueError:  # no model id (cannot happen for a served model): leave unsigned
            return r
        sig = sign_outcome(bytes(self.identity.eth.key), digest)
        return dataclasses.replace(r, eth_address=self.identity.eth_address, signature=sig)

    async def _on_settled(self, s: Settled) -> None:
        """Queue the anchor of a completed task: the agreeing replicas' signatures (each
        checked against the address the signer's heartbeats bind to its peer id), the
        outvoted replicas, and the reward from the task's tokens and price."""
        chain = self.chain
        assert chain is not None
        try:
            digest = outcome_digest(self.config.network, s.task_id, s.result_hash, s.model_id,
                                    s.decision)  # fmt: skip
        except ValueError as exc:
            log.warning("task %s not anchored: %s", s.task_id, exc)
            return
        voters: list[tuple[str, bytes]] = []
        shares: list[int] = []
        for peer, _address, sig in s.signatures:
            bound = self._eth_address_of(peer)
            signer = recover_outcome_signer(digest, sig)
            if signer is None or bound is None or signer.lower() != bound.lower():
                log.info("task %s: signature of %s does not verify; not counted", s.task_id, peer)
                continue
            stake = chain.stake_of(signer)
            if stake is not None and not stake.eligible:  # the contract would refuse it
                log.info("task %s: %s has no eligible stake; not counted", s.task_id, peer)
                continue
            voters.append((signer, sig))
            shares.append(s.shares.get(peer, 0))
        outvoted = [a for a in map(self._eth_address_of, s.outvoted) if a]
        me = self.identity.eth_address.lower()
        if outvoted and all(a.lower() != me for a, _ in voters):
            outvoted = []  # only a voter may claim who was outvoted (the contract's rule)
        ccfg = self.config.chain
        reward = (ccfg.reward_base + ccfg.reward_per_token * s.tokens
                  + ccfg.reward_per_sample * s.samples + s.price)  # fmt: skip
        if s.customer:  # the SLA's penalty while it is violated
            rate = await self.slas.in_violation(s.customer, time.time() - self.config.sla.window_s)
            if rate:
                log.info("task %s: reward cut by %.0f %% (SLA of %s violated)", s.task_id,
                         100 * rate, s.customer)  # fmt: skip
                reward *= 1 - rate
        req = AnchorRequest(
            task_id=s.task_id, result_hash=s.result_hash, model_id=s.model_id,
            decision=DECISION_CODES[s.decision], voters=voters, replicas=s.replicas,
            outvoted=outvoted, deterministic=s.deterministic,
            reward=wei(reward), shares=shares if s.shares and sum(shares) else [],
        )  # fmt: skip
        key = f"anchor:{s.task_id}"
        if req.decision not in (2, 3) or len(voters) * 2 <= s.replicas:
            why = (f"no clear decision ({s.decision})" if req.decision not in (2, 3) else
                   f"{len(voters)} of {s.replicas} replicas signed with an eligible stake; a "
                   "quorum needs more than half")  # fmt: skip
            op_id = await chain.ops.enqueue("anchor", req.payload(), key)
            await chain.ops.update(op_id, status="failed", error=f"not anchored: {why}")
            log.info("task %s not anchored: %s", s.task_id, why)
            return
        await chain.enqueue("anchor", req.payload(), key)

    # --- pipelines -------------------------------------------------------

    def shard_channel(self, peer: str) -> Any:
        """Requests of one pipeline hop: over one /vcoin/shard/1.0.0 stream kept open for
        the session; to ourselves plain calls."""
        if peer == self.identity.peer_id:
            return LocalChannel(self.shard_host, peer)
        return self.streams.session(ID.from_base58(peer), SHARD_STREAM)

    def _resolve_spans(self) -> list[ServedSpan]:
        """``--serve-layers``: a matching shard dir in the models dir, else split the whole
        model into DATADIR/shards once. File work: runs on a worker thread."""
        from vcoind.compute.shards import ShardManifest, split_model

        if not self.config.compute.serve_layers:
            return []
        root = self.config.models_dir
        manifests = []
        for d in [*sorted(root.glob("*")), *sorted((self.datadir.path / "shards").glob("*"))]:
            if (d / "shard.json").is_file():
                manifests.append((d, ShardManifest.read(d)))
        served = []
        for spec in self.config.compute.serve_layers:
            name, a, b = parse_serve_spec(spec)
            found = next((d for d, m in manifests if name in (m.model, m.model_id)
                          and (m.start, m.end) == (a, b)), None)  # fmt: skip
            if found is None:
                try:
                    info = self.models.resolve(name)
                except Exception as exc:
                    raise NodeError(f"--serve-layers {spec}: no shard directory for it in "
                                    f"{root} and {exc}") from None  # fmt: skip
                log.info("splitting layers %d-%d out of %s", a, b, info.name)
                found = split_model(info.path, self.datadir.path / "shards", [(a, b)],
                                    name=info.name, model_id=info.model_id,
                                    partial=True)[0]  # fmt: skip
            m = ShardManifest.read(found)
            served.append(ServedSpan(m.model, m.model_id, m.start, m.end, found))
        return served

    async def _serve_spans(self) -> None:
        """Resolve ``--serve-layers`` and announce the spans."""
        served = await trio.to_thread.run_sync(self._resolve_spans)
        if not served:
            return
        for sp in served:
            self.shard_host.add(sp)
        spans = tuple(sp.span() for sp in served)
        self.heartbeat.set_capabilities(
            dataclasses.replace(self.heartbeat.capabilities, spans=spans))  # fmt: skip
        log.info("serving layer spans: %s", ", ".join(self.config.compute.serve_layers))

    def _spans_by_peer(self) -> dict[str, list[LayerSpan]]:
        out = {st.peer_id: list(st.heartbeat.spans) for st in self.peers.peers()}
        out[self.identity.peer_id] = [s.span() for s in self.shard_host.spans]
        return out

    def _met(self, peer: str) -> bool:
        """This node has had ``peer``'s heartbeat (its spans) and holds a connection."""
        if peer == self.identity.peer_id:
            return True
        return self.peers.get(peer) is not None and any(
            p.to_base58() == peer for p in self.p2p.connected_peers()
        )

    def _route_rank(self, peer: str) -> tuple[float, float]:
        """Lower is better: health (rounded, so near-equal nodes tie), then load (queue
        and pipeline sessions), then latency."""
        if peer == self.identity.peer_id:
            load = self.worker.queue_length + self.shard_host.open_sessions
            return (-round(self._health_of(peer), 1), load)
        st = self.peers.get(peer)
        if st is None:
            return (0.0, 1e9)
        return (-round(st.health, 1), st.heartbeat.queue_length + st.latency_s)

    def _pipeline_source(self, model: str) -> Path:
        """A local directory with the model's tokenizer and config (a span or the model)."""
        for sp in self.shard_host.spans:
            if model in (sp.model, sp.model_id):
                return sp.path
        for info in self.models.all():
            if model in (info.name, info.model_id):
                return info.path
        raise PipelineError(
            f"this node holds no part of {model!r}: a pipeline's origin needs its "
            "tokenizer (serve one of its spans, or the model)"
        )

    async def _pipeline_model(self, model: str) -> tuple[Any, Any, str]:
        """Tokenizer, config and model id of a model this node holds a part of."""
        src = self._pipeline_source(model)
        if str(src) not in self._pipeline_tokenizers:

            def load() -> tuple[Any, Any]:
                from transformers import AutoConfig, AutoTokenizer

                return AutoTokenizer.from_pretrained(str(src)), AutoConfig.from_pretrained(str(src))

            self._pipeline_tokenizers[str(src)] = await trio.to_thread.run_sync(load)
        tokenizer, config = self._pipeline_tokenizers[str(src)]
        manifest_id = next((sp.model_id for sp in self.shard_host.spans if sp.path == src), None)
        return tokenizer, config, manifest_id or self.models.resolve(model).model_id

    async def _pipeline(
        self, model: str, prompt: str, params: GenParams, timeout_s: float, on_token: Any,
        route: list[tuple[str, int, int]] | None = None, exclude: frozenset[str] = frozenset(),
    ) -> tuple[Any, str, PipelineRun, float]:  # fmt: skip
        tokenizer, config, model_id = await self._pipeline_model(model)
        run = PipelineRun(self.shard_channel, model_id, int(config.num_hidden_layers),
                          self._spans_by_peer, self._route_rank,
                          hop_timeout_s=min(30.0, timeout_s), route=route,
                          exclude=exclude, ready=self._met)  # fmt: skip
        max_pos = int(getattr(config, "max_position_embeddings", 1 << 30))
        t0 = time.monotonic()
        try:
            r = await generate_pipelined(run, tokenizer, prompt, params.generation(), max_pos,
                                         on_token)  # fmt: skip
        except GenerationError as exc:
            raise PipelineError(str(exc)) from None
        for h in run.history:
            self.metrics.pipeline_hop.labels(kind="compute").observe(h.compute_s)
            self.metrics.pipeline_hop.labels(kind="transfer").observe(h.transfer_s)
            self.metrics.pipeline_bytes.inc(h.bytes)
        return r, model_id, run, time.monotonic() - t0

    async def _run_pipeline(self, row: Any, on_token: Any) -> dict[str, Any]:
        params = params_from_dict(row.parameters)
        r, model_id, run, total = await self._pipeline(row.model, row.input, params,
                                                       row.timeout_s, on_token)  # fmt: skip
        hops = [h.view() for h in run.history]
        return {
            "text": r.text, "model_id": model_id, "tokens": len(r.token_ids), "hops": hops,
            "timings": {"pipeline_s": round(total, 6), **generation_timings(r),
                        "reroutes": run.reroutes, "hops": hops},
        }  # fmt: skip

    async def _run_route(self, a: Any, on_token: Any) -> tuple[Any, str]:
        """A pipelined consensus replica: this node drives ``a.route``, never touching the
        other replicas' nodes."""
        route = [(h.peer, h.start, h.end) for h in a.route]
        try:
            r, model_id, run, _ = await self._pipeline(
                a.model, a.input, a.params, 30.0, on_token, route, frozenset(a.exclude)
            )
        except PipelineError as exc:
            raise GenerationError(str(exc)) from None
        log.info("task %s attempt %d: pipelined over %s", a.task_id, a.attempt,
                 " -> ".join(f"{h.peer[-6:]}[{h.start}-{h.end}]" for h in run.hops))  # fmt: skip
        return r, model_id

    async def _disjoint_routes(self, model: str, k: int) -> tuple[str, list[Any]]:
        _, config, model_id = await self._pipeline_model(model)
        return model_id, disjoint_routes(
            self._spans_by_peer(), model_id, int(config.num_hidden_layers), self._route_rank, k
        )

    def _eth_address_of(self, peer: str) -> str | None:
        if peer == self.identity.peer_id:
            return self.identity.eth_address
        st = self.peers.get(peer)
        return st.heartbeat.eth_address if st else None

    def _health_of(self, peer: str) -> float:
        if peer == self.identity.peer_id:
            return self.heartbeat.last.health if self.heartbeat.last else 1.0
        st = self.peers.get(peer)
        return st.health if st else 0.5

    def _profile_of(self, peer: str) -> Any:
        if peer == self.identity.peer_id:
            return self.heartbeat.last.profile if self.heartbeat.last else None
        st = self.peers.get(peer)
        return st.heartbeat.profile if st else None

    async def embed(self, texts: Any) -> list[tuple[float, ...]]:
        """Sentence embeddings (all-MiniLM-L6-v2), computed off the trio thread."""
        if self._embedder is None:
            self._torch_threads()
            from vcoind.consensus.embedding import Embedder

            self._embedder = Embedder()
        result: list[tuple[float, ...]] = await trio.to_thread.run_sync(
            self._embedder.embed, list(texts), limiter=self._embed_limiter
        )
        return result

    async def _publish_vote(self, record: Any) -> None:
        await self.gossip.publish("votes", record)
        # Gossip does not hand our own messages back; our own roles still need them
        # (the origin may be one of the replicas). Delivered from a queue, not inline:
        # a handler that publishes must not re-enter the caller.
        await self._local_votes.send(record)

    async def _deliver_local_votes(self) -> None:
        async for record in self._local_votes_rx:
            try:
                await self._on_vote_record(record)
            except Exception:  # like gossip handlers: a bug must not take the node down
                log.exception("local %s handler failed", type(record).__name__)

    async def _on_vote_record(self, record: Any) -> None:
        if isinstance(record, ResultCommitment):
            await self.coordinator.on_commitment(record)
        elif isinstance(record, CommitsClosed):
            self._spawn(self.replica.on_closed, record)  # may wait for others' reveals
        elif isinstance(record, ResultReveal):
            await self.coordinator.on_reveal(record)
            self._spawn(self.replica.on_reveal, record)  # may tally (embedding) and sign
        elif isinstance(record, OutcomeVote):
            await self.coordinator.on_vote(record)

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None  # handlers only run while the node runs
        self._nursery.start_soon(fn, *args)

    def _idle_serving(self, model: str) -> int:
        """Nodes (us included) serving ``model`` whose last word is an empty queue."""
        serving = self._serving(model)
        idle = sum(
            1 for st in self.peers.peers()
            if st.peer_id in serving and st.heartbeat.queue_length == 0
        )  # fmt: skip
        return idle + (self.identity.peer_id in serving and self.worker.queue_length == 0)

    def serving_count_by_model(self) -> dict[str, int]:
        """How many nodes (us included) serve each model name: the replicas possible."""
        names = {m.name for m in self.heartbeat.capabilities.models}
        for st in self.peers.peers():
            names |= {m.name for m in st.heartbeat.models}
        return {name: len(self._serving(name)) for name in sorted(names)}

    def _serving(self, model: str) -> set[str]:
        """Peers (and us) whose last heartbeat says they serve ``model`` (name or id)."""
        out = {
            st.peer_id
            for st in self.peers.peers()
            if any(model in (m.name, m.model_id) for m in st.heartbeat.models)
            and self.origin.bid_allowed(st.peer_id)
        }
        me = self.identity.peer_id
        if any(model in (m.name, m.model_id) for m in self.heartbeat.capabilities.models) and (
            self.origin.bid_allowed(me)
        ):
            out.add(me)
        return out

    async def _task_request(self, peer: ID, record: Any) -> Any:
        return await self._dispatch_task(peer.to_base58(), record)

    async def _dispatch_task(self, peer: str, record: Any) -> Any:
        if isinstance(record, Assignments):
            return await self.worker.on_assignments(peer, record)
        if isinstance(record, Cancel):
            return await self.worker.on_cancel(peer, record)
        if isinstance(record, Progress):
            return await self.origin.on_progress(peer, record)
        if isinstance(record, TaskResult):
            return await self.origin.on_result(peer, record)
        if isinstance(record, OracleQuery | OracleConfirm):
            if self.oracle_replica is None:
                raise StreamProtocolError("this node does not run the oracle")
            if isinstance(record, OracleQuery):
                return await self.oracle_replica.on_query(record)
            return await self.oracle_replica.on_confirm(record)
        raise StreamProtocolError(f"unexpected {type(record).__name__}")

    # --- LoRA training and adapters ----------------------------------------

    async def _train_limiter(self) -> trio.CapacityLimiter:
        return (await self.worker.executor()).limiter

    async def lora(self) -> Any:
        """``vcoind.train.lora`` (peft, transformers): imported once, in a worker thread,
        after the executor's own import of transformers (two threads importing it at once
        break it)."""
        mod = sys.modules.get("vcoind.train.lora")
        if mod is None:
            await self.worker.executor()
            async with self._lora_lock:
                mod = await trio.to_thread.run_sync(importlib.import_module, "vcoind.train.lora")
        return mod

    async def _train_request(self, peer: ID, record: Any) -> Any:
        return await self._dispatch_train(peer.to_base58(), record)

    async def _dispatch_train(self, peer: str, record: Any) -> Any:
        if isinstance(record, TrainProgress):
            run = self._trainings.get(record.task_id)
            if run is None:
                raise StreamProtocolError(f"no training task {record.task_id} here")
            return run.on_progress(peer, record)
        return await self.train_host.handle(peer, record)

    async def train_send(
        self, peer: str, record: Any, reply_type: type[Any], timeout_s: float | None = None
    ) -> Any:
        """A /vcoin/train/1.0.0 request to ``peer``; to ourselves a plain call."""
        if peer == self.identity.peer_id:
            return await self._dispatch_train(peer, record)
        return await self.streams.request(ID.from_base58(peer), TRAIN_STREAM, record,
                                          reply_type, timeout_s=timeout_s)  # fmt: skip

    def _sign_adapter(self, task_id: str, adapter_id: str, model_id: str) -> tuple[str, bytes]:
        digest = outcome_digest(self.config.network, task_id, bytes.fromhex(adapter_id),
                                model_id, "majority")  # fmt: skip
        return self.identity.eth_address, sign_outcome(bytes(self.identity.eth.key), digest)

    def _announce_adapters(self) -> None:
        ids = tuple(self.adapters.newest(16))
        if ids != self.heartbeat.capabilities.adapters:
            self.heartbeat.set_capabilities(
                dataclasses.replace(self.heartbeat.capabilities, adapters=ids))  # fmt: skip

    def _holders(self, adapter_id: str) -> list[str]:
        """Peers whose last heartbeat lists the adapter, healthiest first."""
        peers = [st for st in self.peers.peers() if adapter_id in st.heartbeat.adapters]
        return [st.peer_id for st in sorted(peers, key=lambda st: (-st.health, st.peer_id))]

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
            for peer in self._holders(adapter_id):
                try:
                    data = await pull_blob(self.train_send, peer, adapter_id)
                    await trio.to_thread.run_sync((await self.lora()).adapter_from_bytes, data)
                except (StreamProtocolError, TrainError) as exc:
                    errors.append(f"{peer[-8:]}: {exc}")
                    continue
                await trio.to_thread.run_sync(self.adapters.put, adapter_id, data)
                log.info("adapter %s fetched from %s", adapter_id[:12], peer)
                self._announce_adapters()
                return path
        finally:
            del self._adapter_fetches[adapter_id]
            done.set()
        raise TrainError(f"adapter {adapter_id[:12]}: no node handed it over "
                         f"({'; '.join(errors) or 'no holder known'})")  # fmt: skip

    async def _run_training(self, row: Any, bids: list[Any], on_view: Any) -> dict[str, Any]:
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
        saved = AdapterStore(self.datadir.path / "train" / row.id)  # the last round's average
        resume = None
        if row.training.get("history"):
            last = await trio.to_thread.run_sync(saved.get, row.training["global_adapter"])
            shards = len(row.training.get("shards", ()))
            if last is None:
                log.warning("task %s: the earlier run's adapter is gone; training from the "
                            "start", row.id)  # fmt: skip
            elif shards > len(peers) * MAX_SHARDS:
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
            self.train_send, self.blobs, self.lora,
            round_timeout_s=self.config.market.train_round_timeout_s,
            max_retries=self.config.market.max_retries,
            alive=lambda peer: peer == self.identity.peer_id or self.peers.get(peer) is not None,
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
                signed = await run.finish(adapter_id)
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
        if self.chain is not None and self.config.chain.anchor:
            await self._on_settled(Settled(
                row.id, run.model_id, bytes.fromhex(adapter_id), "majority", sigs,
                replicas=len(signed) or 1, outvoted=[], deterministic=False, tokens=0,
                price=0.0, customer=row.customer, samples=summary["samples"],
                shares={n["node_id"]: n["samples"] for n in run.view()["nodes"]},
            ))  # fmt: skip
        return {"adapter_id": adapter_id, "model_id": run.model_id, "summary": summary,
                "view": view}  # fmt: skip

    # --- SLAs -------------------------------------------------------------

    async def _on_presence(self, peer: str, online: bool, when: float) -> None:
        if online:
            await self.slas.peer_up(peer, when)
        else:
            await self.slas.peer_down(peer, when)

    async def sla_evaluate(self, customer: str | None = None) -> list[dict[str, Any]]:
        """Evaluate SLAs now (all, or one customer's); record new violations (once per
        term and window)."""
        window = self.config.sla.window_s
        now = time.time()
        out = []
        for row in await self.slas.terms(customer):
            terms = SLATerms(*row)
            facts = await self.slas.task_facts(terms.customer, now - window)
            down = await self.slas.downtime(facts["nodes"], now - window)
            status, violations = sla_evaluate(
                terms, now=now, window_s=window, latencies=facts["latencies"],
                submitted=facts["submitted"], completed=facts["completed"], downtime=down,
            )  # fmt: skip
            for v in violations:
                key = f"{terms.customer}:{v.kind}:{int(now // window)}"
                if await self.slas.add_violation(key, terms.customer, v):
                    log.warning("SLA %s: %s violated (%s vs %s); penalty %g", terms.customer,
                                v.kind, v.measured, v.target, v.penalty)  # fmt: skip
            status["evaluated_at"] = now
            self.sla_status[terms.customer] = status
            out.append(status)
        return out

    async def _train_sweep(self) -> None:
        while True:
            await trio.sleep(60)
            self.train_host.sweep()

    async def _sla_loop(self) -> None:
        while True:
            await trio.sleep(self.config.sla.interval_s)
            try:
                await self.sla_evaluate()
            except Exception:
                log.exception("SLA evaluation failed")

    # --- alerts -----------------------------------------------------------

    async def _alerts_loop(self) -> None:
        assert self.alerts is not None
        while True:
            await trio.sleep(self.config.alerts.interval_s)
            try:
                snap = await self._alert_snapshot()
            except Exception:  # a broken source of facts must not stop the alerts
                log.exception("alert snapshot failed")
                continue
            for event, a in self.alerts.evaluate(snap):
                await self._alert_event(event, a)
            for sev in ("info", "warning", "critical"):
                n = sum(1 for x in self.alerts.active.values() if x.severity == sev)
                self.metrics.alerts_active.labels(severity=sev).set(n)

    async def _alert_event(self, event: str, a: Any) -> None:
        level = logging.INFO if event == "resolved" or a.severity == "info" else logging.WARNING
        log.log(level, "alert %s: [%s] %s: %s", event, a.severity, a.rule, a.message)
        if event == "fired":
            self.metrics.alerts_fired.labels(rule=a.rule, severity=a.severity).inc()
        view = {"event": event, **a.view()}
        await self.alert_store.record(a)
        await self.rpc.publish("alerts", view)
        url = self.config.alerts.webhook_url
        if url and self._nursery is not None:
            self._nursery.start_soon(_post_webhook, url, view)

    async def _alert_snapshot(self) -> Snapshot:
        now = time.time()
        # Peers that went silent while we ran (at start every known peer is offline until
        # its first heartbeat: that is not news), within the last hour.
        offline = [(r.peer_id, r.last_heartbeat) for r in await self.store.list_peers("offline")
                   if r.last_heartbeat and r.last_heartbeat >= self.started_at
                   and now - r.last_heartbeat < 3600]  # fmt: skip
        hb = self.heartbeat.last  # the telemetry sampled for our latest heartbeat
        gpu = None
        if hb is not None and hb.device.kind == "cuda":
            d = hb.device
            gpu = {"name": d.name, "temperature_c": d.temperature_c,
                   "memory_used_mb": d.memory_used_mb,
                   "memory_total_mb": d.memory_total_mb}  # fmt: skip
        recent = await self.tasks.recent_outcomes(now - 600)
        stake = None
        if self.chain is not None and self.chain.require_stake:
            info = self.chain.stake_of(self.identity.eth_address)
            if info is not None:
                stake = {"stake": vcoin(info.stake), "eligible": info.eligible}
        anomalies, sentiment = self.oracle.alert_view() if self.oracle else ([], None)
        return Snapshot(
            now=now, peers_offline=offline, gpu=gpu,
            host_memory_pct=hb.memory_percent if hb is not None else None,
            tasks_recent=(recent["failed"], recent["finished"]),
            consensus_recent=(recent["conflicts"], recent["consensus"]), stake=stake,
            price_anomalies=anomalies, sentiment=sentiment,
            sla=[(c, s["violations"], s["breach_imminent"]) for c, s in self.sla_status.items()],
        )  # fmt: skip

    async def oracle_query(
        self, kind: str, symbol: str, window: str, replicas: int
    ) -> dict[str, Any]:
        """An oracle answer from ``replicas`` oracle nodes (this one first), combined,
        signed and, with a chain, anchored; see ``vcoind.oracle.replicated``."""
        mine = [self.identity.peer_id] if self.oracle is not None else []
        others = [st.peer_id for st in self.peers.peers() if "oracle" in st.heartbeat.services]
        reps = await self.consensus_store.reputations(others, DEFAULT_REPUTATION)
        others.sort(key=lambda p: (-reps[p], p))
        chosen = (mine + others)[:replicas]
        if len(chosen) < 2:
            raise OracleError(f"{len(chosen)} oracle node(s) known; a replicated answer needs 2")
        q = OracleQuery(new_task_id(), kind, symbol.upper() if kind == "price" else "", window)
        answer, sigs, out, decision = await replicated_query(
            q, chosen, self.task_send,
            lambda peers: self.consensus_store.reputations(peers, DEFAULT_REPUTATION),
            self.consensus_store.adjust_reputation,
        )  # fmt: skip
        answer["anchor"] = None
        if self.chain is not None and self.config.chain.anchor and decision != "none":
            signed = [(p, self._eth_address_of(p) or "", s) for p, s in sigs]
            await self._on_settled(Settled(
                q.task_id, answer["model_id"], bytes.fromhex(answer["result_hash"]), decision,
                signed, len(chosen), out, False, 0, 0.0,
            ))  # fmt: skip
            answer["anchor"] = f"anchor:{q.task_id} (vcoin_getAnchor)"
        log.info("oracle %s %s %s: %s, %d signed, outliers %s", kind, q.symbol, window,
                 decision, len(sigs), [p[-6:] for p in out] or "none")  # fmt: skip
        return answer

    async def task_send(self, peer: str, record: Any, reply_type: type[Any]) -> Any:
        """A task-protocol request to ``peer``; to ourselves it is a plain call."""
        if peer == self.identity.peer_id:
            return await self._dispatch_task(peer, record)
        return await self.streams.request(ID.from_base58(peer), TASK_STREAM, record, reply_type)

    async def _notify_task(self, view: dict[str, Any]) -> None:
        self.metrics.tasks_in_flight.set(self.origin.in_flight())
        await self.rpc.publish(f"task:{view['task_id']}", view)
        await self.rpc.publish("tasks", view)

    def _worker_changed(self) -> None:
        q = self.worker.queue_length
        self.metrics.queue_length.set(q)
        for model_id, tps in self.worker.tokens_per_s.items():
            self.metrics.tokens_per_s.labels(model=model_id).set(tps)
        # Queue length rides on the next heartbeat (bids carry it at once).
        self.heartbeat.capabilities = dataclasses.replace(
            self.heartbeat.capabilities, queue_length=q
        )

    # --- callbacks --------------------------------------------------------

    def _on_bad_signature(self, forwarder: Any, msg: Any) -> None:
        self.gossip.on_bad_signature(forwarder, msg)

    def _self_health(self, sample: HostSample) -> float:
        return health_score(
            sample.cpu_percent, sample.memory_percent, None, self._rpc_stats.error_rate
        )

    def advertised_addrs(self) -> list[str]:
        pid = self.identity.peer_id
        if self.config.p2p.announce:
            return [f"{a}/p2p/{pid}" for a in self.config.p2p.announce]
        return self.p2p.addrs()

    @property
    def has_executor(self) -> bool:
        return self._executor is not None

    @property
    def executor(self) -> Executor:
        """Created on first use: importing torch costs seconds a node without work need not pay."""
        if self._executor is None:
            self._torch_threads()
            from vcoind.compute.executor import Executor, ExecutorConfig

            cc = self.config.compute
            self._executor = Executor(
                self.models,
                ExecutorConfig(device=cc.device, memory_budget_mb=cc.memory_budget_mb,
                               batch_slots=cc.batch_slots, max_context=cc.max_context,
                               compile_decode=cc.compile_decode,
                               triton_kernels=cc.triton_kernels,
                               prefill_chunk=cc.prefill_chunk,
                               reuse_prefix=cc.reuse_prefix),
            )  # fmt: skip
        return self._executor

    def _torch_threads(self) -> None:
        n = self.config.compute.cpu_threads
        if n > 0:
            import torch

            torch.set_num_threads(n)

    async def rescan_models(self) -> None:
        """Re-read the model store (hashing new weights off the trio thread) and announce it."""
        infos = await trio.to_thread.run_sync(self.models.scan)
        served = tuple(ModelServed(m.name, m.model_id) for m in infos)
        if served != self.heartbeat.capabilities.models:
            log.info("serving models: %s", ", ".join(m.name for m in infos) or "none")
            caps = dataclasses.replace(self.heartbeat.capabilities, models=served)
            self.heartbeat.set_capabilities(caps)

    def is_ready(self) -> bool:
        return self._p2p_listening and self.store.is_open

    def render_metrics(self) -> bytes:
        self.metrics.connections.set(len(self.p2p.connected_peers()))
        return self.metrics.render()

    # --- lifecycle --------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[RunInfo] = trio.TASK_STATUS_IGNORED) -> None:
        await self.store.open()
        try:
            await self.store.mark_all_offline()
            async with running(self.p2p, self.config.p2p.listen), trio.open_nursery() as nursery:
                self._p2p_listening = True
                await self.rescan_models()
                await self._serve_spans()
                self._announce_adapters()
                for row in await self.store.list_peers():
                    self.keeper.learn(row.peer_id, row.addrs)
                self._nursery = nursery
                if self.oracle is not None:
                    await nursery.start(self.oracle.run)
                if self.alerts is not None:
                    nursery.start_soon(self._alerts_loop)
                nursery.start_soon(self._sla_loop)
                nursery.start_soon(self._train_sweep)
                if self.chain is not None:
                    try:
                        await nursery.start(self.chain.run)
                    except* ChainError as group:
                        raise NodeError(f"chain: {first_leaf(group)}") from None
                nursery.start_soon(self._deliver_local_votes)
                await nursery.start(self.gossip.run)
                await nursery.start(self.peers.run)
                await nursery.start(self.keeper.run)
                await nursery.start(self.heartbeat.run)
                await nursery.start(self.worker.run)
                await nursery.start(self.origin.run)
                try:
                    rpc_url = await nursery.start(self.rpc.run)
                except* OSError as group:
                    exc = first_leaf(group)
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    raise NodeError(
                        f"cannot serve RPC on {self.config.rpc.addr}: {reason}"
                    ) from None
                self.info = RunInfo(
                    pid=os.getpid(),
                    peer_id=self.identity.peer_id,
                    eth_address=self.identity.eth_address,
                    network=self.config.network,
                    rpc_url=rpc_url,
                    p2p_addrs=tuple(self.p2p.addrs()),
                    started_at=self.started_at,
                )
                self.datadir.write_run_file(self.info.as_dict())
                log.info(
                    "vcoind %s up: peer %s, eth %s, network %s",
                    __version__,
                    self.identity.peer_id,
                    self.identity.eth_address,
                    self.config.network,
                )
                task_status.started(self.info)
        finally:
            self._p2p_listening = False
            self.datadir.remove_run_file()
            with trio.CancelScope(shield=True):
                if self.oracle is not None:
                    await self.oracle.aclose()
                await self.store.close()


def _forget_training(saved: Path, dataset: str) -> None:
    """A finished training task's files: its saved rounds and its copy of the dataset."""
    shutil.rmtree(saved, ignore_errors=True)
    Path(dataset).unlink(missing_ok=True)


def _peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def _subset(cls: Any, source: Any, **overrides: Any) -> Any:
    """``cls`` built from the same-named fields of the config section ``source``."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in dataclasses.asdict(source).items() if k in names}
    return cls(**{**given, **overrides})


async def _post_webhook(url: str, payload: dict[str, Any]) -> None:
    """Best effort: three tries, then the event is only in the log and the store."""
    import httpx

    async with httpx.AsyncClient(timeout=5.0) as client:
        for attempt in range(3):
            try:
                r = await client.post(url, json=payload)
                if r.status_code < 500:
                    return
            except httpx.HTTPError as exc:
                log.info("alert webhook %s: %s", url, exc)
            await trio.sleep(2**attempt)


def first_leaf(exc: BaseException) -> BaseException:
    """The first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc

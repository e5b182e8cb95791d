"""Prometheus metrics of one node (one registry per node, so in-process test nodes don't mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers = Gauge("vcoin_peers", "Peers currently in the peer table", registry=r)
        self.connections = Gauge("vcoin_p2p_connections", "Open libp2p connections", registry=r)
        self.gossip_in = Counter(
            "vcoin_gossip_received_total", "Valid gossip messages received", ["topic"], registry=r
        )
        self.gossip_out = Counter(
            "vcoin_gossip_published_total", "Gossip messages published", ["topic"], registry=r
        )
        self.gossip_rejected = Counter(
            "vcoin_gossip_rejected_total",
            "Gossip messages rejected by validation, by reason",
            ["topic", "reason"],
            registry=r,
        )
        self.gossip_latency = Histogram(
            "vcoin_gossip_latency_seconds",
            "Heartbeat publish-to-receive latency",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.alerts_active = Gauge(
            "vcoin_alerts_active", "Alerts holding now, by severity", ["severity"], registry=r
        )
        self.alerts_fired = Counter(
            "vcoin_alerts_fired_total", "Alerts fired, by rule and severity",
            ["rule", "severity"], registry=r,
        )  # fmt: skip
        self.oracle_cache = Counter(
            "vcoin_oracle_cache_total", "Oracle cache lookups by cache and hit/miss",
            ["cache", "result"], registry=r,
        )  # fmt: skip
        self.peers_blacklisted = Counter(
            "vcoin_peers_blacklisted_total", "Peers blacklisted for invalid gossip", registry=r
        )
        self.dials = Counter(
            "vcoin_dials_total", "Outbound dials by outcome", ["outcome"], registry=r
        )
        self.consensus_rejected = Counter(
            "vcoin_consensus_rejected_total",
            "Consensus messages rejected (late commit, early or bad reveal, bad signature, ...)",
            ["reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "vcoin_stream_errors_total",
            "Direct-protocol streams reset (oversized, cut short, timed out)",
            ["protocol"],
            registry=r,
        )
        self.stream_requests = Counter(
            "vcoin_stream_requests_total",
            "Requests on direct streams, by protocol, record kind and direction (in, out)",
            ["protocol", "kind", "direction"],
            registry=r,
        )
        self.tasks = Counter(
            "vcoin_tasks_total", "Tasks at this origin by outcome (submitted, completed, ...)",
            ["status"], registry=r,
        )  # fmt: skip
        self.tasks_in_flight = Gauge(
            "vcoin_tasks_in_flight", "Unfinished tasks this node is origin of", registry=r
        )
        self.queue_length = Gauge(
            "vcoin_worker_queue_length", "Assignments waiting or running here", registry=r
        )
        self.dispatch_latency = Histogram(
            "vcoin_task_dispatch_seconds", "Submit to assignment accepted by a worker",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )  # fmt: skip
        self.exec_time = Histogram(
            "vcoin_task_execution_seconds", "Worker-reported prefill + decode time",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r,
        )  # fmt: skip
        self.tokens_per_s = Gauge(
            "vcoin_tokens_per_second", "Measured decode speed of this node", ["model"], registry=r
        )
        self.rpc_calls = Counter(
            "vcoin_rpc_calls_total",
            "JSON-RPC calls by method and outcome",
            ["method", "outcome"],
            registry=r,
        )

        self.chain_writes = Counter(
            "vcoin_chain_writes_total",
            "Chain write attempts by kind (anchor, stake, ...) and outcome (done, failed, retry)",
            ["kind", "outcome"], registry=r,
        )  # fmt: skip
        self.chain_pending = Gauge(
            "vcoin_chain_writes_pending", "Chain writes queued and not yet confirmed", registry=r
        )
        self.chain_reachable = Gauge(
            "vcoin_chain_reachable", "1 when the last chain request succeeded", registry=r
        )
        self.anchor_latency = Histogram(
            "vcoin_anchor_seconds", "Task outcome queued to anchored on chain",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r,
        )  # fmt: skip

        self.pipeline_hop = Histogram(
            "vcoin_pipeline_hop_seconds", "Per task and hop: compute or transfer time",
            ["kind"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30), registry=r,
        )  # fmt: skip
        self.pipeline_bytes = Counter(
            "vcoin_pipeline_bytes_total",
            "Tensor bytes sent and received by pipelines",
            registry=r,
        )
        self.sign_refused = Counter(
            "vcoin_sign_refused_total",
            "Requests refused because they would make this node sign work that is not its "
            "own, by kind (assignment, training, oracle) and reason",
            ["kind", "reason"], registry=r,
        )  # fmt: skip
        self.bids_refused = Counter(
            "vcoin_bids_refused_total",
            "Direct bids refused: from a peer other than the bidder (not_author), for no task "
            "of ours that is taking bids (not_announced)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.budget_refused = Counter(
            "vcoin_budget_refused_total",
            "Requests refused over a per-peer or node-wide budget, by resource",
            ["resource"], registry=r,
        )  # fmt: skip
        self.gateway_requests = Counter(
            "vcoin_gateway_requests_total",
            "OpenAI/REST gateway requests by API key id ('cookie': the RPC cookie) and "
            "outcome (ok, error, limited)", ["key", "outcome"], registry=r,
        )  # fmt: skip
        self.gateway_tokens = Counter(
            "vcoin_gateway_tokens_total", "Tokens generated for gateway requests, by API key",
            ["key"], registry=r,
        )  # fmt: skip
        self.gossip_ignored = Counter(
            "vcoin_gossip_ignored_total",
            "Valid gossip messages ignored (not forwarded), by kind and reason (budget, bytes, "
            "new_identities, graylisted, peer_table_full)",
            ["kind", "reason"], registry=r,
        )  # fmt: skip
        self.peers_graylisted = Counter(
            "vcoin_peers_graylisted_total", "Peers graylisted for a low gossip score", registry=r
        )
        self.peers_evicted = Counter(
            "vcoin_peers_evicted_total", "Peers evicted from a full peer table", registry=r
        )
        self.dials_refused = Counter(
            "vcoin_dials_refused_total",
            "Learned peer addresses not dialled, by reason (private, bogus, transport, dns)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.connections_trimmed = Counter(
            "vcoin_connections_trimmed_total",
            "Connections closed by the connection manager, by reason "
            "(per_ip, per_relay, watermark)",
            ["reason"], registry=r,
        )  # fmt: skip

    def rpc_call(self, method: str, outcome: str) -> None:
        self.rpc_calls.labels(method=method, outcome=outcome).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

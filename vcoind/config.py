"""One typed config tree: built-in defaults < DATADIR/config.toml < VCOIN_* environment < flags.

Every section is a frozen dataclass. Sources are merged as plain dicts keyed by
dotted names (``p2p.heartbeat_interval``), then converted and validated field by
field, so an error always names the key and the problem.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

log = logging.getLogger("vcoind.config")

DEFAULT_DATADIR = Path("~/.vcoin").expanduser()
LOG_LEVELS = ("debug", "info", "warning", "error")
DEVICES = ("auto", "cpu", "cuda")
# Bid selection strategies (market.strategy), ranked by vcoind.market.selection.
STRATEGIES = ("round_robin", "weighted_round_robin", "least_connections", "resource_aware")
ENV_PREFIX = "VCOIN_"


class ConfigError(Exception):
    """A configuration value is wrong; ``key`` names it (dotted)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config {key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    # Addresses to advertise instead of the listen addresses (e.g. a public IP).
    announce: tuple[str, ...] = ()
    heartbeat_interval: float = 5.0
    peer_timeout: float = 30.0
    # Dial peers learned from gossip (full mesh); off = only bootstrap peers.
    discover: bool = True
    # Invalid gossip messages a forwarder may send before it is blacklisted.
    max_invalid_messages: int = 50
    # Per-peer gossip budgets: token buckets, a rate per second and a burst, per message
    # sender (heartbeats, task announces, bids, everything else on the votes topic) plus
    # bytes per sender. Over budget the message is ignored (not forwarded) and counted,
    # and the forwarder's gossip score drops.
    budget_heartbeats: tuple[float, ...] = (10.0, 50.0)
    budget_announces: tuple[float, ...] = (5.0, 100.0)
    budget_bids: tuple[float, ...] = (20.0, 400.0)
    budget_votes: tuple[float, ...] = (50.0, 1000.0)
    budget_bytes: tuple[float, ...] = (4194304.0, 67108864.0)
    # Heartbeats of identities not in the peer table, per forwarder.
    budget_new_identities: tuple[float, ...] = (2.0, 50.0)
    # The peer table (and so the chain's stake-watch list) holds at most this many peers;
    # a newcomer evicts the least recently seen peer without stake.
    max_peers: int = 2000
    # A peer whose gossip score falls below this is ignored for graylist_s; graylisted
    # three times within ten minutes it is disconnected and blacklisted.
    graylist_threshold: float = -50.0
    graylist_s: float = 30.0
    # Dial private addresses (RFC 1918, loopback, link-local, CGNAT...) learned from
    # peers: "auto" = only when none of our announce (else listen) addresses is public.
    allow_private_dials: str = "auto"
    allow_dns_dials: bool = False
    # Connection manager: above conn_high connections the lowest-scored unprotected
    # peers are dropped down to conn_low; learned peers are dialled only below conn_low.
    conn_low: int = 64
    conn_high: int = 96
    max_conns_per_ip: int = 8
    # Peers reached only through one relay (circuit relay v2) are counted per relay, not
    # under the relay's IP; at most this many through one relay.
    max_relayed_per_relay: int = 32

    # Caps the bytes a peer may send on one session stream (0: each protocol's own
    # budget, 64 of its largest requests); past it the stream is reset.
    max_stream_bytes: int = 0

    # Circuit relay v2. relay_service: relay for others (hop) "auto" = when one of our
    # announce (else listen) addresses is public; within these limits per relayed
    # connection and for all of them.
    relay_service: str = "auto"
    relay_max_reservations: int = 128
    relay_max_circuits: int = 64
    relay_circuit_s: int = 3600
    relay_circuit_mb: int = 1024
    # Relays (multiaddrs with /p2p/ID) to reserve a slot at: this node is then reachable
    # at RELAY/p2p-circuit/p2p/<our id>, which it advertises. reachability "private" =
    # advertise only those (behind a NAT our own addresses reach nobody); "auto"/"public"
    # = our own addresses too.
    relays: tuple[str, ...] = ()
    reachability: str = "auto"

    # Kademlia DHT (``vcoind.p2p.dht``): provider records "who serves model id M" and
    # "who serves span A-B of M". dht "auto" = a DHT server once the dial-back finds us
    # publicly reachable (or reachability = public), a client otherwise (private);
    # "server" / "client" force the mode; "off" = no DHT. Records others store at us
    # expire after dht_record_ttl seconds (ours are re-provided every dht_reprovide_s);
    # we hold at most dht_max_records of them, dht_max_keys_per_peer from any one peer.
    dht: str = "auto"
    dht_record_ttl: float = 1800.0
    dht_reprovide_s: float = 300.0
    dht_max_records: int = 8192
    dht_max_keys_per_peer: int = 256
    # mDNS (``--mdns``): find peers on the local network segment; what it finds is dialled
    # under the same dial policy as any learned address.
    mdns: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("budget_"):
                v = getattr(self, f.name)
                if len(v) != 2 or not (v[0] > 0 and v[1] >= 1):
                    raise ConfigError(f"p2p.{f.name}", f"must be [rate > 0, burst >= 1], got {v}")
        if self.allow_private_dials not in ("auto", "on", "off"):
            raise ConfigError("p2p.allow_private_dials", "must be auto, on or off")
        if self.relay_service not in ("auto", "on", "off"):
            raise ConfigError("p2p.relay_service", "must be auto, on or off")
        if self.reachability not in ("auto", "public", "private"):
            raise ConfigError("p2p.reachability", "must be auto, public or private")
        if self.dht not in ("auto", "server", "client", "off"):
            raise ConfigError("p2p.dht", "must be auto, server, client or off")
        if not 0 < self.dht_reprovide_s < self.dht_record_ttl:
            raise ConfigError("p2p.dht_reprovide_s", "needs 0 < dht_reprovide_s < dht_record_ttl")
        if self.dht_max_records < 1 or self.dht_max_keys_per_peer < 1:
            raise ConfigError(
                "p2p.dht_max_records",
                "dht_max_records and dht_max_keys_per_peer must be at least 1",
            )
        if self.reachability == "private" and not self.relays:
            raise ConfigError(
                "p2p.reachability",
                "private needs at least one relay "
                "(p2p.relays / --relay): else nobody can reach this node",
            )
        for key in (
            "relay_max_reservations",
            "relay_max_circuits",
            "relay_circuit_s",
            "relay_circuit_mb",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"p2p.{key}", "must be at least 1")
        if not 1 <= self.conn_low <= self.conn_high or self.max_conns_per_ip < 1:
            raise ConfigError(
                "p2p.conn_low", "needs 1 <= conn_low <= conn_high and max_conns_per_ip >= 1"
            )
        if self.max_relayed_per_relay < 1:
            raise ConfigError("p2p.max_relayed_per_relay", "must be at least 1")
        if self.max_peers < 1:
            raise ConfigError("p2p.max_peers", "must be at least 1")


@dataclass(frozen=True)
class RPCConfig:
    addr: str = "127.0.0.1:8645"
    max_body_bytes: int = 1_048_576
    # Host names the RPC answers to besides loopback names and the bind address ("name"
    # any port, or "name:port"); any other Host header is refused (DNS rebinding).
    hosts: tuple[str, ...] = ()
    # Web origins ("https://ops.example") whose pages may call the RPC (with the cookie);
    # they get CORS headers. Empty: only the daemon's own pages, no CORS.
    origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for o in self.origins:
            scheme, sep, rest = o.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ConfigError("rpc.origins", f"expected scheme://host[:port], got {o!r}")
        for h in self.hosts:
            if not h or any(c in h for c in "/@ "):
                raise ConfigError("rpc.hosts", f"expected a host name or HOST:PORT, got {h!r}")

    @property
    def host(self) -> str:
        return split_host_port(self.addr)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.addr)[1]


@dataclass(frozen=True)
class ComputeConfig:
    # Directory of model directories; "" = DATADIR/models.
    models_dir: str = ""
    device: str = "auto"  # auto | cpu | cuda
    # Models kept loaded; 0 = 80 % of GPU memory, or 50 % of RAM on CPU.
    memory_budget_mb: int = 0
    # Requests decoded together per loaded model (continuous batching); 0 = 32 on a
    # GPU, 4 on CPU. Each slot holds a KV cache of max_context positions.
    batch_slots: int = 0
    # Positions per request (prompt + new tokens), capped by the model's own context.
    max_context: int = 4096
    # CUDA only, experimental: torch.compile the decode step before capturing its CUDA
    # graph (fuses elementwise kernels: faster steps, a compile per batch size on first
    # use). Off by default.
    compile_decode: bool = False
    # CUDA: the engine's triton kernels (rotary + KV-cache write, SiLU * up: fewer
    # kernels per decode step), used where triton is installed and they pass their
    # self-check against torch at load. false = torch's own ops only.
    triton_kernels: bool = True
    # Prompt tokens prefilled between two decode steps while other requests are decoding
    # (chunked prefill: a long prompt joining delays the running streams' next tokens by
    # one chunk, not by its whole prefill); 0 = every prompt whole.
    prefill_chunk: int = 512
    # A prompt whose start some slot's cache holds already (a system prompt, the previous
    # turn of a conversation, at least 16 tokens) gets those positions' K/V copied
    # instead of prefilled; only between tasks of one origin (a faster first token must
    # not tell a requester how another's prompt began). false = every prompt prefilled
    # from its first token.
    reuse_prefix: bool = True
    # CPU threads for torch (inference and sentence embeddings); 0 = torch's default.
    # Several daemons on one box (a devnet) each want 1.
    cpu_threads: int = 0
    # Layer spans served to pipelines, "MODEL:START-END" (inclusive), from a shard directory
    # in the models dir, split from the whole model on first start, or fetched from peers;
    # "auto" / "auto:N" / "MODEL:auto[:N]": the span (of N layers, or as many as fit in
    # memory) the fewest nodes serve, re-balanced when span hosts leave.
    serve_layers: tuple[str, ...] = ()
    # Models (names or ids) to fetch from peers when this node lacks them, then serve.
    fetch_models: tuple[str, ...] = ()
    # Weights this node uploads to others (/vcoin/model/1.0.0): MB/s for all peers together
    # (0 = no limit), and chunk requests one peer may have in flight.
    upload_mb_s: float = 0.0
    uploads_per_peer: int = 4
    # Chunk requests this node keeps in flight to each peer it fetches from.
    fetch_streams_per_peer: int = 4
    # Per-peer budgets: one peer cannot take what this node offers to all of them.
    # Pipeline sessions another peer may hold open on this node's spans (at most half).
    pipeline_sessions_per_peer: int = 16
    # LoRA shards trained at once (each holds a copy of its base model), and for one origin.
    train_slots: int = 4
    train_slots_per_peer: int = 2
    # Adapters kept on disk (MiB): those one peer brought (as the training's origin or
    # as the holder they were fetched from), and all together; over either, the least
    # recently used go first, and one that cannot fit is refused.
    adapter_quota_mb_per_peer: float = 256.0
    adapter_store_mb: float = 4096.0


@dataclass(frozen=True)
class MarketConfig:
    """How this node, as a task's origin, runs the market."""

    strategy: str = "resource_aware"
    bid_window_s: float = 0.25  # after the first bid, wait at most this long for the rest
    no_bid_timeout_s: float = 10.0  # fail when nobody bids within this
    task_timeout_s: float = 30.0  # no progress for this long -> reassign
    max_retries: int = 3
    # Waits that cover a whole answer (a consensus round's commit deadline; an attempt's
    # first progress after a long prompt's prefill) scale with its size and the slowest
    # worker's measured speed: allowance + safety x (tokens / tokens per second), never
    # under the task timeout, at most max_deadline_s (see vcoind.market.deadlines).
    reference_tokens_per_s: float = 20.0  # a worker not measured yet (a T4, 1.5B, fp16)
    deadline_safety: float = 2.0
    deadline_allowance_s: float = 10.0
    max_deadline_s: float = 1800.0
    # LoRA training (as origin): how long one node may take for one sync round
    train_round_timeout_s: float = 900.0
    # Settlement v2 (paid only on a shared chain): what this node asks per generated token
    # as a worker, in VCOIN, and what it offers at most per token as a requester when a
    # task does not say (max_price); the requester's ticket is valid this long.
    price_per_token: float = 0.0001
    max_price_per_token: float = 0.001
    ticket_ttl_s: float = 3600.0
    # As a worker: assignments of one requester (origin) queued or running here at most.
    max_queued_per_origin: int = 256
    # TEST ONLY: make this node misbehave as a consensus replica (junk, copy, slow,
    # silent). Refused outside devnet/test networks.
    fault: str = ""


@dataclass(frozen=True)
class ChainConfig:
    """The EVM chain where outcomes are anchored and rewards, stake and governance live."""

    enabled: bool = True
    # "" = an embedded in-process EVM (py-evm): the contracts are deployed on first use after
    # every start and its state lives and dies with the process. Else an Ethereum JSON-RPC
    # URL (anvil, ...).
    rpc: str = ""
    # Deployment file (addresses, chain id) for an external chain; `vcoind chain deploy`
    # writes one. Needed with chain.rpc.
    contracts: str = ""
    anchor: bool = True  # anchor every completed task's outcome
    # Ignore bids from nodes below the minimum stake: on | off | auto (on for an external
    # chain; an embedded chain is private to this node, so nobody else is staked on it).
    require_stake: str = "auto"
    # What a task pays is settled by the requester's ticket and the workers' signed prices
    # (market.price_per_token, market.max_price_per_token): there is no reward setting.
    # Embedded chain only: this node mints itself 3x this VCOIN at start, stakes one part,
    # deposits one (its own tickets are covered) and keeps one (governance votes).
    embedded_stake: float = 1000.0
    stake_refresh_s: float = 10.0  # how often peers' stakes are re-read
    retry_max_s: float = 10.0  # longest wait between retries of a chain write
    # A chain write (an anchor, a payment, a stake) counts as done once its block has this
    # many blocks on top of it, counting its own (1: as soon as it is mined); a chain
    # reorganisation that drops it before then makes the node send it again.
    confirmations: int = 1
    timeout_s: float = 10.0  # one JSON-RPC request

    def __post_init__(self) -> None:
        if self.confirmations < 1:
            raise ConfigError("chain.confirmations", "must be at least 1")


REQUIRE_STAKE = ("auto", "on", "off")


@dataclass(frozen=True)
class OracleConfig:
    """The AI oracle: market data fetched from public APIs, analysed by this node."""

    enabled: bool = False  # off: the node makes no request outside its network
    coingecko_url: str = "https://api.coingecko.com/api/v3"
    api_key: str = ""  # a CoinGecko Pro key (sent as x-cg-pro-api-key); or VCOIN_ORACLE_API_KEY
    # SYMBOL=coingecko-id
    coins: tuple[str, ...] = ("QUBIC=qubic-network", "BTC=bitcoin", "ETH=ethereum")
    timeout_s: float = 10.0  # one HTTP request
    retries: int = 3  # after the first try, with exponential backoff
    newsapi_url: str = "https://newsapi.org/v2"
    newsapi_key: str = ""  # or VCOIN_ORACLE_NEWSAPI_KEY; without one, news comes from Reddit only
    news_query: str = "Qubic"
    reddit_url: str = "https://www.reddit.com"
    subreddit: str = "CryptoCurrency"
    # A FinBERT-style classifier directory (labels positive/negative/neutral) whose
    # score is averaged with VADER's; "" = VADER and the keyword dictionary only.
    classifier_dir: str = ""
    min_interval_s: float = 2.0  # per source: at most one request this often
    quote_poll_s: float = 300.0  # every coin's quote is stored this often (0 = off)
    news_poll_s: float = 3600.0  # news and posts are fetched this often (0 = off)


@dataclass(frozen=True)
class AlertsConfig:
    """Risk alerts: rules evaluated every ``interval_s`` over what the node knows."""

    enabled: bool = True
    interval_s: float = 5.0
    webhook_url: str = ""  # POSTed a JSON event on every fire, escalation and resolve
    gpu_temp_warning_c: float = 85.0
    gpu_temp_critical_c: float = 92.0
    memory_warning_pct: float = 90.0
    memory_critical_pct: float = 97.0
    error_rate_warning: float = 0.2  # of the tasks finished in the last 10 minutes
    disagreement_warning: float = 0.3  # of the last 20 consensus tasks
    sentiment_swing: float = 0.3  # between two 24 h sentiment indices


@dataclass(frozen=True)
class SLAConfig:
    """SLA compliance: evaluated every ``interval_s`` over the last ``window_s``."""

    interval_s: float = 60.0
    window_s: float = 86_400.0


@dataclass(frozen=True)
class Config:
    datadir: Path = DEFAULT_DATADIR
    network: str = "devnet"
    log_level: str = "info"
    p2p: P2PConfig = field(default_factory=P2PConfig)
    rpc: RPCConfig = field(default_factory=RPCConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    market: MarketConfig = field(default_factory=MarketConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    sla: SLAConfig = field(default_factory=SLAConfig)

    @property
    def models_dir(self) -> Path:
        return (
            Path(self.compute.models_dir).expanduser()
            if self.compute.models_dir
            else (self.datadir / "models")
        )


def split_host_port(addr: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6); raises ValueError."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host, port


# --- conversion -------------------------------------------------------------


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Convert a raw value (TOML value, env string or flag value) to ``tp``."""
    origin = get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list of strings, got {value!r}")
        (item_tp, _) = get_args(tp)
        return tuple(_convert(key, item_tp, v) for v in value)
    if origin in (Union, types.UnionType):
        raise ConfigError(key, "unsupported type")  # no optional fields yet
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if tp is int or tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, got {value!r}")
        try:
            num = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(
                key, f"must be {'an integer' if tp is int else 'a number'}, got {value!r}"
            ) from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return num
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(key, f"must be a path, got {value!r}")
        return Path(value).expanduser()
    raise ConfigError(key, f"unsupported type {tp!r}")


def _build(cls: type[Any], prefix: str, values: Mapping[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp: Any = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, f"{key}.", values)
        elif key in values:
            kwargs[f.name] = _convert(key, tp, values[key])
    return cls(**kwargs)


def known_keys(cls: type[Any] = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> field type, for every leaf of the config tree."""
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp: Any = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(known_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _flatten_toml(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten_toml(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys an earlier version wrote into config.toml, now without effect.
_PRICED = "settlement v2 pays the workers' signed prices: see market.price_per_token"
RETIRED_KEYS = {f"chain.{k}": _PRICED for k in ("reward_base", "reward_per_token",
                                                "reward_per_sample")}  # fmt: skip


def read_toml(path: Path) -> dict[str, Any]:
    """Flattened values of a config file; unknown keys are errors."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    flat = _flatten_toml(raw)
    known = known_keys()
    for key in list(flat):
        if key in RETIRED_KEYS:  # written by an earlier `vcoind init`: ignored, said once
            log.warning("%s: %s is no longer used (%s)", path, key, RETIRED_KEYS[key])
            del flat[key]
        elif key not in known or key == "datadir":
            raise ConfigError(key, f"unknown key in {path}")
    return flat


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``VCOIN_P2P_HEARTBEAT_INTERVAL`` -> ``p2p.heartbeat_interval``; lists comma-separated."""
    out: dict[str, Any] = {}
    by_env = {ENV_PREFIX + k.replace(".", "_").upper(): k for k in known_keys()}
    for name, value in env.items():
        if name in by_env:
            out[by_env[name]] = value
    return out


def load(
    datadir: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the four layers and validate. ``flags`` uses dotted keys; None values are unset."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if datadir is None:
        raw_dir = flags.get("datadir") or env.get(ENV_PREFIX + "DATADIR") or DEFAULT_DATADIR
        datadir = Path(raw_dir).expanduser()
    values: dict[str, Any] = {}
    values.update(read_toml(datadir / "config.toml"))
    values.update(read_env(env))
    values.update(flags)
    values["datadir"] = datadir
    from vcoind.config_check import validate  # it imports this module's types

    return validate(_build(Config, "", values))


def render_toml(cfg: Config) -> str:
    """The config as a commented TOML file (what ``vcoind init`` writes)."""
    lines = ["# vcoind configuration. Precedence: defaults < this file < VCOIN_* env < flags.", ""]
    lines.append(f'network = "{cfg.network}"')
    lines.append(f'log_level = "{cfg.log_level}"')
    for section in ("p2p", "rpc", "compute", "market", "chain"):
        lines += ["", f"[{section}]"]
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


T = TypeVar("T")


def subset(cls: type[T], section: Any, **overrides: Any) -> T:
    """``cls`` (a dataclass of a service's settings) built from the same-named fields of
    the config section ``section``, with ``overrides`` on top."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
    return cls(**{**given, **overrides})

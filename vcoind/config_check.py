"""Validation of the config tree (``vcoind.config``): every value in its range, every
address well formed, so an error names the key and the problem before the node starts."""

from __future__ import annotations

import re
from pathlib import Path

import multiaddr

from vcoind.config import (
    DEVICES,
    LOG_LEVELS,
    REQUIRE_STAKE,
    STRATEGIES,
    Config,
    ConfigError,
    split_host_port,
)

_NETWORK_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _check_multiaddrs(key: str, addrs: tuple[str, ...], *, need_peer_id: bool) -> None:
    for a in addrs:
        try:
            ma = multiaddr.Multiaddr(a)
        except Exception as exc:  # multiaddr raises several unrelated types
            raise ConfigError(key, f"not a valid multiaddr {a!r}: {exc}") from None
        protos = [p.name for p in ma.protocols()]
        if need_peer_id and "p2p" not in protos:
            raise ConfigError(key, f"{a!r} must end in /p2p/<peer id>")
        if not need_peer_id and "tcp" not in protos:
            raise ConfigError(key, f"{a!r} must be a TCP address (/ip4/HOST/tcp/PORT)")


FAULTS = ("junk", "copy", "slow", "silent")  # market.fault: consensus misbehaviour, tests only


def _within(section: str, *checks: tuple[str, float, float, float]) -> None:
    """Each (key, value, lo, hi): ConfigError ``section.key`` unless lo <= value <= hi."""
    for key, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise ConfigError(f"{section}.{key}", f"must be between {lo:g} and {hi:g}, got {value}")


def fault_allowed(network: str) -> bool:
    """Fault injection is a test tool: refused outside devnets and test networks."""
    return network.startswith(("devnet", "test", "bench"))


def validate(cfg: Config) -> Config:
    if not _NETWORK_RE.match(cfg.network):
        raise ConfigError("network", f"must match {_NETWORK_RE.pattern}, got {cfg.network!r}")
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    p = cfg.p2p
    if not p.listen:
        raise ConfigError("p2p.listen", "needs at least one address")
    _check_multiaddrs("p2p.listen", p.listen, need_peer_id=False)
    _check_multiaddrs("p2p.bootstrap", p.bootstrap, need_peer_id=True)
    _check_multiaddrs("p2p.announce", p.announce, need_peer_id=False)
    if not 0.05 <= p.heartbeat_interval <= 3600:
        raise ConfigError(
            "p2p.heartbeat_interval",
            f"must be between 0.05 and 3600 seconds, got {p.heartbeat_interval}",
        )
    if p.peer_timeout <= p.heartbeat_interval:
        raise ConfigError(
            "p2p.peer_timeout",
            f"must be longer than p2p.heartbeat_interval ({p.heartbeat_interval} s), "
            f"got {p.peer_timeout}",
        )
    if p.max_invalid_messages < 1:
        raise ConfigError("p2p.max_invalid_messages", "must be at least 1")
    fault = cfg.market.fault
    if fault and fault not in FAULTS:
        raise ConfigError("market.fault", f"must be one of {', '.join(FAULTS)}")
    if fault and not fault_allowed(cfg.network):
        raise ConfigError("market.fault", f"fault injection is refused on network {cfg.network!r}")
    try:
        split_host_port(cfg.rpc.addr)
    except ValueError as exc:
        raise ConfigError("rpc.addr", str(exc)) from None
    if cfg.compute.device not in DEVICES:
        raise ConfigError("compute.device", f"must be one of {', '.join(DEVICES)}")
    for spec in cfg.compute.serve_layers:
        from vcoind.compute.autospan import parse_auto
        from vcoind.compute.shard_host import parse_serve_spec

        try:
            if parse_auto(spec) is None:
                parse_serve_spec(spec)
        except ValueError as exc:
            raise ConfigError("compute.serve_layers", f"{exc}, or auto[:N] / MODEL:auto[:N]"
                              ) from None  # fmt: skip
    if cfg.compute.upload_mb_s < 0:
        raise ConfigError("compute.upload_mb_s", "must be 0 (no limit) or more")
    for key in ("pipeline_sessions_per_peer", "train_slots", "train_slots_per_peer",
                "uploads_per_peer", "fetch_streams_per_peer"):  # fmt: skip
        if getattr(cfg.compute, key) < 1:
            raise ConfigError(f"compute.{key}", "must be at least 1")
    for key in ("adapter_quota_mb_per_peer", "adapter_store_mb"):
        if getattr(cfg.compute, key) <= 0:
            raise ConfigError(f"compute.{key}", "must be more than 0")
    if cfg.compute.cpu_threads < 0:
        raise ConfigError("compute.cpu_threads", "must be >= 0 (0 = torch's default)")
    if cfg.compute.memory_budget_mb < 0:
        raise ConfigError("compute.memory_budget_mb", "must be >= 0 (0 = automatic)")
    if not 0 <= cfg.compute.batch_slots <= 1024:
        raise ConfigError("compute.batch_slots", "must be 0..1024 (0 = automatic)")
    if not 16 <= cfg.compute.max_context <= 1 << 20:
        raise ConfigError("compute.max_context", "must be 16..1048576 positions")
    if cfg.compute.prefill_chunk < 0:
        raise ConfigError("compute.prefill_chunk", "must be >= 0 tokens (0 = whole prompts)")
    m = cfg.market
    if m.strategy not in STRATEGIES:
        raise ConfigError("market.strategy", f"must be one of {', '.join(STRATEGIES)}")
    _within(
        "market",
        ("bid_window_s", m.bid_window_s, 0.0, 60.0),
        ("no_bid_timeout_s", m.no_bid_timeout_s, 0.1, 3600.0),
        ("task_timeout_s", m.task_timeout_s, 0.5, 86_400.0),
        ("max_retries", m.max_retries, 0, 100),
        ("reference_tokens_per_s", m.reference_tokens_per_s, 0.1, 1e6),
        ("deadline_safety", m.deadline_safety, 1.0, 100.0),
        ("deadline_allowance_s", m.deadline_allowance_s, 0.0, 3600.0),
        ("max_deadline_s", m.max_deadline_s, 1.0, 7 * 86_400.0),
        ("train_round_timeout_s", m.train_round_timeout_s, 1.0, 86_400.0),
        ("price_per_token", m.price_per_token, 0.0, 9.0),
        ("max_price_per_token", m.max_price_per_token, 0.0, 9.0),
        ("ticket_ttl_s", m.ticket_ttl_s, 60.0, 30 * 86_400.0),
        ("max_queued_per_origin", m.max_queued_per_origin, 0, 1_000_000),
    )
    ch = cfg.chain
    if ch.rpc and not ch.rpc.startswith(("http://", "https://")):
        raise ConfigError("chain.rpc", f"must be an http(s) URL, got {ch.rpc!r}")
    if ch.enabled and ch.rpc and not ch.contracts:
        raise ConfigError(
            "chain.contracts",
            "an external chain (chain.rpc) needs its deployment file (--contracts FILE, "
            "written by `vcoind chain deploy`)",
        )
    if ch.require_stake not in REQUIRE_STAKE:
        raise ConfigError("chain.require_stake", f"must be one of {', '.join(REQUIRE_STAKE)}")
    _within(
        "chain",
        ("embedded_stake", ch.embedded_stake, 0.0, 1e9),
        ("stake_refresh_s", ch.stake_refresh_s, 0.1, 86_400.0),
        ("retry_max_s", ch.retry_max_s, 0.1, 3600.0),
        ("timeout_s", ch.timeout_s, 0.1, 600.0),
    )
    if not 0.1 <= cfg.sla.interval_s <= 86_400 or not 60 <= cfg.sla.window_s <= 90 * 86_400:
        raise ConfigError("sla", "interval_s 0.1..86400 and window_s 60..7776000")
    al = cfg.alerts
    if not 0.1 <= al.interval_s <= 3600:
        raise ConfigError("alerts.interval_s", "must be between 0.1 and 3600")
    if al.webhook_url and not al.webhook_url.startswith(("http://", "https://")):
        raise ConfigError("alerts.webhook_url", f"must be an http(s) URL: {al.webhook_url!r}")
    o = cfg.oracle
    for key in ("newsapi_url", "reddit_url"):
        if not getattr(o, key).startswith(("http://", "https://")):
            raise ConfigError(f"oracle.{key}", f"must be an http(s) URL: {getattr(o, key)!r}")
    if o.classifier_dir and not Path(o.classifier_dir).expanduser().is_dir():
        raise ConfigError("oracle.classifier_dir", f"no such directory: {o.classifier_dir}")
    if not o.coingecko_url.startswith(("http://", "https://")):
        raise ConfigError(
            "oracle.coingecko_url", f"must be an http(s) URL, got {o.coingecko_url!r}"
        )
    for spec in o.coins:
        sym, eq, coin = spec.partition("=")
        if not eq or not sym.strip() or not coin.strip():
            raise ConfigError("oracle.coins", f"expected SYMBOL=coingecko-id, got {spec!r}")
    for key in ("min_interval_s", "quote_poll_s", "news_poll_s"):
        if not 0 <= getattr(o, key) <= 86_400:
            raise ConfigError(f"oracle.{key}", "must be between 0 and 86400")
    if not 0.1 <= o.timeout_s <= 600 or not 0 <= o.retries <= 10:
        raise ConfigError("oracle.timeout_s", "timeout_s 0.1..600, retries 0..10")
    if cfg.rpc.max_body_bytes < 1024:
        raise ConfigError("rpc.max_body_bytes", "must be at least 1024")
    return cfg

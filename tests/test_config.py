"""Config precedence (defaults < file < env < flags) and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcoind.cli import daemon_main
from vcoind.config import Config, ConfigError, load, read_toml, render_toml

BOOT = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWEAFCy2zHaWq3TPHeHx8F35FTbdWa12zjgDUzEWrp2RmC"


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={})
    assert cfg.network == "devnet"
    assert cfg.p2p.heartbeat_interval == 5.0
    assert cfg.p2p.peer_timeout == 30.0
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/4001",)
    assert cfg.rpc.addr == "127.0.0.1:8645"
    assert cfg.datadir == tmp_path


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'network = "filenet"\nlog_level = "debug"\n[p2p]\nheartbeat_interval = 2\n'
        'peer_timeout = 20\n[rpc]\naddr = "127.0.0.1:9000"\n'
    )
    cfg = load(tmp_path, env={})
    assert (cfg.network, cfg.log_level, cfg.p2p.heartbeat_interval) == ("filenet", "debug", 2.0)
    env = {
        "VCOIN_NETWORK": "envnet",
        "VCOIN_P2P_HEARTBEAT_INTERVAL": "3",
        "VCOIN_P2P_BOOTSTRAP": BOOT,
        "VCOIN_P2P_DISCOVER": "false",
    }
    cfg = load(tmp_path, env=env)
    assert cfg.network == "envnet"
    assert cfg.p2p.heartbeat_interval == 3.0
    assert cfg.p2p.peer_timeout == 20.0  # from the file, untouched by env
    assert cfg.p2p.bootstrap == (BOOT,)
    assert cfg.p2p.discover is False
    cfg = load(
        tmp_path,
        env=env,
        flags={"network": "flagnet", "p2p.heartbeat_interval": 4.0, "rpc.addr": None},
    )
    assert cfg.network == "flagnet"
    assert cfg.p2p.heartbeat_interval == 4.0
    assert cfg.rpc.addr == "127.0.0.1:9000"  # None flag = not given


def test_datadir_from_env_and_flag(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (b).mkdir()
    (b / "config.toml").write_text('network = "bnet"\n')
    assert load(env={"VCOIN_DATADIR": str(a)}).datadir == a
    cfg = load(env={"VCOIN_DATADIR": str(a)}, flags={"datadir": b})
    assert cfg.datadir == b and cfg.network == "bnet"


@pytest.mark.parametrize(
    ("source", "key", "problem"),
    [
        ({"p2p.heartbeat_interval": "fast"}, "p2p.heartbeat_interval", "must be a number"),
        ({"p2p.heartbeat_interval": -1}, "p2p.heartbeat_interval", "between"),
        ({"p2p.peer_timeout": 1, "p2p.heartbeat_interval": 5}, "p2p.peer_timeout", "longer than"),
        ({"p2p.bootstrap": ["/ip4/127.0.0.1/tcp/1"]}, "p2p.bootstrap", "/p2p/<peer id>"),
        ({"p2p.bootstrap": ["not-a-multiaddr"]}, "p2p.bootstrap", "not a valid multiaddr"),
        ({"p2p.listen": ["/ip4/127.0.0.1/udp/1"]}, "p2p.listen", "TCP address"),
        ({"p2p.discover": "maybe"}, "p2p.discover", "true or false"),
        ({"rpc.addr": "localhost"}, "rpc.addr", "HOST:PORT"),
        ({"rpc.addr": "127.0.0.1:99999"}, "rpc.addr", "0..65535"),
        ({"network": "Bad Net"}, "network", "must match"),
        ({"log_level": "loud"}, "log_level", "one of"),
        ({"p2p.max_invalid_messages": 1.5}, "p2p.max_invalid_messages", "integer"),
        ({"market.fault": "evil"}, "market.fault", "one of junk, copy, slow, silent"),
        ({"market.fault": "junk", "network": "mainnet"}, "market.fault", "refused on network"),
        ({"compute.prefill_chunk": -1}, "compute.prefill_chunk", "0 = whole prompts"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, source: dict[str, object], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={}, flags=source)
    assert info.value.key == key
    assert problem in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[p2p]\nheartbeat_intervall = 2\n")
    with pytest.raises(ConfigError, match=r"p2p.heartbeat_intervall: unknown key"):
        load(tmp_path, env={})
    (tmp_path / "config.toml").write_text("network = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, env={})


def test_env_error_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config p2p\.peer_timeout: must be a number"):
        load(tmp_path, env={"VCOIN_P2P_PEER_TIMEOUT": "soon"})


def test_rendered_file_round_trips(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={}, flags={"network": "x1", "p2p.bootstrap": [BOOT]})
    (tmp_path / "config.toml").write_text(render_toml(cfg))
    assert load(tmp_path, env={}) == cfg
    assert isinstance(cfg, Config)


def test_cli_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = daemon_main(["--datadir", str(tmp_path), "--heartbeat-interval", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vcoind: error: config p2p.heartbeat_interval: must be between 0.05 and "
        "3600 seconds, got 0.0"
    ]
    assert not (tmp_path / "p2p.key").exists()  # nothing created on a bad config


def test_every_metric_is_documented_and_the_dashboard_uses_real_ones() -> None:
    import json
    import re
    from pathlib import Path

    from vcoind.metrics import NodeMetrics

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    m = NodeMetrics()
    names = set()
    for obj in vars(m).values():
        if hasattr(obj, "_name"):
            full = obj._name + ("_total" if type(obj).__name__ == "Counter" else "")
            names.add(obj._name)
            assert f"`{full}`" in readme, f"{full} is not documented in README.md"
    dash = json.loads((root / "deploy" / "grafana-dashboard.json").read_text())
    used = {n for p in dash["panels"] for t in p["targets"]
            for n in re.findall(r"vcoin_[a-z0-9_]+", t["expr"])}  # fmt: skip
    base = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert base <= names, base - names


def test_retired_reward_keys_are_ignored_not_fatal(tmp_path: Path) -> None:
    # An earlier `vcoind init` wrote chain.reward_*; settlement v2 has no reward setting.
    (tmp_path / "config.toml").write_text("[chain]\nreward_base = 1.0\nreward_per_token = 0.01\n")
    assert read_toml(tmp_path / "config.toml") == {}
    (tmp_path / "config.toml").write_text("[chain]\nreward_bonus = 1.0\n")
    with pytest.raises(ConfigError, match="unknown key"):
        read_toml(tmp_path / "config.toml")

"""The deadline rule of ``vcoind.market.deadlines``: scaled waits for whole answers."""

from __future__ import annotations

import dataclasses

import pytest

from vcoind.config import Config, ConfigError, MarketConfig
from vcoind.config_check import validate
from vcoind.market.deadlines import (
    DeadlinePolicy,
    commit_deadline_s,
    first_progress_s,
    prompt_tokens,
    slowest,
    work_s,
)

POLICY = DeadlinePolicy(floor_s=30.0, cap_s=1800.0, reference_tokens_per_s=20.0, safety=2.0,
                        allowance_s=10.0)  # fmt: skip


def test_the_reference_model_on_a_t4() -> None:
    # DeepSeek-R1-Distill-Qwen-1.5B, a 2,000-token answer, replicas never measured (20/s)
    assert commit_deadline_s(POLICY, 2000, 0, 20.0) == pytest.approx(210.0)
    # measured at 30 tokens/s, with a 300-token prompt
    assert commit_deadline_s(POLICY, 2000, 300, 30.0) == pytest.approx(10 + 2 * 2030 / 30)
    # the gateway's default answer (256 tokens) and the API's (64) stay at the floor
    assert commit_deadline_s(POLICY, 64, 20, 20.0) == 30.0
    assert commit_deadline_s(POLICY, 256, 20, 20.0) == pytest.approx(10 + 2 * 258 / 20)


def test_monotonic_in_tokens_and_in_slowness() -> None:
    by_tokens = [commit_deadline_s(POLICY, n, 100, 25.0) for n in range(1, 8193, 97)]
    assert by_tokens == sorted(by_tokens) and by_tokens[-1] > by_tokens[0]
    by_prompt = [commit_deadline_s(POLICY, 1000, p, 25.0) for p in range(0, 100_000, 5000)]
    assert by_prompt == sorted(by_prompt) and by_prompt[-1] > by_prompt[0]
    by_speed = [commit_deadline_s(POLICY, 2000, 100, s) for s in (200.0, 50.0, 20.0, 5.0)]
    assert by_speed == sorted(by_speed) and by_speed[-1] > by_speed[0]


def test_never_below_the_floor_and_capped() -> None:
    for n in (1, 10, 100):
        assert commit_deadline_s(POLICY, n, 0, 1000.0) == POLICY.floor_s
    assert commit_deadline_s(POLICY, 8192, 100_000, 0.5) == POLICY.cap_s
    assert commit_deadline_s(POLICY, 8192, 0, 0.0) == POLICY.cap_s  # no division by zero
    # a task's own timeout above the cap wins: never shorter than the flat timeout was
    high = DeadlinePolicy(floor_s=3600.0, cap_s=1800.0)
    assert commit_deadline_s(high, 8192, 0, 0.5) == 3600.0
    assert commit_deadline_s(high, 1, 0, 1000.0) == 3600.0


def test_first_progress_waits_for_a_long_prefill_only() -> None:
    assert first_progress_s(POLICY, 500, 20.0) == 30.0  # a short prompt: the task timeout
    # 30,000 characters ~ 10,000 tokens at a tenth of the decode cost: 50 s, twice, +10
    n = prompt_tokens("x" * 30_000)
    assert n == 10_000
    assert first_progress_s(POLICY, n, 20.0) == pytest.approx(110.0)
    assert first_progress_s(POLICY, 10**9, 20.0) == POLICY.cap_s


def test_slowest_counts_the_unmeasured_at_the_reference() -> None:
    assert slowest([30.0, 45.0], 20.0) == 30.0
    assert slowest([30.0, None], 20.0) == 20.0  # never what a bidder claims
    assert slowest([8.0, None], 20.0) == 8.0
    assert slowest([], 20.0) == 20.0
    assert slowest([0.0], 20.0) > 0
    assert work_s(2000, 0, 20.0) == pytest.approx(100.0)


def test_policy_from_config_and_its_validation() -> None:
    cfg = MarketConfig()
    p = DeadlinePolicy.of(cfg)
    assert (p.floor_s, p.cap_s, p.reference_tokens_per_s, p.safety, p.allowance_s) == (
        30.0, 1800.0, 20.0, 2.0, 10.0)  # fmt: skip
    assert DeadlinePolicy.of(cfg, 90.0).floor_s == 90.0  # the task's own timeout
    validate(Config())
    for key, bad in (("reference_tokens_per_s", 0.0), ("deadline_safety", 0.5),
                     ("deadline_allowance_s", -1.0), ("max_deadline_s", 0.0)):  # fmt: skip
        c = Config()
        c = dataclasses.replace(c, market=dataclasses.replace(c.market, **{key: bad}))
        with pytest.raises(ConfigError, match=f"market.{key}"):
            validate(c)

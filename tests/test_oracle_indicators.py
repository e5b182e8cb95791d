"""Price indicators against published reference values and independent re-computations."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from vcoind.oracle.indicators import (
    anomalies,
    bollinger,
    ema,
    linear_forecast,
    macd,
    patterns,
    rsi,
    sma,
    support_resistance,
)

# StockCharts ChartSchool's worked examples (their spreadsheets, rounded to 2 places).
RSI_CLOSES = [44.3389, 44.0902, 44.1497, 43.6124, 44.3278, 44.8264, 45.0955, 45.4245,
              45.8433, 46.0826, 45.8931, 46.0328, 45.6140, 46.2820, 46.2820, 46.0028,
              46.0328, 46.4116, 46.2222, 45.6439, 46.2122, 46.2521, 45.7137, 46.4515,
              45.7835, 45.3548, 44.0288, 44.1783, 44.2181, 44.5672, 43.4205, 42.6628,
              43.1314]  # fmt: skip
RSI_14 = [70.53, 66.32, 66.55, 69.41, 66.36, 57.97, 62.93, 63.26, 56.06, 62.38, 54.71, 50.42,
          39.99, 41.46, 41.87, 45.46, 37.30, 33.08, 37.77]  # fmt: skip
EMA_CLOSES = [22.27, 22.19, 22.08, 22.17, 22.18, 22.13, 22.23, 22.43, 22.24, 22.29, 22.15,
              22.39, 22.38, 22.61, 23.36, 24.05, 23.75, 23.83, 23.95, 23.63, 23.82, 23.87,
              23.65, 23.19, 23.10, 23.33, 22.68, 23.10, 22.40, 22.17]  # fmt: skip
EMA_10 = [22.22, 22.21, 22.24, 22.27, 22.33, 22.52, 22.80, 22.97, 23.13, 23.28, 23.34, 23.43,
          23.51, 23.54, 23.47, 23.40, 23.39, 23.26, 23.23, 23.08, 22.92]  # fmt: skip


def test_rsi_matches_the_published_wilder_example() -> None:
    got = rsi(RSI_CLOSES, 14)
    assert all(math.isnan(v) for v in got[:14])
    assert np.allclose(got[14:], RSI_14, atol=0.01), np.round(got[14:], 2)


def test_ema_and_sma_match_the_published_example() -> None:
    got = ema(EMA_CLOSES, 10)
    assert np.allclose(got[9:], EMA_10, atol=0.01), np.round(got[9:], 2)
    s = sma(EMA_CLOSES, 10)
    want = [statistics.fmean(EMA_CLOSES[i - 9 : i + 1]) for i in range(9, len(EMA_CLOSES))]
    assert np.allclose(s[9:], want) and all(math.isnan(v) for v in s[:9])


def _ema_ref(xs: list[float], n: int) -> list[float]:
    """A second, plain-Python EMA (seeded with the SMA), for MACD's reference."""
    out = [statistics.fmean(xs[:n])]
    for x in xs[n:]:
        out.append(x * 2 / (n + 1) + out[-1] * (1 - 2 / (n + 1)))
    return out


def test_macd_matches_a_plain_recomputation() -> None:
    rng = np.random.default_rng(7)
    closes = list(100 + np.cumsum(rng.normal(0, 1, 80)))
    line, sig, hist = macd(closes)
    fast, slow = _ema_ref(closes, 12), _ema_ref(closes, 26)
    ref_line = [f - s for f, s in zip(fast[14:], slow, strict=True)]  # aligned from index 25
    assert np.allclose(line[25:], ref_line)
    ref_sig = _ema_ref(ref_line, 9)
    assert np.allclose(sig[33:], ref_sig) and math.isnan(sig[32])
    assert np.allclose(hist[33:], np.array(ref_line[8:]) - np.array(ref_sig))


def test_bollinger_bands_use_population_deviation() -> None:
    lo, mid, hi = bollinger(EMA_CLOSES, 20)
    w = EMA_CLOSES[:20]
    assert mid[19] == pytest.approx(statistics.fmean(w))
    assert hi[19] - mid[19] == pytest.approx(2 * statistics.pstdev(w))
    assert mid[19] - lo[19] == pytest.approx(2 * statistics.pstdev(w))


def test_linear_forecast_recovers_a_line() -> None:
    xs = [3.0 + 0.5 * t for t in range(30)]
    future, slope, r2 = linear_forecast(xs, steps=3, window=24)
    assert slope == pytest.approx(0.5) and r2 == pytest.approx(1.0)
    assert np.allclose(future, [18.0, 18.5, 19.0])
    with pytest.raises(ValueError, match="at least 3"):
        linear_forecast([1.0, 2.0])


def wave(levels: list[float], step: int = 4) -> list[float]:
    """Straight legs between the given turning points."""
    out: list[float] = []
    for a, b in itertools.pairwise(levels):
        out += list(np.linspace(a, b, step, endpoint=False))
    return [*out, levels[-1]]


def test_support_resistance_and_patterns() -> None:
    # bounces between ~10 and ~12, then a close above 12
    xs = wave([11, 10, 12, 10.05, 11.95, 10, 12.02, 11, 12.8])
    sr = support_resistance(xs)
    assert sr["support"][0]["level"] == pytest.approx(10.02, abs=0.05)
    assert sr["support"][0]["touches"] == 3
    assert sr["resistance"][0]["level"] == pytest.approx(11.99, abs=0.05)
    kinds = {p["pattern"] for p in patterns(xs)}
    assert "breakout_up" in kinds and "breakout_down" not in kinds
    # two equal peaks with a real pullback, then a close under the neckline
    top = wave([8, 12, 9, 12.05, 8.5])
    found = [p for p in patterns(top) if p["pattern"] == "double_top"]
    assert found and found[0]["neckline"] == pytest.approx(9.0)
    bottom = [20 - v for v in top]
    assert any(p["pattern"] == "double_bottom" for p in patterns(bottom))
    assert not any(p["pattern"].startswith("double") for p in patterns(xs[:12]))


def test_anomalies_flag_jumps_spikes_and_a_pump() -> None:
    rng = np.random.default_rng(1)
    prices = list(100 * np.cumprod(1 + rng.normal(0, 0.003, 60)))
    volumes = list(rng.uniform(900, 1100, 60))
    assert anomalies(prices, volumes) == []  # a quiet market: nothing
    pumped = [*prices[:40], prices[40] * 1.3, *prices[41:]]  # up 30 %, straight back
    vols = [*volumes[:40], volumes[40] * 20, *volumes[41:]]
    kinds = {(a.index, a.kind) for a in anomalies(pumped, vols)}
    assert {(40, "price_jump"), (40, "outlier"), (40, "volume_spike"),
            (40, "manipulation")} <= kinds  # fmt: skip
    assert all(i in (40, 41) for i, _ in kinds)

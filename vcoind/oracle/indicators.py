"""Price indicators over a series of closes (oldest first): pure numpy, no I/O.

Conventions follow the usual definitions, so values can be checked against any charting
package: SMA; EMA seeded with the SMA of the first ``n`` values, alpha 2/(n+1); RSI with
Wilder's smoothing (seeded with the mean gain/loss of the first ``n`` changes); MACD
12/26/9 on EMAs; Bollinger bands at 2 population standard deviations. Values not yet
defined (too little history) are NaN.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

F = NDArray[np.float64]


def _arr(x: ArrayLike) -> F:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError("a 1-D series is needed")
    return a


def sma(x: ArrayLike, n: int) -> F:
    a = _arr(x)
    out = np.full(a.shape, np.nan)
    if n < 1 or len(a) < n:
        return out
    c = np.cumsum(np.insert(a, 0, 0.0))
    out[n - 1 :] = (c[n:] - c[:-n]) / n
    return out


def ema(x: ArrayLike, n: int) -> F:
    a = _arr(x)
    out = np.full(a.shape, np.nan)
    if n < 1 or len(a) < n:
        return out
    alpha = 2.0 / (n + 1)
    out[n - 1] = a[:n].mean()
    for i in range(n, len(a)):
        out[i] = alpha * a[i] + (1 - alpha) * out[i - 1]
    return out


def rsi(x: ArrayLike, n: int = 14) -> F:
    a = _arr(x)
    out = np.full(a.shape, np.nan)
    if len(a) <= n:
        return out
    d = np.diff(a)
    gain, loss = np.clip(d, 0, None), np.clip(-d, 0, None)
    avg_g, avg_l = gain[:n].mean(), loss[:n].mean()

    def value(g: float, lo: float) -> float:
        return 100.0 if lo == 0 else 100.0 - 100.0 / (1.0 + g / lo)

    out[n] = value(avg_g, avg_l)
    for i in range(n, len(d)):
        avg_g = (avg_g * (n - 1) + gain[i]) / n
        avg_l = (avg_l * (n - 1) + loss[i]) / n
        out[i + 1] = value(avg_g, avg_l)
    return out


def macd(x: ArrayLike, fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[F, F, F]:
    """(MACD line, signal line, histogram)."""
    a = _arr(x)
    line = ema(a, fast) - ema(a, slow)
    sig = np.full(a.shape, np.nan)
    valid = ~np.isnan(line)
    if valid.sum() >= signal:
        first = int(np.argmax(valid))
        sig[first:] = ema(line[first:], signal)
    return line, sig, line - sig


def bollinger(x: ArrayLike, n: int = 20, k: float = 2.0) -> tuple[F, F, F]:
    """(lower, middle, upper)."""
    a = _arr(x)
    mid = sma(a, n)
    sd = np.full(a.shape, np.nan)
    for i in range(n - 1, len(a)):
        sd[i] = a[i - n + 1 : i + 1].std()
    return mid - k * sd, mid, mid + k * sd


def linear_forecast(x: ArrayLike, steps: int = 1, window: int = 24) -> tuple[F, float, float]:
    """Least-squares line through the last ``window`` points: (the next ``steps`` values,
    slope per step, r²)."""
    a = _arr(x)[-window:]
    if len(a) < 3:
        raise ValueError("at least 3 points are needed for a trend")
    t = np.arange(len(a), dtype=np.float64)
    slope, intercept = np.polyfit(t, a, 1)
    fit = slope * t + intercept
    ss_res = float(((a - fit) ** 2).sum())
    ss_tot = float(((a - a.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    future = slope * np.arange(len(a), len(a) + steps) + intercept
    return future, float(slope), r2


def _pivots(a: F, order: int) -> tuple[list[int], list[int]]:
    """Indices of local highs and lows: extreme within ``order`` points on each side."""
    highs, lows = [], []
    for i in range(order, len(a) - order):
        w = a[i - order : i + order + 1]
        if a[i] == w.max() and (w < a[i]).any():
            highs.append(i)
        if a[i] == w.min() and (w > a[i]).any():
            lows.append(i)
    return highs, lows


def support_resistance(x: ArrayLike, order: int = 3, tolerance: float = 0.02) -> dict[str, Any]:
    """Levels where local lows (support) or highs (resistance) cluster within
    ``tolerance`` (relative), strongest (most touches) first; the nearest ones below and
    above the last price."""
    a = _arr(x)
    highs, lows = _pivots(a, order)

    def cluster(idx: list[int]) -> list[tuple[float, int]]:
        levels: list[list[float]] = []
        for v in sorted(a[i] for i in idx):
            if levels and abs(v - np.mean(levels[-1])) <= tolerance * abs(np.mean(levels[-1])):
                levels[-1].append(v)
            else:
                levels.append([v])
        return sorted(((float(np.mean(c)), len(c)) for c in levels), key=lambda p: -p[1])

    sup, res = cluster(lows), cluster(highs)
    last = float(a[-1])
    below = [lv for lv, _ in sup if lv <= last]
    above = [lv for lv, _ in res if lv >= last]
    return {
        "support": [{"level": lv, "touches": n} for lv, n in sup],
        "resistance": [{"level": lv, "touches": n} for lv, n in res],
        "nearest_support": max(below) if below else None,
        "nearest_resistance": min(above) if above else None,
    }


def patterns(x: ArrayLike, order: int = 3, tolerance: float = 0.02) -> list[dict[str, Any]]:
    """Breakouts (the last close beyond the highest high / lowest low of the pivots before
    it) and double tops/bottoms (two pivots within ``tolerance`` with a pullback of at
    least twice that between them, confirmed by the last close beyond the pullback)."""
    a = _arr(x)
    out: list[dict[str, Any]] = []
    highs, lows = _pivots(a[:-1], order)
    last = float(a[-1])
    if highs and last > max(a[i] for i in highs):
        out.append({"pattern": "breakout_up", "level": float(max(a[i] for i in highs))})
    if lows and last < min(a[i] for i in lows):
        out.append({"pattern": "breakout_down", "level": float(min(a[i] for i in lows))})
    for kind, piv, sign in (("double_top", highs, 1), ("double_bottom", lows, -1)):
        for p, q in itertools.pairwise(piv):
            top = (a[p] + a[q]) / 2
            if abs(a[p] - a[q]) > tolerance * abs(top):
                continue
            between = a[p : q + 1]
            neck = between.min() if sign > 0 else between.max()
            if abs(top - neck) < 2 * tolerance * abs(top):
                continue  # no real pullback between the two peaks
            if (last - neck) * sign < 0:  # the close broke the neckline
                out.append({"pattern": kind, "level": float(top), "neckline": float(neck)})
    return out


@dataclass(frozen=True)
class Anomaly:
    index: int
    kind: str  # outlier | price_jump | volume_spike | manipulation
    value: float
    detail: str


def anomalies(
    prices: ArrayLike,
    volumes: ArrayLike | None = None,
    *,
    z: float = 3.5,
    jump: float = 0.15,
    spike: float = 5.0,
) -> list[Anomaly]:
    """Statistical outliers (modified z-score of returns above ``z``, by median absolute
    deviation; 3.5 as Iglewicz and Hoaglin recommend), price jumps (a step of more than
    ``jump``, relative), volume spikes (more than ``spike`` times the median volume), and
    manipulation warnings (a jump on a volume spike that is reversed by the next step: a
    pump or a dump)."""
    p = _arr(prices)
    out: list[Anomaly] = []
    if len(p) < 3:
        return out
    r = np.diff(p) / np.where(p[:-1] == 0, np.nan, p[:-1])
    med = float(np.nanmedian(r))
    mad = float(np.nanmedian(np.abs(r - med))) or 1e-12
    for i, ri in enumerate(r, start=1):
        if math.isnan(ri):
            continue
        score = 0.6745 * (ri - med) / mad
        if abs(score) > z:
            out.append(Anomaly(i, "outlier", float(p[i]), f"return {ri:+.2%}, z {score:+.1f}"))
        if abs(ri) > jump:
            out.append(Anomaly(i, "price_jump", float(p[i]), f"{ri:+.2%} in one step"))
    if volumes is not None:
        v = _arr(volumes)
        if len(v) == len(p):
            base = float(np.median(v)) or 1e-12
            for i, vi in enumerate(v):
                if vi > spike * base:
                    out.append(Anomaly(i, "volume_spike", float(vi), f"{vi / base:.1f}x median"))
                    jumped = 1 <= i < len(r) and abs(r[i - 1]) > jump
                    if jumped and r[i - 1] * r[i] < 0 and abs(r[i]) > jump / 2:
                        why = "a jump on a volume spike, reversed at once"
                        out.append(Anomaly(i, "manipulation", float(p[i]), why))
    return sorted(out, key=lambda a: (a.index, a.kind))

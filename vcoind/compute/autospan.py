"""``--serve-layers auto``: which span of a model this node should serve.

Pipelines chain spans end to start (``routes.choose_route``), so a chosen span starts
where the network's spans leave off: at layer 0 or one past the end of a span some node
serves. Of those starts, the window of ``size`` layers whose layers the fewest nodes
serve wins (fewest on its least served layer, then on average, then the lowest start);
``size`` comes from the memory the node can give (``layers_that_fit``) or the operator
(``auto:N``). ``should_move`` says when a node's span has become the wrong one: every
layer of it is served by others while some layer of the model is served by nobody (a
span host left); of several nodes serving the same span, only the one whose peer id
sorts first stays, so they do not all move at once.

Pure functions: the compute service feeds them the spans from heartbeats.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

KV_HEADROOM = 1.25  # weights plus room for activations and KV caches


@dataclass(frozen=True)
class AutoSpec:
    model: str | None  # None: any model the network serves
    size: int | None  # layers; None: as many as fit in memory


_AUTO = re.compile(r"^(?:(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,127}|sha256:[0-9a-f]{64}):)?"
                   r"auto(?::(?P<size>[1-9][0-9]{0,4}))?$")  # fmt: skip


def parse_auto(spec: str) -> AutoSpec | None:
    """``auto``, ``auto:N``, ``MODEL:auto`` or ``MODEL:auto:N``; None for other specs."""
    m = _AUTO.match(spec)
    if m is None:
        return None
    size = m.group("size")
    return AutoSpec(m.group("model"), int(size) if size else None)


def coverage(spans: Iterable[tuple[int, int]], num_layers: int) -> list[int]:
    """How many of the given spans hold each layer."""
    c = [0] * num_layers
    for a, b in spans:
        for layer in range(max(a, 0), min(b, num_layers - 1) + 1):
            c[layer] += 1
    return c


def choose_span(spans: list[tuple[int, int]], num_layers: int, size: int) -> tuple[int, int]:
    """The span of (at most) ``size`` layers to serve, given the spans others serve."""
    size = max(1, min(size, num_layers))
    c = coverage(spans, num_layers)
    starts = {0} | {b + 1 for _, b in spans if b + 1 < num_layers}

    def key(s: int) -> tuple[int, float, int]:
        window = c[s : min(s + size, num_layers)]
        return (min(window), sum(window) / len(window), s)

    s = min(starts, key=key)
    return s, min(s + size, num_layers) - 1


def rebalanced(
    mine: tuple[int, int], me: str, others: dict[str, list[tuple[int, int]]],
    num_layers: int, size: int,
) -> tuple[int, int] | None:  # fmt: skip
    """The span to move to, or None to stay: moving must leave fewer layers that nobody
    serves (a span host left a gap), and of the nodes serving exactly our span only the
    one whose peer id sorts first stays (so they do not all move into the same gap)."""
    spans = [s for ss in others.values() for s in ss]
    best = choose_span(spans, num_layers, size)
    if best == mine:
        return None
    gaps_now = coverage([*spans, mine], num_layers).count(0)
    if coverage([*spans, best], num_layers).count(0) >= gaps_now:
        return None
    twins = sorted(p for p, ss in others.items() if mine in ss)
    if twins and me < twins[0]:
        return None  # we are the one that stays; a twin moves
    return best


def layers_that_fit(free_bytes: int, weight_bytes: int, num_layers: int) -> int:
    """Layers whose weights (and headroom) fit in ``free_bytes``; at least 1."""
    per_layer = weight_bytes / max(num_layers, 1) * KV_HEADROOM
    return max(1, min(num_layers, int(free_bytes // max(per_layer, 1.0))))

"""Wire messages a node sent and received, read from its /metrics (for bench/dispatch.py and
bench/consensus.py).

Counted per node, application messages: gossip publications (``vcoin_gossip_published_total``)
and valid receipts (``vcoin_gossip_received_total``, after pubsub's de-duplication: a
GossipSub duplicate or IHAVE is not counted), and direct-stream requests in and out
(``vcoin_stream_requests_total``, one per request; its reply is not counted apart).
Heartbeats are presence, not a task's cost: left out.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_LINE = re.compile(r"^(vcoin_gossip_(?:published|received)_total|vcoin_stream_requests_total)"
                   r"\{([^}]*)\}\s+([0-9.e+]+)$")  # fmt: skip
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def snapshot(node: Any) -> Counter[str]:
    """``gossip out tasks``, ``gossip in votes``, ``stream out task_assignments``, ... -> count."""
    out: Counter[str] = Counter()
    for line in node.rpc.get("/metrics").decode().splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        if m.group(1).startswith("vcoin_gossip"):
            if labels["topic"] == "heartbeat":
                continue
            way = "out" if "published" in m.group(1) else "in"
            key = f"gossip {way} {labels['topic']}"
        else:
            key = f"stream {labels['direction']} {labels['kind']}"
        out[key] += int(float(m.group(3)))
    return out


def per_task(before: list[Counter[str]], after: list[Counter[str]], tasks: int) -> list[str]:
    """One line per node: messages per task (total, then by kind)."""
    lines = []
    for i, (b, a) in enumerate(zip(before, after, strict=True), 1):
        d = {k: (a[k] - b[k]) / tasks for k in a if a[k] - b[k] > 0}
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items()))
        lines.append(f"node {i}: {sum(d.values()):.2f} messages/task ({kinds})")
    return lines

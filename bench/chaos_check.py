"""The chaos run's invariants: pure checks over the nodes' SQLite files (opened read-only,
after the daemons stopped), what the client submitted, the chain's events and the logs.

Each check returns a :class:`Verdict` (PASS when ``problems`` is empty). They are unit
tested on small hand-made files (tests/test_chaos.py) so that each one can fail.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# At most this many problem lines are kept per invariant (the count is always exact).
MAX_DETAIL = 8


@dataclass(frozen=True)
class Submitted:
    """A task the client got an id for: the invariants hold for every one of these."""

    task_id: str
    origin: int  # the node index it was submitted to
    kind: str  # single | consensus | pipeline | gateway
    deterministic: bool


@dataclass(frozen=True)
class Paid:
    """One on-chain ``Paid`` event: what a worker got for a task (toWorker + minted)."""

    task_id: str  # the task id as the nodes store it
    worker: str
    amount: int


@dataclass
class Verdict:
    name: str
    problems: list[str] = field(default_factory=list)
    count: int = 0  # how many problems in all (problems keeps the first MAX_DETAIL)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.count == 0

    def fail(self, problem: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_DETAIL:
            self.problems.append(problem)


def connect(path: Path) -> sqlite3.Connection:
    """Read-only: the checker must not change (or recover) what the daemons left."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    c.row_factory = sqlite3.Row
    return c


def integrity(dbs: dict[int, Path]) -> Verdict:
    v = Verdict("sqlite integrity_check")
    for i, p in sorted(dbs.items()):
        try:
            with connect(p) as c:
                got = [r[0] for r in c.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:  # too broken to check at all
            got = [str(exc)]
        if got != ["ok"]:
            v.fail(f"node {i}: {'; '.join(map(str, got))[:200]}")
    return v


def task_outcomes(dbs: dict[int, Path], subs: Iterable[Submitted]) -> Verdict:
    """Every submitted task is at its origin, ``completed`` or ``failed`` with a reason."""
    v = Verdict("every task completed or failed with a reason")
    rows: dict[int, dict[str, sqlite3.Row]] = {}
    for i, p in dbs.items():
        with connect(p) as c:
            rows[i] = {r["id"]: r for r in c.execute("SELECT id, status, error FROM tasks")}
    for s in subs:
        r = rows.get(s.origin, {}).get(s.task_id)
        if r is None:
            v.fail(f"{s.task_id} ({s.kind}) lost: no row at its origin node {s.origin}")
        elif r["status"] not in ("completed", "failed"):
            v.fail(f"{s.task_id} ({s.kind}) stuck in {r['status']} at node {s.origin}")
        elif r["status"] == "failed" and not (r["error"] or "").strip():
            v.fail(f"{s.task_id} ({s.kind}) failed without a reason at node {s.origin}")
    return v


def single_execution(dbs: dict[int, Path], peer_of: dict[int, str]) -> Verdict:
    """One execution per (task, attempt): a worker claims an attempt in its ``assignments``
    table (its primary key makes a second claim on the same node impossible), so a double
    execution shows as the same (task, attempt, origin) claimed on two nodes, or claimed by a
    node the origin's ``attempts`` row did not assign it to."""
    v = Verdict("no attempt executed twice")
    claims: dict[tuple[str, int], list[int]] = defaultdict(list)
    assigned: dict[tuple[str, int], set[str]] = defaultdict(set)
    for i, p in dbs.items():
        with connect(p) as c:
            for r in c.execute("SELECT task_id, attempt FROM assignments"):
                claims[(r["task_id"], r["attempt"])].append(i)
            for r in c.execute("SELECT task_id, attempt, peer_id FROM attempts"):
                assigned[(r["task_id"], r["attempt"])].add(r["peer_id"])
    for key, nodes in sorted(claims.items()):
        if len(nodes) > 1:
            v.fail(f"{key[0]} attempt {key[1]} claimed on nodes {sorted(nodes)}")
        elif key in assigned and peer_of.get(nodes[0]) not in assigned[key]:
            v.fail(f"{key[0]} attempt {key[1]} run by node {nodes[0]}, not the one assigned")
    return v


def deterministic_answers(dbs: dict[int, Path], subs: Iterable[Submitted]) -> Verdict:
    """Completed deterministic (temperature 0) tasks with the same model, input, parameters
    and kind gave the same answer (kinds are not compared with each other: a pipeline's
    float rounding may differ from one node's)."""
    v = Verdict("deterministic tasks gave identical answers")
    want = {s.task_id: s for s in subs if s.deterministic}
    Key = tuple[str, str, str, str]
    groups: dict[Key, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for p in dbs.values():
        with connect(p) as c:
            q = "SELECT id, model, input, parameters, result FROM tasks WHERE status='completed'"
            for r in c.execute(q):
                s = want.get(r["id"])
                if s is None:
                    continue
                params = {k: x for k, x in json.loads(r["parameters"] or "{}").items()
                          if k not in ("seed",)}  # fmt: skip
                key = (s.kind, str(r["model"]), str(r["input"]), json.dumps(params, sort_keys=True))
                groups[key][r["result"] or ""].append(r["id"])
    compared = 0
    for key, answers in groups.items():
        compared += sum(map(len, answers.values()))
        if len(answers) > 1:
            ids = "; ".join(f"{a[:30]!r}: {t[:3]}" for a, t in answers.items())
            v.fail(f"{key[0]} {key[2][:40]!r}: {len(answers)} answers ({ids})")
    v.note = f"{compared} tasks in {len(groups)} groups"
    return v


def settlements(dbs: dict[int, Path], anchored: dict[str, int], paid: list[Paid]) -> Verdict:
    """Each task's anchor op is ``done`` exactly once across the nodes (none left pending
    or failed, except one declined by rule: ``not anchored: ...``), the chain has exactly
    one ``Anchored`` event for it, and the chain's ``Paid`` events equal the ``rewards``
    rows the nodes recorded."""
    v = Verdict("every settlement landed exactly once, payments = rewards rows")
    done: dict[str, list[int]] = defaultdict(list)
    rewards: dict[tuple[str, str], int] = {}
    refused = 0
    for i, p in sorted(dbs.items()):
        with connect(p) as c:
            for r in c.execute("SELECT kind, key, payload, status, error FROM chain_ops "
                               "WHERE kind IN ('anchor', 'claim')"):  # fmt: skip
                tid = str(json.loads(r["payload"] or "{}").get("task_id", r["key"]))
                if r["status"] == "done":
                    done[tid].append(i)
                elif r["status"] == "failed" and (r["error"] or "").startswith(REFUSED):
                    refused += 1  # the node decided not to settle, and said why
                else:
                    v.fail(f"node {i}: {r['kind']} of {tid} {r['status']}: {r['error']}")
            for r in c.execute("SELECT task_id, node, amount FROM rewards"):
                k = (r["task_id"], r["node"].lower())
                if k in rewards and rewards[k] != int(r["amount"]):
                    v.fail(f"{k}: rewards rows differ between nodes")
                rewards[k] = int(r["amount"])
    for tid, nodes in sorted(done.items()):
        if len(nodes) > 1:
            v.fail(f"{tid}: settled on nodes {nodes}")
        if anchored.get(tid, 0) != 1:
            v.fail(f"{tid}: done but {anchored.get(tid, 0)} Anchored events on chain")
    for tid, n in sorted(anchored.items()):
        if n > 1:
            v.fail(f"{tid}: {n} Anchored events on chain")
        elif tid not in done:
            v.fail(f"{tid}: anchored on chain but no node recorded it done")
    on_chain: dict[tuple[str, str], int] = defaultdict(int)
    for e in paid:
        on_chain[(e.task_id, e.worker.lower())] += e.amount
    for k in sorted(set(on_chain) | set(rewards)):
        if on_chain.get(k) != rewards.get(k):
            v.fail(f"{k[0]} to {k[1]}: chain paid {on_chain.get(k)}, rewards {rewards.get(k)}")
    v.note = f"{len(done)} settled, {refused} not settled by rule, {len(paid)} Paid events"
    return v


# An anchor the origin declined by rule (e.g. too few eligible signatures), not a chain error.
REFUSED = "not anchored:"
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
# A log record as vcoind's logging writes it: "<date> <time> LEVEL name: message"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S* +(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def unhandled_tracebacks(logs: dict[int, Path]) -> Verdict:
    """The rule: a traceback is a handled, logged error when the line before it is a log
    record (logger.exception / exc_info: the daemon caught it and said so); a chained one
    ("During handling of ...") takes the verdict of the one it continues. Any other
    traceback (printed by Python for an uncaught exception, a thread or a task that died)
    is a failure."""
    v = Verdict("no unhandled traceback in any daemon log")
    for i, p in sorted(logs.items()):
        lines = p.read_text(errors="replace").splitlines() if p.exists() else []
        handled = True
        prev = ""
        for n, line in enumerate(lines, 1):
            if line.startswith(TRACEBACK):
                if not prev.startswith(CHAINED):
                    handled = bool(RECORD.match(prev))
                if not handled:
                    v.fail(f"node {i} {p.name}:{n} after {prev[:80]!r}")
            if line.strip():
                prev = line
    return v

"""The chaos run (bench/chaos.py): its invariant checker on small hand-made SQLite files with
the real schema (each invariant can fail), and a short seeded run on real daemons and anvil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos_check as check
from chaos_faults import KINDS, schedule

from devnet.chain import has_anvil
from vcoind.store.schema import open_db

ROOT = Path(__file__).resolve().parent.parent
ORIGIN, WORKER = "12D3origin", "12D3worker"


def db(path: Path, *sql: tuple[str, tuple[object, ...]]) -> Path:
    c = open_db(path)
    for q, args in sql:
        c.execute(q, args)
    c.commit()
    c.close()
    return path


def task(tid: str, status: str, result: str = "", error: str | None = None,
         inp: str = "hi") -> tuple[str, tuple[object, ...]]:  # fmt: skip
    return ("INSERT INTO tasks (id, model, input, parameters, timeout_s, status, phase, result, "
            "error, created_at) VALUES (?, 'm', ?, '{\"temperature\": 0}', 60, ?, 'done', ?, ?, 1)",
            (tid, inp, status, result, error))  # fmt: skip


def test_outcomes_catch_a_lost_a_stuck_and_a_reasonless_task(tmp_path: Path) -> None:
    dbs = {1: db(tmp_path / "1.db", task("a", "completed", "x"), task("b", "running"),
                 task("c", "failed"), task("d", "failed", error="no bid"))}  # fmt: skip
    subs = [check.Submitted(t, 1, "single", True) for t in "abcde"]
    v = check.task_outcomes(dbs, subs)
    assert v.count == 3, v
    assert any("b (single) stuck in running" in p for p in v.problems)
    assert any("c (single) failed without a reason" in p for p in v.problems)
    assert any("e (single) lost" in p for p in v.problems)
    assert check.task_outcomes(dbs, subs[:1] + subs[3:4]).ok


def test_single_execution_catches_an_attempt_claimed_on_two_workers(tmp_path: Path) -> None:
    attempt = ("INSERT INTO attempts VALUES ('t', 0, ?, 'done', NULL, 1, 2)", (WORKER,))
    claim = ("INSERT INTO assignments VALUES ('t', 0, ?, 'done', 1)", (ORIGIN,))
    dbs = {1: db(tmp_path / "1.db", task("t", "completed"), attempt),
           2: db(tmp_path / "2.db", claim)}  # fmt: skip
    peers = {1: ORIGIN, 2: WORKER, 3: "12D3other"}
    assert check.single_execution(dbs, peers).ok
    dbs[3] = db(tmp_path / "3.db", claim)
    v = check.single_execution(dbs, peers)
    assert not v.ok and "claimed on nodes [2, 3]" in v.problems[0], v
    v = check.single_execution({1: dbs[1], 3: dbs[3]}, peers)
    assert not v.ok and "not the one assigned" in v.problems[0], v


def test_deterministic_answers_differ(tmp_path: Path) -> None:
    rows = [
        task("a", "completed", "same"),
        task("b", "completed", "same"),
        task("c", "completed", "other"),
        task("d", "completed", "x", inp="else"),
    ]
    dbs = {1: db(tmp_path / "1.db", *rows)}
    subs = [check.Submitted(t, 1, "single", True) for t in "abd"]
    assert check.deterministic_answers(dbs, subs).ok
    v = check.deterministic_answers(dbs, [*subs, check.Submitted("c", 1, "single", True)])
    assert v.count == 1 and "2 answers" in v.problems[0], v
    # another kind (a pipeline) is its own group
    assert check.deterministic_answers(dbs, [*subs, check.Submitted("c", 1, "pipeline", True)]).ok


def anchor_op(tid: str, status: str = "done", error: str = "") -> tuple[str, tuple[object, ...]]:
    return ("INSERT INTO chain_ops (kind, key, payload, status, next_at, created_at, updated_at, "
            "error) VALUES ('anchor', ?, ?, ?, 0, 0, 0, ?)",
            (f"anchor:{tid}", json.dumps({"task_id": tid}), status, error))  # fmt: skip


def reward(tid: str, node: str, amount: int) -> tuple[str, tuple[object, ...]]:
    return ("INSERT INTO rewards VALUES (?, ?, ?, '0xab', 5, 0)", (tid, node, str(amount)))


def test_settlements_catch_double_missing_and_unequal_payments(tmp_path: Path) -> None:
    declined = anchor_op("d", "failed", "not anchored: 1 of 3 replicas signed")
    dbs = {1: db(tmp_path / "1.db", anchor_op("a"), reward("a", "0xW", 90), anchor_op("b"),
                 declined, anchor_op("e", "failed", "reverted"))}  # fmt: skip
    paid = [check.Paid("a", "0xw", 90)]
    v = check.settlements(dbs, {"a": 1, "b": 1}, paid)
    assert v.count == 1 and "anchor of e failed: reverted" in v.problems[0], v
    # twice on chain; never on chain; paid more than recorded
    v = check.settlements(dbs, {"a": 2}, [check.Paid("a", "0xW", 90), check.Paid("a", "0xW", 1)])
    text = "\n".join(v.problems)
    assert "a: done but 2 Anchored events" in text and "b: done but 0 Anchored" in text, text
    assert "chain paid 91, rewards 90" in text, text
    # settled by two nodes; an op left pending
    dbs[2] = db(tmp_path / "2.db", anchor_op("a"), anchor_op("c", "pending"))
    text = "\n".join(check.settlements(dbs, {"a": 1, "b": 1}, paid).problems)
    assert "a: settled on nodes [1, 2]" in text and "anchor of c pending" in text, text


def test_integrity_check_catches_a_corrupt_file(tmp_path: Path) -> None:
    good = db(tmp_path / "good.db", *(task(f"t{i}", "completed", "x" * 500) for i in range(200)))
    bad = tmp_path / "bad.db"
    raw = bytearray(good.read_bytes())
    raw[4096 * 3 : 4096 * 3 + 200] = b"\xff" * 200  # a btree page's header
    bad.write_bytes(bytes(raw))
    assert check.integrity({1: good}).ok
    assert not check.integrity({1: good, 2: bad}).ok


def test_traceback_rule_allows_logged_errors_only(tmp_path: Path) -> None:
    handled = ("2026-12-08 03:00:01,123 ERROR   vcoind.chain: anchor failed\n"
               "Traceback (most recent call last):\n  File \"x\", line 1\nOSError: down\n\n"
               "During handling of the above exception, another exception occurred:\n\n"
               "Traceback (most recent call last):\n  File \"y\"\nValueError\n")  # fmt: skip
    raw = 'Exception in thread t:\nTraceback (most recent call last):\n  File "z"\nKeyError\n'
    (tmp_path / "a.log").write_text(handled)
    (tmp_path / "b.log").write_text(handled + raw)
    assert check.unhandled_tracebacks({1: tmp_path / "a.log"}).ok
    v = check.unhandled_tracebacks({1: tmp_path / "a.log", 2: tmp_path / "b.log"})
    assert v.count == 1 and "node 2" in v.problems[0], v


def test_schedule_is_seeded_and_has_every_kind() -> None:
    import random

    a = schedule(random.Random(3), 5, 120, short=True)
    assert a == schedule(random.Random(3), 5, 120, short=True)
    assert {f.kind for f in a} == set(KINDS) and all(0 < f.at_s < 120 for f in a)
    assert all(f.duration_s <= 15 for f in a if f.kind == "anvil")


@pytest.mark.slow
@pytest.mark.skipif(not has_anvil(), reason="anvil is not installed")
@pytest.mark.skipif(os.environ.get("VCOIN_CHAOS") != "1",
                    reason="the short chaos run takes about 4 min on 2 cores and CI's 30-minute "
                    "budget has no room for it yet: VCOIN_CHAOS=1 runs it")  # fmt: skip
def test_short_seeded_chaos_run_passes_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--tasks", "16", "--minutes", "0.75",
         "--seed", "7", "--dir", str(tmp_path / "run"), "--json", str(out)],
        capture_output=True, text=True, timeout=420, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    print(r.stdout[-6000:], r.stderr[-3000:], f"took {time.monotonic() - t0:.0f} s")
    assert out.exists(), r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["submitted"] >= 10 and sum(report["faults"].values()) >= 5, report
    failed = [v for v in report["invariants"] if not v["ok"]]
    assert not failed, failed
    assert r.returncode == 0

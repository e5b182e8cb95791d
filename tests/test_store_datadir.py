"""SQLite store (real file, WAL, migrations) and the data directory (keys, lock, run file)."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from vcoind.datadir import DataDir, DataDirError
from vcoind.store import MIGRATIONS, PeerUpdate, Store, StoreError


async def test_store_migrates_and_round_trips(tmp_path: Path) -> None:
    store = Store(tmp_path / "vcoin.db")
    await store.open()
    assert await store.schema_version() == len(MIGRATIONS)
    await store.upsert_peers(
        [
            PeerUpdate(
                "peerA",
                "0xabc",
                ("/ip4/127.0.0.1/tcp/1/p2p/peerA",),
                "Tesla T4",
                15360,
                "12.2",
                0.9,
                "vcoind/0.1.0",
                100.0,
            ),
            PeerUpdate("peerB", "0xdef", (), "cpu", 0, "", 0.5, "vcoind/0.1.0", 150.0),
        ]
    )
    await store.upsert_peers(
        [PeerUpdate("peerA", "0xabc", (), "Tesla T4", 15360, "12.2", 0.8, "vcoind/0.1.0", 200.0)]
    )
    await store.upsert_peers([])
    await store.mark_offline("peerB")
    rows = await store.list_peers()
    assert [r.peer_id for r in rows] == ["peerA", "peerB"]
    a = rows[0]
    assert (a.health_score, a.last_heartbeat, a.status, a.addrs) == (0.8, 200.0, "online", ())
    assert a.reputation_score == 100 and a.staked_amount == 0  # the seed's defaults
    assert [r.peer_id for r in await store.list_peers(status="offline")] == ["peerB"]
    await store.close()

    conn = sqlite3.connect(tmp_path / "vcoin.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    # reopening does not re-run migrations
    store = Store(tmp_path / "vcoin.db")
    await store.open()
    assert len(await store.list_peers()) == 2
    await store.close()


async def test_store_refuses_newer_schema_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "vcoin.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this vcoind"):
        await Store(path).open()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        await Store(junk).open()


async def test_closed_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="closed"):
        await Store(tmp_path / "x.db").list_peers()


def test_init_creates_private_files_and_never_overwrites(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "dd")
    created = dd.init('network = "devnet"\n')
    assert {p.name for p in created} == {"p2p.key", "eth.key", "rpc.cookie", "config.toml"}
    for name in ("p2p.key", "eth.key", "rpc.cookie"):
        assert stat.S_IMODE((dd.path / name).stat().st_mode) == 0o600
    ident = dd.load_identity()
    assert ident.peer_id.startswith("12D3KooW")
    assert ident.eth_address.startswith("0x") and len(ident.eth_address) == 42
    before = (dd.p2p_key.read_bytes(), dd.eth_key.read_bytes())
    with pytest.raises(DataDirError, match="refusing to overwrite"):
        dd.init()
    assert dd.init(exist_ok=True) == []
    assert (dd.p2p_key.read_bytes(), dd.eth_key.read_bytes()) == before
    assert dd.load_identity().peer_id == ident.peer_id


def test_corrupt_keys_are_clear_errors(tmp_path: Path) -> None:
    dd = DataDir(tmp_path)
    dd.init()
    dd.eth_key.write_text("zz")
    with pytest.raises(DataDirError, match="not hold a valid secp256k1 key"):
        dd.load_identity()
    dd.p2p_key.write_bytes(b"garbage")
    with pytest.raises(DataDirError, match="corrupted"):
        dd.load_identity()


def test_lock_is_exclusive(tmp_path: Path) -> None:
    dd = DataDir(tmp_path)
    with dd.lock():
        dd.write_run_file({"pid": 4242})
        with pytest.raises(DataDirError, match=r"already running .* \(pid 4242\)"), dd.lock():
            pass
    with dd.lock():  # released
        pass
    dd.remove_run_file()
    assert dd.read_run_file() is None


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vcoind.cli import daemon_main

    assert daemon_main(["init", "--datadir", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    assert "peer id      12D3KooW" in out and "eth address  0x" in out
    assert (tmp_path / "n" / "config.toml").exists()
    assert daemon_main(["init", "--datadir", str(tmp_path / "n")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_model_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vcoind.cli import daemon_main

    models = tmp_path / "models"
    assert daemon_main(["model", "make-test", "--out", str(models / "tiny-qwen2")]) == 0
    made = capsys.readouterr().out
    assert "model id  sha256:" in made
    assert daemon_main(["model", "list", "--models-dir", str(models)]) == 0
    listing = capsys.readouterr().out
    assert "tiny-qwen2" in listing and "Qwen2ForCausalLM" in listing
    assert daemon_main(["model", "info", "tiny-qwen2", "--models-dir", str(models), "--json"]) == 0
    info = capsys.readouterr().out
    assert '"num_layers": 4' in info and made.split("model id  ")[1].split()[0] in info
    assert daemon_main(["model", "info", "nope", "--models-dir", str(models)]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    # the default store is DATADIR/models
    assert daemon_main(["model", "list", "--datadir", str(tmp_path)]) == 0
    assert "tiny-qwen2" in capsys.readouterr().out


async def test_task_tables_round_trip(tmp_path: Path) -> None:
    from vcoind.store import BidRow, TaskRow, TaskStore

    store = Store(tmp_path / "vcoin.db")
    await store.open()
    tasks = TaskStore(store)
    row = TaskRow(id="a" * 32, model="tiny-qwen2", input="hi", parameters={"seed": 3},
                  timeout_s=30.0, status="pending", phase="bidding", created_at=1.0)  # fmt: skip
    await tasks.insert(row)
    await tasks.insert(TaskRow(**{**row.__dict__, "id": "b" * 32, "created_at": 2.0}))
    await tasks.update("a" * 32, status="completed", phase="completed", result="ok",
                       timings={"total_s": 0.5})  # fmt: skip
    got = await tasks.get("a" * 32)
    assert got is not None and got.result == "ok" and got.timings == {"total_s": 0.5}
    assert got.parameters == {"seed": 3}
    with pytest.raises(StoreError, match="unknown task columns"):
        await tasks.update("a" * 32, nonsense=1)
    page, total = await tasks.page(limit=1)
    assert total == 2 and [t.id for t in page] == ["b" * 32]  # newest first
    assert [t.id for t in await tasks.unfinished()] == ["b" * 32]
    assert await tasks.count_by_status() == {"completed": 1, "pending": 1}
    await tasks.add_bids("a" * 32, [BidRow("p1", 0.0, 1.5, 0.9, 0, 50.0, 3.0)])
    assert (await tasks.bids("a" * 32))[0].eta_s == 1.5
    await tasks.add_attempt("a" * 32, 1, "p1", 4.0)
    await tasks.finish_attempt("a" * 32, 1, "failed", "boom", 5.0)
    (att,) = await tasks.attempts("a" * 32)
    assert (att.attempt, att.peer_id, att.status, att.error) == (1, "p1", "failed", "boom")
    assert await tasks.claim_assignment("a" * 32, 1, "origin", 6.0) is True
    assert await tasks.claim_assignment("a" * 32, 1, "origin", 7.0) is False  # never twice
    # a batch: claimed in one transaction, each at most once (a repeat inside it too)
    claims = [("a" * 32, 1), ("a" * 32, 2), ("b" * 32, 1), ("a" * 32, 2)]
    assert await tasks.claim_assignments(claims, "origin", 8.0) == [False, True, True, False]
    await store.close()


async def test_a_failing_call_loses_only_its_own_changes(tmp_path: Path) -> None:
    """Concurrent calls: one fails half-way and is rolled back whole; the others commit; a
    call cancelled before it ran never runs."""
    import trio

    store = Store(tmp_path / "vcoin.db")
    await store.open()
    await store._run(lambda c: c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    await store._run(lambda c: c.execute("INSERT INTO t VALUES (0, 'before')"))

    def insert(k: int) -> object:
        return lambda c: c.execute("INSERT INTO t VALUES (?, ?)", (k, f"v{k}")).rowcount

    def failing(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (100, 'half')")  # rolled back with its call
        c.execute("INSERT INTO t VALUES (0, 'duplicate key')")

    results: dict[int, object] = {}
    errors: list[BaseException] = []

    async def call(i: int, fn: object) -> None:
        try:
            results[i] = await store._run(fn)  # type: ignore[arg-type]
        except sqlite3.IntegrityError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for k in range(1, 21):
            nursery.start_soon(call, k, insert(k))
        nursery.start_soon(call, -1, failing)
        with trio.CancelScope() as doomed:
            doomed.cancel()
            await store._run(insert(999))
    assert doomed.cancelled_caught
    assert len(errors) == 1 and all(results[k] == 1 for k in range(1, 21))
    keys = await store._run(lambda c: [r[0] for r in c.execute("SELECT k FROM t ORDER BY k")])
    assert keys == list(range(21))  # not 100 (the failed call's half), not 999 (cancelled)
    await store.close()

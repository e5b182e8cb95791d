"""``vcoind apikey ...``: the OpenAI gateway's API keys (create, list, revoke).

Works on the data directory's SQLite file, beside a running daemon: a key created here
works at once, a revoked one stops at once (the gateway looks each one up).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import trio

from vcoind.cli.format import EXIT_USAGE, die, fmt_table
from vcoind.config import ConfigError, load
from vcoind.datadir import DataDir
from vcoind.store import Store
from vcoind.store.apikeys import ApiKeyStore

NAME_RE = "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


def apikey_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcoind apikey",
        description="API keys for the OpenAI-compatible gateway (/v1) and the REST paths. "
        "A key works from any address (the RPC cookie only from this machine) and opens "
        "nothing else; it is shown once, when it is created, and only its hash is kept.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create a key and print it (once)")
    c.add_argument("name", help="what the key is for (letters, digits, _ . -)")
    c.add_argument("--rpm", type=int, default=60,
                   help="requests per minute (default 60; 0 = no limit)")  # fmt: skip
    c.add_argument("--tpm", type=int, default=100_000,
                   help="generated tokens per minute (default 100000; 0 = no limit)")  # fmt: skip
    sub.add_parser("list", help="keys, their limits and usage")
    r = sub.add_parser("revoke", help="revoke a key (by id or name)")
    r.add_argument("key", help="the key's id or name")
    for sp in sub.choices.values():
        sp.add_argument("--datadir", type=Path, metavar="DIR", help="data directory")
        sp.add_argument("--json", action="store_true", help="print JSON")
    return p


def apikey_main(args: list[str]) -> int:
    import re

    ns = apikey_parser().parse_args(args)
    if ns.action == "create" and (
        re.fullmatch(NAME_RE, ns.name) is None or ns.rpm < 0 or ns.tpm < 0
    ):
        return die("name: 1-64 of letters, digits, _ . - ; --rpm and --tpm: >= 0", EXIT_USAGE)
    try:
        cfg = load(flags={"datadir": ns.datadir})
    except ConfigError as exc:
        return die(str(exc), EXIT_USAGE)
    dd = DataDir(cfg.datadir)
    if not dd.db_file.exists():
        return die(f"no node data in {cfg.datadir} (start vcoind there first)")
    return trio.run(_run, ns, dd)


async def _run(ns: argparse.Namespace, dd: DataDir) -> int:
    store = Store(dd.db_file)
    await store.open()
    try:
        keys = ApiKeyStore(store)
        if ns.action == "create":
            record, key = await keys.create(ns.name, ns.rpm, ns.tpm)
            if ns.json:
                print(json.dumps({**record.view(), "key": key}, indent=2))
            else:
                print(f"{key}\n(key {record.id} '{record.name}': {record.rpm} requests and "
                      f"{record.tpm} tokens per minute; shown once, keep it)")  # fmt: skip
            return 0
        if ns.action == "revoke":
            if not await keys.revoke(ns.key):
                return die(f"no live key {ns.key!r} (vcoind apikey list)")
            print(f"revoked {ns.key}")
            return 0
        rows = await keys.list()
        if ns.json:
            print(json.dumps([k.view() for k in rows], indent=2))
            return 0
        if not rows:
            print("no API keys (vcoind apikey create NAME)")
            return 0

        def when(t: float | None) -> str:
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

        table = [[k.id, k.name, str(k.rpm), str(k.tpm), str(k.requests), str(k.tokens),
                  when(k.last_used), "revoked" if k.revoked_at else "live"]
                 for k in rows]  # fmt: skip
        print(fmt_table(table, ["id", "name", "rpm", "tpm", "requests", "tokens", "last used",
                                "state"]))  # fmt: skip
        return 0
    finally:
        await store.close()

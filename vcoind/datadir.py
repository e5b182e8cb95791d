"""The data directory: keys, config file, RPC cookie, run file and lock.

Layout::

    DATADIR/
      p2p.key       Ed25519 libp2p private key (libp2p protobuf encoding), 0600
      eth.key       secp256k1 Ethereum private key (hex), 0600
      rpc.cookie    random RPC auth secret, 0600
      config.toml   written by `vcoind init`
      vcoin.db      SQLite store (WAL)
      run.json      present while a daemon runs: pid, RPC URL, multiaddrs, ...
      LOCK          flock'ed by the running daemon
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity


class DataDirError(Exception):
    """The data directory is unusable (locked, corrupt key, already initialised...)."""


def _write_secret(path: Path, data: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)


@dataclass(frozen=True)
class Identity:
    key_pair: KeyPair
    eth: LocalAccount

    @property
    def peer_id(self) -> str:
        from libp2p.peer.id import ID

        return str(ID.from_pubkey(self.key_pair.public_key))

    @property
    def eth_address(self) -> str:
        return str(self.eth.address)


class DataDir:
    def __init__(self, path: Path) -> None:
        self.path = path = path.expanduser()
        self.p2p_key = path / "p2p.key"
        self.eth_key = path / "eth.key"
        self.cookie_file = path / "rpc.cookie"
        self.config_file = path / "config.toml"
        self.db_file = path / "vcoin.db"
        self.run_file = path / "run.json"
        self.lock_file = path / "LOCK"

    def is_initialised(self) -> bool:
        return self.p2p_key.exists() and self.eth_key.exists()

    def init(self, config_text: str | None = None, *, exist_ok: bool = False) -> list[Path]:
        """Create whatever is missing; never overwrite keys. Returns the files created."""
        if self.is_initialised() and not exist_ok:
            raise DataDirError(
                f"{self.path} is already initialised (keys exist); refusing to overwrite them"
            )
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        created: list[Path] = []
        if not self.p2p_key.exists():
            save_identity(create_new_key_pair(), self.p2p_key)
            created.append(self.p2p_key)
        if not self.eth_key.exists():
            _write_secret(self.eth_key, Account.create().key.hex() + "\n")
            created.append(self.eth_key)
        if not self.cookie_file.exists():
            _write_secret(self.cookie_file, secrets.token_hex(32) + "\n")
            created.append(self.cookie_file)
        if config_text is not None and not self.config_file.exists():
            self.config_file.write_text(config_text)
            created.append(self.config_file)
        return created

    def load_identity(self) -> Identity:
        try:
            key_pair = load_identity(self.p2p_key)
        except FileNotFoundError:
            raise DataDirError(f"{self.p2p_key} is missing; run `vcoind init`") from None
        except ValueError as exc:
            raise DataDirError(str(exc)) from None
        try:
            eth = Account.from_key(self.eth_key.read_text().strip())
        except FileNotFoundError:
            raise DataDirError(f"{self.eth_key} is missing; run `vcoind init`") from None
        except (ValueError, TypeError):
            raise DataDirError(f"{self.eth_key} does not hold a valid secp256k1 key") from None
        return Identity(key_pair=key_pair, eth=eth)

    def read_cookie(self) -> str | None:
        try:
            return self.cookie_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for the daemon's lifetime; a second daemon fails at once."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_file, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self.read_run_file()
                pid = f" (pid {owner['pid']})" if owner and "pid" in owner else ""
                raise DataDirError(
                    f"another vcoind is already running on {self.path}{pid}"
                ) from None
            yield
        finally:
            os.close(fd)

    def write_run_file(self, info: dict[str, Any]) -> None:
        tmp = self.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.run_file)

    def read_run_file(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.run_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def remove_run_file(self) -> None:
        self.run_file.unlink(missing_ok=True)

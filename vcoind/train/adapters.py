"""Blobs named by their sha256: a node's trained adapters on disk, transient training
blobs (shards, round adapters) in memory, and pulling a blob from a peer in chunks.

An adapter's id is the sha256 of its safetensors bytes, so whoever holds the id can
check what a peer hands over; nothing unverified is kept or used.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vcoind.train.spec import TrainError, sha256_hex
from vcoind.train.wire import CHUNK_BYTES, MAX_BLOB_BYTES, BlobGet, BlobPart

log = logging.getLogger("vcoind.train")

ID_RE = re.compile(r"[0-9a-f]{64}")
# (peer, BlobGet) -> BlobPart: one request on /vcoin/train/1.0.0 (or a plain call to us)
Request = Callable[[str, Any, type[Any]], Awaitable[Any]]


class AdapterStore:
    """``DATADIR/adapters/<id>.safetensors``: written atomically, only under its own hash."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, adapter_id: str) -> Path:
        if not ID_RE.fullmatch(adapter_id):
            raise TrainError(f"adapter id must be 64 hex digits, not {adapter_id[:80]!r}")
        return self.root / f"{adapter_id}.safetensors"

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.safetensors") if ID_RE.fullmatch(p.stem))

    def newest(self, n: int) -> list[str]:
        """The ``n`` most recently stored ids, newest first."""
        paths = (self.path(a) for a in self.ids())
        return [p.stem for p in sorted(paths, key=lambda p: -p.stat().st_mtime)[:n]]

    def has(self, adapter_id: str) -> bool:
        return self.path(adapter_id).is_file()

    def get(self, adapter_id: str) -> bytes | None:
        try:
            return self.path(adapter_id).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, adapter_id: str, data: bytes) -> Path:
        if sha256_hex(data) != adapter_id:
            raise TrainError(f"adapter bytes do not hash to {adapter_id}")
        path = self.path(adapter_id)
        if path.is_file():
            return path
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        log.info("adapter %s stored (%d bytes)", adapter_id[:12], len(data))
        return path


class BlobCache:
    """Transient blobs by hash (shards, round adapters), least recently used out first."""

    def __init__(self, budget_bytes: int = 512 << 20) -> None:
        self.budget = budget_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0

    def put(self, data: bytes) -> str:
        h = sha256_hex(data)
        if h not in self._blobs:
            self._blobs[h] = data
            self._used += len(data)
        self._blobs.move_to_end(h)
        while self._used > self.budget and len(self._blobs) > 1:
            _, old = self._blobs.popitem(last=False)
            self._used -= len(old)
        return h

    def get(self, h: str) -> bytes | None:
        data = self._blobs.get(h)
        if data is not None:
            self._blobs.move_to_end(h)
        return data

    def drop(self, h: str) -> None:
        data = self._blobs.pop(h, None)
        if data is not None:
            self._used -= len(data)


def blob_part(data: bytes | None, req: BlobGet) -> BlobPart:
    """The chunk of ``data`` a ``BlobGet`` asks for (TrainError: not held here)."""
    if data is None:
        raise TrainError(f"no blob {req.hash[:12]} here")
    if req.offset >= len(data):
        raise TrainError(f"offset {req.offset} is past the end of blob {req.hash[:12]}")
    chunk = data[req.offset : req.offset + CHUNK_BYTES]
    return BlobPart(req.hash, req.offset, len(data), chunk)


async def pull_blob(request: Request, peer: str, h: str, size: int | None = None) -> bytes:
    """Blob ``h`` of ``size`` bytes (None: as its holder's first part says) from ``peer``,
    chunk by chunk; TrainError unless the whole hashes to ``h``."""
    if size is not None and not 0 < size <= MAX_BLOB_BYTES:
        raise TrainError(f"blob size {size} is outside 1..{MAX_BLOB_BYTES}")
    buf = bytearray()
    while size is None or len(buf) < size:
        part: BlobPart = await request(peer, BlobGet(h, len(buf)), BlobPart)
        size = part.total if size is None else size
        if part.hash != h or part.offset != len(buf) or part.total != size or not part.data:
            raise TrainError(f"{peer[-8:]} sent a blob part that does not match the request")
        buf += part.data
    if len(buf) != size or sha256_hex(bytes(buf)) != h:
        raise TrainError(f"blob from {peer[-8:]} does not hash to {h[:12]}: refused")
    return bytes(buf)

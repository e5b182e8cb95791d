"""Blobs named by their sha256: a node's trained adapters on disk, transient training
blobs (shards, round adapters) in memory, and pulling a blob from a peer in chunks.

An adapter's id is the sha256 of its safetensors bytes, so whoever holds the id can
check what a peer hands over; nothing unverified is kept or used.
"""

from __future__ import annotations

import contextlib
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


class Refusal(TrainError):
    """A request this node will not serve: the peer gets an ``ErrorReply`` with ``code``
    ("over_budget", "sign_refused") and the message; ``label`` is the metric's (the budget,
    or why a signature was refused)."""

    def __init__(self, code: str, label: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.label = label


def over_budget(resource: str, message: str) -> Refusal:
    return Refusal("over_budget", resource, message)


class AdapterStore:
    """``DATADIR/adapters/<id>.safetensors``: written atomically, only under its own hash.

    An adapter a peer brought (``owner``: the training's origin, or the holder it was
    fetched from) is recorded beside it (``<id>.owner``) and counts against that peer's
    ``quota_bytes``; all of them together against ``capacity_bytes``. Over either, the
    least recently used peers' adapters are dropped first (ours, ``owner`` "", never);
    one that cannot fit is refused (``Refusal`` "over_budget"). 0 = no limit."""

    def __init__(self, root: Path, *, quota_bytes: int = 0, capacity_bytes: int = 0) -> None:
        self.root = root
        self.quota_bytes = quota_bytes
        self.capacity_bytes = capacity_bytes

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
            data = self.path(adapter_id).read_bytes()
        except FileNotFoundError:
            return None
        self.touch(adapter_id)
        return data

    def touch(self, adapter_id: str) -> None:
        """Mark it used now (the least recently used go first)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(adapter_id))

    def owner(self, adapter_id: str) -> str:
        try:
            return self.path(adapter_id).with_suffix(".owner").read_text().strip()
        except FileNotFoundError:
            return ""

    def usage(self) -> dict[str, int]:
        """Bytes held per owner ("" = ours)."""
        out: dict[str, int] = {}
        for a in self.ids():
            o = self.owner(a)
            out[o] = out.get(o, 0) + self.path(a).stat().st_size
        return out

    def _remove(self, adapter_id: str) -> None:
        path = self.path(adapter_id)
        path.unlink(missing_ok=True)
        path.with_suffix(".owner").unlink(missing_ok=True)
        log.info("adapter %s dropped (storage budget)", adapter_id[:12])

    def _make_room(self, size: int, owner: str) -> None:
        """Drop least recently used peers' adapters until ``size`` more bytes from
        ``owner`` fit its quota and the capacity; Refusal when they cannot."""
        quota, cap = self.quota_bytes, self.capacity_bytes
        if owner and quota and size > quota:
            raise over_budget("adapter_quota_per_peer", f"adapter storage per peer: an adapter "
                              f"of {size} bytes exceeds the quota of {quota} bytes "
                              "(compute.adapter_quota_mb_per_peer)")  # fmt: skip
        if cap and size > cap:
            raise over_budget("adapter_store", f"adapter storage: an adapter of {size} bytes "
                              f"exceeds the node's {cap} (compute.adapter_store_mb)")  # fmt: skip
        entries = sorted(((self.path(a).stat(), a, self.owner(a)) for a in self.ids()),
                         key=lambda e: e[0].st_mtime)  # fmt: skip
        gone: set[str] = set()
        if owner and quota:  # the peer's own, least recently used first
            mine = sum(st.st_size for st, _, o in entries if o == owner)
            for st, a, o in entries:
                if mine + size <= quota:
                    break
                if o == owner:
                    self._remove(a)
                    gone.add(a)
                    mine -= st.st_size
        if cap:  # then any peer's
            total = sum(st.st_size for st, a, _ in entries if a not in gone)
            for st, a, o in entries:
                if total + size <= cap:
                    break
                if o and a not in gone:
                    self._remove(a)
                    total -= st.st_size
            if total + size > cap:
                raise over_budget("adapter_store", f"adapter storage: the node's {cap} bytes "
                                  "(compute.adapter_store_mb) are full")  # fmt: skip

    def put(self, adapter_id: str, data: bytes, owner: str = "") -> Path:
        """Store ``data`` under its hash, brought by peer ``owner`` ("" = ours)."""
        if sha256_hex(data) != adapter_id:
            raise TrainError(f"adapter bytes do not hash to {adapter_id}")
        path = self.path(adapter_id)
        if path.is_file():
            self.touch(adapter_id)
            return path
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_room(len(data), owner)
        if owner:
            path.with_suffix(".owner").write_text(owner)
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

"""What of a model directory travels over ``/vcoin/model/1.0.0``, and how it is checked.

The serving side lists a directory's files (weights, config, tokenizer, chat template,
generation defaults; a shard's ``shard.json``; never pickles, caches or anything hidden)
with the sha256 of each file and of each ``CHUNK_BYTES`` chunk, cached in
``.vcoin-chunks.json`` by file size and mtime like the model id. The fetching side checks
a manifest before it asks for a byte: the weight files' sha256 must make up the model id
it wants (``models.model_id_from``), a span's manifest must name that model id and
range. A finished span is checked tensor by tensor against its ``shard.json``.

Synchronous file work: call it on a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from vcoind.compute.fetchwire import (
    CHUNK_BYTES,
    FILE_NAME,
    MAX_CHUNKS,
    MAX_FILES,
    WHOLE,
    FileEntry,
    ModelManifest,
)
from vcoind.compute.models import SHARD_MANIFEST, file_sha256, model_id_from

log = logging.getLogger("vcoind.fetch")

CHUNK_CACHE = ".vcoin-chunks.json"
_TRAVELS = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|tokenizer\.model"
    r"|chat_template\.jinja|shard\.json|.+\.safetensors|.+\.safetensors\.index\.json)$"
)
_NAME = re.compile(rf"^{FILE_NAME}$")


class ManifestError(Exception):
    """A manifest that does not describe the model asked for, or files that do not match it."""


def travelling_files(directory: Path) -> list[Path]:
    """The files of a model or shard directory that another node needs to serve it."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and _TRAVELS.match(p.name) and _NAME.match(p.name))  # fmt: skip


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, bytes]:
    """sha256 of the whole file and the concatenated sha256 digests of its chunks."""
    whole = hashlib.sha256()
    chunks = bytearray()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            whole.update(block)
            chunks += hashlib.sha256(block).digest()
            if on_bytes is not None:
                on_bytes(len(block))
    return whole.hexdigest(), bytes(chunks)


def file_entries(directory: Path, on_bytes: Callable[[int], None] | None = None) -> list[FileEntry]:
    """A ``FileEntry`` per travelling file (hashes from the cache when the file is unchanged)."""
    cache_path = directory / CHUNK_CACHE
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    out, fresh = [], {}
    for f in travelling_files(directory):
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cache.get(f.name)
        if isinstance(hit, dict) and hit.get("stamp") == stamp:
            digest, chunks = str(hit["sha256"]), bytes.fromhex(str(hit["chunks"]))
            if on_bytes is not None:
                on_bytes(st.st_size)
        else:
            digest, chunks = hash_file(f, on_bytes)
        fresh[f.name] = {"stamp": stamp, "sha256": digest, "chunks": chunks.hex()}
        out.append(FileEntry(f.name, st.st_size, digest, chunks))
    if fresh != cache:
        try:
            cache_path.write_text(json.dumps(fresh))
        except OSError:  # read-only: hashed again next time
            log.debug("cannot cache chunk hashes in %s", cache_path)
    return out


def travelling_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in travelling_files(directory))


def build_manifest(
    directory: Path, *, name: str, model_id: str, num_layers: int, start: int = WHOLE,
    end: int = WHOLE, on_bytes: Callable[[int], None] | None = None,
) -> ModelManifest:  # fmt: skip
    files = tuple(file_entries(directory, on_bytes))
    if len(files) > MAX_FILES or sum(f.count for f in files) > MAX_CHUNKS:
        raise ManifestError(f"{directory}: too many files or chunks for one manifest")
    return ModelManifest(name, model_id, num_layers, start, end, files)


def check_manifest(m: ModelManifest, model_id: str | None, start: int, end: int) -> None:
    """The manifest describes ``model_id`` (None: any) and the span asked for, and its hashes
    are well formed; ``ManifestError`` says how not."""
    if model_id is not None and m.model_id != model_id:
        raise ManifestError(f"it describes {m.model_id}, not {model_id}")
    if (m.start, m.end) != (start, end):
        raise ManifestError(f"it describes layers {m.start}-{m.end}, not {start}-{end}")
    if len({f.name for f in m.files}) != len(m.files):
        raise ManifestError("it lists a file twice")
    bad = [f.name for f in m.files if not f.well_formed()]
    if bad:
        raise ManifestError(f"wrong number of chunk hashes for {', '.join(bad)}")
    weights = [f for f in m.files if f.name.endswith(".safetensors")]
    if not weights or m.file("config.json") is None:
        raise ManifestError("it lists no weights or no config.json")
    if m.whole:
        got = model_id_from((f.name, f.sha256) for f in weights)
        if got != m.model_id:
            raise ManifestError(f"its weight hashes make up {got}, not the {m.model_id} it names")
    elif m.file(SHARD_MANIFEST) is None:
        raise ManifestError(f"a span without {SHARD_MANIFEST}")
    elif not 0 <= start <= end < m.num_layers:
        raise ManifestError(f"layers {start}-{end} are outside 0-{m.num_layers - 1}")


def missing_chunks(path: Path, entry: FileEntry) -> list[int]:
    """Chunks of a partly fetched file that are not there yet: every chunk whose bytes on
    disk do not hash to the manifest's (so a restart resumes without trusting anything)."""
    if not path.exists():
        return list(range(entry.count))
    out = []
    with path.open("rb") as fh:
        for i in range(entry.count):
            block = fh.read(CHUNK_BYTES)
            if len(block) != entry.chunk_len(i) or hashlib.sha256(block).digest() != (
                entry.chunk_hash(i)
            ):
                out.append(i)
    return out


def preallocate(path: Path, size: int) -> None:
    """The part file at its full size (chunks land at their offsets in any order)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def verify_file(path: Path, entry: FileEntry) -> None:
    if path.stat().st_size != entry.size:
        raise ManifestError(f"{path.name}: {path.stat().st_size} bytes, want {entry.size}")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise ManifestError(f"{path.name}: sha256 {digest}, want {entry.sha256}")


def verify_shard(directory: Path, model_id: str, start: int, end: int) -> None:
    """A fetched span: its ``shard.json`` names the model and range asked for, and every
    tensor hashes to what it lists (imports torch)."""
    from safetensors import safe_open

    from vcoind.compute.shards import WEIGHTS, ShardError, ShardManifest, tensor_hash

    try:
        sm = ShardManifest.read(directory)
    except ShardError as exc:
        raise ManifestError(str(exc)) from None
    if (sm.model_id, sm.start, sm.end) != (model_id, start, end):
        raise ManifestError(f"{SHARD_MANIFEST} names {sm.model_id} layers {sm.span}, "
                            f"not {model_id} layers {start}-{end}")  # fmt: skip
    with safe_open(str(directory / WEIGHTS), "pt") as fh:
        names = set(fh.keys())
        if names != set(sm.tensors):
            raise ManifestError(f"{WEIGHTS} holds other tensors than {SHARD_MANIFEST} lists")
        for t in sorted(names):
            if tensor_hash(fh.get_tensor(t)) != sm.tensors[t]:
                raise ManifestError(f"tensor {t} does not match {SHARD_MANIFEST}")

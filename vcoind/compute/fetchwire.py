"""Wire records of ``/vcoin/model/1.0.0``: a model's files, moved between nodes in chunks.

A session stream (several requests on one stream), requests from the fetching node:

- ``ModelWant`` (a model by name or id; a layer span or the whole model) ->
  ``ModelManifest``: the files with their sizes, sha256 and the sha256 of every
  ``CHUNK_BYTES`` chunk. The weight files' sha256 make up the model id, so the fetcher
  checks the manifest against the id before it asks for a byte;
- ``ChunkWant`` (model id, span, file, chunk index) -> ``ChunkData`` (the chunk's bytes),
  checked against the manifest's chunk hash as it arrives; each finished file is checked
  against its sha256 again before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vcoind.p2p.codec import ABSOLUTE_MAX_BYTES, Message, lim, message

MODEL_PROTOCOL = "/vcoin/model/1.0.0"
CHUNK_BYTES = 1 << 20
HASH_BYTES = 32  # a raw sha256 digest
MAX_FILES = 64
# Chunks in one manifest, all files together: 97 GiB of weights, 3.2 MB of hashes (under
# the codec's ceiling on a record).
MAX_CHUNKS = 100_000
FILE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MODEL_ID = r"sha256:[0-9a-f]{64}"
SHA256 = r"[0-9a-f]{64}"
WHOLE = -1  # start/end of a ModelWant for the whole model


@message
@dataclass(frozen=True)
class ModelWant(Message):
    KIND: ClassVar[str] = "model_want"
    MAX_BYTES: ClassVar[int] = 512

    model: str = field(metadata=lim(max_len=128))  # a short name or a model id
    start: int = field(default=WHOLE, metadata=lim(min=WHOLE, max=10_000))
    end: int = field(default=WHOLE, metadata=lim(min=WHOLE, max=10_000))


@dataclass(frozen=True)
class FileEntry:
    name: str = field(metadata=lim(max_len=128, pattern=FILE_NAME))
    size: int = field(metadata=lim(min=0, max=1 << 40))
    sha256: str = field(metadata=lim(max_len=64, pattern=SHA256))
    # the raw sha256 of each CHUNK_BYTES chunk, concatenated
    chunks: bytes = field(metadata=lim(max_len=MAX_CHUNKS * HASH_BYTES))

    @property
    def count(self) -> int:
        return len(self.chunks) // HASH_BYTES

    def chunk_hash(self, index: int) -> bytes:
        return self.chunks[index * HASH_BYTES : (index + 1) * HASH_BYTES]

    def chunk_len(self, index: int) -> int:
        return min(CHUNK_BYTES, self.size - index * CHUNK_BYTES)

    def well_formed(self) -> bool:
        want = -(-self.size // CHUNK_BYTES)
        return len(self.chunks) == want * HASH_BYTES


@message
@dataclass(frozen=True)
class ModelManifest(Message):
    KIND: ClassVar[str] = "model_manifest"
    MAX_BYTES: ClassVar[int] = ABSOLUTE_MAX_BYTES

    name: str = field(metadata=lim(max_len=128, pattern=FILE_NAME))
    model_id: str = field(metadata=lim(max_len=71, pattern=MODEL_ID))
    num_layers: int = field(metadata=lim(min=0, max=10_000))
    start: int = field(metadata=lim(min=WHOLE, max=10_000))
    end: int = field(metadata=lim(min=WHOLE, max=10_000))
    files: tuple[FileEntry, ...] = field(metadata=lim(max_len=MAX_FILES))

    @property
    def whole(self) -> bool:
        return self.start == WHOLE

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)


@message
@dataclass(frozen=True)
class ChunkWant(Message):
    KIND: ClassVar[str] = "chunk_want"
    MAX_BYTES: ClassVar[int] = 512

    model_id: str = field(metadata=lim(max_len=71, pattern=MODEL_ID))
    start: int = field(metadata=lim(min=WHOLE, max=10_000))
    end: int = field(metadata=lim(min=WHOLE, max=10_000))
    file: str = field(metadata=lim(max_len=128, pattern=FILE_NAME))
    index: int = field(metadata=lim(min=0, max=MAX_CHUNKS))


@message
@dataclass(frozen=True)
class ChunkData(Message):
    KIND: ClassVar[str] = "chunk_data"
    MAX_BYTES: ClassVar[int] = CHUNK_BYTES + 256

    data: bytes = field(metadata=lim(max_len=CHUNK_BYTES))

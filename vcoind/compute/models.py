"""Model store: a directory of model directories (config.json + safetensors + tokenizer).

A model's id is ``sha256`` over the sorted ``(file name, sha256 of file)`` pairs of
its ``*.safetensors`` files, so two nodes holding the same weights compute the same
id and can prove it. Its short name is the directory name. Hashing a multi-GB
checkpoint takes seconds, so the id is cached in ``.vcoin-model-id`` next to the
weights, keyed by the files' sizes and modification times.

Imports nothing heavy (no torch): listing models is cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("vcoind.models")

ID_CACHE = ".vcoin-model-id"
# Where a model came from (written by ``vcoind model pull`` and by a fetch from peers):
# {"source": "hub", "repo", "revision", "commit", ...} or {"source": "peer", "peers": [...]}.
SOURCE_FILE = ".vcoin-source.json"
SHARD_MANIFEST = "shard.json"  # vcoind.compute.shards.MANIFEST (that module imports torch)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelError(Exception):
    """A model directory is missing, incomplete or unknown."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_id: str  # "sha256:<hex>"
    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    weight_bytes: int
    tied_embeddings: bool
    # A reasoning model: its chat template opens a <think> section (DeepSeek-R1 and its
    # distills); its answers come as reasoning, "</think>", then the reply.
    reasoning: bool = False
    # Where the weights came from: "hub:<repo>@<commit[:12]>", "peer:<peer id[:12]>…", "local".
    source: str = "local"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "path": str(self.path),
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "weight_bytes": self.weight_bytes,
            "tied_embeddings": self.tied_embeddings,
            "reasoning": self.reasoning,
            "source": self.source,
        }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def model_id_from(hashes: Iterable[tuple[str, str]]) -> str:
    """The model id of weight files given as ``(file name, sha256 hex)`` pairs."""
    h = hashlib.sha256()
    for name, digest in sorted(hashes):
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return "sha256:" + h.hexdigest()


def compute_model_id(path: Path) -> str:
    """The model id of the weights in ``path`` (cached by file sizes and mtimes)."""
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path}: no *.safetensors weight files")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = path / ID_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp and isinstance(cached.get("model_id"), str):
            return str(cached["model_id"])
    except (OSError, ValueError):
        pass
    model_id = model_id_from((f.name, file_sha256(f)) for f in files)
    try:
        cache.write_text(json.dumps({"files": stamp, "model_id": model_id}) + "\n")
    except OSError:  # a read-only model dir still works, just re-hashes next time
        log.debug("cannot cache the model id in %s", cache)
    return model_id


def inspect_model(path: Path) -> ModelInfo:
    """Check that ``path`` holds a usable model and describe it."""
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no config.json") from None
    except ValueError as exc:
        raise ModelError(f"{cfg_file}: not valid JSON ({exc})") from None
    if not any((path / t).exists() for t in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    files = weight_files(path)
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    return ModelInfo(
        name=path.name,
        model_id=compute_model_id(path),
        path=path,
        architecture=str(archs[0]),
        num_layers=int(cfg.get("num_hidden_layers", 0)),
        hidden_size=int(cfg.get("hidden_size", 0)),
        vocab_size=int(cfg.get("vocab_size", 0)),
        weight_bytes=sum(f.stat().st_size for f in files),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        reasoning="<think>" in _chat_template(path),
        source=describe_source(read_source(path)),
    )


def read_source(path: Path) -> dict[str, Any] | None:
    """The provenance record of the model in ``path`` (None without one, or unreadable)."""
    try:
        record = json.loads((path / SOURCE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s)", path / SOURCE_FILE, exc)
        return None
    return record if isinstance(record, dict) else None


def describe_source(record: dict[str, Any] | None) -> str:
    """A provenance record in a few words: ``hub:org/name@0123456789ab``, ``peer:12D3KooWabcd…``."""
    if record is None:
        return "local"
    kind = str(record.get("source", "unknown"))
    if kind == "hub":
        return f"hub:{record.get('repo', '?')}@{str(record.get('commit', '?'))[:12]}"
    peers = record.get("peers")
    if kind == "peer" and isinstance(peers, list) and peers:
        return f"peer:{str(peers[0])[:12]}…"
    return kind


def _chat_template(path: Path) -> str:
    """The model's chat template as text ('' without one)."""
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    template = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(errors="replace")
    if isinstance(template, list):  # named templates: [{"name", "template"}]
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else ""


class ModelStore:
    """The models under one directory, by short name and by id."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._models: dict[str, ModelInfo] = {}

    def scan(self) -> list[ModelInfo]:
        """(Re)read the directory; broken model dirs are logged and skipped."""
        found: dict[str, ModelInfo] = {}
        if self.root is not None and self.root.is_dir():
            for sub in sorted(self.root.iterdir()):
                if not sub.is_dir() or not NAME_RE.match(sub.name):
                    continue
                if (sub / SHARD_MANIFEST).is_file():
                    continue  # a layer shard (vcoind model split), not a whole model
                try:
                    found[sub.name] = inspect_model(sub)
                except ModelError as exc:
                    log.warning("skipping model directory: %s", exc)
        self._models = found
        return list(found.values())

    def all(self) -> list[ModelInfo]:
        return list(self._models.values())

    def resolve(self, ref: str) -> ModelInfo:
        """A model by short name or by id."""
        info = self._models.get(ref)
        if info is not None:
            return info
        for m in self._models.values():
            if m.model_id == ref:
                return m
        known = ", ".join(sorted(self._models)) or "none"
        raise ModelError(f"unknown model {ref!r} (this node serves: {known})")

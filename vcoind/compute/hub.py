"""``vcoind model pull``: a model from the Hugging Face Hub (or a mirror) into the model store.

``huggingface_hub`` resolves the revision to a commit and lists the files with their sizes
and hashes; the files themselves are downloaded here, because its own downloader neither
verifies checksums nor resumes across processes. Each file streams into
``MODELS_DIR/.pull-<org>--<name>@<commit>/<file>.part`` (a pull killed even with ``kill -9``
resumes with a ``Range`` request on the next run), is checked against the Hub's hash
(sha256 for LFS files, the git blob sha1 for small ones) and only then takes its name.
When every file is in, the directory gets ``.vcoin-source.json`` (repo, revision, commit,
file hashes), must pass ``inspect_model``, and is renamed to ``MODELS_DIR/<name>`` at once.

Only safetensors weights, configs, tokenizer files and licences are taken: a pickled
checkpoint (``*.bin``, ``*.pt``) can run code when loaded, so a repository without
safetensors is refused before anything is downloaded. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # lazy export

from vcoind import __version__
from vcoind.compute.models import (
    NAME_RE,
    SOURCE_FILE,
    ModelError,
    ModelInfo,
    inspect_model,
    read_source,
)
from vcoind.progress import BOARD, Step

log = logging.getLogger("vcoind.hub")

DEFAULT_ENDPOINT = "https://huggingface.co"
# What a model directory needs (weights, configs, tokenizer) and what travels with it.
WANTED = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
          "chat_template.jinja", "LICENSE*", "README.md")  # fmt: skip
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REPO_RE = re.compile(r"^(?:\w[\w.-]{0,95}/)?\w[\w.-]{0,95}$")  # as the Hub allows
RETRY_BACKOFF_S = 2.0
LOCK = ".lock"  # in the staging directory, flock()ed by the pull writing there
TIMEOUT = httpx.Timeout(60.0, connect=15.0)

T = TypeVar("T")


class PullError(Exception):
    """A pull failed; the message says why and what to do about it."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repository at the pinned commit, as the Hub lists it."""

    path: str
    size: int
    git_sha1: str  # the blob id (for an LFS file: that of its pointer)
    sha256: str | None  # LFS files: the content's sha256

    def record(self) -> dict[str, Any]:
        if self.sha256:
            return {"size": self.size, "sha256": self.sha256}
        return {"size": self.size, "git_sha1": self.git_sha1}

    def hasher(self) -> Any:
        """A hash object for the content, to compare with ``expected``."""
        if self.sha256:
            return hashlib.sha256()
        return hashlib.sha1(b"blob %d\0" % self.size)  # git's blob hash

    @property
    def expected(self) -> str:
        return self.sha256 or self.git_sha1

    @property
    def algo(self) -> str:
        return "sha256" if self.sha256 else "git sha1"


@dataclass(frozen=True)
class Pulled:
    info: ModelInfo
    repo: str
    revision: str
    commit: str
    already: bool  # the same repo and commit was there before

    def as_dict(self) -> dict[str, Any]:
        extra = {"repo": self.repo, "revision": self.revision, "commit": self.commit}
        return {**self.info.as_dict(), **extra, "already_pulled": self.already}


@dataclass(frozen=True)
class _Hub:
    """Where a pull reads from: the endpoint, the repository, the revision asked for."""

    endpoint: str
    repo: str
    revision: str
    token: str | None

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.revision}"

    def denied(self, status: int) -> str:
        if self.token:
            return (
                f"{self.endpoint} refused the token for {self.where} (HTTP {status}): check "
                "that HF_TOKEN is valid and may read this repository"
            )
        return (
            f"{self.where} needs authentication (HTTP {status}; it is private, gated or does "
            "not exist): set HF_TOKEN (or --token) to a token that may read it"
        )

    def gated(self) -> str:
        return (
            f"{self.where} is gated: accept its terms on its page at {self.endpoint}, then "
            "set HF_TOKEN to a token of that account"
        )

    def call(self, fn: Callable[[], T]) -> T:
        """One ``huggingface_hub`` call, its failures turned into one clear line."""
        try:
            return fn()
        except RevisionNotFoundError:
            msg = f"{self.where}: no such revision (branch, tag or commit) on {self.endpoint}"
        except GatedRepoError:
            msg = self.gated()
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                msg = self.denied(status)
            elif isinstance(exc, RepositoryNotFoundError) or status == 404:
                msg = f"{self.where}: no such repository on {self.endpoint}"
            else:
                msg = f"{self.endpoint} answered HTTP {status} for {self.where}"
        except OfflineModeIsEnabled:
            msg = "HF_HUB_OFFLINE is set: unset it to pull"
        except (httpx2.HTTPError, OSError, ValueError) as exc:
            msg = f"cannot reach {self.endpoint}: {type(exc).__name__}: {exc}"
        raise PullError(msg)


def parse_ref(ref: str) -> tuple[str, str]:
    """``org/name[@revision]`` -> (repo, revision); the revision defaults to ``main``."""
    repo, _, revision = ref.partition("@")
    if not REPO_RE.match(repo) or ".." in repo:
        raise PullError(f"{repo!r} is not a repository id (expected ORG/NAME[@REVISION])")
    if "@" in ref and not revision:
        raise PullError(f"{ref!r}: empty revision after '@'")
    return repo, revision or "main"


def select_files(where: str, files: list[RemoteFile]) -> list[RemoteFile]:
    """What to download: the files a model directory needs, never a pickle."""
    top = [f for f in files if "/" not in f.path]
    if not any(f.path.endswith(".safetensors") for f in top):
        pickled = sorted(f.path for f in top if f.path.endswith(PICKLED))
        only = f" (only {', '.join(pickled)})" if pickled else ""
        raise PullError(
            f"{where} has no safetensors weights{only}; vcoind never loads pickled weights"
        )
    wanted = [f for f in top if any(fnmatch(f.path, pat) for pat in WANTED)]
    if any(f.path.startswith("model") and f.path.endswith(".safetensors") for f in wanted):
        # Mistral-style repos also ship one consolidated checkpoint of the same weights.
        wanted = [f for f in wanted if not f.path.startswith("consolidated")]
    return wanted


def pull(
    ref: str,
    models_dir: Path,
    *,
    endpoint: str = DEFAULT_ENDPOINT,
    token: str | None = None,
    name: str | None = None,
    retries: int = 3,
) -> Pulled:
    """Download ``ref`` (``org/name[@revision]``) into ``models_dir/<name>``; see the module doc."""
    repo, revision = parse_ref(ref)
    name = name or repo.rsplit("/", 1)[-1]
    if not NAME_RE.match(name):
        raise PullError(f"{name!r} cannot name a model directory: pass --name")
    hub = _Hub(endpoint.rstrip("/"), repo, revision, token or None)
    api = HfApi(endpoint=hub.endpoint, token=token or False, library_name="vcoind",
                library_version=__version__)  # fmt: skip
    commit = hub.call(lambda: api.model_info(repo, revision=revision)).sha
    if not commit:
        raise PullError(f"{hub.endpoint} did not name the commit of {hub.where}")
    target = models_dir / name
    if target.exists():
        return _existing(target, repo, revision, commit)
    listing = hub.call(lambda: list(api.list_repo_tree(repo, revision=commit)))
    files = select_files(hub.where, [
        RemoteFile(f.path, int(f.size), f.blob_id, f.lfs.sha256 if f.lfs else None)
        for f in listing if isinstance(f, RepoFile)
    ])  # fmt: skip
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".pull-{repo.replace('/', '--')}@{commit}"
    with _locked(staging, hub.where):
        _download_all(hub, commit, files, staging, retries)
        record = {"source": "hub", "repo": repo, "revision": revision, "commit": commit,
                  "endpoint": hub.endpoint, "pulled_at": datetime.now(UTC).isoformat(),
                  "files": {f.path: f.record() for f in files}}  # fmt: skip
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            inspect_model(staging)
        except ModelError as exc:
            raise PullError(f"{hub.where} is not a usable model: {exc}") from None
        (staging / LOCK).unlink()
        try:
            staging.rename(target)
        except OSError as exc:
            raise PullError(f"cannot move the pulled files to {target}: {exc}") from None
    return Pulled(inspect_model(target), repo, revision, commit, already=False)


def _download_all(
    hub: _Hub, commit: str, files: list[RemoteFile], staging: Path, retries: int
) -> None:
    have = sum(_on_disk(staging, f) for f in files)
    total = sum(f.size for f in files)
    free = shutil.disk_usage(staging).free
    if total - have > free:
        raise PullError(
            f"{hub.where} needs {(total - have) / 2**30:.2f} GiB more; "
            f"{staging.parent} has {free / 2**30:.2f} GiB free"
        )
    if have:
        log.info("resuming %s (commit %s): %d of %d bytes already here", hub.where,
                 commit[:12], have, total)  # fmt: skip
    headers = build_hf_headers(token=hub.token or False, library_name="vcoind",
                               library_version=__version__)  # fmt: skip
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself
    with (
        httpx.Client(headers=headers, timeout=TIMEOUT, follow_redirects=True) as client,
        BOARD.step("pull", hub.where, total=total, unit="B") as step,
    ):
        step.set(have)
        for f in files:
            url = hf_hub_url(hub.repo, f.path, revision=commit, endpoint=hub.endpoint)
            _download(client, url, staging, f, step, retries, hub)


def _existing(target: Path, repo: str, revision: str, commit: str) -> Pulled:
    src = read_source(target) or {}
    if src.get("source") == "hub" and src.get("repo") == repo and src.get("commit") == commit:
        try:
            return Pulled(inspect_model(target), repo, revision, commit, already=True)
        except ModelError as exc:
            raise PullError(f"{target} holds {repo}@{commit[:12]} but is broken ({exc}): "
                            "remove it and pull again") from None  # fmt: skip
    held = (f"{src.get('repo')}@{str(src.get('commit'))[:12]}" if src.get("source") == "hub"
            else str(src.get("source", "a model that was not pulled")))  # fmt: skip
    raise PullError(f"{target} already exists (it holds {held}, not {repo}@{commit[:12]}): "
                    "pass --name to pull beside it, or remove it first")  # fmt: skip


@contextmanager
def _locked(staging: Path, where: str) -> Iterator[None]:
    """One pull at a time into a staging directory (the lock dies with its process)."""
    staging.mkdir(exist_ok=True)
    with (staging / LOCK).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another pull of {where} is running into {staging}") from None
        yield


def _on_disk(staging: Path, f: RemoteFile) -> int:
    """Bytes of ``f`` already here (verified whole, or a partial download)."""
    done, part = staging / f.path, staging / (f.path + ".part")
    if done.is_file() and done.stat().st_size == f.size:
        return f.size
    if part.is_file() and part.stat().st_size <= f.size:
        return part.stat().st_size
    part.unlink(missing_ok=True)  # longer than the file: not ours
    return 0


class _Interrupted(Exception):
    """The transfer stopped; a retry (or the next run) resumes from the bytes on disk."""


def _download(client: httpx.Client, url: str, staging: Path, f: RemoteFile, step: Step,
              retries: int, hub: _Hub) -> None:  # fmt: skip
    done, part = staging / f.path, staging / (f.path + ".part")
    if done.is_file() and done.stat().st_size == f.size:
        return  # verified when it took its name
    for attempt in range(retries + 1):
        try:
            _fetch(client, url, part, f, step, hub)
            break
        except _Interrupted as exc:
            got = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise PullError(
                    f"downloading {f.path} stopped at {got} of {f.size} bytes ({exc}): "
                    "run the same command again to resume"
                ) from None
            log.warning("downloading %s stopped at %d of %d bytes (%s); retrying", f.path, got,
                        f.size, exc)  # fmt: skip
            time.sleep(RETRY_BACKOFF_S * (attempt + 1))
    h = f.hasher()
    with part.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != f.expected:
        part.unlink()
        raise PullError(
            f"{f.path} is corrupt: the Hub lists {f.algo} {f.expected}, the download has "
            f"{h.hexdigest()}; deleted it, installed nothing"
        )
    os.replace(part, done)


def _fetch(client: httpx.Client, url: str, part: Path, f: RemoteFile, step: Step,
           hub: _Hub) -> None:  # fmt: skip
    """Stream the rest of ``f`` into ``part`` (``Range`` from the bytes already there)."""
    have = part.stat().st_size if part.exists() else 0
    if have == f.size:
        return
    try:
        with client.stream("GET", url, headers={"Range": f"bytes={have}-"} if have else {}) as r:
            if r.status_code == 416:  # the server's file is shorter than the part: start over
                step.set(step.done - have)
                part.unlink()
                raise _Interrupted("HTTP 416 (range not satisfiable)")
            _check(r, f, have, hub)
            if have and r.status_code == 200:  # the server ignored the range: start over
                step.set(step.done - have)
                have = 0
            with part.open("r+b" if have else "wb") as fh:
                fh.seek(have)
                fh.truncate()
                for chunk in r.iter_raw():
                    if have + len(chunk) > f.size:
                        raise PullError(f"{f.path}: the server sent more than the {f.size} bytes "
                                        "the Hub lists")  # fmt: skip
                    fh.write(chunk)
                    fh.flush()  # in the OS at once: a killed pull resumes from here
                    have += len(chunk)
                    step.advance(len(chunk))
                os.fsync(fh.fileno())
    except httpx.TransportError as exc:
        raise _Interrupted(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
    if have < f.size:
        raise _Interrupted("the connection closed early")


def _check(r: httpx.Response, f: RemoteFile, have: int, hub: _Hub) -> None:
    """Go on with a 200 or the 206 asked for; otherwise say what went wrong."""
    if r.status_code == 200 or (
        r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
    ):
        return
    if r.headers.get("X-Error-Code") == "GatedRepo":
        raise PullError(hub.gated())
    if r.status_code in (401, 403):
        raise PullError(hub.denied(r.status_code))
    if r.status_code == 404:
        code = r.headers.get("X-Error-Code") or "HTTP 404"
        raise PullError(f"{f.path}: the server has no such file ({code}) at {r.url}")
    if r.status_code in (408, 429) or r.status_code >= 500:
        raise _Interrupted(f"HTTP {r.status_code}")
    raise PullError(f"{f.path}: unexpected HTTP {r.status_code} "
                    f"{r.headers.get('Content-Range', '')} from {r.url}")  # fmt: skip

"""A stand-in for the Hugging Face Hub on 127.0.0.1, in the Hub's URL layout.

Serves what ``huggingface_hub`` and ``vcoind model pull`` ask for:
``GET /api/models/{repo}/revision/{rev}``, ``GET /api/models/{repo}/tree/{rev}`` and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (with ``Range``), with ``X-Repo-Commit``,
``ETag`` and ``X-Error-Code`` on 404s, plus knobs for the failures a pull must survive:
a required bearer token (for everything, or only for the files of a gated repo), a
connection cut after K bytes of a file (once), a stall after K bytes (until
``release``), and a flipped byte in a file. It records every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # as in a .gitattributes
API_RE = re.compile(r"^/api/models/(.+?)/(revision|tree)/([^/]+)(?:/.*)?$")
RESOLVE_RE = re.compile(r"^/(.+?)/resolve/([^/]+)/(.+)$")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StubRepo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class HubStub:
    token: str | None = None  # when set, every request needs "Authorization: Bearer <token>"
    gated: bool = False  # with ``token``: the API answers anyone, the files need the token
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> cut after K bytes, once
    stall_after: dict[str, int] = field(default_factory=dict)  # file -> stall after K bytes
    flip: set[str] = field(default_factory=set)  # files served with one byte flipped
    repos: dict[str, StubRepo] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def add_repo(self, repo: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` as ``repo`` at a new commit on ``main``; returns the commit."""
        h = hashlib.sha1(repo.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        commit = h.hexdigest()
        self.repos[repo] = StubRepo(dict(files), commit, {"main": commit})
        return commit

    def add_dir(self, repo: str, path: Path) -> str:
        files = {p.name: p.read_bytes() for p in sorted(path.iterdir())
                 if p.is_file() and not p.name.startswith(".")}  # fmt: skip
        return self.add_repo(repo, files)

    def gets(self, file: str) -> list[Seen]:
        """The GETs of one file's resolve URL."""
        return [s for s in self.seen if s.method == "GET" and s.path.endswith(f"/{file}")
                and "/resolve/" in s.path]  # fmt: skip

    def __enter__(self) -> HubStub:
        stub = self

        class Handler(_Handler):
            hub = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, body: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        hub.seen.append(Seen(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        auth = self.headers.get("Authorization")
        if hub.token is not None and auth != f"Bearer {hub.token}" and hub.gated:
            if "/resolve/" in path:
                return self._error(401, "GatedRepo", "Access to this model is restricted.")
        elif hub.token is not None and auth != f"Bearer {hub.token}":
            if auth:
                return self._error(401, None, "Invalid credentials in Authorization header")
            # what the Hub says about a private repo to an anonymous client
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        m = API_RE.match(path)
        if m and body:
            repo_id, what, rev = m.groups()
            found = self._find(repo_id, rev)
            if found is None:
                return None
            repo, commit = found
            if what == "revision":
                siblings = [{"rfilename": n} for n in sorted(repo.files)]
                return self._json({"id": repo_id, "sha": commit, "siblings": siblings})
            return self._json([_tree_entry(n, d) for n, d in sorted(repo.files.items())])
        m = RESOLVE_RE.match(path)
        if m:
            repo_id, rev, file = m.groups()
            found = self._find(repo_id, rev)
            if found is None:
                return None
            repo, commit = found
            if file not in repo.files:
                return self._error(404, "EntryNotFound", f"{file} does not exist at {rev}")
            return self._serve(file, repo.files[file], commit, body)
        return self._error(404, None, "Not Found")

    def _find(self, repo_id: str, rev: str) -> tuple[StubRepo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.branches.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return repo, commit

    def _serve(self, file: str, data: bytes, commit: str, body: bool) -> None:
        hub = self.hub
        etag = hashlib.sha256(data).hexdigest() if file.endswith(LFS_SUFFIXES) else git_sha1(data)
        if file in hub.flip:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            if start >= len(data):
                return self._error(416, None, "Range Not Satisfiable")
        self.send_response(206 if rng else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return None
        stop = len(data)
        cut = hub.cut_after.pop(file, None)
        stall = hub.stall_after.get(file)
        for k in (cut, stall):
            if k is not None and start < k:
                stop = k
        self.wfile.write(data[start:stop])
        self.wfile.flush()
        if stop == len(data):
            return None
        if stop == stall:
            hub.release.wait(60)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # the body ends short: the client sees a cut
        return None


def _tree_entry(name: str, data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data)}
    if name.endswith(LFS_SUFFIXES):
        sha = hashlib.sha256(data).hexdigest()
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
        )
        entry["oid"] = git_sha1(pointer.encode())
        entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
    else:
        entry["oid"] = git_sha1(data)
    return entry

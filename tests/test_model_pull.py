"""``vcoind model pull`` against a local stand-in for the Hugging Face Hub (tests/hubstub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.hubstub import HubStub
from vcoind.cli import daemon_main
from vcoind.compute import hub as hubmod
from vcoind.compute.hub import PullError, pull
from vcoind.compute.models import SOURCE_FILE, describe_source, inspect_model
from vcoind.progress import BOARD

REPO = "org/tiny-qwen2"
WEIGHTS = "model.safetensors"
TOKEN = "hf_test_secret_token"


@pytest.fixture
def hub(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    for var in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(BOARD, "bars", False)
    with HubStub() as stub:
        stub.add_dir(REPO, models_dir / "tiny-qwen2")
        stub.add_repo("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04K."})
        yield stub


@pytest.fixture
def source_id(models_dir: Path) -> str:
    return inspect_model(models_dir / "tiny-qwen2").model_id


def commit(hub: HubStub) -> str:
    return hub.repos[REPO].commit


def cli(*args: str) -> int:
    return daemon_main(["model", *args])


def test_pull_by_branch_and_by_commit(
    hub: HubStub, source_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    store = tmp_path / "models"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert cli("pull", REPO, "--models-dir", str(store)) == 0
    out = capsys.readouterr().out
    assert f"model id  {source_id}" in out and f"commit {commit(hub)}" in out
    record = json.loads((store / "tiny-qwen2" / SOURCE_FILE).read_text())
    assert record["repo"] == REPO and record["revision"] == "main"
    assert record["commit"] == commit(hub) and record["endpoint"] == hub.url
    weights = (store / "tiny-qwen2" / WEIGHTS).read_bytes()
    assert record["files"][WEIGHTS] == {"size": len(weights),
                                        "sha256": hashlib.sha256(weights).hexdigest()}  # fmt: skip
    assert "git_sha1" in record["files"]["config.json"]
    # only what a model directory needs, nothing left behind
    assert not (store / "tiny-qwen2" / "vcoin-test-model.json").exists()
    assert [p.name for p in store.iterdir()] == ["tiny-qwen2"]

    pinned = f"{REPO}@{commit(hub)}"
    assert cli("pull", pinned, "--name", "pinned", "--models-dir", str(store), "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["model_id"] == source_id and got["commit"] == commit(hub)
    assert cli("pull", REPO, "--models-dir", str(store)) == 0
    assert "already pulled" in capsys.readouterr().out

    assert cli("list", "--models-dir", str(store), "--json") == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    want = f"hub:{REPO}@{commit(hub)[:12]}"
    assert {n: (m["model_id"], m["source"]) for n, m in listed.items()} == {
        "tiny-qwen2": (source_id, want), "pinned": (source_id, want)}  # fmt: skip
    assert cli("list", "--models-dir", str(store)) == 0
    assert "SOURCE" in (table := capsys.readouterr().out) and want in table
    # another model under the same name is not overwritten
    assert cli("pull", REPO, "--name", "pinned", "--models-dir", str(tmp_path / "m2")) == 0
    capsys.readouterr()
    (tmp_path / "m2" / "pinned" / SOURCE_FILE).unlink()
    assert cli("pull", REPO, "--name", "pinned", "--models-dir", str(tmp_path / "m2")) == 1
    assert "already exists" in capsys.readouterr().err


def test_source_of_local_and_peer_models() -> None:
    assert describe_source(None) == "local"
    peers = {"source": "peer", "peers": ["12D3KooWAbCdEfGhIjKl", "12D3KooWz"]}
    assert describe_source(peers) == "peer:12D3KooWAbCd…"
    assert describe_source({"source": "hub", "repo": "a/b", "commit": "0123456789abcdef"}) == (
        "hub:a/b@0123456789ab"
    )


def test_token_is_sent_and_required(
    hub: HubStub, source_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    hub.token = TOKEN
    store = ["--models-dir", str(tmp_path), "--endpoint", hub.url]
    assert cli("pull", REPO, *store) == 1
    err = capsys.readouterr().err
    assert "needs authentication (HTTP 401" in err and "HF_TOKEN" in err
    assert cli("pull", REPO, *store, "--token", "hf_wrong") == 1
    assert "refused the token" in capsys.readouterr().err
    hub.seen.clear()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli("pull", REPO, *store) == 0
    assert source_id in (out := capsys.readouterr().out)
    assert len(hub.gets(WEIGHTS)) == 1
    assert {s.headers.get("authorization") for s in hub.seen} == {f"Bearer {TOKEN}"}
    assert TOKEN not in out + caplog.text


def test_gated_repo_needs_a_token_for_its_files(
    hub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.token, hub.gated = TOKEN, True
    assert cli("pull", REPO, "--endpoint", hub.url, "--models-dir", str(tmp_path)) == 1
    assert f"{REPO}@main is gated: accept its terms" in capsys.readouterr().err
    assert not (tmp_path / "tiny-qwen2").exists()
    assert cli("pull", REPO, "--endpoint", hub.url, "--models-dir", str(tmp_path),
               "--token", TOKEN) == 0  # fmt: skip


def test_interrupted_download_resumes(hub: HubStub, source_id: str, tmp_path: Path) -> None:
    cut = 100_000
    hub.cut_after[WEIGHTS] = cut
    with pytest.raises(PullError, match=f"{WEIGHTS} stopped at {cut} of .* run the same command"):
        pull(REPO, tmp_path, endpoint=hub.url, retries=0)
    assert not (tmp_path / "tiny-qwen2").exists()
    (part,) = tmp_path.glob(f".pull-*/{WEIGHTS}.part")
    assert part.stat().st_size == cut
    got = pull(REPO, tmp_path, endpoint=hub.url, retries=0)
    assert got.info.model_id == source_id
    first, second = hub.gets(WEIGHTS)
    assert "range" not in first.headers and second.headers["range"] == f"bytes={cut}-"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen2"]


def test_cut_connection_is_retried_within_one_run(
    hub: HubStub, source_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hubmod, "RETRY_BACKOFF_S", 0.0)
    hub.cut_after[WEIGHTS] = 4096
    assert pull(REPO, tmp_path, endpoint=hub.url, retries=1).info.model_id == source_id
    assert [s.headers.get("range") for s in hub.gets(WEIGHTS)] == [None, "bytes=4096-"]


def test_killed_pull_resumes(hub: HubStub, source_id: str, tmp_path: Path) -> None:
    stall = 300_000
    hub.stall_after[WEIGHTS] = stall
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "vcoind", "model", "pull", REPO, "--endpoint", hub.url,
           "--models-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        part = tmp_path / f".pull-org--tiny-qwen2@{commit(hub)}" / f"{WEIGHTS}.part"
        wait_until(lambda: part.exists() and part.stat().st_size == stall, 30, "a stalled pull")
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.communicate()
    hub.stall_after.clear()
    hub.release.set()
    got = pull(REPO, tmp_path, endpoint=hub.url, retries=0)
    assert got.info.model_id == source_id
    assert hub.gets(WEIGHTS)[-1].headers["range"] == f"bytes={stall}-"


def test_corrupt_file_is_refused(
    hub: HubStub, models_dir: Path, source_id: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    hub.flip.add(WEIGHTS)
    assert cli("pull", REPO, "--endpoint", hub.url, "--models-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    good = hashlib.sha256((models_dir / "tiny-qwen2" / WEIGHTS).read_bytes()).hexdigest()
    assert f"{WEIGHTS} is corrupt: the Hub lists sha256 {good}, the download has " in err
    assert "Traceback" not in err
    assert not (tmp_path / "tiny-qwen2").exists() and not list(tmp_path.glob("**/*.part"))
    assert cli("list", "--models-dir", str(tmp_path), "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    # the files that were verified stay: a good server later gives only the weights again
    hub.flip.clear()
    hub.seen.clear()
    assert pull(REPO, tmp_path, endpoint=hub.url).info.model_id == source_id
    assert [s.path.rsplit("/", 1)[-1] for s in hub.seen if "/resolve/" in s.path] == [
        WEIGHTS, "tokenizer.json", "tokenizer_config.json"]  # fmt: skip


def test_pickle_only_repo_is_refused_before_any_download(
    hub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("pull", "org/pickled", "--endpoint", hub.url, "--models-dir", str(tmp_path)) == 1
    assert capsys.readouterr().err.strip() == (
        "vcoind: error: org/pickled@main has no safetensors weights (only pytorch_model.bin); "
        "vcoind never loads pickled weights"
    )
    assert not [s for s in hub.seen if "/resolve/" in s.path]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("org/nope", "org/nope@main: no such repository on "),
        (f"{REPO}@dev", f"{REPO}@dev: no such revision (branch, tag or commit) on "),
        ("org/a b", "is not a repository id"),
        (f"{REPO}@", "empty revision"),
        ("org/_x", "cannot name a model directory: pass --name"),
    ],
)
def test_unknown_repo_or_revision(
    hub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str], ref: str, message: str
) -> None:
    if ref == "org/_x":
        hub.add_repo(ref, {})
    assert cli("pull", ref, "--endpoint", hub.url, "--models-dir", str(tmp_path)) == 1
    assert message in capsys.readouterr().err


def test_unreachable_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli("pull", REPO, "--endpoint", url, "--models-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {url}: ConnectError" in err and "Traceback" not in err

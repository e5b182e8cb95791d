"""Start daemons by forking a process that has already imported them.

A daemon spends 3 to 7 s of CPU importing its stack (libp2p, web3, torch, transformers)
before it does anything; the test suite starts about 130 of them on two cores. The zygote
imports that stack once and forks a daemon per request: each child runs the real
``vcoind`` entry point (``daemon_main``) with its own arguments, environment, session and
log file, exactly as ``python -m vcoind`` would, minus the imports. Only launching changes:
the daemon's code, its sockets and its SQLite file are its own.

    z = Zygote()  # started (and the stack imported) on its first spawn
    proc = z.spawn(["--datadir", ...], env=dict(os.environ), log_path=path)
    proc.send_signal(signal.SIGKILL); proc.wait()

``proc`` answers the part of ``subprocess.Popen`` the devnet and the tests use (``pid``,
``poll``, ``wait``, ``send_signal``, ``kill``, ``terminate``, ``returncode``). The children
are the zygote's, not ours, so their exit status comes from the zygote, which reaps them.
Forking after ``import torch`` is what torch's own DataLoader workers do; the zygote runs
no torch operation (no thread pool exists yet) and no trio loop before it forks.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

# What a daemon imports before it is up (the model-serving path included).
PRELOAD = (
    "vcoind.cli.daemon",
    "vcoind.node",
    "torch",
    "transformers",
    "safetensors.torch",
    "vcoind.compute.executor",
    "vcoind.compute.engine",
    "vcoind.train.service",
)


class ZygoteError(Exception):
    pass


class ForkedProc:
    """A daemon forked by the zygote: the ``subprocess.Popen`` calls the devnet uses."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.status(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"vcoind pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """The forking process, driven over its stdin/stdout by one JSON line per call."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        """Nothing starts until the first call: a run that starts no daemon pays nothing."""
        self._preload = tuple(preload)
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()  # tests start daemons from several threads

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "devnet.zygote", *self._preload],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                )  # fmt: skip
            stdin, stdout = self._proc.stdin, self._proc.stdout
            assert stdin is not None and stdout is not None
            try:
                stdin.write(json.dumps(msg) + "\n")
                stdin.flush()
                line = stdout.readline()
            except (BrokenPipeError, ValueError) as exc:
                raise ZygoteError(f"the zygote is gone: {exc}") from exc
            if not line:
                raise ZygoteError(f"the zygote exited with code {self._proc.poll()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise ZygoteError(reply["error"])
        return reply

    def spawn(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> ForkedProc:
        """Fork a daemon running ``vcoind *argv`` with ``env``; its output goes to
        ``log_path`` (appended)."""
        reply = self._call({"op": "spawn", "argv": list(argv), "env": env,
                            "log": str(log_path), "cwd": os.getcwd()})  # fmt: skip
        return ForkedProc(self, int(reply["pid"]))

    def status(self, pid: int) -> int | None:
        """The exit code of a forked daemon (negative: the signal), None while it runs."""
        rc = self._call({"op": "status", "pid": pid})["rc"]
        return None if rc is None else int(rc)

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # its loop ends at end of input
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --- the zygote process ------------------------------------------------------------


def _child(msg: dict[str, Any], out: IO[str]) -> None:
    """In the fork: become the daemon (never returns)."""
    rc = 1
    try:
        os.setsid()  # like Popen(start_new_session=True): signals to the group reach it only
        fd = os.open(msg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        out.close()
        # Signal dispositions stay as Python set them at start-up (SIGPIPE ignored,
        # SIGINT raising KeyboardInterrupt), as in a fresh interpreter.
        os.chdir(msg["cwd"])
        os.environ.clear()
        os.environ.update(msg["env"])
        sys.argv = ["vcoind", *msg["argv"]]
        from vcoind.cli.daemon import daemon_main

        rc = daemon_main(msg["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def main(preload: Sequence[str]) -> None:
    # Replies go to the pipe on fd 1; anything an import prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in preload:
        importlib.import_module(name)
    done: dict[int, int] = {}  # reaped children's exit codes
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "ping":
                reply: dict[str, Any] = {"ok": True}
            elif msg["op"] == "spawn":
                out.flush()
                pid = os.fork()
                if pid == 0:
                    _child(msg, out)
                reply = {"pid": pid}
            elif msg["op"] == "status":
                pid = int(msg["pid"])
                if pid not in done:
                    got, status = os.waitpid(pid, os.WNOHANG)
                    if got == pid:
                        done[pid] = os.waitstatus_to_exitcode(status)
                reply = {"rc": done.get(pid)}
            else:
                reply = {"error": f"unknown op {msg['op']!r}"}
        except OSError as exc:
            reply = {"error": str(exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])

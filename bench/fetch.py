"""A peer fetch of a 300+ MB model on loopback, from 1 and from 2 peers, against a file copy.

    .venv/bin/python bench/fetch.py [--mb 370] [--streams 4] [--keep DIR]

Makes a random-weight Qwen2 model (fp32, ~370 MB by default: hidden 1024, 8 layers),
copies its files once with ``shutil.copyfile`` (the floor: what the disk and page cache
allow), then starts real daemons: A serves the model; B (empty models dir) fetches it
over ``/vcoin/model/1.0.0`` from A alone; then A2 serves the same files too and C
fetches from A and A2 at once. Each fetch is timed from ``vcoin_fetchModel`` to its job's
end as the daemon reports it (manifest, chunks checked against their hashes, files
checked against the model id, the directory installed). The first manifest of a model
hashes it on the serving node (cached after); that is timed apart, as ``hash``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devnet.__main__ import DevNode, start_node, stop_all

NAME = "bench-qwen2"
OPTS: dict[str, Any] = {"heartbeat": 0.5, "peer_timeout": 5.0, "network": "bench"}


def make_model(root: Path, mb: int) -> Path:
    from vcoind.compute.testmodel import TinyModelSpec, make_test_model

    # per layer ~ 4*h^2*(3/4) + 3*h*i floats; 8 layers of h=1024, i=2816 is ~360 MB in fp32
    layers = max(1, round(mb / 45))
    spec = TinyModelSpec(hidden_size=1024, intermediate_size=2816, num_layers=layers,
                         num_heads=8, num_kv_heads=2, seed=7)  # fmt: skip
    return make_test_model(root / NAME, spec)


def weight_bytes(d: Path) -> int:
    from vcoind.compute.manifest import travelling_bytes

    return travelling_bytes(d)


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception:  # a daemon still starting
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def sees(node: DevNode, peers: int) -> bool:
    return sum(any(m["name"] == NAME for m in p["models"])
               for p in node.rpc.call("vcoin_peers")) >= peers  # fmt: skip


def timed_fetch(node: DevNode) -> dict[str, Any]:
    t0 = time.perf_counter()
    node.rpc.call("vcoin_fetchModel", {"model": NAME})

    def ended() -> dict[str, Any] | None:
        jobs = node.rpc.call("vcoin_models")["fetches"]
        job = next((j for j in jobs if j["model"] == NAME), None)
        return job if job and job["status"] != "running" else None

    job = wait_for(ended, 900, "the fetch")
    job["wall_s"] = time.perf_counter() - t0
    if job["status"] != "done":
        raise SystemExit(f"fetch failed: {job['error']}")
    return dict(job)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=370, help="model size to make (default 370)")
    p.add_argument("--streams", type=int, default=4, help="chunk requests in flight a peer")
    p.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    ns = p.parse_args()
    base = ns.keep or Path(tempfile.mkdtemp(prefix="vcoin-bench-fetch-"))
    nodes: list[DevNode] = []
    try:
        src_root = base / "src"
        model = make_model(src_root, ns.mb)
        size = weight_bytes(model)
        print(f"model {NAME}: {size / 1e6:.0f} MB to move", flush=True)

        t0 = time.perf_counter()
        dst = base / "copy"
        dst.mkdir(exist_ok=True)
        for f in model.iterdir():
            if f.is_file():
                shutil.copyfile(f, dst / f.name)
        copy_s = time.perf_counter() - t0

        extra = ["--no-chain"]
        for i in (1, 2, 3, 4):
            cfg = base / f"node{i}"
            cfg.mkdir(parents=True, exist_ok=True)
            (cfg / "config.toml").write_text(
                f"[compute]\nfetch_streams_per_peer = {ns.streams}\n")  # fmt: skip
        a = start_node(1, base, bootstrap=None, **OPTS,
                       extra=[*extra, "--models-dir", str(src_root)])  # fmt: skip
        nodes.append(a)
        empties = []
        for i in (2, 3):
            e = base / f"empty{i}"
            e.mkdir(exist_ok=True)
            empties.append(e)
        b = start_node(2, base, bootstrap=a.p2p_addr, **OPTS,
                       extra=[*extra, "--models-dir", str(empties[0])])  # fmt: skip
        nodes.append(b)
        wait_for(lambda: sees(b, 1), 60, "B to see A's model")
        # the serving node hashes the model for its first manifest (then caches it)
        t0 = time.perf_counter()
        from vcoind.compute.manifest import file_entries

        file_entries(model)  # (the same cache file A reads)
        hash_s = time.perf_counter() - t0
        one = timed_fetch(b)

        stop_all([b])  # (else C would fetch from B too, which now holds the model)
        a2 = start_node(4, base, bootstrap=a.p2p_addr, **OPTS,
                        extra=[*extra, "--models-dir", str(src_root)])  # fmt: skip
        c = start_node(3, base, bootstrap=a.p2p_addr, **OPTS,
                       extra=[*extra, "--models-dir", str(empties[1])])  # fmt: skip
        nodes += [a2, c]
        wait_for(lambda: sees(c, 2), 60, "C to see the model on A and A2")
        two = timed_fetch(c)
    finally:
        stop_all(nodes)
        if ns.keep is None:
            shutil.rmtree(base, ignore_errors=True)

    def mbs(n: int, s: float) -> str:
        return f"{n / s / 1e6:8.1f} MB/s  ({s:6.2f} s)"

    print(f"\n{'path':<28} {'rate':>26}")
    print(f"{'file copy (shutil)':<28} {mbs(size, copy_s)}")
    print(f"{'hash (sha256 + chunks)':<28} {mbs(size, hash_s)}")
    print(f"{'peer fetch, 1 peer':<28} {mbs(one['bytes'], one['seconds'])}")
    print(
        f"{'peer fetch, 2 peers':<28} {mbs(two['bytes'], two['seconds'])}  split "
        + " / ".join(f"{v / 1e6:.0f} MB" for v in two["peers"].values())
    )
    print(
        f"(RPC to done, 1 peer {one['wall_s']:.2f} s, 2 peers {two['wall_s']:.2f} s; "
        f"{ns.streams} chunk requests in flight a peer, 1 MiB chunks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

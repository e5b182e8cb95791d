"""``vcoind model ...``: the model store (pull, make-test, list, info, split), and asking
the running daemon to fetch a model from peers (fetch) or to find its servers (find).

``pull`` downloads a model from the Hugging Face Hub (or a mirror: ``--endpoint`` /
``HF_ENDPOINT``) through ``vcoind.compute.hub``; ``list`` says where each model came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vcoind.cli.format import EXIT_USAGE, die, fmt_table
from vcoind.config import ConfigError, load


def model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcoind model",
        description="Manage the model store: a directory of model directories, each with "
        "config.json, *.safetensors weights and a tokenizer. A model's id is a hash of its "
        "weight files, so nodes can prove they serve the same weights. `pull` downloads a "
        "model from the Hugging Face Hub (safetensors only, checksummed, resumable); `list` "
        "shows each model's source (hub:REPO@COMMIT, peer:PEER, or local).",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    _pull_parser(sub)
    _fetch_parser(sub)
    _find_parser(sub)
    mk = sub.add_parser(
        "make-test",
        help="write a small random-weight Qwen2 model (the DeepSeek-R1-Distill-Qwen-1.5B "
        "architecture at toy size) with a locally trained tokenizer",
    )
    mk.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory")
    mk.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    for name, help_text in (
        ("list", "list the models in the store"),
        ("info", "one model"),
        ("split", "split a model by layer range into shard directories (each holds only its "
         "tensors, plus shard.json with the layer range and tensor hashes)"),
    ):  # fmt: skip
        sp = sub.add_parser(name, help=help_text)
        if name in ("info", "split"):
            sp.add_argument("model", help="short name or model id")
        if name == "split":
            how = sp.add_mutually_exclusive_group(required=True)
            how.add_argument("--shards", type=int, help="N shards of (nearly) equal layers")
            how.add_argument("--ranges", help="inclusive layer ranges, e.g. 0-13,14-27")
            sp.add_argument(
                "--out", type=Path, metavar="DIR",
                help="where the shard directories go (default: the models dir)",
            )  # fmt: skip
        sp.add_argument("--datadir", type=Path, metavar="DIR", help="data directory")
        sp.add_argument("--models-dir", metavar="DIR", help="default DATADIR/models")
        sp.add_argument("--json", action="store_true", help="print JSON")
    return p


PULL_EPILOG = """\
Only safetensors weights, configs, tokenizer files, LICENSE* and README.md are
downloaded; a repository with only pickled weights (pytorch_model.bin, *.pt) is
refused before anything is downloaded. Every file is checked against the hash the
Hub lists for it (sha256 for LFS files) before it is kept. An interrupted pull
(network error, Ctrl-C, even kill -9) resumes where it stopped when you run the same
command again. The model directory appears only when every file is in; its
.vcoin-source.json records the repository, the revision asked for and the commit.

examples:
  vcoind model pull deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
  vcoind model pull deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B@<commit> --name r1-1.5b
  HF_TOKEN=hf_... vcoind model pull my-org/private-model
  HF_ENDPOINT=https://hf-mirror.example vcoind model pull Qwen/Qwen2.5-0.5B-Instruct
"""


def _pull_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub (or a mirror) into the store",
        description="Download REPO at REVISION (a branch, tag or commit; default main) into\n"
        "MODELS_DIR/NAME, pinned to the commit that the revision resolves to.",
        epilog=PULL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("repo", metavar="REPO[@REVISION]", help="e.g. deepseek-ai/DeepSeek-R1-Distill-"
                    "Qwen-1.5B or ...@<commit sha>")  # fmt: skip
    sp.add_argument("--name", help="model directory name (default: the repository's name)")
    sp.add_argument(
        "--endpoint", metavar="URL",
        help="the Hub or a mirror of it (default: env HF_ENDPOINT, else https://huggingface.co)",
    )  # fmt: skip
    sp.add_argument(
        "--token",
        help="access token for private or gated repositories (default: env HF_TOKEN; "
        "prefer the variable: a flag shows in the process list)",
    )
    sp.add_argument("--datadir", type=Path, metavar="DIR", help="data directory")
    sp.add_argument("--models-dir", metavar="DIR", help="default DATADIR/models")
    sp.add_argument("--json", action="store_true", help="print the model as JSON")


def _pull(ns: argparse.Namespace, models_dir: Path) -> int:
    from vcoind.compute.hub import DEFAULT_ENDPOINT, PullError, pull
    from vcoind.progress import BOARD

    endpoint = ns.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    token = ns.token or os.environ.get("HF_TOKEN") or None

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")  # fmt: skip
    for noisy in ("httpx", "httpx2", "huggingface_hub"):  # a line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    BOARD.bars = True
    try:
        got = pull(ns.repo, models_dir, endpoint=endpoint, token=token, name=ns.name)
    except PullError as exc:
        return die(str(exc))
    except KeyboardInterrupt:
        return die("interrupted: run the same command again to resume", 130)
    if ns.json:
        print(json.dumps(got.as_dict(), indent=2))
        return 0
    what = "already pulled" if got.already else "pulled"
    print(f"{what} {got.repo}@{got.revision} (commit {got.commit}) into {got.info.path}\n"
          f"model id  {got.info.model_id}\nweights   {got.info.weight_bytes} bytes")  # fmt: skip
    return 0


def _fetch_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "fetch",
        help="have the running daemon fetch a model (or one layer span) from its peers",
        description="Ask the daemon on DATADIR to fetch MODEL from the peers that advertise "
        "it, over /vcoin/model/1.0.0: in 1 MiB chunks from several peers at once, each "
        "chunk and file checked against the hashes that make up the model id, resumable "
        "after a restart. A peer that sends bad bytes is dropped and penalised. The model "
        "(or span) is served once it is in. Shows progress until it ends.",
    )
    sp.add_argument("model", help="short name or model id, as peers advertise it")
    sp.add_argument("--layers", metavar="START-END",
                    help="only this span (inclusive), into DATADIR/shards")  # fmt: skip
    sp.add_argument("--datadir", type=Path, metavar="DIR", help="data directory")
    sp.add_argument("--no-wait", action="store_true", help="start it and return")
    sp.add_argument("--json", action="store_true", help="print the outcome as JSON")


def _fetch(ns: argparse.Namespace, datadir: Path) -> int:
    import time

    from vcoind.cli.client import ClientError, RPCClient
    from vcoind.datadir import DataDir

    dd = DataDir(datadir)
    run = dd.read_run_file()
    if not run or "rpc_url" not in run:
        return die(f"no daemon running on {dd.path} (no run.json): start `vcoind --datadir "
                   f"{dd.path}` first; it fetches from its peers")  # fmt: skip
    client = RPCClient(str(run["rpc_url"]), dd.read_cookie())
    try:
        job = client.call("vcoin_fetchModel", {"model": ns.model, "layers": ns.layers})
        shown = -1.0
        while not ns.no_wait and job["status"] == "running":
            time.sleep(0.5)
            steps = [p for p in client.call("vcoin_nodeInfo").get("progress", [])
                     if p["kind"] == "fetch" and p["outcome"] == "running"]  # fmt: skip
            if steps and not ns.json and steps[0]["fraction"] != shown:
                st = steps[0]
                shown = st["fraction"]
                print(f"\r{st['label']}: {100 * shown:5.1f}%  {st['done'] / 1e6:,.1f} of "
                      f"{st['total'] / 1e6:,.1f} MB  {st['rate'] / 1e6:.1f} MB/s", end="",
                      file=sys.stderr, flush=True)  # fmt: skip
            jobs = client.call("vcoin_models")["fetches"]
            key = (ns.model, ns.layers)
            job = next((j for j in jobs if (j["model"], j["layers"]) == key), job)
    except ClientError as exc:
        return die(str(exc))
    except KeyboardInterrupt:
        return die("stopped watching: the daemon goes on fetching", 130)
    if shown >= 0:
        print(file=sys.stderr)
    if ns.json:
        print(json.dumps(job, indent=2))
    elif job["status"] == "done":
        peers = ", ".join(f"{p[:16]}… {b / 1e6:.1f} MB" for p, b in job["peers"].items())
        print(f"fetched {ns.model} into {job['path']}: {job['bytes'] / 1e6:.1f} MB in "
              f"{job['seconds']:.1f} s from {peers}")  # fmt: skip
        for p, why in job["dropped"].items():
            print(f"  left out {p}: {why}")
    elif job["status"] == "running":
        print(f"fetching {ns.model}: see `vcoind model list` and `vcoin node-info`")
    return 0 if job["status"] in ("done", "running") else die(f"fetch failed: {job['error']}")


def _find_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "find",
        help="ask the running daemon's DHT which nodes serve a model (or a layer span)",
        description="Look MODEL up in the Kademlia DHT through the daemon on DATADIR: the "
        "nodes that provide it, each verified over a direct stream (its own heartbeat must "
        "list the model) before it is counted; verified ones join the daemon's peer table. "
        "Give the model id (sha256:...) unless the daemon already knows the name.",
    )
    sp.add_argument("model", help="model id, or a short name the daemon knows the id of")
    sp.add_argument("--layers", metavar="START-END", help="providers of this span (inclusive)")
    sp.add_argument("--datadir", type=Path, metavar="DIR", help="data directory")
    sp.add_argument("--json", action="store_true", help="print the answer as JSON")


def _find(ns: argparse.Namespace, datadir: Path) -> int:
    from vcoind.cli.client import ClientError, RPCClient
    from vcoind.datadir import DataDir

    layers = None
    if ns.layers:
        try:
            a, b = (int(x) for x in ns.layers.split("-"))
        except ValueError:
            return die(f"--layers {ns.layers!r}: expected START-END", EXIT_USAGE)
        layers = [a, b]
    dd = DataDir(datadir)
    run = dd.read_run_file()
    if not run or "rpc_url" not in run:
        return die(f"no daemon running on {dd.path} (no run.json)")
    try:
        found = RPCClient(str(run["rpc_url"]), dd.read_cookie()).call(
            "vcoin_findProviders", {"model": ns.model, "layers": layers}
        )
    except ClientError as exc:
        return die(str(exc))
    if ns.json:
        print(json.dumps(found, indent=2))
        return 0
    span = f" layers {layers[0]}-{layers[1]}" if layers else ""
    print(f"{found['model_id']}{span}: {len(found['workers'])} verified")
    for w in found["workers"]:
        print(f"  {w['peer_id']}  {' '.join(w['addrs'][:2])}")
    for w in found["unverified"]:
        print(f"  not counted {w['peer_id']}: {w['reason']}")
    return 0


def model_main(args: list[str]) -> int:
    from vcoind.compute.models import ModelError, ModelStore, inspect_model

    ns = model_parser().parse_args(args)
    if ns.action == "make-test":
        from vcoind.compute.testmodel import TinyModelSpec, make_test_model

        out = make_test_model(ns.out, TinyModelSpec(seed=ns.seed))
        info = inspect_model(out)
        print(f"wrote {out}\nmodel id  {info.model_id}\nweights   {info.weight_bytes} bytes")
        return 0
    try:
        cfg = load(flags={"datadir": ns.datadir,
                      "compute.models_dir": getattr(ns, "models_dir", None)})  # fmt: skip
    except ConfigError as exc:
        return die(str(exc), EXIT_USAGE)
    if ns.action == "pull":
        return _pull(ns, cfg.models_dir)
    if ns.action == "fetch":
        return _fetch(ns, cfg.datadir)
    if ns.action == "find":
        return _find(ns, cfg.datadir)
    store = ModelStore(cfg.models_dir)
    models = store.scan()
    if ns.action == "list":
        if ns.json:
            print(json.dumps([m.as_dict() for m in models], indent=2))
        elif not models:
            print(f"no models in {cfg.models_dir}")
        else:
            rows = [
                [
                    m.name,
                    m.model_id[:19] + "…",
                    m.architecture,
                    str(m.num_layers),
                    f"{m.weight_bytes / (1 << 20):.1f}",
                    m.source,
                ]
                for m in models
            ]
            head = ["NAME", "MODEL ID", "ARCHITECTURE", "LAYERS", "MiB", "SOURCE"]
            print(fmt_table(rows, head))
        return 0
    try:
        info = store.resolve(ns.model)
    except ModelError as exc:
        return die(str(exc))
    if ns.action == "split":
        return _split(info, ns.shards, ns.ranges, ns.out or cfg.models_dir, ns.json)
    d = info.as_dict()
    print(json.dumps(d, indent=2) if ns.json else "\n".join(f"{k:<16}{v}" for k, v in d.items()))
    return 0


def _split(info: Any, shards: int | None, ranges: str | None, out: Path, as_json: bool) -> int:
    from vcoind.compute.shards import ShardError, even_ranges, parse_ranges, split_model

    try:
        spans = (
            parse_ranges(ranges, info.num_layers) if ranges
            else even_ranges(info.num_layers, shards or 0)
        )  # fmt: skip
        if not as_json:
            print(f"splitting {info.name} ({info.num_layers} layers) into {len(spans)} shards "
                  f"under {out}", flush=True)  # fmt: skip
        dirs = split_model(info.path, out, spans, name=info.name, model_id=info.model_id)
    except (ShardError, OSError) as exc:
        return die(str(exc))
    rows: list[dict[str, Any]] = [{"path": str(d), "layers": f"{a}-{b}",
             "bytes": sum(f.stat().st_size for f in d.glob("*.safetensors"))}
            for d, (a, b) in zip(dirs, spans, strict=True)]  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=2))
    for r in [] if as_json else rows:
        print(f"  {r['path']}  layers {r['layers']}  {r['bytes'] / (1 << 20):.1f} MiB")
    return 0

"""``vcoind model ...``: the model store (make-test, list, info, split)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vcoind.cli.format import EXIT_USAGE, die, fmt_table
from vcoind.config import ConfigError, load


def model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcoind model",
        description="Manage the model store: a directory of model directories, each with "
        "config.json, *.safetensors weights and a tokenizer. A model's id is a hash of its "
        "weight files, so nodes can prove they serve the same weights.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
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
        cfg = load(flags={"datadir": ns.datadir, "compute.models_dir": ns.models_dir})
    except ConfigError as exc:
        return die(str(exc), EXIT_USAGE)
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
                ]
                for m in models
            ]
            print(fmt_table(rows, ["NAME", "MODEL ID", "ARCHITECTURE", "LAYERS", "MiB"]))
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

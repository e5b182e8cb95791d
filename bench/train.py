"""LoRA training: per-node step speed and the cost of one FedAvg sync, on one machine.

    .venv/bin/python bench/train.py                          # the test model, CPU
    .venv/bin/python bench/train.py --hidden 1024 --layers 8 # a bigger random Qwen2
    python bench/train.py --device cuda --shape deepseek-1.5b  # on a GPU box

Builds a random Qwen2 of the chosen shape (real safetensors + tokenizer), trains LoRA on
it with ``vcoind.train.lora.LoraTrainer`` (the code the daemon runs) for ``--steps``
steps of ``--batch-size`` examples of ``--max-length`` tokens, and reports step time,
samples/s and tokens/s after a warm-up step; then times what one sync round adds per
node: the adapter to bytes, back from bytes, and FedAvg of ``--nodes`` adapters, with
the adapter's size (what travels twice per node per round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES: dict[str, dict[str, Any]] = {
    "test": {},
    "deepseek-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28,
                      "num_heads": 12, "num_kv_heads": 2, "vocab_size": 151936,
                      "init_std": 0.02},
}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shape", choices=sorted(SHAPES), default="test")
    p.add_argument("--hidden", type=int, help="override hidden size (intermediate = 2.75x)")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--nodes", type=int, default=3, help="adapters averaged in the sync")
    ns = p.parse_args()

    import torch

    from vcoind.compute.testmodel import CORPUS, TinyModelSpec, make_test_model
    from vcoind.train.lora import LoraTrainer, adapter_from_bytes, adapter_to_bytes, fedavg
    from vcoind.train.spec import LoraSettings

    shape = dict(SHAPES[ns.shape])
    if ns.hidden:
        shape.update(hidden_size=ns.hidden, intermediate_size=int(ns.hidden * 2.75) // 16 * 16,
                     num_heads=max(2, ns.hidden // 128), num_kv_heads=2)  # fmt: skip
    if ns.layers:
        shape["num_layers"] = ns.layers
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_test_model(Path(tmp) / "m", TinyModelSpec(**shape))
        words = " ".join(CORPUS.split())
        examples = [{"text": (words[i * 37 :] + " " + words) * 4} for i in range(64)]
        settings = LoraSettings(r=ns.r, alpha=2 * ns.r, batch_size=ns.batch_size,
                                max_length=ns.max_length, epochs=100)  # fmt: skip
        t0 = time.perf_counter()
        trainer = LoraTrainer(model_dir, settings, ns.device)
        load_s = time.perf_counter() - t0
        trainer.train(examples, 0, 1)  # warm-up
        times = []
        for s in range(1, ns.steps + 1):
            if ns.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            trainer.train(examples, s, 1)
            if ns.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        state = trainer.adapter_state()
        t = time.perf_counter()
        data = adapter_to_bytes(state, trainer.meta)
        to_bytes = time.perf_counter() - t
        t = time.perf_counter()
        back, _ = adapter_from_bytes(data)
        from_bytes = time.perf_counter() - t
        t = time.perf_counter()
        fedavg([(back, float(i + 1)) for i in range(ns.nodes)])
        avg_s = time.perf_counter() - t
    step = statistics.median(times)
    device = torch.cuda.get_device_name(0) if ns.device.startswith("cuda") else "CPU"
    n_params = sum(v.numel() for v in state.values())
    print(f"shape {ns.shape} {shape or ''} on {device} (torch {torch.__version__})")
    print(f"model load + LoRA wrap: {load_s:.2f} s; LoRA r={ns.r} on q_proj, v_proj: "
          f"{n_params:,} parameters")  # fmt: skip
    print(
        f"step (batch {ns.batch_size} x {ns.max_length} tokens): median {1000 * step:.1f} ms "
        f"over {ns.steps} steps -> {ns.batch_size / step:.1f} samples/s, "
        f"{ns.batch_size * ns.max_length / step:.0f} tokens/s (upper bound: full-length rows)"
    )
    print(f"sync per node and round: adapter {len(data) / 1024:.1f} KiB each way; to bytes "
          f"{1000 * to_bytes:.1f} ms, from bytes {1000 * from_bytes:.1f} ms; FedAvg of "
          f"{ns.nodes}: {1000 * avg_s:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

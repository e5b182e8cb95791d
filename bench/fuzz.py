"""Fuzzing, the long run: the properties of tests/test_fuzz.py with many more examples.

    .venv/bin/python bench/fuzz.py [--minutes 10] [--seed 1] [--targets rpc_body,...]

Every decoder a peer or a client reaches (codec messages, stream frames and the serving
loop of a session protocol, tensor frames and the shard wire, RPC bodies) must answer
arbitrary input with its typed error. Each target gets an equal share of the time, run in
rounds of --batch examples, each round with its own seed (from --seed: a run is
reproducible). Prints, per target, the inputs tried (shrinking included), the failing
rounds and each failure's shrunk input; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, settings

from tests.test_fuzz import TARGETS, Target, run


@dataclass
class Tally:
    tried: int = 0
    rounds: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def fuzz(target: Target, seconds: float, first_seed: int, batch: int) -> Tally:
    tally = Tally()

    def counted(value: object) -> None:
        tally.tried += 1
        target.check(value)

    counting = Target(target.name, target.strategy, counted, target.examples)
    cfg = settings(max_examples=batch, database=None, deadline=None, derandomize=False,
                   suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            run(counting, cfg, at_seed=first_seed * 1_000_003 + tally.rounds)
        except Exception as exc:  # the property failed: hypothesis raises the shrunk case
            notes = "\n".join(getattr(exc, "__notes__", []))
            tally.failures.append(f"{type(exc).__name__}: {exc}"[:600] + "\n" + notes[:1500])
        tally.rounds += 1
    tally.seconds = time.perf_counter() - t0
    return tally


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="in all, shared by the targets")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=500, help="examples per round")
    p.add_argument("--targets", default="", help="comma-separated names (default: all)")
    ns = p.parse_args()
    # The serving loop's fuzzed handler has deliberate bugs: their tracebacks are noise here.
    logging.getLogger("vcoind").setLevel(logging.CRITICAL)
    names = [n for n in ns.targets.split(",") if n]
    unknown = set(names) - {t.name for t in TARGETS}
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; known: {[t.name for t in TARGETS]}")
    targets = [t for t in TARGETS if not names or t.name in names]
    share = ns.minutes * 60 / len(targets)
    print(f"fuzzing {len(targets)} targets for {ns.minutes:g} min, seed {ns.seed}", flush=True)
    print(f"{'target':16} {'inputs':>9} {'rounds':>7} {'inputs/s':>9} {'failures':>9}")
    failed = 0
    for i, target in enumerate(targets):
        tally = fuzz(target, share, ns.seed + i, ns.batch)
        rate = tally.tried / tally.seconds if tally.seconds else 0.0
        print(f"{target.name:16} {tally.tried:9d} {tally.rounds:7d} {rate:9.0f} "
              f"{len(tally.failures):9d}", flush=True)  # fmt: skip
        for failure in tally.failures:
            print("  " + failure.replace("\n", "\n  "))
        failed += len(tally.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

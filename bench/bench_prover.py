"""Prover speed: `prove diff v1 v2` (goal: under 10 s) and `prove rules` for every bundled version
(goal: under 60 s), wall and CPU seconds, each the best of a few runs, with a reference measured in
the same run: loading and checking the bundled policies (`bindpolicy check`).

Run: .venv/bin/python bench/bench_prover.py [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.loader import load_policies  # noqa: E402
from engine.prover.diff import prove_diff  # noqa: E402
from engine.prover.rules import prove_rules  # noqa: E402


def best(runs: int, work: Callable[[], Any]) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest run."""
    found: list[tuple[float, float]] = []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        found.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = ROOT / "policies"
    policies = load_policies(folder)
    v1, v2 = policies.get("v1"), policies.get("v2")
    assert v1 is not None and v2 is not None
    prove_diff(policies, v1, v2)  # warm: engines for the witness checks, cel-python's parser
    reference = best(args.runs, lambda: load_policies(folder))
    diff = best(args.runs, lambda: prove_diff(policies, v1, v2))
    rules = best(args.runs, lambda: [prove_rules(policies, v) for v in policies])
    print("| what | wall s | CPU s | goal s | x reference (wall) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| reference: load + check the bundled policies | {reference[0]:.2f} | {reference[1]:.2f} | | 1.0 |")
    print(f"| `prove diff v1 v2` | {diff[0]:.2f} | {diff[1]:.2f} | 10 | {diff[0] / reference[0]:.1f} |")
    print(f"| `prove rules` (v1 and v2) | {rules[0]:.2f} | {rules[1]:.2f} | 60 | {rules[0] / reference[0]:.1f} |")


if __name__ == "__main__":
    main()

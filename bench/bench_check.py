"""`bindpolicy check` and load speed: the bundled policies (check goal: under 2 s) and 4,000 generated
rules (issue 10: load_policies under 10 s; issue 9: `bindpolicy check` under 15 s), each the best of a
few runs, with a reference measured in the same run on the same files, the two taking turns: reading
them as bare YAML (PyYAML's yaml.safe_load, Python reader), which any checker has to do at least.

In process (`load_policies`, every stage: YAML with positions, JSON Schema, inheritance, CEL
parsing, field and type checks, native compilation, the generated decision paths) and end to end
(`bindpolicy check` in a fresh interpreter, imports included; check loads without the generated
paths, which find no problem). The 4,000 rules are the bundled rules again and again with their
thresholds and literals changed, so that no two expressions share a parse (the compiler caches by text).

Run: .venv/bin/python bench/bench_check.py [--runs 3] [--rules 4000] [--before TREE]

--before TREE: one more table, in the same run and the same turns: load_policies of the generated
rules with bindpolicy's code taken from TREE (another checkout, e.g. `git worktree add /tmp/before
COMMIT`) and with this tree's, each in a fresh interpreter (timed after its imports), with the
reference: a before/after of the load.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.loader import load_policies  # noqa: E402


def taking_turns(runs: int, *works: Callable[[], Any]) -> list[float]:
    """Wall seconds of the fastest run of each, the works taking turns in each round: the load of
    a shared machine, which moves 2-4x within minutes, falls on the reference and the measured alike.
    A work that returns a float reports its own seconds (a load timed inside another interpreter)."""
    found: list[list[float]] = [[] for _ in works]
    for _ in range(runs):
        for times, work in zip(found, works, strict=True):
            started = time.perf_counter()
            reported = work()
            times.append(reported if isinstance(reported, float) else time.perf_counter() - started)
    return [min(times) for times in found]


_TIMED_LOAD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from engine.loader import load_policies
started = time.perf_counter()
load_policies(sys.argv[2])
print(time.perf_counter() - started)
"""


def fresh_load(tree: Path, folder: Path) -> float:
    """Seconds of load_policies(folder) with the engine of `tree`, in a fresh interpreter, after its imports."""
    result = subprocess.run([sys.executable, "-c", _TIMED_LOAD, str(tree), str(folder)], cwd=tree,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"load failed with {tree}'s code:\n{result.stdout}{result.stderr}")
    return float(result.stdout.split()[-1])


def bare_yaml(folder: Path) -> None:
    for path in sorted(folder.rglob("*.yaml")):
        if "tests" not in path.parts:
            yaml.safe_load(path.read_text(encoding="utf-8"))


def cli_check(folder: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(folder)], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"check failed on {folder}:\n{result.stdout}{result.stderr}")


def many_rules(folder: Path, count: int) -> None:
    """One version of `count` rules: the bundled v1 rules, each copy with a condition of its own."""
    source = ROOT / "policies" / "v1"
    (folder / "v1").mkdir(parents=True)
    (folder / "v1" / "version.yaml").write_text((source / "version.yaml").read_text(encoding="utf-8"))
    rules: list[dict[str, Any]] = []
    for path in sorted(source.glob("*.yaml")):
        if path.name != "version.yaml":
            rules.extend(yaml.safe_load(path.read_text(encoding="utf-8")).get("rules", []))
    written: list[dict[str, Any]] = []
    for index in range(count):
        rule = copy.deepcopy(rules[index % len(rules)])
        round_ = index // len(rules)
        rule["id"] = f"{rule['id']}.n{index}"
        # A distinct condition each time (one more term, always true here, with this round's number);
        # applies_when stays as written, shared as it would be between rules of one area.
        rule["fires_when"] = (f"({rule['fires_when']}) && "
                              f"at > timestamp(\"2000-01-01T00:00:00Z\") + duration(\"{round_}s\")")
        written.append(rule)
    per_file = 500
    for start in range(0, count, per_file):
        (folder / "v1" / f"rules-{start // per_file:02d}.yaml").write_text(
            yaml.safe_dump({"rules": written[start:start + per_file]}, allow_unicode=True, sort_keys=False),
            encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rules", type=int, default=4000)
    parser.add_argument("--before", type=Path, help="a checkout whose load is measured too, in the same turns")
    args = parser.parse_args()
    compared: tuple[float, float, float] | None = None
    bundled = ROOT / "policies"
    with tempfile.TemporaryDirectory() as scratch:
        generated = Path(scratch) / "policies"
        many_rules(generated, args.rules)
        loaded = load_policies(generated)
        count = sum(len(v.rules) for v in loaded)
        assert count == args.rules, count
        rows = []
        for name, folder, goals in (("the bundled policies (v1, v2: 80 rules)", bundled, (None, 2.0)),
                                    (f"{count:,} generated rules", generated, (10.0, 15.0))):
            reference, in_process, end_to_end = taking_turns(
                args.runs, lambda f=folder: bare_yaml(f),  # type: ignore[misc]
                lambda f=folder: load_policies(f), lambda f=folder: cli_check(f))  # type: ignore[misc]
            rows.append((name, reference, in_process, end_to_end, goals))
        if args.before is not None:
            before = args.before.resolve()
            compared = taking_turns(  # type: ignore[assignment]
                args.runs, lambda: bare_yaml(generated), lambda: fresh_load(before, generated),
                lambda: fresh_load(ROOT, generated))
    print(f"machine load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
    print("| policies | bare YAML load s (reference) | load_policies s (issue 10: every stage, generated paths "
          "included) | x reference | goal s | `bindpolicy check` s (fresh process) | x reference | goal s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, reference, in_process, end_to_end, (load_goal, check_goal) in rows:
        shown = f"{load_goal:.0f}" if load_goal is not None else "-"
        print(f"| {name} | {reference:.3f} | {in_process:.2f} | {in_process / reference:.2f} | {shown} "
              f"| {end_to_end:.2f} | {end_to_end / reference:.2f} | {check_goal:.0f} |")
    if compared is not None:
        reference, before_s, after_s = compared
        print(f"\nload_policies of the {args.rules:,} generated rules, each in a fresh interpreter (after its "
              f"imports), in the same turns; before: the code of {args.before}")
        print("| bare YAML load s (reference) | before s | x reference | after s | x reference | after / before |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {reference:.3f} | {before_s:.2f} | {before_s / reference:.2f} | {after_s:.2f} "
              f"| {after_s / reference:.2f} | {after_s / before_s:.2f} |")


if __name__ == "__main__":
    main()

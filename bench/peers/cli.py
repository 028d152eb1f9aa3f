"""The command line per JSON line: `bindpolicy decide --jsonl` against Google's CEL runtime
(cel-expr-python, bench/peers/cel_expr_lines.py) over the same official binds, in one run.

Each side runs as its own process over a file of N lines and over a file of 1 line; the cost
per line is the difference of the CPU time each process used (user and system, measured by
getrusage) divided by N - 1 (start-up, imports and policy loading cancel out). bindpolicy
takes ten times the lines of the reference, so that its run stays long against the noise of
a start-up. Each is run `--repeat` times, alternating;
the medians are compared. Before timing, both must fire the same rules on every line.

Run: .venv/bin/python bench/peers/cli.py [--lines 4000] [--repeat 3] [--before TREE]

--before TREE: first the same measure with bindpolicy's code taken from TREE (another checkout,
e.g. `git worktree add /tmp/before COMMIT`, put first on PYTHONPATH), then this tree's: a
before/after in one run, each with its own reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.peers.corpus import build_corpus  # noqa: E402

BINDPOLICY = [str(ROOT / ".venv/bin/bindpolicy"), "decide", "--jsonl", "--now", "2025-07-01T00:00:00Z",
              "--policies", str(ROOT / "policies")]
CEL_EXPR = [sys.executable, str(ROOT / "bench/peers/cel_expr_lines.py")]


def run(command: list[str], path: Path) -> tuple[float, str]:
    """(CPU seconds the process used, user and system, its output): on a shared machine the CPU
    time of a process moves far less with the load than the clock does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([*command, str(path)], capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), done.stdout


def fired_bindpolicy(line: str) -> list[str]:
    answer = json.loads(line)
    return sorted(f["id"] for f in answer["violations"] + answer["warnings"])


def measure(lines: int, repeat: int, seed: int = 20250701) -> dict[str, Any]:
    corpus = build_corpus(500, seed)
    requests = [corpus[i % len(corpus)] for i in range(lines * 10)]
    with tempfile.TemporaryDirectory() as folder:
        many, more, one = Path(folder) / "many.jsonl", Path(folder) / "more.jsonl", Path(folder) / "one.jsonl"
        # UTF-8 as it is, as a JSON Lines file usually holds it (json.dumps's default escapes it)
        many.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests[:lines]), encoding="utf-8")
        more.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests), encoding="utf-8")
        one.write_text(json.dumps(requests[0], ensure_ascii=False) + "\n", encoding="utf-8")
        _, ours = run(BINDPOLICY, many)
        _, theirs = run(CEL_EXPR, many)
        for number, (a, b) in enumerate(zip(ours.splitlines(), theirs.splitlines(), strict=True), start=1):
            if fired_bindpolicy(a) != sorted(json.loads(b)["fired"]):
                raise SystemExit(f"line {number}: bindpolicy fires {fired_bindpolicy(a)}, "
                                 f"cel-expr-python {json.loads(b)['fired']}")
        per_line: dict[str, list[float]] = {"bindpolicy": [], "cel-expr-python": []}
        for _ in range(repeat):
            for name, command, path, count in (("bindpolicy", BINDPOLICY, more, lines * 10),
                                               ("cel-expr-python", CEL_EXPR, many, lines)):
                long, _ = run(command, path)
                short, _ = run(command, one)
                per_line[name].append((long - short) / (count - 1) * 1e6)
    ours_us, theirs_us = statistics.median(per_line["bindpolicy"]), statistics.median(per_line["cel-expr-python"])
    return {"lines": lines, "repeat": repeat, "bindpolicy_us": ours_us, "cel_expr_python_us": theirs_us,
            "ratio": ours_us / theirs_us, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=3000, help="lines for the reference (bindpolicy: ten times)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout whose engine is measured first, in the same run")
    args = parser.parse_args()
    trees = [("before: ", str(args.before.resolve())), ("after: ", None)] if args.before else [("", None)]
    for label, tree in trees:
        if tree is not None:
            os.environ["PYTHONPATH"] = tree  # the bindpolicy script imports engine from there first
        else:
            os.environ.pop("PYTHONPATH", None)
        found = measure(args.lines, args.repeat)
        print(f"{label}per JSON line, median of {args.repeat}: bindpolicy decide --jsonl ({args.lines * 10} lines) "
              f"{found['bindpolicy_us']:.1f} µs, cel-expr-python ({args.lines} lines) "
              f"{found['cel_expr_python_us']:.1f} µs: "
              f"{found['ratio']:.2f}x (goal ≤ 0.35x); CPU time per line, load average {found['load']:.1f}", flush=True)


if __name__ == "__main__":
    main()

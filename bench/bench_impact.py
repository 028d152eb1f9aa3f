"""Impact throughput: a generated corpus (a million requests by default) judged under v1 and v2,
every core used (or --workers). Reports requests and decisions re-judged per second of the clock,
and per CPU second of the judging processes (per core: what a shared machine's load does not
change as much); only requests decided under both versions count, two decisions each.

The corpus file is read as `bindpolicy impact --requests FILE` reads it (engine/inputs.py's
request_blocks: its lines as bytes, each named `FILE:N`) and judged by run_impact, as the
command does (only the policies' loading and the report's rendering left out). --text: as the
command read it before (numbered_lines: text lines).

--before TREE: the same corpus judged in turns by this tree and by another checkout (its own
engine and policies, the file read as that checkout's command reads it: request_blocks where it
has one, else text lines; --rounds each, the best kept): the ratio of their decisions per CPU
second, in one run.

Run: .venv/bin/python bench/bench_impact.py [--count 1000000] [--workers N] [--before TREE --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--tree" in sys.argv:  # the engine (and policies) of another checkout, judged by this script
    ROOT = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from engine import inputs  # noqa: E402
from engine.generator import generate_requests  # noqa: E402
from engine.impact import render, run_impact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--corpus", type=Path, help="judge this JSON Lines file instead of a generated one")
    parser.add_argument("--before", type=Path, metavar="TREE", help="another checkout judged in turns with this one")
    parser.add_argument("--rounds", type=int, default=3, help="with --before: runs of each tree, the best kept")
    parser.add_argument("--tree", type=Path, help="judge with the engine and policies of this checkout")
    parser.add_argument("--text", action="store_true", help="read the corpus as text lines, as the command "
                        "did before it read bytes (engine/inputs.py's numbered_lines)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        corpus = args.corpus or Path(temp) / "corpus.jsonl"
        if args.corpus is None:
            start = time.perf_counter()
            with corpus.open("w") as out:
                for request in generate_requests(args.count, args.seed, broken=0.01):
                    out.write(json.dumps(request) + "\n")
            made = time.perf_counter() - start
            print(f"corpus: {args.count:,} requests, {corpus.stat().st_size / 2**20:.0f} MiB, written in {made:.0f} s",
                  file=sys.stderr)
        if args.before is not None:
            compare(args, corpus)
            return
        read = getattr(inputs, "request_blocks", None)  # None: a checkout whose command reads text lines
        lines = (inputs.numbered_lines if args.text or read is None else read)([str(corpus)])
        report = run_impact(ROOT / "policies", "v1", "v2", lines, workers=args.workers, progress=sys.stderr)
    data = report.to_dict()
    per_cpu = 2 * report.decided / report.cpu_seconds
    print(render(report, "text").splitlines()[0])
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("| requests | workers | seconds | requests/s | decisions re-judged/s | CPU seconds "
          "| decisions re-judged per CPU second (goal >= 80,000 per core) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {data['requests']:,} | {args.workers} | {report.seconds:.1f} | {data['requests'] / report.seconds:,.0f} "
          f"| {data['decisions_per_second']:,} | {report.cpu_seconds:.1f} | {per_cpu:,.0f} |")


def compare(args: argparse.Namespace, corpus: Path) -> None:
    """This tree and the one before, each judging the corpus in its own process, in turns."""
    best: dict[str, float] = {}
    trees = {"before": args.before.resolve(), "after": ROOT}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            command = [sys.executable, str(ROOT / "bench" / "bench_impact.py"), "--workers", str(args.workers),
                       "--corpus", str(corpus), *(["--tree", str(tree)] if name == "before" else [])]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            figure = float(re.findall(r"\| ([\d,]+) \|$", out.stdout.strip(), re.M)[-1].replace(",", ""))
            best[name] = max(best.get(name, 0.0), figure)
            print(f"{name}: {figure:,.0f} decisions re-judged per CPU second", file=sys.stderr)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"{args.count:,} requests, --workers {args.workers}, best of {args.rounds} in turns")
    print("| tree | decisions re-judged per CPU second (goal >= 80,000 per core) |")
    print("|---|---:|")
    print(f"| before ({args.before}) | {best['before']:,.0f} |")
    print(f"| after (this tree) | {best['after']:,.0f} |")
    print(f"after / before: {best['after'] / best['before']:.2f}x")


if __name__ == "__main__":
    main()

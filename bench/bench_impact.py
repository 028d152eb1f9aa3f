"""Impact throughput: a generated corpus (a million requests by default) judged under v1 and v2,
every core used (or --workers). Reports requests and decisions re-judged per second of the clock,
and per CPU second of the judging processes (per core: what a shared machine's load does not
change as much); only requests decided under both versions count, two decisions each.

Run: .venv/bin/python bench/bench_impact.py [--count 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.generator import generate_requests  # noqa: E402
from engine.impact import render, run_impact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        corpus = Path(temp) / "corpus.jsonl"
        start = time.perf_counter()
        with corpus.open("w") as out:
            for request in generate_requests(args.count, args.seed, broken=0.01):
                out.write(json.dumps(request) + "\n")
        made = time.perf_counter() - start
        print(f"corpus: {args.count:,} requests, {corpus.stat().st_size / 2**20:.0f} MiB, written in {made:.0f} s",
              file=sys.stderr)
        with corpus.open() as lines:
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


if __name__ == "__main__":
    main()

"""The SQLite decision log alone, as the service's workers use it: old and new code in turns.

For each variant (this checkout, or another one given as LABEL:CHECKOUT, e.g. `git worktree add
/tmp/old <commit>`), --processes processes (the service's workers) of --threads threads each call
the store's `write_many` with --size records at a time (1: single decisions; 100: batches) for
--seconds, every call returning once its records are committed, on a fresh log of its own. The
variants take turns, round after round; each figure is the median of its rounds.

Reported: records committed per second, the writers' CPU per record (every process, from its
resource usage, its store closed: whatever a store does behind the commits, such as filling a
new log's lookup table, is counted), records per commit, each call's latency (p50, p99), and the
bytes the log's files took a record (the database and its WAL).

Run: .venv/bin/python bench/bench_sqlitelog.py --variant old:/tmp/old --variant new: [--size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pglog import CHILD  # noqa: E402  (one writer process, as bench_pglog runs it)


def run_variant(path: Path, checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    url = f"sqlite:///{path}"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, url, str(args.threads), str(args.seconds),
                                  str(args.size), ""], cwd=checkout, env=env, stdout=subprocess.PIPE)
                for _ in range(args.processes)]
    outputs = [json.loads(child.communicate()[0]) for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError("a writer failed")
    records = sum(o["records"] for o in outputs)
    commits = sum(o["commits"] for o in outputs)
    latencies = sorted(x for o in outputs for x in o["latencies"])
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.suffix != ".lock")
    return {"records_per_s": records / args.seconds,
            "writer_cpu_us": sum(o["cpu"] for o in outputs) / records * 1e6,
            "per_commit": records / commits if commits else float("nan"),
            "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
            "bytes_per_record": size / records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", metavar="LABEL:CHECKOUT",
                        help="a checkout's code (repeatable); default: this checkout")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--size", type=int, default=1, help="records a call (1: single decisions; 100: batches)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = []
    for text in args.variant or ["this:"]:
        label, _, checkout = text.partition(":")
        variants.append((label, Path(checkout or ROOT).resolve()))
    load_before = os.getloadavg()[0]
    figures: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
    with tempfile.TemporaryDirectory(prefix="bench-sqlitelog-") as temp:
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for label, checkout in variants:
                log = Path(temp) / f"{label}-{number}" / "decisions.db"
                log.parent.mkdir()
                figures[label].append(run_variant(log, checkout, args))
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {args.processes} processes x "
          f"{args.threads} threads, {args.size} record(s) a call, {args.seconds:g} s, median of {args.rounds} rounds")
    print("| variant | records/s | writers' CPU µs/record | records/commit | p50 ms | p99 ms | bytes/record |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, rows in figures.items():
        m = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"| {label} | {m['records_per_s']:.0f} | {m['writer_cpu_us']:.0f} | {m['per_commit']:.1f} | "
              f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['bytes_per_record']:.0f} |")


if __name__ == "__main__":
    main()

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
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pglog import run_writers, writer_options, writers_figures  # noqa: E402  (as bench_pglog runs them)


def run_variant(path: Path, checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    outputs = run_writers(f"sqlite:///{path}", checkout, args)
    records = sum(o["records"] for o in outputs)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.suffix != ".lock")
    return {**writers_figures(outputs, args.seconds, sum(o["commits"] for o in outputs)),
            "bytes_per_record": size / records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", metavar="LABEL:CHECKOUT",
                        help="a checkout's code (repeatable); default: this checkout")
    writer_options(parser)
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

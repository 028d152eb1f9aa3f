"""The PostgreSQL decision log alone, as the service's workers use it: old and new code in turns.

A fresh PostgreSQL server with fsync ON (as bench/bench_service.py starts it); for each variant
(this checkout, or another one given as LABEL:CHECKOUT, e.g. `git worktree add /tmp/old <commit>`),
--processes processes (the service's workers) of --threads threads each call the store's
`write_many` with --size records at a time (1: single decisions; 100: batches) for --seconds,
every call returning once its records are committed. The variants take turns, round after
round, each on a schema of its own; each figure is the median of its rounds.

Reported: records committed per second, the writers' CPU per record (every process, from its
resource usage), PostgreSQL's CPU per record (every process of the server, from /proc: it
shares the cores), records per commit, and each call's latency (p50, p99).

A variant LABEL:CHECKOUT:writer runs the log writer of that checkout (engine/logwriter.py, one
process, as `bindpolicy serve --log-writer process` does), and the processes write through it
(`WriterClient`); the writer's CPU is counted with the writers'.

Run: .venv/bin/python bench/bench_pglog.py --variant old:/tmp/old --variant new: [--variant one::writer]
     [--size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.postgres import fresh_schema, postgres_cluster  # noqa: E402

# One writer process: run with the variant's checkout first on the path.
CHILD = r"""
import json, resource, sys, threading, time, uuid
from engine.decisionlog import new_record, open_store
from tests.conftest import bind_request

url, threads, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
store = open_store(url)
log = store
if sys.argv[5]:  # through the log writer
    from engine.logwriter import WriterClient
    log = WriterClient(sys.argv[5], store)
request = bind_request()
response = {"decision": "allow", "rule": None, "violations": [], "warnings": [], "outputs": {"fee": 12},
            "policy": {"version": "2025-07-01", "digest": "d" * 64, "runtime": "native"}, "at": "x" * 27}

def record():
    return new_record(decision_id=uuid.uuid4().hex, outcome="decided", status=200, request=request,
                      response=response, duration_us=40)

for _ in range(20):
    log.write_many([record() for _ in range(size)])
store.batches = store.records = 0
latencies = []
start_gate = threading.Barrier(threads + 1)

def work():
    mine = []
    start_gate.wait()
    while time.monotonic() < deadline:
        records = [record() for _ in range(size)]
        began = time.perf_counter()
        log.write_many(records)
        mine.append(time.perf_counter() - began)
    latencies.extend(mine)

workers = [threading.Thread(target=work) for _ in range(threads)]
for w in workers:
    w.start()
before = resource.getrusage(resource.RUSAGE_SELF)
deadline = time.monotonic() + seconds
start_gate.wait()
for w in workers:
    w.join()
commits = store.batches
store.close()  # (counted: whatever a store does behind its commits, as filling a SQLite log's lookup)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"calls": len(latencies), "records": len(latencies) * size, "commits": commits,
                  "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                  "latencies": latencies}))
"""


def server_cpu(data: Path) -> float:
    """CPU seconds of every process of the PostgreSQL server (the postmaster and its children)."""
    pid = int((data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
    return total


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_variant(url: str, checkout: Path, writer: bool, args: argparse.Namespace, data: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    pg_before = server_cpu(data)
    path, process = "", None
    if writer:  # the log writer, on a socket of its own
        from engine.logwriter import listening_socket

        path = str(data.parent / "writer.sock")
        listener = listening_socket(path)
        stats = data.parent / "writer.json"
        process = subprocess.Popen([sys.executable, "-m", "engine.logwriter", "--fd", str(listener.fileno()),
                                    "--database-url", url], cwd=checkout, pass_fds=(listener.fileno(),),
                                   env={**env, "BINDPOLICY_LOG_WRITER_STATS": str(stats)})
    outputs = run_writers(url, checkout, args, path)
    writer_cpu = 0.0
    commits = sum(o["commits"] for o in outputs)
    if process is not None:
        writer_cpu = process_cpu(process.pid)  # (its start and the warm-up included)
        process.send_signal(signal.SIGUSR1)
        process.wait(30)
        listener.close()
        done = json.loads(stats.read_text())
        print(f"  the writer: {done}", file=sys.stderr)
        commits = round(done["commits"] * sum(o["records"] for o in outputs) / done["records"])
    pg_cpu = server_cpu(data) - pg_before
    records = sum(o["records"] for o in outputs)
    return {**writers_figures(outputs, args.seconds, commits, writer_cpu),
            "postgres_cpu_us": pg_cpu / records * 1e6}  # (its warm-up's share included)


def run_writers(url: str, checkout: Path, args: argparse.Namespace, socket: str = "") -> list[dict[str, Any]]:
    """--processes writer processes (CHILD) of `checkout`'s code on the log at `url` (through the
    log writer at `socket`, if given), run to their end: what each reported."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, url, str(args.threads), str(args.seconds),
                                  str(args.size), socket], cwd=checkout, env=env, stdout=subprocess.PIPE)
                for _ in range(args.processes)]
    outputs = [json.loads(child.communicate()[0]) for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError("a writer failed")
    return outputs


def writers_figures(outputs: list[dict[str, Any]], seconds: float, commits: int,
                    more_cpu: float = 0.0) -> dict[str, float]:
    """Records a second, the writers' CPU a record (with `more_cpu` seconds of another process),
    records a commit and the calls' latency, from what the writer processes reported."""
    records = sum(o["records"] for o in outputs)
    latencies = sorted(x for o in outputs for x in o["latencies"])
    return {"records_per_s": records / seconds,
            "writer_cpu_us": (sum(o["cpu"] for o in outputs) + more_cpu) / records * 1e6,
            "per_commit": records / commits if commits else float("nan"),
            "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}


def writer_options(parser: argparse.ArgumentParser) -> None:
    """How the writers write (shared with bench_sqlitelog)."""
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--size", type=int, default=1, help="records a call (1: single decisions; 100: batches)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", metavar="LABEL:CHECKOUT",
                        help="a checkout to run (empty CHECKOUT: this one); repeatable, in turns")
    writer_options(parser)
    args = parser.parse_args()
    variants = []
    for text in args.variant or ["this:"]:
        label, _, rest = text.partition(":")
        checkout, _, mode = rest.partition(":")
        if mode not in ("", "writer"):
            sys.exit(f"--variant {text}: expected LABEL:CHECKOUT[:writer]")
        variants.append((label, Path(checkout or ROOT).resolve(), mode == "writer"))
    load_before = os.getloadavg()[0]
    figures: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    with postgres_cluster(fsync=True) as cluster:
        urls = {label: fresh_schema(cluster.url, f"pglog_{number}") for number, (label, _, _) in enumerate(variants)}
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for label, checkout, writer in variants:
                figures[label].append(run_variant(urls[label], checkout, writer, args, cluster.data))
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {args.processes} processes x "
          f"{args.threads} threads, {args.size} record(s) a call, {args.seconds:g} s, median of {args.rounds} rounds; "
          "PostgreSQL fsync on")
    print("| variant | records/s | writers' CPU µs/record | PostgreSQL CPU µs/record | records/commit | p50 ms "
          "| p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, rows in figures.items():
        m = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"| {label} | {m['records_per_s']:.0f} | {m['writer_cpu_us']:.0f} | {m['postgres_cpu_us']:.0f} | "
              f"{m['per_commit']:.1f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")


if __name__ == "__main__":
    main()

"""Where bindpolicy's slow requests spend their time at half load (issue 10, item 5's p50/p99).

    .venv/bin/python bench/bench_latency.py --config before:/tmp/before=  --config now= [--rounds 4]

Starts the reference (bench/bench_service.py's Flask hello on gunicorn) and bindpolicy once per
--config (LABEL[:CHECKOUT]=VAR=VALUE,...: another checkout's code, environment settings), each with
the SQLite log and bench/latency_probe on its path (GC pauses, the log watch's steps, slow
commits and lock waits, and every request's time in the server: see its docstring). All are sent
the same rate (half of the first config's maximum, or --rate), in turns, round after round, by hey
with 16 connections; each answer's latency is read from hey's CSV. Prints per round and as
medians: p50, p99, p99.9, the server's CPU per answer; then, per config, what the probe saw: slow
commits and lock waits, collections of the oldest generation while the load ran, the watch's
steps (CPU and wall), the in-server p99 of each worker (the watcher apart), and how many of the
slowest 1% of answers overlapped a step of the watch. The per-request files stay in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_service import bindpolicy, hey, reference, running  # noqa: E402
from tests.conftest import bind_request  # noqa: E402
from tests.postgres import free_port  # noqa: E402

PROBE = ROOT / "bench" / "latency_probe"
CONCURRENCY = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def hey_csv(url: str, body: Path, count: int, rate: float) -> list[tuple[float, float]]:
    """(latency ms, wall time it was sent) of each answer; every answer must be a 200."""
    command = ["hey", "-n", str(count), "-c", str(CONCURRENCY), "-m", "POST", "-T", "application/json",
               "-D", str(body), "-o", "csv", "-q", f"{rate / CONCURRENCY:.2f}", url]
    started = time.time()
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900).stdout
    rows = [line.split(",") for line in out.splitlines()[1:] if line.count(",") >= 7]
    if len(rows) != count // CONCURRENCY * CONCURRENCY or any(row[6] != "200" for row in rows):  # (n/c each)
        raise RuntimeError(f"{url}: {len(rows)} answers of {count}, statuses {sorted({r[6] for r in rows})}")
    return [(float(row[0]) * 1000, started + float(row[7])) for row in rows]


def probe_lines(out: Path, label: str) -> dict[str, list[list[str]]]:
    """The probe's lines of every process of a config, by pid (str)."""
    found: dict[str, list[list[str]]] = {}
    for path in out.glob(f"probe-{label}.*"):
        if ".req." not in path.name:
            found[path.name.rsplit(".", 1)[1]] = [line.split() for line in path.read_text().splitlines()]
    return found


def report_probe(out: Path, label: str, windows: list[tuple[float, float]],
                 answers: list[list[tuple[float, float]]]) -> None:
    lines = probe_lines(out, label)
    inside = [x for rows in lines.values() for x in rows
              if len(x) > 2 and any(a <= float(x[1]) <= b for a, b in windows)]
    slow = {kind: sum(1 for x in inside if x[0] == kind and float(x[2]) > 20) for kind in ("commit", "lockwait")}
    gen2 = [float(x[3]) for x in inside if x[0] == "gc" and x[2] == "2"]
    young = [float(x[3]) for x in inside if x[0] == "gc" and x[2] != "2"]
    steps = [(float(x[1]), float(x[2]) / 1000, float(x[3])) for rows in lines.values() for x in rows
             if x[0] == "watch" and x[4] == "True"]
    print(f"  {label}: while the load ran: commits > 20 ms {slow['commit']}, waits > 20 ms for the write lock "
          f"{slow['lockwait']}, oldest-generation collections {len(gen2)} (max {max(gen2, default=0):.0f} ms), "
          f"younger ones of 0.5 ms or more {len(young)} (max {max(young, default=0):.1f} ms)")
    if steps:
        print(f"  {label}: the watch's steps: median {statistics.median(s[2] for s in steps):.0f} ms CPU over "
              f"{statistics.median(s[1] for s in steps) * 1000:.0f} ms wall (max {max(s[2] for s in steps):.0f} ms "
              "CPU)")
    overlapped = total = 0
    for rows in answers:
        threshold = percentile([r[0] for r in rows], 0.99)
        for latency, sent in rows:
            if latency >= threshold:
                total += 1
                overlapped += any(start < sent + latency / 1000 and start + wall > sent for start, wall, _ in steps)
    print(f"  {label}: the slowest 1% of answers that overlapped a step of the watch: {overlapped} of {total}")
    watchers = {pid for pid, rows in lines.items() if any(x[0] == "watch" and x[4] == "True" for x in rows)}
    for path in sorted(out.glob(f"probe-{label}.req.*")):
        pid = path.name.rsplit(".", 1)[1]
        rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines()]
        rows = [r for r in rows if any(a <= r[0] <= b for a, b in windows)]
        if rows:
            print(f"  {label}: worker {pid}{' (the watcher)' if pid in watchers else ''}: in the server p50 "
                  f"{percentile([r[1] + r[2] + r[3] for r in rows], 0.5):.1f} ms, p99 "
                  f"{percentile([r[1] + r[2] + r[3] for r in rows], 0.99):.1f}: waiting for a pool thread "
                  f"{percentile([r[1] for r in rows], 0.99):.1f}, app (decision, commit) "
                  f"{percentile([r[2] for r in rows], 0.99):.1f}, writing {percentile([r[3] for r in rows], 0.99):.1f}"
                  f" (p99 of each)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, metavar="LABEL[:CHECKOUT]=VAR=VALUE,...")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4000, help="requests a measurement")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s (default: half the first config's max)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-latency")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("probe-*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as temp, ExitStack() as stack:
        one, hello = Path(temp) / "one.json", Path(temp) / "hello.json"
        one.write_text(json.dumps(bind_request()))
        hello.write_text("{}")
        port = free_port()
        servers = [stack.enter_context(running(reference(port), "/healthz", "reference", port))]
        for number, spec in enumerate(args.config):
            head, _, settings = spec.partition("=")
            label, _, checkout_text = head.partition(":")
            checkout = Path(checkout_text).resolve() if checkout_text else ROOT
            env = dict(item.split("=", 1) for item in settings.split(",") if item)
            env.update({"BINDPOLICY_LOG_LEVEL": "WARNING", "PYTHONPATH": f"{PROBE}:{checkout}",
                        "BENCH_PROBE": str(args.out / f"probe-{label}")})
            port = free_port()
            command = bindpolicy(port, Path(temp) / f"data-{number}", f"sqlite:///{temp}/log-{number}/decisions.db",
                                 2, 8, "uvloop")
            servers.append(stack.enter_context(running(command, "/readyz", label, port, env=env, cwd=checkout)))
        for server in servers:  # warm up
            hey(server.url + ("/hello" if server.name == "reference" else "/v1/decisions"),
                hello if server.name == "reference" else one, 1000, CONCURRENCY)
        rate = args.rate or hey(servers[1].url + "/v1/decisions", one, 6000, CONCURRENCY)["rps"] / 2
        print(f"{rate:.0f} requests/s to each, {args.requests} a round; load average {os.getloadavg()[0]:.1f}")
        figures: dict[str, list[tuple[float, ...]]] = {s.name: [] for s in servers}
        windows: list[tuple[float, float]] = []
        answers: dict[str, list[list[tuple[float, float]]]] = {s.name: [] for s in servers}
        for number in range(args.rounds):
            for server in servers:
                path, body = ("/hello", hello) if server.name == "reference" else ("/v1/decisions", one)
                cpu = server.cpu_seconds()
                rows = hey_csv(server.url + path, body, args.requests, rate)
                cpu_us = (server.cpu_seconds() - cpu) / len(rows) * 1e6
                windows.append((min(r[1] for r in rows), max(r[1] + r[0] / 1000 for r in rows)))
                answers[server.name].append(rows)
                latencies = [r[0] for r in rows]
                figures[server.name].append((percentile(latencies, 0.5), percentile(latencies, 0.99),
                                             percentile(latencies, 0.999), cpu_us))
                print(f"round {number + 1} {server.name:12} p50 {figures[server.name][-1][0]:6.2f} ms  p99 "
                      f"{figures[server.name][-1][1]:6.2f}  p99.9 {figures[server.name][-1][2]:6.2f}  CPU "
                      f"{cpu_us:5.0f} µs an answer; load average {os.getloadavg()[0]:.1f}", flush=True)
        print(f"medians of {args.rounds} rounds (ratio to the reference):")
        ref50 = statistics.median(f[0] for f in figures["reference"])
        ref99 = statistics.median(f[1] for f in figures["reference"])
        for name, values in figures.items():
            p50, p99 = statistics.median(f[0] for f in values), statistics.median(f[1] for f in values)
            print(f"  {name:12} p50 {p50:6.2f} ms ({p50 / ref50:.2f}x)  p99 {p99:6.2f} ms ({p99 / ref99:.2f}x)  "
                  f"CPU {statistics.median(f[3] for f in values):.0f} µs an answer")
        print("what the probe saw:")
        for server in servers[1:]:
            report_probe(args.out, server.name, windows, answers[server.name])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

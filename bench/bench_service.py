"""The service under load, against a reference measured in the same run on the same machine.

Reference: a minimal Flask "hello" app (bench/hello.py) on gunicorn, 3 gthread workers x 4
threads. Against it, `bindpolicy serve` as `make run` starts it (uvicorn's workers on uvloop,
api/server.py's httptools protocol handing each request to the front's pool, Flask; every
decision committed to the log before it is answered), with the
log on SQLite (WAL) and on PostgreSQL (a fresh server with fsync ON, as production runs it).

Measured, with `hey` (Debian package; `make bench-service` installs it) on loopback, bounded
in count: the most hellos per second; the most single logged decisions per second; decisions
per second in batches (--batch-size, 50 by default: the service's own bound; `--batch-size 100`, as
issue 10 names it, starts the service bounded to 100); then, at half
of bindpolicy's maximum rate, p50/p99 of both the reference (hellos) and bindpolicy
(decisions) at that same rate. The servers take turns, round after round, and each figure is
the median of its rounds (the machine is shared: turns spread the noise over both). The
server CPU each answer costs (from /proc, every process of the server) is reported too: it is
steadier than rates on a loaded machine.

Goals (issue 10): single >= 1.0x the reference's hellos/s; batched >= 8x; at half load p50
and p99 <= 1.5x the reference's at that rate. `--write-readme` puts the table into README.md.

Run: make bench-service   (or .venv/bin/python bench/bench_service.py [--rounds 3] [--write-readme])
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import bind_request  # noqa: E402
from tests.postgres import free_port, fresh_schema, postgres_cluster  # noqa: E402

BIN = Path(sys.executable).parent
CONCURRENCY = 16
BATCH_CONCURRENCY = 4
README_START, README_END = "<!-- bench_service: start -->", "<!-- bench_service: end -->"


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    samples: dict[str, list[float]] = field(default_factory=dict)
    database: int | None = None  # the pid of its PostgreSQL server (postmaster), whose CPU is counted apart

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's process tree so far."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """User + system CPU of each process of the server's tree so far (with its reaped children)."""
        return tree_cpu(self.process.pid)

    def database_cpu_seconds(self) -> float:
        """User + system CPU of its PostgreSQL server's processes so far (0 without one)."""
        return sum(tree_cpu(self.database).values()) if self.database else 0.0


def tree_cpu(root: int) -> dict[int, float]:
    """User + system CPU of each process of root's tree so far (with its reaped children)."""
    found, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[pid] = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return found


def _tree(pid: int) -> list[int]:
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                found += _tree(int(child))
    except OSError:
        pass
    return found


def hey(url: str, body: Path, requests: int, concurrency: int, rate: float | None = None) -> dict[str, float]:
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "application/json",
               "-D", str(body)]
    if rate:
        command += ["-q", f"{rate / concurrency:.2f}"]  # hey's -q is per connection
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=900).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"hey printed no rate:\n{out}")
    figures = {"rps": float(found.group(1))}
    for pct in ("50", "99"):
        at = re.search(rf"{pct}% in ([\d.]+) secs", out)
        figures[f"p{pct}_ms"] = float(at.group(1)) * 1000 if at else float("nan")
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    if set(codes) - {"200"} or "Error distribution" in out:
        raise RuntimeError(f"answers other than 200 under load: {codes}\n{out[-2000:]}")
    figures["answered"] = float(codes.get("200", 0))
    return figures


def client_cpu_seconds() -> float:
    """User + system CPU of this script's finished children: hey's, once each run is reaped."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def measure(server: Server, path: str, body: Path, requests: int, concurrency: int, key: str,
            rate: float | None = None) -> dict[str, float]:
    before, client_before = server.cpu_by_process(), client_cpu_seconds()
    database_before = server.database_cpu_seconds()
    figures = hey(server.url + path, body, requests, concurrency, rate)
    server.add(f"{key}_database_cpu_us", (server.database_cpu_seconds() - database_before) / requests * 1e6)
    spent = {pid: cpu - before.get(pid, 0.0) for pid, cpu in server.cpu_by_process().items()}
    server.add(f"{key}_cpu_us", sum(spent.values()) / requests * 1e6)
    # How evenly the workers shared the work: the busiest process's share of the server's CPU
    # (hey's keep-alive connections stay with the worker that accepted them).
    server.add(f"{key}_busiest_share", max(spent.values()) / max(sum(spent.values()), 1e-9))
    server.add(f"{key}_client_cpu_us", (client_cpu_seconds() - client_before) / requests * 1e6)
    for name, value in figures.items():
        server.add(f"{key}_{name}", value)
    return figures


def wait_ready(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start")


@contextmanager
def running(command: list[str], ready_path: str, name: str, port: int,
            env: dict[str, str] | None = None, cwd: Path = ROOT) -> Iterator[Server]:
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + ready_path, process, name)
        yield Server(name, url, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)


def reference(port: int) -> list[str]:
    return [str(BIN / "gunicorn"), "-k", "gthread", "-w", "3", "--threads", "4", "-b", f"127.0.0.1:{port}",
            "--log-level", "warning", "bench.hello:app"]


@dataclass(frozen=True)
class Variant:
    """One way of running bindpolicy in the run: its workers and threads, and the checkout whose
    code it runs (another checkout, e.g. `git worktree add /tmp/old <commit>`, for an A/B pair of
    old and new code in the same run)."""

    label: str
    workers: int
    threads: int
    checkout: Path = ROOT
    env: tuple[tuple[str, str], ...] = ()  # settings of its own (BINDPOLICY_LOG_WRITER=inline...)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """LABEL:WORKERS:THREADS[:CHECKOUT][:VAR=VALUE,...]"""
        parts = text.split(":")
        env: list[tuple[str, str]] = []
        if len(parts) > 3 and "=" in parts[-1]:
            for setting in parts.pop().split(","):
                name, _, value = setting.partition("=")
                env.append((name.strip(), value.strip()))
        if len(parts) not in (3, 4) or not parts[1].isdigit() or not parts[2].isdigit():
            raise argparse.ArgumentTypeError(f"expected LABEL:WORKERS:THREADS[:CHECKOUT][:VAR=VALUE,...], not {text!r}")
        checkout = Path(parts[3]).resolve() if len(parts) == 4 else ROOT
        if not (checkout / "api" / "asgi.py").is_file():
            raise argparse.ArgumentTypeError(f"{checkout} is not a bindpolicy checkout (no api/asgi.py)")
        return cls(parts[0], int(parts[1]), int(parts[2]), checkout, tuple(env))


def bindpolicy(port: int, data: Path, database_url: str, workers: int, threads: int, loop: str) -> list[str]:
    return [str(BIN / "bindpolicy"), "serve", "--data", str(data), "--port", str(port), "--workers", str(workers),
            "--threads", str(threads), "--database-url", database_url, "--loop", loop]


def logged_records(database_url: str) -> int:
    from engine.decisionlog import open_store

    store = open_store(database_url, read_only=True)
    try:
        return store.head()[0]
    finally:
        store.close()


def postgres_settings(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        values = [conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                  for name in ("fsync", "synchronous_commit", "wal_sync_method")]
    return f"fsync={values[0]}, synchronous_commit={values[1]}, wal_sync_method={values[2]}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                                         f"{platform.python_version()}", "rounds": args.rounds,
                              "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as temp, ExitStack() as stack:
        one, batch, hello = Path(temp) / "one.json", Path(temp) / "batch.json", Path(temp) / "hello.json"
        one.write_text(json.dumps(bind_request()))
        batch.write_text(json.dumps({"requests": [bind_request()] * args.batch_size}))
        hello.write_text("{}")
        cluster = stack.enter_context(postgres_cluster(fsync=True))
        pg_url = fresh_schema(cluster.url, "bench")
        report["postgres"] = postgres_settings(pg_url)
        logs = {"SQLite (WAL)": f"sqlite:///{temp}/sqlite/decisions.db", "PostgreSQL (fsync on)": pg_url}
        port = free_port()
        ref = stack.enter_context(running(reference(port), "/healthz", "reference", port))
        servers = []
        variants = args.variant or [Variant("", args.workers, args.threads)]
        for log_name, log_url in logs.items():
            if args.only and args.only not in log_name:
                continue
            for number, variant in enumerate(variants):
                name = f"{log_name}, {variant.label}" if variant.label else log_name
                url = log_url if number == 0 else (
                    f"sqlite:///{temp}/sqlite-{number}/decisions.db" if log_url.startswith("sqlite")
                    else fresh_schema(cluster.url, f"bench{number}"))
                port = free_port()
                data = Path(temp) / f"{log_name.split()[0].lower()}-{number}"
                # Another checkout's code: found first on the path (before the editable install).
                path_env = {} if variant.checkout == ROOT else {"PYTHONPATH": str(variant.checkout)}
                server = stack.enter_context(running(
                    bindpolicy(port, data, url, variant.workers, variant.threads, args.loop), "/readyz", name,
                    port, cwd=variant.checkout,
                    # The service is bounded as the batches sent (issue 10 names batches of 100; the
                    # default bound is 50 requests and 64 KiB, issue 8's CPU bound for one request).
                    env={"BINDPOLICY_LOG_LEVEL": "WARNING", "BINDPOLICY_MAX_BATCH": str(args.batch_size),
                         "BINDPOLICY_MAX_BATCH_BYTES": str(max(64 * 1024, 2 * batch.stat().st_size)),
                         **path_env, **dict(variant.env)}))
                if log_url.startswith("postgresql"):
                    server.database = cluster.postmaster()
                servers.append((server, url))
        print("servers: " + ", ".join(f"{s.name} {s.url}" for s in [ref] + [s for s, _ in servers]), file=sys.stderr,
              flush=True)
        for server in [ref] + [s for s, _ in servers]:  # warm up (and compile)
            path, body = ("/hello", hello) if server is ref else ("/v1/decisions", one)
            hey(server.url + path, body, 1000, CONCURRENCY)
        answered = {s.name: 0.0 for s, _ in servers}
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            measure(ref, "/hello", hello, args.requests, CONCURRENCY, "max")
            for server, _ in servers:
                answered[server.name] += measure(server, "/v1/decisions", one, args.requests, CONCURRENCY,
                                                 "max")["answered"]
                answered[server.name] += measure(server, "/v1/decisions/batch", batch, args.batches,
                                                 BATCH_CONCURRENCY, "batch")["answered"] * args.batch_size
            for server, _ in servers:  # half of this round's maximum, for both
                rate = server.samples["max_rps"][-1] / 2
                # At least --half-seconds of load: p99 is then over thousands of answers and spans
                # the service's periodic work (the log watch's step every 5 s, the WAL's
                # checkpoints), as it would in a longer run; 1000 answers (3 s) made it the 10th
                # slowest, there or not depending on whether a step fell inside the window.
                count = max(args.requests // 2, int(rate * args.half_seconds))
                measure(ref, "/hello", hello, count, CONCURRENCY, f"half_{server.name}", rate)
                answered[server.name] += measure(server, "/v1/decisions", one, count, CONCURRENCY,
                                                 "half", rate)["answered"]
        rows = []
        for server, url in servers:
            records = logged_records(url)
            hellos = ref.median("max_rps")
            row = {
                "log": server.name, "reference_hellos_per_s": hellos,
                "reference_cpu_us": ref.median("max_cpu_us"),
                "single_per_s": server.median("max_rps"), "single_ratio": server.median("max_rps") / hellos,
                "single_cpu_us": server.median("max_cpu_us"),
                "reference_client_cpu_us": ref.median("max_client_cpu_us"),
                "reference_busiest_share": ref.median("max_busiest_share"),
                "single_busiest_share": server.median("max_busiest_share"),
                "single_client_cpu_us": server.median("max_client_cpu_us"),
                "single_p50_ms": server.median("max_p50_ms"), "single_p99_ms": server.median("max_p99_ms"),
                "batch_decisions_per_s": server.median("batch_rps") * args.batch_size,
                "batch_ratio": server.median("batch_rps") * args.batch_size / hellos,
                "batch_cpu_us_per_decision": server.median("batch_cpu_us") / args.batch_size,
                "single_database_cpu_us": server.median("max_database_cpu_us"),
                "batch_database_cpu_us_per_decision": server.median("batch_database_cpu_us") / args.batch_size,
                "half_rate": server.median("max_rps") / 2,
                "half_p50_ms": server.median("half_p50_ms"), "half_p99_ms": server.median("half_p99_ms"),
                "reference_half_p50_ms": ref.median(f"half_{server.name}_p50_ms"),
                "reference_half_p99_ms": ref.median(f"half_{server.name}_p99_ms"),
                "decisions_answered": int(answered[server.name]), "records_logged": records}
            row["half_p50_ratio"] = row["half_p50_ms"] / row["reference_half_p50_ms"]
            row["half_p99_ratio"] = row["half_p99_ms"] / row["reference_half_p99_ms"]
            if records < row["decisions_answered"]:
                raise RuntimeError(f"{server.name}: {row['decisions_answered']} decisions answered but only "
                                   f"{records} records in the log")
            rows.append(row)
    report["rows"] = rows
    report["load_after"] = os.getloadavg()[0]
    report["batch_size"] = args.batch_size
    serving = "; ".join(
        f"{v.label + ': ' if v.label else ''}`bindpolicy serve --workers {v.workers} --threads {v.threads} "
        f"--loop {args.loop}`{'' if v.checkout == ROOT else f' (the code of {v.checkout})'}"
        f"{''.join(f' {name}={value}' for name, value in v.env)}"
        for v in args.variant or [Variant("", args.workers, args.threads)])
    report["settings"] = (f"bindpolicy: {serving}; "
                          f"load: hey, {CONCURRENCY} connections ({BATCH_CONCURRENCY} for batches of "
                          f"{args.batch_size}), {args.requests} requests a measurement (at half load at least "
                          f"{args.half_seconds:g} s of them), median of "
                          f"{args.rounds} rounds")
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['machine']}, load average {report['load_before']:.1f} before the run and "
             f"{report['load_after']:.1f} after it (other sessions share the cores); "
             f"reference: Flask hello on gunicorn, 3 gthread workers x 4 threads; "
             f"{report['settings']}; PostgreSQL: {report.get('postgres', 'not run')}.", "",
             "| decision log | reference hellos/s | single decisions/s (ratio; goal >= 1.0) "
             f"| decisions/s in batches of {report['batch_size']} (ratio; goal >= 8) | at half load (decisions/s) "
             "| p50 ms: bindpolicy / reference (ratio; goal <= 1.5) "
             "| p99 ms: bindpolicy / reference (ratio; goal <= 1.5) "
             "| server CPU per answer: hello / decision / decision in a batch "
             "| client (hey) CPU per answer: hello / decision |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['log']} | {r['reference_hellos_per_s']:.0f} | {r['single_per_s']:.0f} ({r['single_ratio']:.2f}x) "
            f"| {r['batch_decisions_per_s']:.0f} ({r['batch_ratio']:.2f}x) | {r['half_rate']:.0f} "
            f"| {r['half_p50_ms']:.1f} / {r['reference_half_p50_ms']:.1f} ({r['half_p50_ratio']:.2f}x) "
            f"| {r['half_p99_ms']:.1f} / {r['reference_half_p99_ms']:.1f} ({r['half_p99_ratio']:.2f}x) "
            f"| {r['reference_cpu_us']:.0f} / {r['single_cpu_us']:.0f} / {r['batch_cpu_us_per_decision']:.0f} µs "
            f"| {r['reference_client_cpu_us']:.0f} / {r['single_client_cpu_us']:.0f} µs |")
    lines.append("")
    lines.append("The busiest process's share of the server's CPU (single requests at the maximum rate): "
                 f"reference {report['rows'][0]['reference_busiest_share']:.0%}, " + ", ".join(
                     f"bindpolicy on {r['log']} {r['single_busiest_share']:.0%}" for r in report["rows"]) + ".")
    databases = [r for r in report["rows"] if r.get("single_database_cpu_us")]
    if databases:
        lines.append("")
        lines.append("PostgreSQL's own CPU (its server's processes, on the same cores, not in the server CPU above) "
                     "per decision: " + ", ".join(
                         f"{r['log']} {r['single_database_cpu_us']:.0f} µs single, "
                         f"{r['batch_database_cpu_us_per_decision']:.0f} µs in a batch" for r in databases) + ".")
    lines.append("")
    lines.append("Every answered decision had its record in the log: " + ", ".join(
        f"{r['log']}: {r['records_logged']} records for {r['decisions_answered']} decisions answered"
        for r in report["rows"]) + ".")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = content.find(README_START), content.find(README_END)
    if start < 0 or end < start:
        sys.exit(f"README.md has no {README_START} ... {README_END} block to fill")
    readme.write_text(content[:start + len(README_START)] + "\n" + text + "\n" + content[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8000, help="single requests per measurement")
    parser.add_argument("--batches", type=int, default=200, help="batch requests per measurement")
    parser.add_argument("--half-seconds", type=float, default=10.0,
                        help="at half load, send at least this many seconds of requests (default 10)")
    parser.add_argument("--batch-size", type=int, default=50,
                        help="requests in a batch (default 50, the service's own bound; it is started with this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="bindpolicy's event loop (uvloop, as `make run`; asyncio to compare)")
    parser.add_argument("--variant", action="append", type=Variant.parse,
                        metavar="LABEL:WORKERS:THREADS[:CHECKOUT][:VAR=VALUE,...]",
                        help="run bindpolicy this way too, each in turn with the others in every round (A/B pairs: "
                             "worker models, old code from another checkout, or settings such as "
                             "BINDPOLICY_LOG_WRITER=inline); replaces --workers/--threads")
    parser.add_argument("--only", help="only the decision log whose name holds this (SQLite, PostgreSQL)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--write-readme", action="store_true", help="put the table into README.md")
    args = parser.parse_args()
    if not shutil.which("hey"):
        sys.exit("hey is not installed: make bench-service installs it (apt-get install hey)")
    report = run(args)
    text = markdown(report)
    print(text)
    if args.json:
        print(json.dumps(report, indent=2))
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()

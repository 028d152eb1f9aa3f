"""The service under load, on this machine over loopback: decisions per second and latency.

For each decision log (SQLite, PostgreSQL): the most single decisions and batched decisions per
second the service answers, then p50/p99 latency of single decisions at half that rate.
The load comes from `hey` (Debian package; `make bench-service` installs it), bounded in count.
Run: make bench-service   (or .venv/bin/python bench/bench_service.py [--requests 20000])
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import bind_request  # noqa: E402
from tests.postgres import free_port, fresh_schema, postgres_server  # noqa: E402


def run_hey(url: str, body: Path, requests: int, concurrency: int, rate: float | None = None) -> dict[str, float]:
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "application/json",
               "-D", str(body)]
    if rate:
        command += ["-q", f"{rate / concurrency:.2f}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=600).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        found = re.search(rf"{pct}% in ([\d.]+) secs", out)
        figures[f"p{pct}_ms"] = float(found.group(1)) * 1000 if found else float("nan")
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    if set(codes) - {"200"}:
        raise RuntimeError(f"non-200 answers under load: {codes}")
    return figures


def start(data: Path, database_url: str, workers: int, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("bindpolicy")), "serve", "--data", str(data), "--port", str(port),
         "--workers", str(workers), "--threads", str(threads), "--database-url", database_url],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "BINDPOLICY_LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the service did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000, help="single requests per measurement")
    parser.add_argument("--batches", type=int, default=400, help="batch requests per measurement")
    parser.add_argument("--batch-size", type=int, default=50)  # the service's MAX_BATCH
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not shutil.which("hey"):
        sys.exit("hey is not installed: make bench-service installs it (apt-get install hey)")
    rows = []
    with tempfile.TemporaryDirectory() as temp, ExitStack() as stack:
        one, batch = Path(temp) / "one.json", Path(temp) / "batch.json"
        one.write_text(json.dumps(bind_request()))
        batch.write_text(json.dumps({"requests": [bind_request()] * args.batch_size}))
        postgres = stack.enter_context(postgres_server())
        for name, url_of in (("SQLite (WAL)", lambda d: ""), ("PostgreSQL", lambda d: fresh_schema(postgres, "bench"))):
            data = Path(temp) / name.split()[0]
            process, url = start(data, url_of(data), args.workers, args.threads)
            try:
                run_hey(url + "/v1/decisions", one, 2000, args.concurrency)  # warm up
                single = run_hey(url + "/v1/decisions", one, args.requests, args.concurrency)
                batched = run_hey(url + "/v1/decisions/batch", batch, args.batches, 4)
                half = run_hey(url + "/v1/decisions", one, args.requests // 2, args.concurrency, single["rps"] / 2)
            finally:
                os.killpg(process.pid, 15)
                process.wait(timeout=30)
            rows.append({"log": name, "single_per_s": single["rps"], "single_p50_ms": single["p50_ms"],
                         "single_p99_ms": single["p99_ms"], "batch_decisions_per_s": batched["rps"] * args.batch_size,
                         "batch_p99_ms": batched["p99_ms"], "half_load_per_s": half["rps"],
                         "half_load_p50_ms": half["p50_ms"], "half_load_p99_ms": half["p99_ms"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; service: "
          f"{args.workers} gunicorn workers x {args.threads} threads; load: hey, {args.concurrency} connections "
          f"(batches: 4 connections, {args.batch_size} decisions each), same machine, loopback")
    print("| decision log | single decisions/s | p50 / p99 ms at full load | decisions/s in batches "
          "| at half load: decisions/s | p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['log']} | {r['single_per_s']:.0f} | {r['single_p50_ms']:.1f} / {r['single_p99_ms']:.1f} "
              f"| {r['batch_decisions_per_s']:.0f} | {r['half_load_per_s']:.0f} "
              f"| {r['half_load_p50_ms']:.1f} / {r['half_load_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()

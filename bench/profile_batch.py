"""Where a batched decision's server CPU goes, in process: the Flask app called as the server calls it.

The app (SQLite log in a temporary folder, or PostgreSQL with --database-url; the access log
off, as the bench runs the service) is called through its WSGI entry with a batch of --size
bind requests (the bundled one, as bench/bench_service.py sends), first plainly (CPU per
decision), then under cProfile (CPU time: its cost per Python call swells the Python-heavy parts,
so take its shares as a map and py-spy's for sizes), whose cumulative times are split into the
parts of the batch route: reading the body, deciding, making the records, committing them (chained, inserted,
SQLite's COMMIT), metrics and the JSON answer. The log's watch is off here
(BINDPOLICY_LOG_CHECK_INTERVAL=0): in the service one worker checks every new record too (see
bench/bench_logwatch.py). `--checkout DIR` runs another checkout's code, and `--turns N`
alternates this code and it N times (an A/B in one process's time, CPU per decision each turn).

Run: .venv/bin/python bench/profile_batch.py [--batches 200] [--size 100] [--checkout /tmp/old --turns 4]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # (last: a --checkout's code, on PYTHONPATH, comes first)

# (part, how to find its cumulative time: file suffix and function name), in the order printed
PARTS = [
    ("reading the body (msgspec, the one-pass reader)", "api/routes.py", "_batch_items"),
    ("deciding (the generated path, the version chosen)", "api/routes.py", "_decide_one"),
    ("deciding (the generated path, the version chosen)", "api/routes.py", "_decide_all"),
    ("making the records (canonical JSON of each answer)", "engine/decisionlog.py", "new_record"),
    ("making the records (canonical JSON of each answer)", "engine/decisionlog.py", "new_records"),
    ("committing: chaining (content, hash or MAC)", "engine/decisionlog.py", "_chain"),
    ("committing: the rows' INSERT", "engine/decisionlog.py", "_insert_rows"),
    ("committing: the rows' INSERT", "~", "<method 'executemany' of 'sqlite3.Connection' objects>"),
    ("committing: COMMIT", "engine/decisionlog.py", "commit"),
    ("metrics (prometheus, multiprocess files)", "api/routes.py", "_count"),
    ("the JSON answer (orjson, headers)", "api/routes.py", "_json"),
]


def environ(method: str, path: str, body: bytes) -> dict[str, Any]:
    """A request's WSGI environ as api/front.py hands it to the app (bench/profile_service.py's too)."""
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": True, "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json", "HTTP_HOST": "127.0.0.1:8080",
            "bindpolicy.body": body}  # as api/front.py hands it: the whole body, read


def batch_call(temp: str, size: int, database_url: str | None) -> Callable[[], bytes]:
    """One batch of `size` through the app's WSGI entry, as the service's front calls it."""
    import orjson

    from api.app import create_app
    from tests.conftest import bind_request

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(temp) / "metrics")
    (Path(temp) / "metrics").mkdir(exist_ok=True)
    config: dict[str, Any] = {"DATA_DIR": temp, "RELOAD_INTERVAL": 0, "LOG_CHECK_INTERVAL": 0,
                              "MAX_BATCH": size, "MAX_BATCH_BYTES": 4 * 1024 * 1024}
    if database_url:
        config["DATABASE_URL"] = database_url
    app = create_app(config)
    wsgi = app.wsgi_app
    body = orjson.dumps({"requests": [bind_request()] * size})
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], object]:
        statuses.append(status)
        return lambda data: None

    def call() -> bytes:
        answer = b"".join(wsgi(environ("POST", "/v1/decisions/batch", body), start_response))
        if statuses.pop() != "200 OK":
            raise RuntimeError(f"the batch was not answered 200: {answer[:300]!r}")
        return answer

    return call


def cpu_per_call(call: Callable[[], Any], count: int) -> float:
    """µs of this process's CPU per call, over `count` calls."""
    started = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - started) / count * 1e6


def shares(profile: cProfile.Profile, parts: list[tuple[str, str, str]]) -> dict[str, float]:
    """Each part's share of the Flask app's whole time (its wsgi_app's cumulative time): the
    cumulative time of the functions named by (label, file suffix or prefix, function name),
    summed by label in the parts' order."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    whole = sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                if name == "wsgi_app" and file.endswith("flask/app.py"))
    found: dict[str, float] = {}
    for label, suffix, function in parts:
        spent = sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                    if name == function and (file.endswith(suffix) or file.startswith(suffix)))
        found[label] = found.get(label, 0.0) + spent / whole
    return found


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """This process's code: CPU per decision, then the profile's shares."""
    os.environ.setdefault("BINDPOLICY_LOG_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as temp:
        os.chdir(ROOT)
        call = batch_call(temp, args.size, args.database_url)
        for _ in range(20):
            call()
        figures: dict[str, Any] = {"cpu_us": [cpu_per_call(call, args.batches) / args.size
                                               for _ in range(args.repeat)]}
        if args.no_profile:
            return figures
        profile = cProfile.Profile(time.process_time)  # CPU, as the plain figure (a wall clock counts waits)
        profile.enable()
        for _ in range(args.batches):
            call()
        profile.disable()
    figures["shares"] = shares(profile, PARTS)
    if args.top:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        figures["top"] = out.getvalue()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="plain measurements (CPU per decision each)")
    parser.add_argument("--database-url", help="postgresql://... (default: SQLite in a temporary folder)")
    parser.add_argument("--checkout", type=Path, help="another checkout: A/B its code against this one")
    parser.add_argument("--turns", type=int, default=3, help="with --checkout: alternations of the two")
    parser.add_argument("--top", type=int, default=0, help="print the profile's N costliest functions")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # (a turn's figures, for --checkout)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args)))
        return
    if args.checkout is None:
        figures = measure(args)
        cpu = sorted(figures["cpu_us"])
        print(f"a decision in a batch of {args.size}, through the Flask app in process: "
              f"{cpu[len(cpu) // 2]:.1f} µs of CPU (runs: {', '.join(f'{c:.1f}' for c in cpu)})")
        if args.no_profile:
            return
        print("| part | share | µs |")
        print("|---|---:|---:|")
        median = cpu[len(cpu) // 2]
        for label, share in figures["shares"].items():
            print(f"| {label} | {share:.0%} | {share * median:.1f} |")
        rest = 1 - sum(figures["shares"].values())
        print(f"| the rest (Flask, the route's own work, the group commit's hand-over) | {rest:.0%} | "
              f"{rest * median:.1f} |")
        if args.top:
            print(figures["top"])
        return
    results: dict[str, list[float]] = {"this": [], "checkout": []}
    for _ in range(args.turns):
        for name, where in (("checkout", args.checkout.resolve()), ("this", ROOT)):
            command = [sys.executable, str(ROOT / "bench" / "profile_batch.py"), "--json", "--no-profile",
                       "--batches", str(args.batches), "--size", str(args.size), "--repeat", str(args.repeat)]
            if args.database_url:
                command += ["--database-url", args.database_url]
            out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=where,
                                 env={**os.environ, "PYTHONPATH": str(where)}).stdout
            results[name] += json.loads(out.splitlines()[-1])["cpu_us"]
    for name, cpu in results.items():
        cpu.sort()
        print(f"{name}: median {cpu[len(cpu) // 2]:.1f} µs a decision (runs: {', '.join(f'{c:.1f}' for c in cpu)})")


if __name__ == "__main__":
    main()

"""Where a logged decision's server CPU goes, in process: the Flask app called as the server calls it.

The app (SQLite log in a temporary folder, access log written to /dev/null) is called through
its WSGI entry N times with the bundled bind request, first plainly (CPU per request, and the
same for `/healthz`, the cheapest route through the same stack), then under cProfile, whose
cumulative times are split into the parts issue 10 names: Flask's dispatch, the access log,
reading the body, the decision, making the log record, committing it (one request at a time, so
no group shares the commit), metrics and the JSON answer. What the HTTP server adds on top is
the difference between bench/bench_service.py's server CPU per answer and the total here.

Run: .venv/bin/python bench/profile_service.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from api.app import create_app  # noqa: E402
from api.logs import configure_logging  # noqa: E402
from bench.profile_batch import cpu_per_call, environ, shares  # noqa: E402
from tests.conftest import bind_request  # noqa: E402

# (part, how to find its cumulative time: file suffix and function name), in the order printed
PARTS = [
    ("reading the body (the one-pass reader: strict JSON and the check)", "api/routes.py", "_decision_body"),
    ("the decision (engine: rules, answer)", "api/routes.py", "_decide_one"),
    ("making the log record (canonical JSON of the answer)", "engine/decisionlog.py", "new_record"),
    ("committing the record (SQLite, one transaction, chained)", "engine/decisionlog.py", "write_many"),
    ("metrics (prometheus, multiprocess files)", "prometheus_client/metrics.py", "inc"),
    ("metrics: latency histogram", "prometheus_client/metrics.py", "observe"),
    ("the JSON answer (orjson, headers)", "api/routes.py", "_json"),
    ("the access log (one JSON line)", "api/routes.py", "_access_log"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    configure_logging("INFO")
    logging.getLogger("bindpolicy").handlers[0].setStream(open(os.devnull, "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory() as temp:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(temp) / "metrics")
        (Path(temp) / "metrics").mkdir()
        os.chdir(ROOT)
        app = create_app({"DATA_DIR": temp, "RELOAD_INTERVAL": 0, "LOG_CHECK_INTERVAL": 0})
        wsgi = app.wsgi_app
        body = orjson.dumps(bind_request())

        def decision() -> bytes:
            return b"".join(wsgi(environ("POST", "/v1/decisions", body), lambda *a: None))

        def health() -> bytes:
            return b"".join(wsgi(environ("GET", "/healthz", b""), lambda *a: None))

        for _ in range(300):
            decision()
            health()
        total = cpu_per_call(decision, args.requests)
        healthz = cpu_per_call(health, args.requests)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.requests):
            decision()
        profile.disable()
    found = shares(profile, PARTS)
    print(f"a logged decision through the Flask app, in process: {total:.0f} µs of CPU; /healthz through the "
          f"same stack: {healthz:.0f} µs")
    print("| part | share | µs |")
    print("|---|---:|---:|")
    for label, share in found.items():
        print(f"| {label} | {share:.0%} | {share * total:.0f} |")
    rest = 1 - sum(found.values())
    print(f"| Flask's dispatch and the rest (request context, routing, hooks, response object) "
          f"| {rest:.0%} | {rest * total:.0f} |")


if __name__ == "__main__":
    main()

"""The log beyond one machine: export, impact (local and Ray) and whole-log replay at growing sizes.

For each size (100,000 and 1,000,000 records by default) a SQLite log is written with decisions of
generated requests (policy contents archived), then measured: `log export` to Parquet, impact over
the export with the local engine and with Ray (a local Ray of 2 CPUs), and whole-log replay from
the export. Each line gives seconds, records per second and peak memory (max RSS of this process;
Ray's workers are other processes). Ray's fixed cost is measured alone: the time of an impact over
10 records. The machine is shared: compare ratios within one run, not seconds across runs.

Run: .venv/bin/python bench/bench_logscale.py [--sizes 100000 1000000] [--no-ray]
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.decider import Engine  # noqa: E402
from engine.decisionlog import LogRecord, Store, new_record, open_store  # noqa: E402
from engine.errors import RequestError  # noqa: E402
from engine.generator import generate_requests  # noqa: E402
from engine.impact import run_impact  # noqa: E402
from engine.inputs import request_lines  # noqa: E402
from engine.loader import load_policies  # noqa: E402
from engine.logexport import ExportArchive, export_log, read_records  # noqa: E402
from engine.replay import WHOLE_SET, replay_records  # noqa: E402

NOW = datetime(2025, 7, 1, tzinfo=UTC)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_log(store: Store, engine: Engine, count: int) -> None:
    for version in engine.policies:
        store.save_policy(version.digest, version.name, dict(version.sources))
    store.save_policy(engine.policies.digest, WHOLE_SET, engine.policies.sources)
    batch: list[LogRecord] = []
    start = datetime(2025, 6, 1, tzinfo=UTC)
    step = timedelta(days=30) / count  # a month of decisions: about 30 day partitions
    for index, request in enumerate(generate_requests(count, 5, broken=0.01)):
        logged = start + step * index
        decision_id = f"b{index}"
        try:
            decision = engine.decide(request, now=logged, decision_id=decision_id)
            batch.append(new_record(decision_id=decision_id, outcome="decided", status=200, request=request,
                                    response=decision.to_dict(), duration_us=10, logged_at=logged))
        except RequestError as exc:  # as the service logs it: with the digest of what judged it, if any
            record = new_record(decision_id=decision_id, outcome="rejected", status=400, request=request,
                                response={**exc.to_dict(), "decision_id": decision_id}, duration_us=10,
                                logged_at=logged)
            batch.append(replace(record, policy_digest=exc.policy_digest) if exc.policy_digest else record)
        if len(batch) >= 1000:
            store.write_many(batch)
            batch = []
    if batch:
        store.write_many(batch)


def line(what: str, count: int, seconds: float) -> None:
    print(f"{what:<28} {count:>10,} records {seconds:8.1f} s {count / seconds:>10,.0f}/s  peak {peak_mib():6.0f} MiB",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    policies = load_policies(ROOT / "policies")
    engine = Engine(policies)
    if not args.no_ray:
        import ray

        from engine.rayengine import run_impact_ray

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"ray.init (2 CPUs): {time.perf_counter() - started:.1f} s", flush=True)
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as temp:
            store = open_store(str(Path(temp) / "decisions.db"))
            started = time.perf_counter()
            write_log(store, engine, size)
            line("write the log (SQLite)", size, time.perf_counter() - started)
            out = Path(temp) / "export"
            started = time.perf_counter()
            export_log(store, out)
            line("log export (Parquet)", size, time.perf_counter() - started)
            started = time.perf_counter()
            report = run_impact(ROOT / "policies", "v1", "v2", request_lines([str(out)]), workers=2, now=NOW)
            line("impact, local (2 procs)", report.total, time.perf_counter() - started)
            if not args.no_ray:
                started = time.perf_counter()
                tiny = Path(temp) / "tiny.jsonl"
                tiny.write_text("".join(text + "\n" for text in itertools.islice(request_lines([str(out)]), 10)))
                run_impact_ray(policies, "v1", "v2", [str(tiny)], now=NOW)
                print(f"ray fixed cost (impact of a tiny file): {time.perf_counter() - started:.1f} s", flush=True)
                started = time.perf_counter()
                on_ray = run_impact_ray(policies, "v1", "v2", [str(out)], now=NOW)
                line("impact, Ray (2 CPUs)", on_ray.total, time.perf_counter() - started)
            started = time.perf_counter()
            summary = replay_records(ExportArchive(out), read_records(out))
            line("replay, whole log (1 proc)", summary.total, time.perf_counter() - started)
            assert summary.reproduced == summary.total, summary.describe()
            store.close()


if __name__ == "__main__":
    main()

"""The log beyond one machine: export, verify, impact (local and Ray) and replay at growing sizes.

For each size (100,000 and 1,000,000 records by default) a keyed SQLite log (HMAC chain, as the
service writes with BINDPOLICY_LOG_MAC_KEY_FILE) is built, then measured. The log is built as
the service builds it, without HTTP: every record is a real decision (or rejection, with the
digest of what judged it) made by the engine at its own logged time under its own decision id,
for requests drawn in turn from a pool of 20,000 generated ones (1% broken; generating a request
costs more than deciding it), then chained and MACed by the store's own code
(`Store.write_many`) in transactions of 5,000. Two forked processes decide while this one
chains and writes, in order. The records verify and replay as the service's do (the bench
checks it: every line below asserts its outcome).

- reference: one process deciding the first 100,000 logged requests once, in memory (no I/O):
  the figure every other line is a ratio to (records per second over the reference's);
- `log export` to Parquet; `log verify --export` (MACs checked with the key);
- impact v1 -> v2 over the export: local engine (2 processes) and Ray (a local Ray of 2 CPUs);
- replay: the whole log from the export (1 process), the whole log on Ray straight from the
  database (workers reading ranges of records), and (up to --week-up-to records) one week.

Each line gives seconds, records per second, the ratio to the reference and the peak memory of
the phase (max RSS of a forked child that runs it alone; Ray's phases run in this process and
its workers are other processes: the driver's peak only). Ray's fixed cost is measured alone:
ray.init, then an impact over 10 records (a job: actors started, policies loaded). The machine is
shared (its load average is printed): compare ratios within one run, not seconds across runs.

Run: .venv/bin/python bench/bench_logscale.py [--sizes 100000 1000000] [--no-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.decider import Engine  # noqa: E402
from engine.decisionlog import ChainVerifier, LogRecord, Store, new_record, open_store  # noqa: E402
from engine.errors import RequestError  # noqa: E402
from engine.generator import generate_requests  # noqa: E402
from engine.impact import run_impact  # noqa: E402
from engine.inputs import numbered_lines, request_lines  # noqa: E402
from engine.loader import load_policies  # noqa: E402
from engine.logexport import ExportArchive, export_log, read_records, verify_export  # noqa: E402
from engine.logkeys import MacKey, MacKeyring  # noqa: E402
from engine.replay import replay_records  # noqa: E402
from engine.sources import SET_VERSION  # noqa: E402
from engine.versions import PolicySet  # noqa: E402

NOW = datetime(2025, 7, 1, tzinfo=UTC)
START = datetime(2025, 6, 1, tzinfo=UTC)
KEYS = MacKeyring((MacKey(bytes(range(32))),))
POOL = 20_000  # distinct generated requests the log's records are drawn from, in turn
CHUNK = 5_000  # records decided by a process, then chained and written in one transaction
REFERENCE = 100_000  # records the reference decides
_POOL: list[dict[str, Any]] = []  # filled before the deciding processes fork
_ENGINE: list[Engine] = []


def _decided(span: tuple[int, int, int]) -> list[LogRecord]:
    """Records `first..end` of a log of `size`, each decided by the engine at its logged time."""
    first, end, size = span
    engine, step = _ENGINE[0], timedelta(days=30) / size  # a month of decisions: about 30 day partitions
    out: list[LogRecord] = []
    for index in range(first, end):
        request, logged, decision_id = _POOL[index % len(_POOL)], START + step * index, f"b{index}"
        try:
            decision = engine.decide(request, now=logged, decision_id=decision_id)
            out.append(new_record(decision_id=decision_id, outcome="decided", status=200, request=request,
                                  response=decision.to_dict(), duration_us=10, logged_at=logged))
        except RequestError as exc:  # as the service logs it: with the digest of what judged it, if any
            record = new_record(decision_id=decision_id, outcome="rejected", status=400, request=request,
                                response={**exc.to_dict(), "decision_id": decision_id}, duration_us=10,
                                logged_at=logged)
            out.append(replace(record, policy_digest=exc.policy_digest) if exc.policy_digest else record)
    return out


def write_log(store: Store, engine: Engine, count: int, processes: int = 2) -> None:
    """The log of `count` records: decided in `processes` forked processes, chunk by chunk, and
    chained and written here in order, a transaction per chunk (the store's own chain code)."""
    for version in engine.policies:
        store.save_policy(version.digest, version.name, dict(version.sources))
    store.save_policy(engine.policies.digest, SET_VERSION, engine.policies.sources)
    if not _POOL:
        _POOL.extend(generate_requests(POOL, 5, broken=0.01))
    _ENGINE[:] = [engine]
    spans = [(first, min(first + CHUNK, count), count) for first in range(0, count, CHUNK)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:  # a few chunks ahead at most
        for start in range(0, len(spans), 2 * processes):
            for records in pool.imap(_decided, spans[start:start + 2 * processes]):
                store.write_many(records)


def _child(work: Callable[[], int], pipe: Any) -> None:
    started = time.perf_counter()
    count = work()
    pipe.send((count, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def rss() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def alone(work: Callable[[], int]) -> tuple[int, float, float]:
    """(records, seconds, peak MiB) of `work` run in a forked child of its own (its peak counts what
    it shares with this process at the fork: this process's own size is printed at each size)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(work, send))
    child.start()
    result = receive.recv()
    child.join()
    return result  # type: ignore[no-any-return]


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


class Table:
    def __init__(self) -> None:
        self.reference: float | None = None

    def line(self, what: str, count: int, seconds: float, peak: float | None = None) -> None:
        rate = count / seconds
        if self.reference is None:
            self.reference = rate
        memory = f"peak {peak:6.0f} MiB" if peak is not None else "peak      - (Ray)"
        print(f"{what:<38} {count:>10,} records {seconds:8.1f} s {rate:>10,.0f}/s  x{rate / self.reference:5.2f}  "
              f"{memory}  ({load()})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--week-up-to", type=int, default=100_000, help="replay one week only up to this size")
    parser.add_argument("--folder", default=None, help="where the logs are built (default: a temporary folder)")
    parser.add_argument("--log", default=None, help="measure this log (built by this script) instead of building one")
    args = parser.parse_args()
    policies = load_policies(ROOT / "policies")
    print(f"{os.cpu_count()} CPUs, {load()}", flush=True)
    for size in args.sizes:
        print(f"--- {size:,} records", flush=True)
        with tempfile.TemporaryDirectory(dir=args.folder) as temp:
            measure(policies, size, Path(temp), ray_too=not args.no_ray, week=size <= args.week_up_to, log=args.log)


def measure(policies: PolicySet, size: int, temp: Path, *, ray_too: bool, week: bool, log: str | None) -> None:
    engine = Engine(policies)
    path = Path(log) if log else temp / "decisions.db"
    store = open_store(str(path), keys=KEYS)
    if log:
        assert store.head()[0] == size, f"{log} holds {store.head()[0]:,} records, not {size:,}"
    else:
        started = time.perf_counter()
        write_log(store, engine, size)
        seconds = time.perf_counter() - started
        print(f"(the log built in {seconds:.0f} s: {size / seconds:,.0f} records/s; {load()})", flush=True)
    print(f"(the log: {path.stat().st_size / 2**20:,.0f} MiB; this process {rss():,.0f} MiB)", flush=True)
    table = Table()
    out = temp / "export"

    def decide_once() -> int:
        count = 0
        for record in store.query(limit=REFERENCE):
            count += 1
            with contextlib.suppress(RequestError, TypeError, ValueError):
                engine.decide(record.request, now=NOW, decision_id="x")
        return count

    def verify() -> int:
        report = verify_export(out, KEYS)
        assert report.exit_code == 0 and report.keyed == size, report.describe()
        return report.records

    def replay_all() -> int:
        summary = replay_records(ExportArchive(out), read_records(out), ChainVerifier(KEYS))
        assert summary.reproduced + summary.nothing == summary.total == size and not summary.breach, \
            summary.describe()
        return summary.total

    def replay_week() -> int:
        summary = replay_records(ExportArchive(out), read_records(out), ChainVerifier(KEYS),
                                 since="2025-06-08T00:00:00.000000Z", until="2025-06-15T00:00:00.000000Z")
        assert summary.reproduced == summary.total > 0 and not summary.breach, summary.describe()
        return summary.total

    table.line(f"reference: decide {REFERENCE:,}, 1 process", *alone(decide_once))
    table.line("log export (Parquet)", *alone(lambda: export_log(store, out).records))
    table.line("log verify --export (MACs)", *alone(verify))
    table.line("impact, local (2 processes)", *alone(
        lambda: run_impact(policies, "v1", "v2", numbered_lines([str(out)]), workers=2, now=NOW).total))
    table.line("replay, whole log from the export (1 p.)", *alone(replay_all))
    if week:
        table.line("replay, one week (1 process)", *alone(replay_week))
    if ray_too:
        ray_lines(policies, store, path, table, temp, size)
    store.close()


def ray_lines(policies: PolicySet, store: Store, path: Path, table: Table, temp: Path, size: int) -> None:
    """Impact over the export and replay from the database, on a local Ray of 2 CPUs started here."""
    import ray

    from engine.rayengine import run_impact_ray, run_replay_log_ray

    out = str(temp / "export")
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    begun = time.perf_counter() - started
    try:
        started = time.perf_counter()
        tiny = temp / "tiny.jsonl"
        tiny.write_text("".join(text + "\n" for text in itertools.islice(request_lines([out]), 10)))
        run_impact_ray(policies, "v1", "v2", [str(tiny)], now=NOW)
        print(f"Ray's fixed cost: ray.init (2 CPUs) {begun:.1f} s, then a job (an impact of 10 records) "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        on_ray = run_impact_ray(policies, "v1", "v2", [out], now=NOW)
        table.line("impact, Ray (2 CPUs)", on_ray.total, time.perf_counter() - started, _peak())
        started = time.perf_counter()
        summary = run_replay_log_ray(store, f"sqlite:///{path.resolve()}", workers=2)
        assert summary.reproduced + summary.nothing == summary.total == size and not summary.breach, \
            summary.describe()
        table.line("replay, whole log, Ray from the database", summary.total, time.perf_counter() - started, _peak())
    finally:
        ray.shutdown()


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024




if __name__ == "__main__":
    main()

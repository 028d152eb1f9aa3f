"""What one commit of the decision log costs PostgreSQL itself, by part.

A fresh PostgreSQL server with fsync ON (as bench/bench_service.py starts it) and one
connection, no other writer: each part is sent --commits times (the store's own commits by
`PostgresStore.write_many`: BEGIN, the chain's advisory lock, the read of its head and a COPY in
one message, the rows in another, committed without a flush under the lock and flushed after
it; the store's commits before it by hand: the lock and the head, then the rows as an INSERT of
literals and COMMIT, flushed under the lock), and the server's CPU (every process of it, from /proc:
the backend, the WAL writer, the checkpointer) is divided by the count. The parts take turns,
round after round; each figure is the median of its rounds. The server's CPU is what the
service's figures leave out (bench_service counts it apart): on one machine it shares the
cores with the service and the load generator.

Parts: a commit of one record (the service's single decision, alone in its group), as the store
sends it and as it sent it before; the latter with `synchronous_commit` off for that transaction
(no flush: the difference is the flush's cost); BEGIN, the lock and the head, then COMMIT (no
row); a round trip (`SELECT 1`); a commit of --group records, both ways.

Run: .venv/bin/python bench/bench_pgcommit.py [--commits 1000] [--rounds 3] [--group 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pglog import server_cpu  # noqa: E402
from engine.decisionlog import _HEAD, LogRecord, PostgresStore, new_record  # noqa: E402
from tests.conftest import bind_request  # noqa: E402
from tests.postgres import fresh_schema, postgres_cluster  # noqa: E402

RESPONSE = {"decision": "allow", "rule": None, "violations": [], "warnings": [], "outputs": {"fee": 12},
            "policy": {"version": "2025-07-01", "digest": "d" * 64, "runtime": "native"}, "at": "x" * 27}


def record() -> LogRecord:
    return new_record(decision_id=uuid.uuid4().hex, outcome="decided", status=200, request=bind_request(),
                      response=RESPONSE, duration_us=40)


def parts(store: PostgresStore, conn: Any, group: int) -> dict[str, Callable[[], object]]:
    lock_and_head = b"BEGIN; SELECT pg_advisory_xact_lock(%d); %s" % (store.LOCK, _HEAD.encode())

    def commit(size: int, tail: bytes) -> Callable[[], object]:
        def send() -> None:
            head = store._run(conn, lock_and_head)
            seq, prev = int(head.get_value(0, 0)), head.get_value(0, 1).decode()
            chained = store._chain([record() for _ in range(size)], (seq, prev))
            store._run(conn, store._literal_rows(conn, chained) + tail)
        return send

    return {
        "a commit of one record as the store sends it (COPY, flushed after the lock)":
            lambda: store.write_many([record()]),
        "a commit of one record as an INSERT of literal rows (the store before)": commit(1, b"; COMMIT"),
        "the same, not flushed (synchronous_commit off)": commit(1, b"; SET LOCAL synchronous_commit TO off; COMMIT"),
        "BEGIN, the lock and the head, then COMMIT (no row)": lambda: (store._run(conn, lock_and_head),
                                                                     store._run(conn, b"COMMIT")),
        "a round trip (SELECT 1)": lambda: store._run(conn, b"SELECT 1"),
        f"a commit of {group} records as the store sends it":
            lambda: store.write_many([record() for _ in range(group)]),
        f"a commit of {group} records as an INSERT of literal rows": commit(group, b"; COMMIT"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=1000, help="commits (or statements) a part, a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group", type=int, default=8, help="records of the last part's commits")
    args = parser.parse_args()
    with postgres_cluster(fsync=True) as cluster:
        store = PostgresStore(fresh_schema(cluster.url, "commits"))
        store.write(record())  # a head to chain on
        conn = store._connect()
        runs = parts(store, conn, args.group)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for name, send in runs.items():
                cpu, began = server_cpu(cluster.data), time.perf_counter()
                for _ in range(args.commits):
                    send()
                figures[name].append(((server_cpu(cluster.data) - cpu) / args.commits * 1e6,
                                      (time.perf_counter() - began) / args.commits * 1e6))
        conn.close()
        store.close()
    print(f"PostgreSQL fsync on, one connection, {args.commits} a part a round, median of {args.rounds} rounds")
    print("| part | PostgreSQL CPU µs | clock µs |")
    print("|---|---:|---:|")
    for name, values in figures.items():
        print(f"| {name} | {statistics.median(v[0] for v in values):.0f} "
              f"| {statistics.median(v[1] for v in values):.0f} |")


if __name__ == "__main__":
    main()

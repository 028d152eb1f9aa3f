"""The PostgreSQL store's group commit: the chain's lock, the group taken once it is held, and
several writers (the service's processes, replicas) on one chain."""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg
import pytest

from engine.decisionlog import LogError, LogRecord, PostgresStore, Store, new_record, open_store
from engine.logkeys import MacKey, MacKeyring

from .conftest import in_threads
from .postgres import fresh_schema, postgres_cluster

pytestmark = pytest.mark.slow


def record(name: str) -> LogRecord:
    return new_record(decision_id=name, outcome="decided", status=200, request={"n": name},
                      response={"decision": "allow"}, duration_us=1)


@pytest.fixture
def schema_url(postgres_url: str) -> str:
    return fresh_schema(postgres_url, f"plog_{uuid.uuid4().hex[:12]}")


def test_callers_who_come_while_the_leader_waits_for_the_lock_commit_with_it(schema_url: str) -> None:
    store = open_store(schema_url)
    assert isinstance(store, PostgresStore)
    store.write(record("first"))
    store.batches = store.records = 0
    other = psycopg.connect(schema_url, autocommit=True)  # another process holding the chain's lock
    other.execute("SELECT pg_advisory_lock(%s)", (PostgresStore.LOCK,))
    threads = [threading.Thread(target=store.write, args=(record(f"r{i}"),)) for i in range(5)]
    threads[0].start()
    time.sleep(0.3)  # the leader is waiting for the lock; the others queue behind it
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.3)
    assert store.records == 0  # nothing committed while the lock is held elsewhere
    other.execute("SELECT pg_advisory_unlock(%s)", (PostgresStore.LOCK,))
    for thread in threads:
        thread.join(10)
    other.close()
    assert (store.batches, store.records) == (1, 5)  # one commit, one flush, for all five
    assert store.head()[0] == 6 and store.verify() is None
    store.close()


def test_two_writers_on_one_chain_keep_it_whole(schema_url: str) -> None:
    keys = MacKeyring((MacKey(b"k" * 32),))
    stores = [open_store(schema_url, keys=keys) for _ in range(2)]  # as two worker processes

    def write(store: Store, prefix: str) -> None:
        for number in range(15):
            if number % 5 == 4:
                store.write_many([record(f"{prefix}-{number}-{i}") for i in range(7)])
            else:
                store.write(record(f"{prefix}-{number}"))

    in_threads(write, [(store, f"s{s}t{t}") for s, store in enumerate(stores) for t in range(4)])
    expected = 2 * 4 * (12 + 3 * 7)
    assert stores[0].head()[0] == expected
    assert stores[0].verify() is None
    assert len({r.decision_id for r in stores[1].query()}) == expected
    for store in stores:
        store.close()


ODD_TEXT = ("it's a \\ back\\\\slash, \\N, \\., %s and %% and %(x)s, $$ dollars $$, E'x', \n\t newline, \r\n, "
            "é 中文 🙂, ''")


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_rows_sent_by_copy_are_stored_as_they_are(schema_url: str, conforming: str) -> None:
    # Every row goes by COPY's text format: backslashes, tabs, newlines and carriage returns
    # escaped, NULL as \N (a text "\N" stays text), whatever the server reads in plain strings.
    url = schema_url.replace("options=", f"options=-cstandard_conforming_strings%3D{conforming}%20")
    keys = MacKeyring((MacKey(b"k" * 32),))
    store = open_store(url, keys=keys)
    assert isinstance(store, PostgresStore)
    body = json.dumps({"text": ODD_TEXT, ODD_TEXT: [1, None]}, ensure_ascii=False, indent=1)  # as sent
    odd = new_record(decision_id="odd'id\\\t", outcome="decided", status=200, request=json.loads(body),
                     response={"r": ODD_TEXT}, duration_us=2**40, request_text=body)
    plain = new_record(decision_id="\\N", outcome="rejected", status=400, request="\\N", response={},
                       duration_us=0)
    written = store.write_many([odd, plain])
    written += store.write_many([record(f"many-{number}") for number in range(40)])  # a batch's size
    stored = store.get("odd'id\\\t")
    assert stored is not None and stored.request == json.loads(body) and stored.response == {"r": ODD_TEXT}
    assert stored.request_text == body and stored.duration_us == 2**40 and stored.hash == written[0].hash
    again = store.get("\\N")
    assert again is not None and again.request == "\\N" and again.action is None  # NULL, not the text
    # Each hash is the one the record's own chaining gives (LogRecord.chained), on the one before.
    previous = "0" * 64
    for number, one in enumerate(written, 1):
        assert one.seq == number and one.prev_hash == previous
        assert one.hash == store.get(one.decision_id).hash == one.chained(number, previous, keys).hash  # type: ignore[union-attr]
        previous = one.hash
    assert store.verify() is None
    store.close()


def test_a_row_the_table_refuses_after_its_copy_fails_its_caller_alone(schema_url: str) -> None:
    """A duplicate decision_id is refused by the server at the COPY's end, the commit rolled
    back; its caller alone fails, the others' records commit, and the next write goes on."""
    store = open_store(schema_url)
    store.write(record("taken"))
    failed: list[BaseException] = []

    def write(records: list[LogRecord]) -> None:
        try:
            store.write_many(records)
        except LogError as exc:
            failed.append(exc)

    holder = psycopg.connect(schema_url, autocommit=True)  # the three callers queue while the lock is held
    holder.execute("SELECT pg_advisory_lock(%s)", (PostgresStore.LOCK,))
    threads = [threading.Thread(target=write, args=(records,))
               for records in ([record("c")], [record("taken")], [record(f"b{i}") for i in range(50)])]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    holder.execute("SELECT pg_advisory_unlock(%s)", (PostgresStore.LOCK,))
    for thread in threads:
        thread.join(10)
    holder.close()
    assert len(failed) == 1 and "decisions_decision_id_key" in str(failed[0])
    store.write(record("after"))
    found = [r.decision_id for r in store.query()]
    assert sorted(found) == sorted(["taken", "c", "after", *[f"b{i}" for i in range(50)]])
    assert store.verify() is None
    store.close()


def test_a_cell_postgresql_cannot_hold_fails_its_caller_alone(schema_url: str) -> None:
    store = open_store(schema_url)
    store.write(record("before"))
    bad = new_record(decision_id="nul", outcome="rejected", status=400, request="a\0b", response={},
                     duration_us=1, request_text="a\0b")
    with pytest.raises(LogError, match="NUL"):
        store.write(bad)
    store.write(record("after"))
    assert [r.decision_id for r in store.query()] == ["before", "after"] and store.verify() is None
    store.close()


def test_statements_sent_through_libpq_fail_as_psycopg_fails_and_the_connection_goes_on(schema_url: str) -> None:
    """The writes' statements go through libpq itself (PostgresStore._run): an error is the
    exception psycopg raises for it, and after the rollback the connection is idle and usable."""
    store = open_store(schema_url)
    assert isinstance(store, PostgresStore)
    conn = store._connect()
    with pytest.raises(psycopg.errors.DivisionByZero, match="division by zero"):
        store._run(conn, b"BEGIN; SELECT 1 / 0; COMMIT")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    store._rollback(conn)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert store._run(conn, b"SELECT 6 * 7").get_value(0, 0) == b"42"
    conn.close()
    with pytest.raises(psycopg.OperationalError):  # a closed connection: psycopg's own error
        store._run(conn, b"SELECT 1")
    store.write(record("after"))
    assert store.head()[0] == 1 and store.verify() is None
    store.close()


def test_a_close_waits_for_the_commit_in_flight(schema_url: str) -> None:
    """close() from another thread while a leader's commit is in libpq: the commit ends first,
    whole, and the connection is closed after it (not freed under the call using it)."""
    store = open_store(schema_url)
    assert isinstance(store, PostgresStore)
    store.write(record("first"))
    holder = psycopg.connect(schema_url, autocommit=True)  # holds the chain's lock: the commit waits in libpq
    holder.execute("SELECT pg_advisory_lock(%s)", (PostgresStore.LOCK,))
    writing = threading.Thread(target=store.write, args=(record("in flight"),))
    writing.start()
    time.sleep(0.5)
    closing = threading.Thread(target=store.close)
    closing.start()
    time.sleep(0.5)
    assert closing.is_alive()  # waiting for the commit
    holder.execute("SELECT pg_advisory_unlock(%s)", (PostgresStore.LOCK,))
    writing.join(10)
    closing.join(10)
    assert not writing.is_alive() and not closing.is_alive()
    holder.close()
    reader = open_store(schema_url, read_only=True)
    assert [r.decision_id for r in reader.query()] == ["first", "in flight"] and reader.verify() is None
    reader.close()


def test_a_commit_returns_only_once_its_rows_are_flushed() -> None:
    """The rows' transaction commits without waiting for its flush (the chain's lock goes at
    once); the write returns only after a flush that covers it. A database crashed the moment a
    write returned (an immediate stop: the WAL not yet written out is lost, its next start
    replays the rest) still holds every record returned, each time."""
    with postgres_cluster(fsync=True) as cluster:
        url = fresh_schema(cluster.url, "durable")
        for attempt in range(3):
            store = open_store(url)
            written = store.write_many([record(f"try{attempt}-{number}") for number in range(3)])
            cluster.crash()
            store.close()
            cluster.start()
            reader = open_store(url, read_only=True)
            assert reader.head() == (written[-1].seq, written[-1].hash)
            assert reader.verify() is None
            reader.close()

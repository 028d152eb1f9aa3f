"""The log writer (engine/logwriter.py): every worker's records chained and committed by one
writer, answered only once committed; bad frames answered, never a crash; a dead writer fails
its callers, loses and duplicates nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from engine.decisionlog import LogError, LogRecord, PostgresStore, Store, new_record, open_store
from engine.logkeys import MacKey, MacKeyring
from engine.logwriter import WIRE, LogWriter, WriterClient, listening_socket

from .conftest import bind_request, in_threads
from .postgres import fresh_schema

KEYS = MacKeyring((MacKey(b"w" * 32),))


def record(name: str, **fields: object) -> LogRecord:
    return new_record(decision_id=name, outcome="decided", status=200, request={"n": name, **fields},
                      response={"decision": "allow"}, duration_us=1)


def running_writer(store: Store, path: str) -> Iterator[LogWriter]:
    writer = LogWriter(store, listening_socket(path))
    thread = threading.Thread(target=writer.serve)
    thread.start()
    try:
        yield writer
    finally:
        writer.stopping.set()
        thread.join(10)
        writer.listener.close()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/log.db"


@pytest.fixture
def writer(store_url: str, tmp_path: Path) -> Iterator[tuple[LogWriter, str, Store]]:
    store = open_store(store_url, keys=KEYS)
    if isinstance(store, PostgresStore):
        store.sole_writer = True
    path = str(tmp_path / "w.sock")
    yield from ((w, path, store) for w in running_writer(store, path))
    store.close()


def write_from_two_workers(path: str, reader: Store) -> dict[str, list[int]]:
    """Two workers' worth of clients (4 threads each), singles and batches; each thread's seqs."""
    workers = [WriterClient(path, reader), WriterClient(path, reader)]
    seqs: dict[str, list[int]] = {}

    def work(client: WriterClient, name: str) -> None:
        mine = seqs.setdefault(name, [])
        for number in range(12):
            records = [record(f"{name}-{number}-{i}") for i in range(1 if number % 4 else 5)]
            chained = client.write_many(records)
            assert [r.decision_id for r in chained] == [r.decision_id for r in records]
            mine.extend(r.seq for r in chained)

    in_threads(work, [(client, f"w{w}t{t}") for w, client in enumerate(workers) for t in range(4)])
    return seqs


def test_records_from_two_workers_are_chained_in_order_and_verify(writer: tuple[LogWriter, str, Store]) -> None:
    log_writer, path, store = writer
    seqs = write_from_two_workers(path, store)
    expected = 8 * (9 + 3 * 5)
    assert store.head()[0] == expected and store.verify() is None  # one keyed chain, every record in it
    stored = {r.decision_id: r.seq for r in store.query()}
    assert len(stored) == expected
    for name, mine in seqs.items():
        assert mine == sorted(mine)  # each caller's records in the order it sent them
        assert all(stored[f"{name}-{n}-0"] in mine for n in range(12))  # the seqs answered are the stored ones
    assert log_writer.commits < expected  # grouped: fewer commits than calls


def test_bad_frames_are_answered_and_the_writer_goes_on(writer: tuple[LogWriter, str, Store]) -> None:
    _, path, store = writer
    good = list(orjson.loads(orjson.dumps([getattr(record("x"), n) for n in WIRE])))
    frames = [b"not json", b"{}", b"[]", orjson.dumps([[1, 2]]), orjson.dumps([[*good[:3], True, *good[4:]]]),
              orjson.dumps([[*good[:-1], None]]), b"[" + b"9" * 30 + b"]"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        for frame in frames:
            sock.sendall(len(frame).to_bytes(4, "big") + frame)
            size = int.from_bytes(sock.recv(4), "big")
            answer = orjson.loads(sock.recv(size, socket.MSG_WAITALL))
            assert answer.get("error")
        sock.sendall((2**31).to_bytes(4, "big"))  # over the bound: answered, then closed
        size = int.from_bytes(sock.recv(4), "big")
        assert "over the writer's" in orjson.loads(sock.recv(size, socket.MSG_WAITALL))["error"]
        assert sock.recv(1) == b""
    assert WriterClient(path, store).write_many([record("after")])[0].seq == 1  # still serving
    assert store.head()[0] == 1 and store.verify() is None


def test_a_record_that_cannot_be_stored_fails_its_caller_alone(writer: tuple[LogWriter, str, Store],
                                                              store_url: str) -> None:
    _, path, store = writer
    client = WriterClient(path, store)
    client.write_many([record("one")])
    with pytest.raises(LogError, match="could not commit"):
        client.write_many([record("one")])  # the same decision id: refused by the table
    assert store.last_error is not None
    assert client.write_many([record("two")])[0].seq == 2
    assert store.last_error is None and store.verify() is None


def test_no_writer_is_a_log_error_and_nothing_is_sent_twice(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/log.db")
    client = WriterClient(str(tmp_path / "none.sock"), store, timeout=1.0)
    with pytest.raises(LogError, match="writer did not answer"):
        client.write_many([record("lost")])
    assert store.last_error is not None and store.head()[0] == 0
    # A writer that takes a call and dies before answering: the caller hears it at once.
    listener = listening_socket(str(tmp_path / "dies.sock"))
    client = WriterClient(str(tmp_path / "dies.sock"), store, timeout=5.0)

    def die() -> None:
        conn, _ = listener.accept()
        conn.recv(1 << 16)
        conn.close()

    thread = threading.Thread(target=die)
    thread.start()
    with pytest.raises(LogError, match="writer did not answer"):
        client.write_many([record("unanswered")])
    thread.join(5)
    listener.close()


@pytest.mark.slow
def test_the_writer_on_postgres_chains_on_its_own_head_and_on_anyone_elses(postgres_url: str,
                                                                           tmp_path: Path) -> None:
    url = fresh_schema(postgres_url, f"lw_{uuid.uuid4().hex[:12]}")
    store = open_store(url, keys=KEYS)
    assert isinstance(store, PostgresStore)
    store.sole_writer = True
    other = open_store(url, keys=KEYS)  # a worker of the old mode (or another machine) on the same chain
    path = str(tmp_path / "w.sock")
    for _ in running_writer(store, path):
        write_from_two_workers(path, other)
        before = store.records
        other.write_many([record(f"elsewhere-{i}") for i in range(3)])  # the writer's head moves under it
        client = WriterClient(path, other)
        assert client.write_many([record("after-elsewhere")])[0].seq == 8 * 24 + 4
        assert store.records == before + 1
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM decisions").fetchone() == (8 * 24 + 4,)
    assert other.verify() is None
    store.close()
    other.close()


def writer_pid(supervisor: int) -> int | None:
    """The pid of the log writer the supervisor runs (a child whose command is engine.logwriter)."""
    for task in os.listdir(f"/proc/{supervisor}/task"):
        for child in Path(f"/proc/{supervisor}/task/{task}/children").read_text().split():
            with contextlib.suppress(OSError):
                if b"engine.logwriter" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
    return None


@pytest.mark.slow
def test_the_service_with_its_writer_killed_mid_run_answers_503_and_loses_nothing(tmp_path: Path,
                                                                                  postgres_url: str) -> None:
    from .test_server import call, start_server

    url = fresh_schema(postgres_url, f"lwk_{uuid.uuid4().hex[:12]}")
    server = start_server(tmp_path, database_url=url, env={"BINDPOLICY_LOG_WRITER": "process"})
    answered: dict[int, list[str]] = {}
    statuses: list[int] = []
    stop = threading.Event()

    def send(number: int) -> None:  # one client: each decision after the last one's answer
        mine = answered.setdefault(number, [])
        while not stop.is_set():
            status, body = call(server.url + "/v1/decisions", bind_request(), timeout=15)
            statuses.append(status)
            if status == 200:
                mine.append(body["decision_id"])
            else:
                assert status == 503 and body["error"]["code"] == "log_unavailable", body

    try:
        first = writer_pid(server.process.pid)
        assert first is not None
        clients = [threading.Thread(target=send, args=(n,)) for n in range(4)]
        for client in clients:
            client.start()
        time.sleep(1.5)
        os.kill(first, signal.SIGKILL)
        time.sleep(2.5)
        stop.set()
        for client in clients:
            client.join(30)
        print(f"\nwriter killed mid-run: {statuses.count(200)} answered, {statuses.count(503)} 503s")
        assert set(statuses) <= {200, 503}
        second = writer_pid(server.process.pid)
        assert second not in (None, first)  # restarted by the supervisor
        assert call(server.url + "/v1/decisions", bind_request())[0] == 200
    finally:
        stop.set()
        server.stop()
    store = open_store(url, read_only=True)
    assert store.verify() is None
    logged = {r.decision_id: r.seq for r in store.query()}
    for mine in answered.values():
        assert all(d in logged for d in mine)  # every answered decision is in the log
        assert [logged[d] for d in mine] == sorted(logged[d] for d in mine)  # in the order answered
    assert sum(map(len, answered.values())) > 20


@pytest.mark.parametrize("setting, expected", [(None, "inline"), ("process", "process"), ("bogus", None)])
def test_serve_hands_the_log_writer_setting_to_the_supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str],
                                                              setting: str | None, expected: str | None) -> None:
    from engine.cli import main

    from .conftest import POLICIES
    from .test_serve_loop import SET_BY_SERVE

    for name in (*SET_BY_SERVE, "BINDPOLICY_LOG_WRITER"):  # serve sets them for its workers: as they were after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    if setting is not None:
        monkeypatch.setenv("BINDPOLICY_LOG_WRITER", setting)
    started: list[list[str]] = []

    class Started(Exception):
        pass

    def execv(_path: str, argv: list[str]) -> None:
        started.append(argv)
        raise Started

    monkeypatch.setattr(os, "execv", execv)
    if expected is None:
        assert main(["serve", "--policies", str(POLICIES), "--data", str(tmp_path / "data")]) == 2
        assert "BINDPOLICY_LOG_WRITER must be one of inline, process, not 'bogus'" in capsys.readouterr().err
        return
    with pytest.raises(Started):
        main(["serve", "--policies", str(POLICIES), "--data", str(tmp_path / "data")])
    argv = started[0]
    assert argv[argv.index("--log-writer") + 1] == expected
    assert argv[argv.index("--database-url") + 1] == str(tmp_path / "data" / "decisions.db")

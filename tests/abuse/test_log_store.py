"""The log's store and the audit commands against odd records, a database that goes away or
fills up, and a start-up race: answers stay clean (503, exit 1 naming the record, exit 2 saying
what could not be read), and never a traceback."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.decisionlog import COLUMNS, open_store
from engine.merkle import inclusion_proof, leaf_hash, node_hash, root_of, verify_inclusion
from engine.replay import BROKEN, NOTHING, REPRODUCED, replay

from ..conftest import bind_request, make_app

LOG = {"Authorization": "Bearer log-secret"}


def filled(tmp_path: Path, count: int = 6) -> tuple[Any, Path]:
    app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}")
    client = app.test_client()
    for _ in range(count):
        client.post("/v1/decisions", json=bind_request())
    return app, tmp_path / "data"


def sql(db: Path, statement: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(statement)
    conn.close()


ODD_RECORDS = {
    "status as text": ("UPDATE decisions SET status = 'two hundred' WHERE seq = 3", "its status is str"),
    "request as a blob": ("UPDATE decisions SET request = X'7B7D00FF' WHERE seq = 3", "its request is bytes"),
    "request not UTF-8": ("UPDATE decisions SET request = CAST(X'7B22FF227D' AS TEXT) WHERE seq = 3",
                          "not valid Unicode"),
    "request nested 1000 deep": (f"UPDATE decisions SET request = '{'[' * 1000}{']' * 1000}' WHERE seq = 3",
                                 "does not match its hash"),
    "request nested 5000 deep": (f"UPDATE decisions SET request = '{'[' * 5000}{']' * 5000}' WHERE seq = 3",
                                 "its request is not JSON (depth limit"),
    "response not JSON": ("UPDATE decisions SET response = '{\"decision\": al' WHERE seq = 3",
                          "its response is not JSON"),
    "duration as a real": ("UPDATE decisions SET duration_us = 2.5 WHERE seq = 3", "its duration_us is float"),
    "decision id as a number": ("UPDATE decisions SET decision_id = 42 WHERE seq = 3", "does not match its hash"),
    "hash null": ("UPDATE decisions SET hash = NULL WHERE seq = 3", None),  # NOT NULL: refused by SQLite
}


@pytest.mark.parametrize("case", list(ODD_RECORDS))
def test_audit_commands_name_an_odd_record_and_never_trace_back(
        tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    _app, data = filled(tmp_path)
    statement, problem = ODD_RECORDS[case]
    try:
        sql(data / "decisions.db", statement)
    except sqlite3.IntegrityError:
        assert problem is None
        return
    decision_id = sqlite3.connect(data / "decisions.db").execute(
        "SELECT decision_id FROM decisions ORDER BY seq LIMIT 1 OFFSET 2").fetchone()[0]
    assert main(["log", "verify", "--data", str(data)]) == 1
    out = capsys.readouterr()
    assert "BROKEN at record" in out.out and problem in out.out and "Traceback" not in out.err
    code = main(["log", "list", "--data", str(data), "--format", "jsonl"])
    out = capsys.readouterr()
    if "hash" in problem:  # a readable record, altered: listed; only verify can tell
        assert code == 0 and len(out.out.splitlines()) == 6
    else:
        assert code == 1 and "BROKEN: record" in out.err and len(out.out.splitlines()) == 5
        for line in out.out.splitlines():
            json.loads(line)
    assert main(["replay", decision_id, "--data", str(data)]) in (1, 2)
    assert "Traceback" not in capsys.readouterr().err
    # And the service starts on it, not ready, naming the record.
    ready = make_app(tmp_path, f"sqlite:///{data / 'decisions.db'}").test_client().get("/readyz")
    assert ready.status_code == 503 and "record" in ready.json["decision_log_chain"]


def test_audit_commands_create_nothing_and_work_on_a_read_only_snapshot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app, data = filled(tmp_path)
    app.extensions["bindpolicy"].store.close()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("decisions.db", "decisions.db-wal"):
        if (data / name).exists():
            shutil.copy(data / name, snapshot / name)
    before = sorted(p.name for p in snapshot.iterdir())
    snapshot.chmod(0o555)
    try:
        assert main(["log", "verify", "--data", str(snapshot)]) == 0
        assert "the chain holds over 6 records" in capsys.readouterr().out
        assert main(["log", "list", "--data", str(snapshot)]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 6
    finally:
        snapshot.chmod(0o755)
    assert sorted(p.name for p in snapshot.iterdir()) == before
    # The live log: no lock file, no table, nothing new beside it either.
    live = sorted(p.name for p in data.iterdir())
    assert main(["log", "verify", "--data", str(data)]) == 0
    assert sorted(p.name for p in data.iterdir()) == live


def test_a_missing_table_or_a_file_that_is_no_database_is_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    sqlite3.connect(empty / "decisions.db").close()
    for command in (["log", "verify"], ["log", "list"], ["replay", "some-id"]):
        assert main([*command, "--data", str(empty)]) == 2
        err = capsys.readouterr().err
        assert "no decision log" in err and "Traceback" not in err
    assert [p.name for p in empty.iterdir()] == ["decisions.db"]  # nothing created, no table made
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "decisions.db").write_bytes(b"not a database at all" * 100)
    assert main(["log", "verify", "--data", str(garbage)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["log", "verify", "--data", str(tmp_path / "nowhere")]) == 2


def test_replay_says_what_a_rejection_was(tmp_path: Path) -> None:
    app = make_app(tmp_path, f"sqlite:///{tmp_path / 'data' / 'decisions.db'}", MAX_BATCH=2,
                   MAX_CONTENT_LENGTH=4096)
    client = app.test_client()
    ids = {
        "415": client.post("/v1/decisions", data="{}", content_type="text/plain"),
        "413": client.post("/v1/decisions", data="[" + " " * 5000 + "]", content_type="application/json"),
        "not json": client.post("/v1/decisions", data='{"action": ', content_type="application/json"),
        "batch shape": client.post("/v1/decisions/batch", json={"requests": 5}),
        "batch size": client.post("/v1/decisions/batch", json={"requests": [bind_request()] * 3}),
        "contract": client.post("/v1/decisions", json={"action": "nope"}),
    }
    store = app.extensions["bindpolicy"].store
    results = {name: replay(store, response.json["decision_id"]) for name, response in ids.items()}
    assert {name: r.status for name, r in results.items()} == {
        "415": NOTHING, "413": NOTHING, "not json": REPRODUCED, "batch shape": REPRODUCED,
        "batch size": REPRODUCED, "contract": REPRODUCED}
    assert "whole-batch" in results["batch size"].message and "not JSON" in results["not json"].message


def test_replay_checks_the_stored_policy_content_against_its_digest(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    app, data = filled(tmp_path, 1)
    decision = app.extensions["bindpolicy"].store.tail(1)[0]
    sql(data / "decisions.db", "UPDATE policy_contents SET files = replace(files, 'min_age: 18', 'min_age: 12')")
    result = replay(app.extensions["bindpolicy"].store, decision.decision_id)
    assert result.status == BROKEN and "does not match its digest" in result.message
    assert main(["replay", decision.decision_id, "--data", str(data)]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == BROKEN


def test_readiness_follows_the_commits_and_never_names_the_database(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = filled(tmp_path, 2)
    client = app.test_client()
    store = app.extensions["bindpolicy"].store
    real = store._connect
    full = {"on": True}

    def disk_full() -> Any:  # SQLite's own "database or disk is full", at the size the file has now
        conn = real()
        if full["on"]:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(store, "_connect", disk_full)
    store.close()
    big = bind_request()
    big["shop"]["name"] = "x" * 100  # type: ignore[index]
    statuses = [client.post("/v1/decisions/batch", json={"requests": [big] * 200}).status_code for _ in range(3)]
    assert 503 in statuses
    store._probed_at = 0.0
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["decision_log"] == "unwritable"
    assert ready.json["decision_log_last_error"].startswith("OperationalError: the last commit failed")
    full["on"] = False  # space again: the probe commit makes it ready without any decision
    store._probed_at = 0.0
    assert client.get("/readyz").status_code == 200


def test_reads_answer_503_when_the_database_is_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = filled(tmp_path, 2)
    store = app.extensions["bindpolicy"].store

    def away() -> Any:
        raise sqlite3.OperationalError("unable to open database file /secret/path host=db.internal")

    monkeypatch.setattr(store, "_connect", away)
    client = app.test_client()
    for path in ("/v1/decisions", "/v1/decisions/abc"):
        response = client.get(path, headers=LOG)
        assert response.status_code == 503 and response.json["error"]["code"] == "log_unavailable"
        assert "secret" not in response.get_data(as_text=True)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "db.internal" not in ready.get_data(as_text=True)


def _open(path: str, start: Any, results: Any) -> None:
    try:
        start.wait()
        open_store(f"sqlite:///{path}")
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_workers_starting_together_on_a_fresh_log_never_fail(tmp_path: Path) -> None:
    # forkserver, not fork: a fork of this process copies whatever lock one of its threads holds
    # at that moment (other tests' stores checkpoint their WAL from threads of their own, inside
    # SQLite's locks), which a child may then wait on for ever: with fork this test timed out
    # twice under load. (The service's workers are spawned, never forked from a process with threads.)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # (imported once, by the server, before any fork)
    outcomes = []
    for attempt in range(8):
        path = str(tmp_path / f"fresh-{attempt}.db")
        start, results = context.Event(), context.Queue()
        workers = [context.Process(target=_open, args=(path, start, results)) for _ in range(4)]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=60)
        outcomes += [results.get(timeout=5) for _ in workers]
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert outcomes == ["ok"] * 32


def test_indexed_fields_that_a_store_could_refuse_stay_in_the_request_only(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    from engine.decisionlog import new_record

    request = {"action": "bind\u0000", "shop": {"id": "s" * 3000}, "account": {"id": "a\u0000b"}}
    [record] = store.write_many([new_record(decision_id="odd", outcome="rejected", status=400, request=request,
                                            response={}, duration_us=1)])
    assert (record.action, record.shop_id, record.account_id) == (None, None, None)
    assert store.get("odd").request == request  # type: ignore[union-attr]
    assert COLUMNS[0] == "seq"


def _reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962's MTH, written out recursively."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(_reference_root(leaves[:k]), _reference_root(leaves[k:]))


def test_merkle_tree_against_the_rfc_definition() -> None:
    for size in range(1, 34):
        leaves = [leaf_hash(str(i).encode()) for i in range(size)]
        root = root_of(leaves)
        assert root == _reference_root(leaves)
        for index in range(size):
            path = inclusion_proof(leaves, index)
            assert verify_inclusion(leaves[index], index, size, path, root)
            assert not verify_inclusion(leaf_hash(b"other"), index, size, path, root)
            if size > 1:
                assert not verify_inclusion(leaves[index], (index + 1) % size, size, path, root)


def test_the_wal_is_checkpointed_by_a_thread_not_in_a_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's own checkpoint ran inside a commit (every 1000 pages: a flush of the database while
    every decision waited); a thread of the writing process does it now, and ends with the store."""
    import threading
    import time

    from engine.decisionlog import SQLiteStore, new_record

    monkeypatch.setattr(SQLiteStore, "CHECKPOINT_EVERY", 0.05)
    before = {t for t in threading.enumerate() if t.name == "log-checkpoint"}
    store = open_store(f"sqlite:///{tmp_path / 'decisions.db'}")
    empty = (tmp_path / "decisions.db").stat().st_size
    store.write_many([new_record(decision_id=f"d{n}", outcome="decided", status=200, request=bind_request(),
                                 response={"decision": "allow"}, duration_us=1) for n in range(200)])
    [thread] = {t for t in threading.enumerate() if t.name == "log-checkpoint"} - before
    for _ in range(100):  # the records reach the database file itself (SQLite's own: past 20,000 pages)
        if (tmp_path / "decisions.db").stat().st_size > empty + 100 * 1024:
            break
        time.sleep(0.05)
    assert (tmp_path / "decisions.db").stat().st_size > empty + 100 * 1024
    assert [r.decision_id for r in store.scan(after_seq=198)] == ["d198", "d199"]
    store.close()
    thread.join(timeout=5)
    assert not thread.is_alive()

"""The log as evidence, attacked: every way of rewriting, removing, inserting or cutting records
that an attacker without the keys has is found by `log verify`, by the running service within
one check, or both; a proof of one decision holds only for what was logged."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.checkpoints import checkpoint_files, read_checkpoint
from engine.cli import main
from engine.decisionlog import COLUMNS, LogRecord, record_from_row, record_hash
from engine.logkeys import MacKey, MacKeyring, generate_keys

from ..conftest import bind_request, make_app


@dataclass
class Evidence:
    app: Any
    data: Path
    keys: Path
    db: Path

    @property
    def watch(self) -> Any:
        return self.app.extensions["bindpolicy"].watch

    def cli(self, *args: str) -> list[str]:
        return [*args, "--data", str(self.data), "--mac-key-file", str(self.keys / "log-mac.key")]

    def verify(self) -> int:
        return main([*self.cli("log", "verify"), "--public-key", str(self.keys / "checkpoint.pub")])

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[Any]:
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            return conn.execute(statement, args).fetchall()
        finally:
            conn.close()

    def records(self) -> list[LogRecord]:
        rows = self.sql(f"SELECT {', '.join(COLUMNS)} FROM decisions ORDER BY seq")
        return [r for r in map(record_from_row, rows) if isinstance(r, LogRecord)]

    def rewrite(self, seq: int, record: LogRecord) -> None:
        assignments = ", ".join(f"{c} = ?" for c in COLUMNS)
        values = [record.request_text if c == "request" else record.response_text if c == "response"
                  else getattr(record, c) for c in COLUMNS]
        self.sql(f"UPDATE decisions SET {assignments} WHERE seq = ?", (*values, seq))


def decide(client: Any, count: int) -> list[str]:
    young = bind_request()
    young["account"]["age"] = 16  # type: ignore[index]
    return [client.post("/v1/decisions", json=young if i % 3 else bind_request()).json["decision_id"]
            for i in range(count)]


@pytest.fixture
def evidence(tmp_path: Path) -> Evidence:
    """30 records: a MAC key, a checkpoint after record 20, ten records after it."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    data = tmp_path / "data"
    app = make_app(tmp_path, f"sqlite:///{data / 'decisions.db'}", LOG_MAC_KEY_FILE=str(keys / "log-mac.key"),
                   CHECKPOINT_KEY_FILE=str(keys / "checkpoint.key"), CHECKPOINT_INTERVAL=0)
    client = app.test_client()
    decide(client, 20)
    app.extensions["bindpolicy"].watch.step()
    decide(client, 10)
    found = Evidence(app, data, keys, data / "decisions.db")
    assert [read_checkpoint(p).tree_size for p in checkpoint_files(data / "checkpoints")] == [20]
    return found


def rechain_without_key(ev: Evidence, start: int, change: Callable[[LogRecord], LogRecord] | None = None) -> None:
    """What an attacker with the database but no key can do: rewrite, then recompute the hashes."""
    records = ev.records()
    prev = records[start - 2].hash if start > 1 else "0" * 64
    for record in records[start - 1:]:
        if change is not None and record.seq == start:
            record = change(record)
        record = record.chained(record.seq, prev)
        ev.rewrite(record.seq, record)
        prev = record.hash


def to_allow(record: LogRecord) -> LogRecord:
    response = {**record.response, "decision": "allow", "rule": None, "violations": []}
    return LogRecord(**{**{c: getattr(record, c) for c in COLUMNS}, "response": response, "request_text": "",
                        "response_text": ""})


def forged_mac(ev: Evidence, seq: int, key: MacKey) -> None:
    record = to_allow(next(r for r in ev.records() if r.seq == seq))
    record = record.chained(seq, record.prev_hash, MacKeyring((key,)))
    ev.rewrite(seq, record)


TAMPERING: dict[str, Callable[[Evidence], None]] = {
    "rewrite a decision to allow and recompute the plain hashes after it":
        lambda ev: rechain_without_key(ev, 5, to_allow),
    "rewrite a decision after the last checkpoint with a MAC under a guessed key":
        lambda ev: forged_mac(ev, 25, MacKey(b"\x01" * 32)),
    "rewrite a decision keeping its MAC":
        lambda ev: ev.sql("UPDATE decisions SET response = replace(response, 'deny', 'allow') WHERE seq = 26"),
    "change the MAC of the last record":
        lambda ev: ev.sql("UPDATE decisions SET hash = substr(hash, 1, length(hash) - 4) || 'abcd' WHERE seq = 30"),
    "remove records back past the latest checkpoint": lambda ev: ev.sql("DELETE FROM decisions WHERE seq > 14"),
    "truncate the whole log": lambda ev: ev.sql("DELETE FROM decisions"),
    "remove one record in the middle": lambda ev: ev.sql("DELETE FROM decisions WHERE seq = 12"),
    "insert a record": lambda ev: ev.sql(
        "INSERT INTO decisions SELECT seq + 1, decision_id || '-copy', logged_at, outcome, status, "
        "action, decision, rule_id, shop_id, account_id, policy_version, policy_digest, runtime, duration_us, "
        "request, response, hash, hash FROM decisions WHERE seq = 30"),
    "swap the contents of two records": lambda ev: ev.sql(
        "UPDATE decisions SET request = (SELECT request FROM decisions WHERE seq = 3) WHERE seq = 4"),
    "re-make the whole chain from record 1 without the key (a downgrade)":
        lambda ev: rechain_without_key(ev, 1, to_allow),
    "corrupt a stored request cell": lambda ev: ev.sql("UPDATE decisions SET request = '{\"acc' WHERE seq = 8"),
    "alter the checkpoint's root": lambda ev: _edit_checkpoint(ev, "root", "00" * 32),
    "rename the log the checkpoint is of": lambda ev: _edit_checkpoint(ev, "origin", "bindpolicy-log/" + "0" * 32),
    "give the log another log's origin": lambda ev: ev.sql("UPDATE log_origin SET origin = 'bindpolicy-log/x'"),
    "replace the checkpoint by one signed with another key": lambda ev: _resign_checkpoint(ev),
}


def _edit_checkpoint(ev: Evidence, field: str, value: Any) -> None:
    path = checkpoint_files(ev.data / "checkpoints")[0]
    body = json.loads(path.read_text())
    body[field] = value
    path.write_text(json.dumps(body))


def _resign_checkpoint(ev: Evidence) -> None:
    from engine.checkpoints import make_checkpoint, write_checkpoint
    from engine.logkeys import read_signing_key

    other = ev.data.parent / "other-keys"
    generate_keys(other)
    checkpoint = read_checkpoint(checkpoint_files(ev.data / "checkpoints")[0])
    state = checkpoint.frontier_state()
    assert state is not None
    write_checkpoint(ev.data / "checkpoints", make_checkpoint(state, checkpoint.head_hash,
                                                              read_signing_key(other / "checkpoint.key")))


@pytest.mark.parametrize("attack", list(TAMPERING))
def test_log_verify_finds_every_tampering(evidence: Evidence, attack: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert evidence.verify() == 0
    out = capsys.readouterr().out
    assert "ok: the chain holds over 30 records (30 with a keyed MAC)" in out and "1..20" in out
    TAMPERING[attack](evidence)
    assert evidence.verify() == 1, attack
    out = capsys.readouterr().out
    assert "BROKEN" in out and "Traceback" not in out


def test_the_running_service_finds_tampering_and_truncation_within_one_check(evidence: Evidence) -> None:
    client = evidence.app.test_client()
    evidence.watch.step()
    assert client.get("/readyz").status_code == 200
    # Records written since the last checkpoint, removed: only a running service can know.
    evidence.sql("DELETE FROM decisions WHERE seq > 28")
    evidence.watch.step()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json["decision_log_chain"].startswith("broken at record 30") and "truncated" in \
        ready.json["decision_log_chain"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "bindpolicy_decision_log_broken_record 30.0" in metrics


def test_a_record_rewritten_in_place_while_the_service_runs(evidence: Evidence) -> None:
    client = evidence.app.test_client()
    evidence.watch.step()
    forged_mac(evidence, 22, MacKey(b"\x02" * 32))
    evidence.watch.step()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "record 22" in ready.json["decision_log_chain"]


def test_a_corrupted_record_never_stops_the_service_from_starting(evidence: Evidence, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    evidence.sql("UPDATE decisions SET request = '[[[' WHERE seq = 26")
    app = make_app(tmp_path, f"sqlite:///{evidence.db}", LOG_MAC_KEY_FILE=str(evidence.keys / "log-mac.key"))
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["decision_log_chain"].startswith("broken at record 26")
    assert "bindpolicy_decision_log_broken_record 26.0" in client.get("/metrics").get_data(as_text=True)
    listed = client.get("/v1/decisions?after=24&limit=3", headers={"Authorization": "Bearer log-secret"}).json
    assert listed["records"][1]["broken"].startswith("its request is not JSON")
    assert evidence.verify() == 1
    assert "BROKEN at record 26" in capsys.readouterr().out


def test_prove_and_verify_proof(evidence: Evidence, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = evidence.records()
    public = ["--public-key", str(evidence.keys / "checkpoint.pub")]
    proof_file = tmp_path / "proof.json"
    assert main(evidence.cli("log", "prove", records[13].decision_id) + public + ["-o", str(proof_file)]) == 0
    assert main(["log", "verify-proof", str(proof_file), *public]) == 0
    assert f"decision {records[13].decision_id} is record 14 of the 20 records" in capsys.readouterr().out
    # Not covered by a checkpoint yet: said so, exit 2.
    assert main(evidence.cli("log", "prove", records[25].decision_id) + public) == 2
    capsys.readouterr()
    proof = json.loads(proof_file.read_text())
    for change in (lambda p: p["record"].__setitem__("response", p["record"]["response"].replace("deny", "allow")),
                   lambda p: p["audit_path"].__setitem__(0, "00" * 32),
                   lambda p: p["checkpoint"].__setitem__("root", "11" * 32),
                   lambda p: p["record"]["meta"].__setitem__("seq", 15)):
        altered = json.loads(json.dumps(proof))
        change(altered)
        proof_file.write_text(json.dumps(altered))
        assert main(["log", "verify-proof", str(proof_file), *public]) == 1
    other = tmp_path / "other"
    generate_keys(other)
    proof_file.write_text(json.dumps(proof))
    assert main(["log", "verify-proof", str(proof_file), "--public-key", str(other / "checkpoint.pub")]) == 1
    proof_file.write_text("{not json")
    assert main(["log", "verify-proof", str(proof_file), *public]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_keys_rotate_and_a_missing_old_key_is_named(evidence: Evidence, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    old = (evidence.keys / "log-mac.key").read_text()
    new_key = "ab" * 32
    rotated = tmp_path / "rotated.key"
    rotated.write_text(f"{new_key}\n{old}")
    app = make_app(tmp_path, f"sqlite:///{evidence.db}", LOG_MAC_KEY_FILE=str(rotated))
    decide(app.test_client(), 3)
    assert main(["log", "verify", "--data", str(evidence.data), "--mac-key-file", str(rotated),
                 "--public-key", str(evidence.keys / "checkpoint.pub")]) == 0
    assert "33 with a keyed MAC" in capsys.readouterr().out
    only_new = tmp_path / "only-new.key"
    only_new.write_text(new_key)
    assert main(["log", "verify", "--data", str(evidence.data), "--mac-key-file", str(only_new),
                 "--public-key", str(evidence.keys / "checkpoint.pub")]) == 1
    assert "BROKEN at record 1" in capsys.readouterr().out


def test_an_older_unkeyed_log_still_verifies_and_says_what_it_is(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    decide(make_app(tmp_path, f"sqlite:///{data / 'decisions.db'}").test_client(), 4)
    keys = tmp_path / "keys"
    generate_keys(keys)
    decide(make_app(tmp_path, f"sqlite:///{data / 'decisions.db'}",
                    LOG_MAC_KEY_FILE=str(keys / "log-mac.key")).test_client(), 2)
    assert main(["log", "verify", "--data", str(data), "--mac-key-file", str(keys / "log-mac.key")]) == 0
    out = capsys.readouterr().out
    assert "2 with a keyed MAC" in out and "4 in the older unkeyed format" in out
    # Without the key the MACs cannot be checked: the command says so rather than vouching for them.
    assert main(["log", "verify", "--data", str(data)]) == 0
    assert "2 not checked: no MAC key given" in capsys.readouterr().out


def test_readyz_says_how_the_log_is_protected(evidence: Evidence, tmp_path: Path) -> None:
    integrity = evidence.app.test_client().get("/readyz").json["decision_log_integrity"]
    assert integrity["mac"].startswith("hmac-sha256, key ")
    assert integrity["checkpoints"]["latest_tree_size"] == 20
    plain = make_app(tmp_path, f"sqlite:///{tmp_path / 'plain.db'}").test_client().get("/readyz").json
    assert plain["decision_log_integrity"]["mac"].startswith("off: ")
    assert plain["decision_log_integrity"]["checkpoints"].startswith("off: ")


def test_chained_hash_formats() -> None:
    keys = MacKeyring((MacKey(b"k" * 32),))
    assert len(record_hash("content", "0" * 64)) == 64
    assert record_hash("content", "0" * 64, keys).startswith(f"hmac-sha256:{keys.current.id}:")


def test_serve_refuses_a_bad_key_file_before_any_worker_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from ..conftest import POLICIES

    def no_exec(*_: Any) -> None:
        raise AssertionError("serve went on to start gunicorn")

    monkeypatch.setattr(os, "execv", no_exec)
    bad = tmp_path / "short.key"
    bad.write_text("abcd\n")
    monkeypatch.setenv("BINDPOLICY_LOG_MAC_KEY_FILE", str(bad))
    assert main(["serve", "--policies", str(POLICIES), "--data", str(tmp_path / "data")]) == 1
    assert f"{bad}:1: a MAC key has at least 32 bytes" in capsys.readouterr().err


def origin_of(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT origin FROM log_origin").fetchone()[0])
    finally:
        conn.close()


def test_checkpoints_name_their_log_and_another_logs_are_named_as_such(
        evidence: Evidence, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    origin = origin_of(evidence.db)
    assert origin.startswith("bindpolicy-log/") and len(origin) == len("bindpolicy-log/") + 32
    checkpoint = read_checkpoint(checkpoint_files(evidence.data / "checkpoints")[0])
    assert checkpoint.origin == origin and b'"origin":"' + origin.encode() + b'"' in checkpoint.payload()
    # Another log, signed with the same key: its checkpoints are its own, by their origin.
    other = tmp_path / "o" / "data"
    app = make_app(tmp_path / "o", f"sqlite:///{other / 'decisions.db'}",
                   LOG_MAC_KEY_FILE=str(evidence.keys / "log-mac.key"),
                   CHECKPOINT_KEY_FILE=str(evidence.keys / "checkpoint.key"), CHECKPOINT_INTERVAL=0)
    decide(app.test_client(), 25)
    app.extensions["bindpolicy"].watch.step()
    other_origin = origin_of(other / "decisions.db")
    assert other_origin != origin
    public = ["--public-key", str(evidence.keys / "checkpoint.pub")]
    keys = ["--mac-key-file", str(evidence.keys / "log-mac.key")]
    # Named: a failure that says whose they are (the folder given is another log's, or the log was replaced).
    assert main(["log", "verify", "--database-url", f"sqlite:///{evidence.db}", "--checkpoint-dir",
                 str(other / "checkpoints"), *keys, *public]) == 1
    out = capsys.readouterr().out
    assert f"is of another log ({other_origin}; this log is {origin})" in out
    assert "no longer give its signed Merkle root" not in out and "truncated" not in out
    # Only the default folder's guess (--database-url alone): they could not be used, exit 2.
    monkeypatch.chdir(tmp_path / "o")
    assert main(["log", "verify", "--database-url", f"sqlite:///{evidence.db}", *keys, *public]) == 2
    out = capsys.readouterr().out
    assert "ok: the chain holds over 30 records" in out
    assert f"cannot check: the checkpoints in data/checkpoints (the default folder: no --data or --checkpoint-dir " \
           f"given) are another log's ({other_origin}); this log is {origin}" in out
    # The same log and folder, named: ok; a proof names the log.
    assert main(["log", "verify", "--data", str(evidence.data), *keys, *public]) == 0
    records = [r for r in map(record_from_row, evidence.sql(f"SELECT {', '.join(COLUMNS)} FROM decisions"))
               if isinstance(r, LogRecord)]
    proof = tmp_path / "proof.json"
    capsys.readouterr()
    assert main(["log", "prove", records[3].decision_id, "--data", str(evidence.data), *public,
                 "-o", str(proof)]) == 0
    assert main(["log", "verify-proof", str(proof), *public]) == 0
    assert f"is record 4 of the 20 records of log {origin} signed at" in capsys.readouterr().out
    # Another log's checkpoints never prove this log's records.
    assert main(["log", "prove", records[3].decision_id, "--database-url", f"sqlite:///{evidence.db}",
                 "--checkpoint-dir", str(other / "checkpoints"), *public]) == 2
    assert "no signed checkpoint" in capsys.readouterr().err


def test_a_service_started_on_another_logs_checkpoints_names_both(evidence: Evidence, tmp_path: Path) -> None:
    origin = origin_of(evidence.db)
    evidence.sql("UPDATE log_origin SET origin = 'bindpolicy-log/replaced'")
    app = make_app(tmp_path, f"sqlite:///{evidence.db}", LOG_MAC_KEY_FILE=str(evidence.keys / "log-mac.key"),
                   CHECKPOINT_KEY_FILE=str(evidence.keys / "checkpoint.key"), CHECKPOINT_INTERVAL=0)
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.json["decision_log_chain"] == (
        f"broken at record 20: checkpoint checkpoint-000000000020.json is of another log ({origin}; this log is "
        "bindpolicy-log/replaced): this log was replaced by another, or the checkpoint folder is another log's")


def test_checkpoints_written_before_logs_had_an_origin_still_verify(
        evidence: Evidence, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.checkpoints import make_checkpoint, write_checkpoint
    from engine.logkeys import read_signing_key

    path = checkpoint_files(evidence.data / "checkpoints")[0]
    checkpoint = read_checkpoint(path)
    state = checkpoint.frontier_state()
    assert state is not None
    older = make_checkpoint(state, checkpoint.head_hash, read_signing_key(evidence.keys / "checkpoint.key"))
    assert older.origin == "" and b"origin" not in older.payload() and "origin" not in older.to_dict()
    write_checkpoint(path.parent, older)  # in its place; and the signed head (with an origin) gone
    (path.parent / "head.json").unlink()
    assert evidence.verify() == 0
    assert "checkpoints: 1 verified; the latest covers records 1..20" in capsys.readouterr().out
    # A log made before origins (no log_origin table), read-only, with such checkpoints: as before.
    evidence.sql("DROP TABLE log_origin")
    assert evidence.verify() == 0

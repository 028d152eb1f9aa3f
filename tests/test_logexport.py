"""Log export: day partitions with every chain field, verified on their own; a window is one piece of chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.cli import main
from engine.decider import Engine
from engine.decisionlog import Store, new_record, open_store
from engine.errors import RequestError
from engine.generator import generate_requests
from engine.logexport import ExportManifest, export_log, read_records, record_of, verify_export

START = datetime(2025, 7, 1, 23, 0, tzinfo=UTC)


def write_log(store: Store, engine: Engine, count: int = 120) -> None:
    """Decisions and rejections over three days, with days alternating near a midnight (commit order)."""
    for policy in engine.policies:
        store.save_policy(policy.digest, policy.name, dict(policy.sources))
    records = []
    for index, request in enumerate(generate_requests(count, 7, broken=0.1)):
        at = START + timedelta(minutes=index * 30)
        if index == 3:  # committed after a record of the next day
            at = START + timedelta(minutes=59, seconds=59)
        try:
            decision = engine.decide(request, now=at, decision_id=f"d{index}")
            record = new_record(decision_id=f"d{index}", outcome="decided", status=200, request=request,
                                response=decision.to_dict(), duration_us=5, logged_at=at)
        except RequestError as exc:
            record = new_record(decision_id=f"d{index}", outcome="rejected", status=400, request=request,
                                response={**exc.to_dict(), "decision_id": f"d{index}"}, duration_us=5, logged_at=at)
        records.append(record)
    store.write_many(records)


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> Store:
    store = open_store(str(tmp_path / "data" / "decisions.db"))
    write_log(store, engine)
    return store


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_export_holds_every_record_and_verifies_alone(store: Store, tmp_path: Path, fmt: str) -> None:
    manifest = export_log(store, tmp_path / "out", file_format=fmt)
    assert manifest.records == 120 and (manifest.first_seq, manifest.last_seq) == (1, 120)
    days = sorted({p.day for p in manifest.parts})
    assert days == ["2025-07-01", "2025-07-02", "2025-07-03", "2025-07-04"]
    assert len(manifest.parts) == len(days) + 2  # the alternation near the first midnight: two more runs
    exported = list(read_records(tmp_path / "out"))
    assert [r.to_dict() for r in exported] == [r.to_dict() for r in store.query()]
    assert {r.policy_digest for r in exported if r.policy_digest} == set(manifest.policy_digests)
    check = verify_export(tmp_path / "out")
    assert check.exit_code == 0 and check.records == 120 and check.unkeyed == 120
    store.close()


def test_an_altered_record_a_missing_part_and_a_cut_end_are_found(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = export_log(store, out)
    part = out / manifest.parts[-1].path
    table = pq.read_table(part).to_pylist()
    table[1]["response"] = table[1]["response"].replace('"deny"', '"allow"').replace('"allow"', '"deny"', 0)
    altered = table[1]["response"] != pq.read_table(part).to_pylist()[1]["response"]
    if not altered:
        table[1]["duration_us"] += 1
    pq.write_table(pq.read_table(part).from_pylist(table, schema=pq.read_schema(part)), part)
    check = verify_export(out)
    assert check.breach is not None and check.breach.seq == table[1]["seq"] and "altered" in check.breach.problem

    short = tmp_path / "short"
    export_log(store, short)
    first = short / ExportManifest.read(short).parts[0].path
    first.unlink()
    assert any("not in the folder" in p for p in verify_export(short).problems)

    cut = tmp_path / "cut"
    export_log(store, cut)
    last = ExportManifest.read(cut).parts[-1]
    rows = pq.read_table(cut / last.path).slice(0, last.records - 1)
    pq.write_table(rows, cut / last.path)
    assert any("the parts hold 119" in p for p in verify_export(cut).problems)


def test_a_window_is_one_piece_of_chain(store: Store, tmp_path: Path) -> None:
    manifest = export_log(store, tmp_path / "w", since="2025-07-02T06:00:00Z", until="2025-07-03T00:00:00Z",
                          file_format="jsonl")
    records = list(read_records(tmp_path / "w"))
    assert records[0].logged_at >= "2025-07-02T06:00:00" and records[-1].logged_at < "2025-07-03"
    assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + len(records)))
    assert manifest.records == len(records) == 36
    check = verify_export(tmp_path / "w")
    assert check.exit_code == 0 and check.records == 36


def test_the_command_says_what_it_wrote(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["log", "export", "--data", str(data), "-o", str(tmp_path / "x")]) == 0
    said = capsys.readouterr().out
    assert "wrote 120 records (seq 1..120) as parquet in 6 part(s) over 4 day(s)" in said
    assert "day=2025-07-02: 47 records" in said
    assert main(["log", "verify", "--export", str(tmp_path / "x")]) == 0
    assert "ok: the chain holds over 120 records" in capsys.readouterr().out
    assert main(["log", "export", "--data", str(data), "-o", str(tmp_path / "x")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["log", "verify", "--export", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["columns"][-2:] == ["prev_hash", "hash"]


def test_a_keyed_export_is_checked_as_log_verify_checks_the_log(tmp_path: Path, engine: Engine,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The same walk as `log verify`: MACs checked with the key, a wrong key or a chain re-made
    without it named, and a whole export compared with the signed checkpoints it reaches."""
    from engine.logcheck import verify_log
    from engine.logkeys import generate_keys, read_mac_keys

    generate_keys(tmp_path / "keys")
    (tmp_path / "other.key").write_text("ab" * 32 + "\n")
    keys = read_mac_keys(tmp_path / "keys" / "log-mac.key")
    store = open_store(str(tmp_path / "data" / "decisions.db"), keys=keys)
    write_log(store, engine, count=40)
    export_log(store, tmp_path / "out", file_format="jsonl")
    check = verify_export(tmp_path / "out", keys)
    assert check.exit_code == 0 and check.keyed == 40 and check.unchecked == 0
    assert check.records == verify_log(store, None, {}).records == 40
    assert verify_export(tmp_path / "out").unchecked == 40  # without the key: links only, and said so
    mac = str(tmp_path / "keys" / "log-mac.key")
    assert main(["log", "verify", "--export", str(tmp_path / "out"), "--mac-key-file", mac]) == 0
    assert "40 with a keyed MAC" in capsys.readouterr().out
    assert main(["log", "verify", "--export", str(tmp_path / "out"),
                 "--mac-key-file", str(tmp_path / "other.key")]) == 1
    assert "not among the keys given" in capsys.readouterr().out

    # Re-made without the key (plain SHA-256 from a part's third record on): links hold, the MAC walk does not.
    part = max((tmp_path / "out").glob("day=*/*.jsonl"), key=lambda p: len(p.read_text().splitlines()))
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    from engine.decisionlog import record_hash

    for row in rows[2:]:
        row["prev_hash"] = rows[rows.index(row) - 1]["hash"]
        row["hash"] = record_hash(record_of(row, parse=False).content(), row["prev_hash"])
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = verify_export(tmp_path / "out", keys)
    assert check.breach is not None and check.breach.seq == rows[2]["seq"]
    assert "unkeyed record after keyed" in check.breach.problem
    store.close()


def test_an_export_names_its_log_and_another_logs_checkpoints_are_named(tmp_path: Path, engine: Engine) -> None:
    from engine.logcheck import LogWatch
    from engine.logkeys import generate_keys, read_public_keys, read_signing_key

    generate_keys(tmp_path / "keys")
    key = read_signing_key(tmp_path / "keys" / "checkpoint.key")
    public = read_public_keys([str(tmp_path / "keys" / "checkpoint.pub")])
    stores = {}
    for name in ("this", "other"):
        stores[name] = store = open_store(str(tmp_path / name / "decisions.db"))
        if name == "other":  # (the same records would make the same chain, root and head)
            store.write(new_record(decision_id="other", outcome="rejected", status=400, request={}, response={},
                                   duration_us=1, logged_at=START))
        write_log(store, engine, count=30 if name == "this" else 29)
        watch = LogWatch(store, checkpoint_dir=tmp_path / name / "checkpoints", signing_key=key, checkpoint_interval=0)
        watch.start()
        watch.step()
    manifest = export_log(stores["this"], tmp_path / "out", file_format="jsonl")
    assert manifest.origin == stores["this"].origin() != stores["other"].origin()
    assert ExportManifest.read(tmp_path / "out").origin == manifest.origin
    check = verify_export(tmp_path / "out", None, tmp_path / "this" / "checkpoints", public)
    assert check.exit_code == 0 and check.checkpoints == 2 and check.latest is not None  # the checkpoint, the head
    check = verify_export(tmp_path / "out", None, tmp_path / "other" / "checkpoints", public)
    assert check.exit_code == 1 and check.checkpoints == 0
    assert check.problems and all(f"is of another log ({stores['other'].origin()}; this log is {manifest.origin})"
                                  in p for p in check.problems)
    # An export made before logs had an origin is compared with every checkpoint, as it was.
    body = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del body["origin"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(body))
    check = verify_export(tmp_path / "out", None, tmp_path / "other" / "checkpoints", public)
    assert check.exit_code == 1 and any("no longer give its signed Merkle root" in p for p in check.problems)
    for store in stores.values():
        store.close()

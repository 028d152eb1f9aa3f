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
from engine.logexport import ExportManifest, export_log, read_records, verify_export

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
    assert check.ok and check.records == 120
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
    assert verify_export(tmp_path / "w").ok


def test_the_command_says_what_it_wrote(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["log", "export", "--data", str(data), "-o", str(tmp_path / "x")]) == 0
    said = capsys.readouterr().out
    assert "wrote 120 records (seq 1..120) as parquet in 6 part(s) over 4 day(s)" in said
    assert "day=2025-07-02: 47 records" in said
    assert main(["log", "verify", "--export", str(tmp_path / "x")]) == 0
    assert "ok: the chain holds over the 120 records" in capsys.readouterr().out
    assert main(["log", "export", "--data", str(data), "-o", str(tmp_path / "x")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["log", "verify", "--export", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["columns"][-2:] == ["prev_hash", "hash"]

"""Impact over files (JSON Lines, Parquet, log exports) and whole-window replay, locally and on Ray."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flask import Flask

from engine.cli import main
from engine.decisionlog import open_store
from engine.generator import generate_requests
from engine.impact import run_impact
from engine.inputs import InputError, request_lines
from engine.loader import load_policies
from engine.logexport import export_log
from engine.replay import CANNOT, DIFFERENT, REPRODUCED, replay_records

from .conftest import NOW, POLICIES, ROOT, bind_request, make_app

EXAMPLES = ROOT / "examples" / "requests.jsonl"


def figures(report: Any) -> dict[str, Any]:
    """The report without its timing."""
    data = report.to_dict()
    data.pop("seconds"), data.pop("decisions_per_second")
    return dict(data)


def served_log(tmp_path: Path, count: int = 150) -> tuple[Flask, Path]:
    """A log written by the service: decisions, schema rejections, late rejections (missing field,
    unknown version), one request pinned to each version, and a batch."""
    data = tmp_path / "data"
    app = make_app(tmp_path, f"sqlite:///{data / 'decisions.db'}")
    client = app.test_client()
    for request in generate_requests(count, 3, broken=0.15):
        client.post("/v1/decisions", json=request)
    late = bind_request()
    del late["account"]["kyc"]  # type: ignore[attr-defined]
    for extra in (bind_request(policy_version="v9"), late, bind_request(policy_version="v1"),
                  {k: v for k, v in bind_request().items() if k != "at"}, {"action": "nope"}):
        client.post("/v1/decisions", json=extra)
    client.post("/v1/decisions/batch", json={"requests": [bind_request(), bind_request(policy_version="v0")]})
    client.post("/v1/decisions?explain=true", json=bind_request())
    return app, data


class TestImpactInputs:
    def test_jsonl_parquet_and_folders_give_one_report(self, tmp_path: Path) -> None:
        lines = EXAMPLES.read_text().splitlines()
        texts = pa.table({"request": lines})
        pq.write_table(texts, tmp_path / "texts.parquet")
        # One request per row: a table's columns are shared, so a field absent from one row reads as null;
        # rows of one shape read back exactly.
        rows = [bind_request(), bind_request(role="channel"), bind_request(at="2024-01-01T00:00:00Z")]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "a.jsonl").write_text("\n".join(lines[:700]) + "\n")
        (tmp_path / "folder" / "b.jsonl").write_text("\n".join(lines[700:]) + "\n")
        reference = figures(run_impact(POLICIES, "v1", "v2", lines, workers=1, now=NOW))
        assert reference["requests"] == 2000 and sum(reference["flips"].values()) > 0
        for paths in ([str(EXAMPLES)], [str(tmp_path / "texts.parquet")], [str(tmp_path / "folder")],
                      [f"file://{EXAMPLES}"]):
            got = figures(run_impact(POLICIES, "v1", "v2", request_lines(paths), workers=1, now=NOW))
            assert got == reference, paths
        by_row = list(request_lines([str(tmp_path / "rows.parquet")]))
        assert [json.loads(t) for t in by_row] == rows

    def test_a_log_export_is_judged_at_its_logged_time(self, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        _, data = served_log(tmp_path)
        store = open_store(str(data / "decisions.db"))
        export_log(store, tmp_path / "export")
        from_log = figures(run_impact(POLICIES, "v1", "v2", store.requests(), workers=1, now=NOW))
        from_export = figures(run_impact(POLICIES, "v1", "v2", request_lines([str(tmp_path / "export")]),
                                         workers=1, now=NOW))
        assert from_export == from_log and from_log["requests"] > 100
        no_at = [json.loads(t) for t in request_lines([str(tmp_path / "export")])]
        assert all("at" in r for r in no_at)  # the request sent without `at` took its logged time

    def test_unreadable_inputs_are_named(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(InputError, match="no such file"):
            list(request_lines([str(tmp_path / "nowhere.jsonl")]))
        (tmp_path / "x.csv").write_text("a,b\n")
        assert main(["impact", "v1", "v2", "--requests", str(tmp_path / "x.csv"), "--quiet"]) == 2
        assert "not a .jsonl or .parquet file" in capsys.readouterr().err
        (tmp_path / "bad.parquet").write_bytes(b"not parquet")
        assert main(["impact", "v1", "v2", "--requests", str(tmp_path / "bad.parquet"), "--quiet"]) == 2
        assert "bad.parquet" in capsys.readouterr().err

    def test_without_ray_the_engine_says_how_to_install_it(self, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setitem(sys.modules, "ray", None)
        assert main(["impact", "v1", "v2", "--requests", str(EXAMPLES), "--engine", "ray"]) == 2
        assert "pip install 'bindpolicy[ray]'" in capsys.readouterr().err


class TestWholeLogReplay:
    def test_every_decision_of_a_served_log_reproduces(self, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
        _, data = served_log(tmp_path)
        store = open_store(str(data / "decisions.db"))
        records = list(store.query())
        late = [r for r in records if r.outcome == "rejected" and r.policy_digest]
        codes = {r.response["error"]["code"] for r in late}
        assert {"missing_field", "unknown_version"} <= codes  # rejections past the schema check carry a digest
        summary = replay_records(store, records)
        assert summary.total == len(records) and summary.reproduced == len(records), summary.describe()
        # One archive entry per load for the whole set (what unknown_version rejections name), read back by replay.
        import sqlite3

        with sqlite3.connect(data / "decisions.db") as db:
            sets = db.execute("SELECT digest FROM policy_contents WHERE version = '(set)'").fetchall()
        assert len(sets) == 1 and sets[0][0] in {r.policy_digest for r in late}
        assert main(["replay", "--data", str(data)]) == 0
        assert f"{len(records)} logged records replayed: {len(records)} reproduced, 0 differ" \
            in capsys.readouterr().out
        export_log(store, tmp_path / "export", file_format="jsonl")
        assert main(["replay", "--from-export", str(tmp_path / "export"), "--format", "json"]) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["replayed"] == body["reproduced"] == len(records)

    def test_a_window_lists_what_differs_and_why_some_cannot(self, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
        _, data = served_log(tmp_path, count=30)
        store = open_store(str(data / "decisions.db"))
        records = list(store.query())
        altered = records[0]
        response = dict(altered.response)
        response["decision"] = "allow" if response.get("decision") == "deny" else "deny"
        from dataclasses import replace

        forged = replace(altered, response=response, response_text="")
        lost = replace(records[1], policy_digest="sha256:gone", response={**records[1].response, "policy": {
            **records[1].response.get("policy", {}), "digest": "sha256:gone"}}, response_text="")
        summary = replay_records(store, [forged, lost, *records[2:]])
        statuses = {r.decision_id: r.status for r in summary.different}
        assert statuses == {forged.decision_id: DIFFERENT}
        assert summary.different[0].differences[0]["path"] == "/decision"
        assert summary.cannot == {"the policy content sha256:gone is not in the log": 1}
        assert summary.reproduced == len(records) - 2 and summary.exit_code == 1
        assert REPRODUCED != CANNOT
        text = summary.describe()
        assert f"differs {forged.decision_id}" in text and "cannot replay 1: the policy content sha256:gone" in text
        since = records[10].logged_at
        assert main(["replay", "--data", str(data), "--since", since]) == 0
        assert f"{len(records) - 10} logged records replayed" in capsys.readouterr().out

        # The window goes through the chain walk of `log verify` first: an altered record stops it.
        import sqlite3

        with sqlite3.connect(data / "decisions.db") as db:
            db.execute("UPDATE decisions SET duration_us = duration_us + 1 WHERE seq = 12")
        assert main(["replay", "--data", str(data), "--format", "json"]) == 1
        body = json.loads(capsys.readouterr().out)
        assert body["chain"].startswith("BROKEN at record 12") and body["replayed"] == 11


# --- Ray: a local cluster of 2 CPUs, started once -------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_local_report_figure_for_figure(ray_cluster: None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from engine.rayengine import run_impact_ray, run_replay_ray

    policies = load_policies(POLICIES)
    local = figures(run_impact(POLICIES, "v1", "v2", request_lines([str(EXAMPLES)]), workers=1, now=NOW))
    on_ray = figures(run_impact_ray(policies, "v1", "v2", [str(EXAMPLES)], now=NOW))
    assert on_ray == local and local["requests"] == 2000

    _, data = served_log(tmp_path, count=120)
    store = open_store(str(data / "decisions.db"))
    export_log(store, tmp_path / "export")
    local = figures(run_impact(POLICIES, "v1", "v2", request_lines([str(tmp_path / "export")]), workers=1, now=NOW))
    on_ray = figures(run_impact_ray(policies, "v1", "v2", [str(tmp_path / "export")], now=NOW))
    assert on_ray == local and local["requests"] > 80

    replayed = run_replay_ray(str(tmp_path / "export"))
    records = sum(1 for _ in store.query())
    assert replayed.total == replayed.reproduced == records, replayed.describe()
    assert main(["impact", "v1", "v2", "--requests", str(EXAMPLES), "--engine", "ray", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 2000

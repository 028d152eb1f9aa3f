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
from engine.errors import RequestError
from engine.generator import generate_requests
from engine.impact import render, run_impact
from engine.inputs import InputError, numbered_lines, request_lines
from engine.logexport import export_log
from engine.replay import CANNOT, DIFFERENT, REPRODUCED, replay_records
from engine.versions import PolicySet

from .conftest import NOW, POLICIES, ROOT, bind_request, make_app

EXAMPLES = ROOT / "examples" / "requests.jsonl"


def figures(report: Any, inputs: bool = True) -> dict[str, Any]:
    """The report without its timing (and without where each example was read, to compare sources)."""
    data = report.to_dict()
    data.pop("seconds"), data.pop("decisions_per_second")
    if not inputs:
        for example in (x for g in data["groups"] for x in g["examples"]):
            example.pop("input")
        for rejection in data["rejections"]:
            rejection.pop("inputs")
    return dict(data)


def corpus(count: int = 300, seed: int = 5) -> list[str]:
    """Generated requests, some broken (missing fields, bad values), plus a line that is not JSON,
    one that is not an object and a blank one."""
    lines = [json.dumps(r) for r in generate_requests(count, seed, broken=0.15)]
    lines[7:7] = ["{not json", "[1, 2]", ""]
    return lines


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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One log written by the service for the whole module (tests that alter it take a copy)."""
    return served_log(tmp_path_factory.mktemp("served"))[1]


class TestImpactInputs:
    def test_jsonl_parquet_and_folders_give_one_report(self, tmp_path: Path, policies: PolicySet) -> None:
        lines = EXAMPLES.read_text().splitlines()[:400]
        (tmp_path / "some.jsonl").write_text("\n".join(lines) + "\n")
        texts = pa.table({"request": lines})
        pq.write_table(texts, tmp_path / "texts.parquet")
        # One request per row: a table's columns are shared, so a field absent from one row reads as null;
        # rows of one shape read back exactly.
        rows = [bind_request(), bind_request(role="channel"), bind_request(at="2024-01-01T00:00:00Z")]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "a.jsonl").write_text("\n".join(lines[:150]) + "\n")
        (tmp_path / "folder" / "b.jsonl").write_text("\n".join(lines[150:]) + "\n")
        reference = figures(run_impact(policies, "v1", "v2", lines, workers=1, now=NOW), inputs=False)
        assert reference["requests"] == 400 and sum(reference["flips"].values()) > 0
        for paths in ([str(tmp_path / "some.jsonl")], [str(tmp_path / "texts.parquet")], [str(tmp_path / "folder")],
                      [f"file://{tmp_path / 'some.jsonl'}"]):
            got = figures(run_impact(policies, "v1", "v2", request_lines(paths), workers=1, now=NOW), inputs=False)
            assert got == reference, paths
        by_row = list(request_lines([str(tmp_path / "rows.parquet")]))
        assert [json.loads(t) for t in by_row] == rows

    def test_a_log_export_is_judged_at_its_logged_time(self, tmp_path: Path, policies: PolicySet, served: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        store = open_store(str(served / "decisions.db"))
        export_log(store, tmp_path / "export")
        from_log = figures(run_impact(policies, "v1", "v2", store.requests(), workers=1, now=NOW), inputs=False)
        from_export = figures(run_impact(policies, "v1", "v2", request_lines([str(tmp_path / "export")]),
                                         workers=1, now=NOW), inputs=False)
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


def other_checkout(tmp_path: Path, min_age: int = 25) -> Path:
    """The bundled policies copied, v2 raising the minimum age: a branch under review."""
    import shutil

    new = tmp_path / "new"
    shutil.copytree(POLICIES, new)
    with open(new / "v2" / "version.yaml", "a", encoding="utf-8") as version:
        version.write(f"parameters:\n  min_age: {min_age}\n")
    return new


class TestImpactReport:
    def test_against_another_checkout_examples_say_where_which_rule_and_what_it_read(
            self, tmp_path: Path, engine: Any, policies: PolicySet, capsys: pytest.CaptureFixture[str]) -> None:
        lines = corpus()
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(lines) + "\n")
        new = other_checkout(tmp_path)
        report = run_impact(policies, "v2", "v2", numbered_lines([str(path)]), new_policies=new, workers=1, now=NOW)
        data = report.to_dict()
        # Requests read, decisions made, rejections apart: counted independently of the impact code.
        refused = 0
        for line in filter(None, lines):
            try:
                engine.decide({**json.loads(line), "policy_version": "v2"}, now=NOW)
            except (ValueError, TypeError, RequestError):
                refused += 1
        assert data["requests"] == len(lines) - 1 and data["rejected"] == refused > 2
        assert data["decided"] == data["requests"] - refused and data["decisions"] == 2 * data["decided"]
        reasons = {r["reason"]: r for r in data["rejections"]}
        assert reasons["not JSON"]["inputs"] == [f"{path}:8"]
        assert reasons["not a JSON object"]["inputs"] == [f"{path}:9"]
        assert sum(r["count"] for r in data["rejections"]) == refused
        # Raising the minimum age only denies more, by the age rules, each example read from its line.
        assert set(data["flips"]) and data["flips"]["deny→allow"] == 0 and data["flips"]["allow→deny"] > 0
        for group in data["groups"]:
            for example in group["examples"]:
                where, number = example["input"].rsplit(":", 1)
                assert where == str(path) and json.loads(lines[int(number) - 1]) == example["request"]
                assert example["new"]["rule"].endswith("min-age") and example["new"]["version"] == "v2"
                assert 18 <= example["new"]["read"]["account.age"] < 25
                assert example["new"]["where"].startswith("v1/") and example["new"]["decision"] == "deny"
                if group["kind"] == "allow→deny":
                    assert example["old"]["decision"] == "allow" and example["old"]["rule"] is None
        assert main(["impact", "v2", "v2", "--policies", str(POLICIES), "--new-policies", str(new),
                     "--requests", str(path), "--quiet", "--workers", "1", "--format", "json"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["new"] == f"v2 of {new}" and said["flips"] == data["flips"]
        text = render(report, "text")
        assert f"{data['requests']} requests read: {data['decided']} decided under both" in text
        assert f"e.g. {path}:" in text and "read account.age=" in text and "not JSON" in text

    def test_policies_that_do_not_load_are_said_as_check_says_them(self, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
        new = other_checkout(tmp_path)
        (new / "v2" / "bind.yaml").write_text("rules:\n  - id: [broken\n")
        assert main(["check", str(new)]) == 3  # every command: exit 3
        said = capsys.readouterr().out.strip()
        assert said and "Traceback" not in said
        for argv in (["--new-policies", str(new)], ["--policies", str(new)]):
            assert main(["impact", "v1", "v2", *argv, "--requests", str(EXAMPLES), "--quiet"]) == 3
            err = capsys.readouterr().err
            assert err.strip() == said and "Traceback" not in err


class TestWholeLogReplay:
    def test_every_decision_of_a_served_log_reproduces(self, tmp_path: Path, served: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
        data = served
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

    def test_a_window_lists_what_differs_and_why_some_cannot(self, tmp_path: Path, served: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
        import shutil

        data = tmp_path / "data"
        shutil.copytree(served, data)
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


def test_ray_replay_ranges_check_and_replay_as_the_local_walk(tmp_path: Path, served: Path) -> None:
    """What each Ray worker does with its range of seqs, run here without Ray: ranges of 7 records
    (each range's first link checked against the record before it), merged, give the local
    replay's summary, on an intact log and on one altered mid-way, whole and from --since."""
    import shutil
    import sqlite3

    from engine.decisionlog import ChainVerifier
    from engine.logexport import window_items
    from engine.rayengine import _RangeReplayer, log_window, merged_ranges

    shutil.copytree(served, tmp_path / "data")
    path = tmp_path / "data" / "decisions.db"
    url = f"sqlite:///{path}"
    store = open_store(url, read_only=True)
    since = list(store.query(limit=11))[-1].logged_at
    for altered in (False, True):
        if altered:
            with sqlite3.connect(path) as db:
                db.execute("UPDATE decisions SET duration_us = duration_us + 1 WHERE seq = 30")
        store = open_store(url, read_only=True)
        for window_since in (None, since):
            local = replay_records(store, window_items(store, window_since, None),
                                   ChainVerifier(store.keys, from_first_seen=window_since is not None))
            window = log_window(store, window_since, None)
            worker = _RangeReplayer(url, None, window)
            ranges = merged_ranges(worker.replay(first, last) for first, last in window.ranges(7))
            assert ranges.to_dict() == local.to_dict(), (altered, window_since)
            assert (local.breach is not None) == altered and local.total >= 19


# --- Ray: a cluster of two nodes (ray start --head, then ray start --address), started once -------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    pytest.importorskip("ray")
    from .raycluster import RayCluster

    with RayCluster(cpus_per_node=1) as cluster:
        yield cluster.address


@pytest.mark.slow
def test_ray_cluster_gives_the_local_reports_figure_for_figure(ray_cluster: str, tmp_path: Path,
                                                               policies: PolicySet, served: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """On a cluster of two nodes, through --address as an operator runs it: impact over a generated
    corpus with rejected lines, the shipped corpus and a log export, with another checkout's set
    shipped beside the first; then the whole log replayed straight from its database and from the export. Each gives
    the local report, and both nodes did work."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(corpus()) + "\n")
    store = open_store(str(served / "decisions.db"))
    export_log(store, tmp_path / "export")
    inputs = [str(path), str(EXAMPLES), str(tmp_path / "export")]
    new = other_checkout(tmp_path)
    impact = ["impact", "v2", "v2", "--policies", str(POLICIES), "--new-policies", str(new), "--requests", *inputs,
              "--quiet"]
    ray = ["--engine", "ray", "--address", ray_cluster, "--workers", "2", "--format", "json"]
    assert main([*impact, "--workers", "1", "--format", "json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*impact, *ray]) == 0
    said = capsys.readouterr()
    on_ray = json.loads(said.out)
    for report in (local, on_ray):
        report.pop("seconds"), report.pop("decisions_per_second")
    assert on_ray == local and local["rejected"] > 30 and local["decided"] > 2300 and local["flips"]["allow→deny"]
    assert "on Ray: 2 node(s) did the work" in said.err
    examples = [x["input"] for g in local["groups"] for x in g["examples"]]
    assert any(":" in x and "corpus.jsonl" in x for x in examples + [i for r in local["rejections"]
                                                                    for i in r["inputs"]])

    records = sum(1 for _ in store.query())
    assert main(["replay", "--data", str(served), "--format", "json"]) == 0
    replayed_here = json.loads(capsys.readouterr().out)
    assert main(["replay", "--data", str(served), *ray]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out) == replayed_here and replayed_here["reproduced"] == records
    assert "each read by a worker from" in said.err and "on Ray: 2 node(s) did the work" in said.err
    assert main(["replay", "--from-export", str(tmp_path / "export"), *ray]) == 0  # its one day: one node
    assert json.loads(capsys.readouterr().out) == replayed_here


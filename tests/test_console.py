"""The console's page and the endpoints it calls (scratch copies, replay, the chain, impact), without a browser."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from flask import Flask
from flask.testing import FlaskClient

from api.app import scratch_enabled
from api.console import STATIC
from engine.errors import RequestError
from engine.impact import run_impact
from engine.inputs import numbered_lines
from engine.loader import load_policies
from engine.scratch import ScratchLimits, scratch_files

from .conftest import POLICIES, ROOT, bind_request, make_app

AUTH = {"Authorization": "Bearer log-secret"}


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    # The time bound has its own test; here a loaded machine must not make the work time out.
    return make_app(tmp_path, f"sqlite:///{tmp_path / 'decisions.db'}", SCRATCH_MAX_SECONDS=300.0)


@pytest.fixture
def files(client: FlaskClient) -> dict[str, str]:
    answer = client.get("/v1/sources")
    assert answer.status_code == 200
    body: dict[str, str] = answer.json["files"]  # type: ignore[index]
    return body


def _post(client: FlaskClient, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


# --- the page ------------------------------------------------------------------------------------


def test_the_page_is_served_under_a_strict_content_security_policy(client: FlaskClient) -> None:
    page = client.get("/console/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "unsafe" not in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = page.get_data(as_text=True)
    assert "<style" not in html and " style=" not in html and re.search(r"<script(?![^>]*\ssrc=)", html) is None
    for asset in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert client.get(f"/console/{asset}").status_code == 200, asset
    assert client.get("/console").status_code == 308


@pytest.mark.parametrize("path", ["/console/nothing.js", "/console/../app.py", "/console/%2e%2e/app.py",
                                  "/console/vendor/../../console.py"])
def test_anything_else_under_console_is_a_json_404(client: FlaskClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404 and answer.json["error"]["code"] == "not_found"  # type: ignore[index]


def test_every_endpoint_the_page_calls_is_documented(client: FlaskClient) -> None:
    documented = set(client.get("/openapi.json").json["paths"])  # type: ignore[index]
    called = set()
    for script in STATIC.glob("*.js"):
        for path in re.findall(r'[`"](/(?:v1|openapi)[^`"?]*)', script.read_text()):
            called.add(re.sub(r"\$\{[^}]*\}", "{}", path))
    assert len(called) >= 14
    patterns = {re.sub(r"\{[^}]*\}", "{}", p) for p in documented}
    assert called - patterns == set()


# --- scratch copies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("setting,bind,enabled", [
    ("auto", "127.0.0.1:8080", True), ("auto", "[::1]:8080", True), ("auto", "localhost:8080", True),
    ("auto", "0.0.0.0:8080", False), ("auto", "[::]:8080", False), ("auto", "10.1.2.3:80", False),
    ("on", "0.0.0.0:8080", True), ("off", "127.0.0.1:8080", False)])
def test_scratch_is_on_by_default_only_on_loopback(setting: str, bind: str, enabled: bool) -> None:
    assert scratch_enabled(setting, bind) is enabled


def test_scratch_off_is_a_json_403_and_said_by_its_settings(tmp_path: Path, files: dict[str, str]) -> None:
    app = make_app(tmp_path / "b", f"sqlite:///{tmp_path / 'b.db'}", BIND="0.0.0.0:8080")
    client = app.test_client()
    assert client.get("/v1/scratch").json["enabled"] is False  # type: ignore[index]
    for path in ("/v1/scratch/check", "/v1/scratch/decisions", "/v1/scratch/tests", "/v1/scratch/diff"):
        answer = _post(client, path, {"files": files})
        assert answer.status_code == 403 and answer.json["error"]["code"] == "scratch_disabled"  # type: ignore[index]
    with pytest.raises(ValueError, match="BINDPOLICY_SCRATCH"):
        make_app(tmp_path / "c", f"sqlite:///{tmp_path / 'c.db'}", SCRATCH="maybe")


def test_auto_takes_scratch_copies_from_this_machine_only(client: FlaskClient, files: dict[str, str]) -> None:
    remote = client.post("/v1/scratch/check", data=json.dumps({"files": files}), content_type="application/json",
                         environ_base={"REMOTE_ADDR": "10.0.0.5"})
    assert remote.status_code == 403 and remote.json["error"]["code"] == "scratch_disabled"  # type: ignore[index]
    local = client.post("/v1/scratch/check", data=json.dumps({"files": files}), content_type="application/json",
                        environ_base={"REMOTE_ADDR": "::1"})
    assert local.status_code == 200


def test_the_files_in_force_check_clean(client: FlaskClient, files: dict[str, str]) -> None:
    assert {"v1/bind.yaml", "v2/version.yaml", "tests/bind_personal_test.yaml"} <= set(files)
    answer = _post(client, "/v1/scratch/check", {"files": files})
    assert answer.status_code == 200
    assert answer.json["ok"] is True and answer.json["problems"] == []  # type: ignore[index]
    digests = {v.name: v.digest for v in load_policies(POLICIES)}
    assert {v["version"]: v["digest"] for v in answer.json["versions"]} == digests  # type: ignore[index]


def test_a_broken_copy_gives_every_problem_at_its_line_and_column(client: FlaskClient, files: dict[str, str]) -> None:
    text = files["v1/bind.yaml"]
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "account.age < params.min_age" in row)
    column = text.splitlines()[line - 1].index("age <") + 1
    broken = {**files, "v1/bind.yaml": text.replace("account.age < params.min_age", "account.agee < params.min_age"),
              "v2/version.yaml": files["v2/version.yaml"] + "nonsense: [\n"}
    answer = _post(client, "/v1/scratch/check", {"files": broken}).json
    assert answer["ok"] is False
    problems = {(p["file"], p["line"], p["column"], p["code"]) for p in answer["problems"]}
    assert ("v2/version.yaml", len(files["v2/version.yaml"].splitlines()) + 2, 1, "yaml_syntax") in problems
    only_cel = {**files, "v1/bind.yaml": broken["v1/bind.yaml"]}
    answer = _post(client, "/v1/scratch/check", {"files": only_cel}).json
    assert [(p["file"], p["line"], p["column"], p["code"]) for p in answer["problems"]] == [
        ("v1/bind.yaml", line, column, "unknown_field")]


@pytest.mark.parametrize("change,pointer,problem", [
    ({"../v1/x.yaml": "a: 1"}, "/files/..~1v1~1x.yaml", "expected a path"),
    ({"v1/x.txt": "a: 1"}, "/files/v1~1x.txt", "expected a path"),
    ({"v1/x.yaml": 3}, "/files/v1~1x.yaml", "expected the file's text"),
    ({"v1/big.yaml": "#" * 600_000}, "/files", "bytes; at most"),
])
def test_a_copy_that_cannot_be_taken_is_a_400_naming_the_file(
        client: FlaskClient, files: dict[str, str], change: dict[str, Any], pointer: str, problem: str) -> None:
    answer = _post(client, "/v1/scratch/check", {"files": {**files, **change}})
    assert answer.status_code == 400
    error = answer.json["error"]  # type: ignore[index]
    assert error["code"] == "invalid_scratch"
    assert any(d["path"] == pointer and problem in d["problem"] for d in error["details"]), error


def test_too_many_files_and_unknown_fields_are_refused(client: FlaskClient) -> None:
    many = {f"v1/f{i}.yaml": "a: 1" for i in range(ScratchLimits().files + 1)}
    assert _post(client, "/v1/scratch/check", {"files": many}).status_code == 400
    answer = _post(client, "/v1/scratch/check", {"files": {}, "extra": 1})
    assert answer.status_code == 400 and answer.json["error"]["details"][0]["path"] == "/extra"  # type: ignore[index]
    answer = client.post("/v1/scratch/check", data="{", content_type="application/json")
    assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_json"  # type: ignore[index]
    answer = client.post("/v1/scratch/check", data="{}", content_type="text/plain")
    assert answer.status_code == 415


def test_a_scratch_decision_uses_the_copy_and_is_not_logged(client: FlaskClient, files: dict[str, str]) -> None:
    request = bind_request(account={**bind_request()["account"], "age": 18})  # type: ignore[dict-item]
    stricter = {**files, "v1/bind.yaml": files["v1/bind.yaml"].replace("account.age < params.min_age",
                                                                       "account.age <= params.min_age")}
    answer = _post(client, "/v1/scratch/decisions?explain=true", {"files": stricter, "request": request})
    assert answer.status_code == 200
    assert answer.json["decision"] == "deny" and answer.json["rule"]["id"] == "personal.min-age"  # type: ignore[index]
    assert any(t["id"] == "personal.min-age" and t["values"] == {"account.type": "personal", "account.age": 18}
               for t in answer.json["explain"])  # type: ignore[index]
    assert _post(client, "/v1/decisions", request).json["decision"] == "allow"  # type: ignore[index]
    assert len(client.get("/v1/decisions", headers=AUTH).json["records"]) == 1  # type: ignore[index]
    bad = _post(client, "/v1/scratch/decisions", {"files": stricter, "request": {"action": "bind"}})
    assert bad.status_code == 400
    assert {d["path"] for d in bad.json["error"]["details"]} >= {"/request/role"}  # type: ignore[index]
    broken = {**files, "v1/bind.yaml": "rules: ["}
    answer = _post(client, "/v1/scratch/decisions", {"files": broken, "request": request})
    assert answer.status_code == 400 and answer.json["error"]["code"] == "policy_load_error"  # type: ignore[index]


@pytest.mark.slow
def test_suites_run_against_the_copy(client: FlaskClient, files: dict[str, str]) -> None:
    clean = _post(client, "/v1/scratch/tests", {"files": files}).json
    assert clean["ok"] is True and clean["failed"] == 0 and clean["passed"] > 100
    stricter = {**files, "v1/bind.yaml": files["v1/bind.yaml"].replace("account.age < params.min_age",
                                                                       "account.age <= params.min_age")}
    report = _post(client, "/v1/scratch/tests", {"files": stricter}).json
    assert report["ok"] is False and report["failed"] >= 1
    failing = [r for r in report["results"] if not r["passed"]]
    assert any("personal.min-age" in "\n".join(r["failures"]) for r in failing)
    assert all(r["where"].startswith("tests/") for r in failing)


@pytest.mark.slow
def test_diff_and_impact_between_the_set_in_force_and_the_copy(client: FlaskClient, files: dict[str, str]) -> None:
    same = _post(client, "/v1/scratch/diff", {"files": files}).json
    assert all(d["rules"] == {"added": [], "removed": [], "changed": []} for d in same["versions"].values())
    assert same["impact"]["requests"] == 2000 and sum(same["impact"]["flips"].values()) == 0
    stricter = {**files, "v1/bind.yaml": files["v1/bind.yaml"].replace("account.age < params.min_age",
                                                                       "account.age <= params.min_age")}
    answer = _post(client, "/v1/scratch/diff", {"files": stricter}).json
    for version in ("v1", "v2"):
        changed = answer["versions"][version]["rules"]["changed"]
        assert [c["id"] for c in changed] == ["personal.min-age"]
        assert changed[0]["changes"] == [{"field": "fires_when", "old": "account.age < params.min_age",
                                          "new": "account.age <= params.min_age"}]
    groups = {(g["kind"], g["rule"]): g["count"] for g in answer["impact"]["groups"]}
    assert groups.get(("allow→deny", "personal.min-age"), 0) > 0
    assert all(rule.endswith("personal.min-age") for _, rule in groups)  # it now decides first, or alone


def test_the_work_on_a_copy_is_bounded_in_time(tmp_path: Path, files: dict[str, str]) -> None:
    app = make_app(tmp_path / "t", f"sqlite:///{tmp_path / 't.db'}", SCRATCH_MAX_SECONDS=0.0)
    answer = _post(app.test_client(), "/v1/scratch/diff", {"files": files})
    assert answer.status_code == 400 and answer.json["error"]["code"] == "scratch_too_slow"  # type: ignore[index]


def test_scratch_files_are_checked_before_anything_is_parsed() -> None:
    with pytest.raises(RequestError) as caught:
        scratch_files(["v1/x.yaml"], ScratchLimits())
    assert caught.value.details[0].path == "/files"
    assert scratch_files({"v1/a.yaml": "é"}, ScratchLimits()) == {"v1/a.yaml": "é".encode()}


# --- auditors -----------------------------------------------------------------------------------------


def _log_some(client: FlaskClient, count: int = 5) -> list[str]:
    ids = []
    lines = (ROOT / "examples" / "requests.jsonl").read_text().splitlines()[:count]
    for line in lines:
        ids.append(client.post("/v1/decisions", data=line, content_type="application/json").json["decision_id"])
    return ids


def test_replay_of_a_logged_decision(client: FlaskClient) -> None:
    ids = _log_some(client)
    assert client.post(f"/v1/decisions/{ids[0]}/replay").status_code == 401
    answer = client.post(f"/v1/decisions/{ids[0]}/replay", headers=AUTH)
    assert answer.status_code == 200 and answer.json["status"] == "reproduced"  # type: ignore[index]
    assert answer.json["differences"] == []  # type: ignore[index]
    missing = client.post("/v1/decisions/nope/replay", headers=AUTH)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "unknown_decision"  # type: ignore[index]


def test_the_chain_state_names_an_altered_record(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    assert client.get("/v1/log/chain").status_code == 401
    _log_some(client, 6)
    state = client.get("/v1/log/chain?recent=4", headers=AUTH).json
    assert state["intact"] is True and state["checked"] == {"records": 4, "from_seq": 3, "to_seq": 6}
    assert state["head"]["seq"] == 6
    with sqlite3.connect(tmp_path / "decisions.db") as db:
        db.execute("UPDATE decisions SET decision = 'allow' WHERE seq = 5")
    state = client.get("/v1/log/chain", headers=AUTH).json
    assert state["intact"] is False and state["breach"]["seq"] == 5 and "altered" in state["breach"]["problem"]
    bad = client.get("/v1/log/chain?recent=0", headers=AUTH)
    assert bad.status_code == 400 and bad.json["error"]["details"][0]["path"] == "?recent"  # type: ignore[index]


def test_impact_between_versions_matches_the_command(client: FlaskClient) -> None:
    answer = client.get("/v1/policies/v1/impact/v2")
    assert answer.status_code == 200
    corpus = numbered_lines([str(ROOT / "examples" / "requests.jsonl")])
    body = answer.json
    now = datetime(2026, 1, 1, tzinfo=UTC)
    expected = run_impact(POLICIES, "v1", "v2", corpus, workers=1, now=now).to_dict()
    assert body["requests"] == expected["requests"] == 2000  # type: ignore[index]
    assert body["flips"] == expected["flips"] and body["groups"] == expected["groups"]  # type: ignore[index]
    assert body["groups"][0]["examples"][0]["input"].startswith("examples/requests.jsonl:")  # type: ignore[index]
    assert client.get("/v1/policies/v1/impact/v9").status_code == 404


def test_the_console_reads_a_corpus_as_the_impact_command_does(tmp_path: Path) -> None:
    """One reader (engine/inputs.py): a line that is not JSON, and one that is JSON but no object,
    are rejected under the same words, at the same file:line, by the console and by the command."""
    path = tmp_path / "corpus.jsonl"
    path.write_text(f"{json.dumps(bind_request())}\n{{broken\n\n[1, 2]\n")
    client = make_app(tmp_path, f"sqlite:///{tmp_path / 'decisions.db'}", CORPUS=str(path)).test_client()
    console = client.get("/v1/policies/v1/impact/v2").json
    command = run_impact(POLICIES, "v1", "v2", numbered_lines([str(path)]), workers=1).to_dict()
    assert console["rejections"] == command["rejections"] == [  # type: ignore[index]
        {"reason": "not JSON", "count": 1, "inputs": [f"{path}:2"]},
        {"reason": "not a JSON object", "count": 1, "inputs": [f"{path}:4"]}]
    assert console["requests"] == command["requests"] == 3 and console["decided"] == 1  # type: ignore[index]
    path.unlink()  # read once: the console keeps what it read
    assert client.get("/v1/policies/v1/impact/v2").json == {**console, "seconds": ANY, "decisions_per_second": ANY}  # type: ignore[dict-item]
    unreadable = make_app(tmp_path, f"sqlite:///{tmp_path / 'other.db'}", CORPUS=str(tmp_path)).test_client()
    answer = unreadable.get("/v1/policies/v1/impact/v2")
    assert answer.status_code == 503 and answer.json["error"]["code"] == "corpus_unreadable"  # type: ignore[index]
    assert str(tmp_path) in answer.json["error"]["message"]  # type: ignore[index]


def test_examples_decide_as_labelled(client: FlaskClient) -> None:
    examples = client.get("/v1/examples").json["examples"]  # type: ignore[index]
    actions = {e["request"]["action"] for e in examples}
    assert actions == {"bind", "unbind", "create_org_account", "upgrade_start", "upgrade_confirm", "upgrade_cancel",
                       "enable_affiliate", "login"}
    for example in examples:
        decided = _post(client, "/v1/decisions", example["request"]).json
        assert example["label"].endswith(f": {decided['decision']}")

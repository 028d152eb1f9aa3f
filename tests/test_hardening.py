"""Bad input and bad luck: whatever a client sends, a clear 400 naming the field, never a 500,
never a decision on a value nobody checked, and the log keeps every answered decision."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from engine.cli import main
from engine.decider import Engine
from engine.decisionlog import LogError, _Pending, new_record, open_store
from engine.loader import load_policies

from .conftest import NOW, POLICIES, VERSION_V1, WriteFiles, bind_request, make_app

LOG = {"Authorization": "Bearer log-secret"}


def post_raw(client: FlaskClient, body: str) -> Any:
    return client.post("/v1/decisions", data=body.encode("utf-8", "surrogatepass"), content_type="application/json")


@pytest.mark.parametrize("body", [
    '{"action": "bind", "account": {"name": "\\ud800"}}',  # a lone surrogate
    '{"action": "upgrade_confirm", "account": {"upgrade": {"unwithdrawn_earnings": NaN}}}',
    '{"a": 1e400}',
    "[" * 10_000,  # deeper than orjson goes (beyond 20,000 brackets the count refuses it first)
])
def test_json_that_cannot_be_held_faithfully_is_a_400(client: FlaskClient, body: str) -> None:
    response = post_raw(client, body)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json"
    assert response.json["error"]["details"][0]["problem"].startswith("line 1 column")


def test_a_bad_body_does_not_fail_anybody_elses_decision(client: FlaskClient) -> None:
    statuses: list[int] = []

    def good() -> None:
        for _ in range(20):
            statuses.append(client.post("/v1/decisions", json=bind_request()).status_code)

    def bad() -> None:
        for _ in range(20):
            post_raw(client, '{"action": "bind", "account": {"name": "\\ud800"}}')

    threads = [threading.Thread(target=good) for _ in range(3)] + [threading.Thread(target=bad)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 60


@pytest.mark.parametrize(("where", "value"), [
    ("at", "2025-06-30T23:59:60Z"),
    ("at", "0000-01-01T00:00:00Z"),
    ("at", "0001-01-01T00:30:00+01:00"),
    ("at", "9999-12-31T23:30:00-01:00"),
    ("shop.channel_unbinds", ["2025-01-01T00:00:00Z", "2025-06-30T23:59:60Z"]),
])
def test_timestamps_python_cannot_hold_are_a_400_naming_the_field(client: FlaskClient, where: str,
                                                                  value: Any) -> None:
    request = bind_request()
    if where == "at":
        request["at"] = value
        pointer = "/at"
    else:
        request["shop"]["channel_unbinds"] = value  # type: ignore[index]
        pointer = "/shop/channel_unbinds/1"
    response = client.post("/v1/decisions", json=request)
    assert response.status_code == 400, response.json
    assert [d["path"] for d in response.json["error"]["details"]] == [pointer]


def test_a_country_with_a_trailing_newline_is_refused(client: FlaskClient) -> None:
    request = bind_request()
    request["shop"]["market"] = "US\n"  # type: ignore[index]
    response = client.post("/v1/decisions", json=request)
    assert response.status_code == 400
    assert {d["path"] for d in response.json["error"]["details"]} == {"/shop/market"}


@pytest.mark.parametrize("query", ["limit=%C2%B2", "after=99999999999999999999999",
                                   "since=0001-01-01T00:00:00%2B01:00", "until=2025-13-01T00:00:00Z"])
def test_odd_log_queries_are_a_400(client: FlaskClient, query: str) -> None:
    response = client.get(f"/v1/decisions?{query}", headers=LOG)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_query"


def test_the_bearer_scheme_is_case_insensitive(client: FlaskClient) -> None:
    assert client.get("/v1/decisions", headers={"Authorization": "bearer log-secret"}).status_code == 200
    assert client.get("/v1/decisions", headers={"Authorization": "Basic log-secret"}).status_code == 401


def test_a_denial_does_not_need_the_fields_of_outputs(engine: Engine) -> None:
    request = bind_request(role="channel", invitation=None)
    del request["account"]["affiliate_enabled"]  # type: ignore[attr-defined]
    decision = engine.decide(request, now=NOW)
    assert decision.decision == "deny" and decision.rule is not None and decision.rule.id == "channel.invited"


def test_an_output_that_fails_denies_with_no_outputs(write_policies: WriteFiles) -> None:
    root = write_policies({"v1/version.yaml": VERSION_V1, "v1/rules.yaml": """\
        outputs:
          - name: fine
            actions: [login]
            value: '"yes"'
            source: test
          - name: broken
            actions: [login]
            value: 1 / 0
            source: test
        """})
    engine = Engine(load_policies(root))
    got = engine.decide({"action": "login", "at": "2025-01-01T00:00:00Z", "account": {"id": "a"},
                         "login": {"method": "otp", "target": "app"}}, now=NOW)
    assert got.decision == "deny" and dict(got.outputs) == {}
    assert got.rule is not None and got.rule.id == "output.broken" and "fail closed" in got.rule.message


def test_the_whole_chain_must_start_at_genesis(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    for n in range(1, 5):
        store.write(new_record(decision_id=f"d{n}", outcome="decided", status=200, request={"n": n},
                               response={}, duration_us=1))
    conn = store._connect()
    conn.execute("DELETE FROM decisions WHERE seq IN (1, 2)")
    conn.commit()
    conn.close()
    breach = store.verify()
    assert breach is not None and breach.seq == 1 and "missing" in breach.problem
    assert store.verify(store.tail(2)) is None  # the tail alone is consistent: that is why the head is shown


def test_one_bad_caller_does_not_sink_its_group_and_a_batch_commits_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    real = store._append

    def refuse_poison(conn: Any, records: list[Any]) -> Any:
        if any(r.decision_id.startswith("poison") for r in records):
            raise ValueError("cannot store this one")
        return real(conn, records)

    def record(decision_id: str) -> Any:
        return new_record(decision_id=decision_id, outcome="decided", status=200, request={}, response={},
                          duration_us=1)

    monkeypatch.setattr(store, "_append", refuse_poison)
    # Three callers committed as one group: the poisoned one fails alone; a two-record batch stays whole.
    callers = [_Pending([record("a")]), _Pending([record("poison-1")]), _Pending([record("b"), record("c")])]
    store._commit(callers)
    assert [c.error is None for c in callers] == [True, False, True]
    assert [r.decision_id for r in store.query()] == ["a", "b", "c"]
    # One caller's batch with one record the store refuses: none of it is committed (never logged
    # but unanswered).
    with pytest.raises(LogError, match="cannot store this one"):
        store.write_many([record("d"), record("poison-2"), record("e")])
    assert [r.decision_id for r in store.query()] == ["a", "b", "c"]
    assert store.verify() is None


def test_cli_lines_with_unusable_timestamps_are_errors_and_the_rest_go_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (bind_request(at="2025-06-30T23:59:60Z"), bind_request())))
    code = main(["decide", str(path), "--policies", str(POLICIES)])
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert code == 2
    assert first["error"]["details"][0]["path"] == "/at" and first["line"] == 1
    assert second["decision"] == "allow"


def test_a_rejected_batch_is_logged_as_received(tmp_path: Path) -> None:
    app = make_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}")
    client = app.test_client()
    response = client.post("/v1/decisions/batch", json={"requests": 5})
    record = client.get(f"/v1/decisions/{response.json['decision_id']}", headers=LOG).json["record"]
    assert record["request"] == {"requests": 5} and record["status"] == 400

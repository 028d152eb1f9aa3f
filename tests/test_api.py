"""The HTTP API through Flask's test client, every endpoint and error status, against SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from engine.cli import main
from engine.decisionlog import (
    COLUMNS,
    BrokenRecord,
    LogError,
    LogRecord,
    Store,
    _Pending,
    canonical,
    new_record,
    open_store,
    record_from_row,
)
from engine.logkeys import MacKey, MacKeyring
from engine.schemas import load_schema

from .conftest import bind_request, make_app

LOG = {"Authorization": "Bearer log-secret"}


def conforms(body: Any, definition: str) -> None:
    schema = {**load_schema("response"), "$ref": f"#/$defs/{definition}"}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(body)]
    assert errors == [], errors


def logged(client: FlaskClient, decision_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/decisions/{decision_id}", headers=LOG)
    assert response.status_code == 200, response.json
    record: dict[str, Any] = response.json["record"]
    return record


def store_of(app: Flask) -> Any:
    return app.extensions["bindpolicy"].store


def database_url_of(store: Any) -> str:
    return str(getattr(store, "url", "sqlite"))


class TestDecisions:
    def test_a_decision_is_answered_and_logged(self, client: FlaskClient, app: Flask) -> None:
        request = bind_request()
        response = client.post("/v1/decisions", json=request)
        assert response.status_code == 200 and response.is_json
        body = response.json
        conforms(body, "decision")
        assert body["decision"] == "allow" and body["policy"]["version"] == "v2"
        record = logged(client, body["decision_id"])
        assert record["request"] == request and record["response"] == body
        assert record["outcome"] == "decided" and record["status"] == 200
        assert record["policy_digest"] == body["policy"]["digest"] and record["duration_us"] > 0
        assert store_of(app).verify() is None

    def test_explain(self, client: FlaskClient) -> None:
        request = bind_request()
        request["account"]["age"] = 17  # type: ignore[index]
        body = client.post("/v1/decisions?explain=true", json=request).json
        conforms(body, "decision")
        assert {t["id"]: t["outcome"] for t in body["explain"]}["personal.min-age"] == "fired"
        assert "explain" not in client.post("/v1/decisions", json=request).json

    @pytest.mark.parametrize(("payload", "code", "paths"), [
        ({"action": "bind"}, "invalid_request", ["/account", "/role", "/shop"]),
        ({**bind_request(), "policy_version": "v7"}, "unknown_version", ["/policy_version"]),
        ({**bind_request(), "at": "2020-01-01T00:00:00Z"}, "no_version_in_force", ["/at"]),
        ([1, 2], "invalid_request", [""]),
    ])
    def test_bad_requests_are_400_with_pointers_and_logged(self, client: FlaskClient, payload: Any, code: str,
                                                           paths: list[str]) -> None:
        response = client.post("/v1/decisions", json=payload)
        assert response.status_code == 400
        body = response.json
        conforms(body, "error")
        assert body["error"]["code"] == code
        assert [d["path"] for d in body["error"]["details"]] == paths
        record = logged(client, body["decision_id"])
        assert record["outcome"] == "rejected" and record["status"] == 400 and record["request"] == payload

    def test_a_missing_field_a_rule_needs(self, client: FlaskClient) -> None:
        request = bind_request()
        del request["account"]["age"]  # type: ignore[attr-defined]
        body = client.post("/v1/decisions", json=request).json
        assert body["error"]["code"] == "missing_field"
        assert body["error"]["details"] == [{"path": "/account/age",
                                             "problem": "required by personal.min-age but missing"}]

    def test_broken_json_is_400_and_logged_as_received(self, client: FlaskClient) -> None:
        response = client.post("/v1/decisions", data='{"action": ', content_type="application/json")
        assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json"
        assert logged(client, response.json["decision_id"])["request"] == '{"action": '

    def test_wrong_media_type_is_415(self, client: FlaskClient) -> None:
        response = client.post("/v1/decisions", data=json.dumps(bind_request()), content_type="text/plain")
        assert response.status_code == 415 and response.json["error"]["code"] == "unsupported_media_type"
        conforms(response.json, "error")

    def test_a_body_over_the_limit_is_413(self, tmp_path: Path, database_url: str) -> None:
        client = make_app(tmp_path, database_url, MAX_CONTENT_LENGTH=200).test_client()
        response = client.post("/v1/decisions", json=bind_request())
        assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"

    def test_wrong_method_is_405_and_unknown_paths_404_as_json(self, client: FlaskClient) -> None:
        response = client.get("/v1/decisions/batch", headers=LOG)
        assert response.status_code in (404, 405)  # GET /v1/decisions/<id> matches 'batch' as an id
        response = client.put("/v1/decisions")
        assert response.status_code == 405 and response.is_json
        assert "POST" in response.headers["Allow"]
        response = client.get("/v2/nothing")
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found"

    def test_no_stack_trace_ever(self, client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
        def explode(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(app.extensions["bindpolicy"].holder.engine, "decide_checked", explode)  # (every way)
        response = client.post("/v1/decisions", json=bind_request())
        assert response.status_code == 500 and response.is_json
        assert "secret internals" not in response.get_data(as_text=True)
        assert "Traceback" not in response.get_data(as_text=True)
        record = logged(client, response.json["decision_id"])  # even a failure of ours is in the log
        assert record["outcome"] == "failed" and record["status"] == 500


class TestBatch:
    def test_answers_in_order_and_a_bad_one_does_not_sink_the_rest(self, client: FlaskClient) -> None:
        young = bind_request()
        young["account"]["age"] = 16  # type: ignore[index]
        response = client.post("/v1/decisions/batch", json={"requests": [bind_request(), {"action": "x"}, young]})
        assert response.status_code == 200
        conforms(response.json, "batch")
        answers = response.json["decisions"]
        assert [a.get("decision") or a["error"]["code"] for a in answers] == ["allow", "invalid_request", "deny"]
        assert [logged(client, a["decision_id"])["outcome"] for a in answers] == ["decided", "rejected", "decided"]

    def test_batch_limits_and_shape(self, tmp_path: Path, database_url: str) -> None:
        client = make_app(tmp_path, database_url, MAX_BATCH=2).test_client()
        response = client.post("/v1/decisions/batch", json={"requests": [bind_request()] * 3})
        assert response.status_code == 413 and response.json["error"]["code"] == "batch_too_large"
        response = client.post("/v1/decisions/batch", json=[bind_request()])
        assert response.status_code == 400 and response.json["error"]["details"][0]["path"] == "/requests"
        # What the one-pass reading of a batch cannot take is read the strict way, refused whole as ever.
        one = json.dumps(bind_request())

        def batch_of(text: str, after: str = "") -> str:
            return '{"requests": [' + text + "]" + after + "}"

        for body, code, words in (
                (batch_of(one, ', "requests": []'), "invalid_json", "a key twice"),
                (batch_of(one, ', "more": 1'), "invalid_request", 'a batch is {"requests": [...]}'),
                (batch_of(one) + " x", "invalid_json", "not valid JSON"),
                (batch_of(one.replace('"action": "bind"', '"action": "bind", "action": "bind"')),
                 "invalid_json", "a key twice"),
                (batch_of(one.replace('"age": 30', '"age": 30.000000000000001')), "invalid_json",
                 "a double cannot hold")):
            answer = client.post("/v1/decisions/batch", data=body, content_type="application/json")
            assert (answer.status_code, answer.json["error"]["code"]) == (400, code), body[-80:]
            assert words in answer.json["error"]["message"]
            kept = logged(client, answer.json["decision_id"])["request"]  # as received, or as read
            assert kept == (body if code == "invalid_json" else json.loads(body))
        spaced = '{ "requests" :\n[ ' + one + " ," + json.dumps(bind_request(), separators=(",", ":")) + " ] }"
        answer = client.post("/v1/decisions/batch", data=spaced, content_type="application/json")
        assert [a["decision"] for a in answer.json["decisions"]] == ["allow", "allow"]

    def test_a_batch_answers_and_logs_as_its_requests_one_by_one(self, tmp_path: Path, database_url: str) -> None:
        """Read in one pass or the strict way, each request of a batch gets the answer, and the log
        the record, it gets sent alone (but for ids and times); the chain holds (`log verify`)."""
        young, missing, nulls, strict = bind_request(), bind_request(), bind_request(), bind_request()
        young["account"]["age"] = 16  # type: ignore[index]
        del missing["account"]["age"]  # type: ignore[attr-defined]
        nulls["account"]["kyc"] = None  # type: ignore[index]
        strict["account"]["followers"] = 5000.0  # type: ignore[index]  (an integer written 5000.0)
        requests = [bind_request(), young, {"action": "x"}, missing, bind_request(policy_version="v7"), nulls,
                    strict, [1], bind_request(at="2020-01-01T00:00:00Z"), bind_request(policy_version="v1")]
        client = make_app(tmp_path, database_url).test_client()
        store = client.application.extensions["bindpolicy"].store

        def same(body: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in body.items() if k != "decision_id"}

        def kept(record: dict[str, Any]) -> dict[str, Any]:
            return {**{k: v for k, v in record.items() if k not in ("seq", "decision_id", "logged_at", "duration_us",
                                                                   "prev_hash", "hash")},
                    "response": same(record["response"])}

        alone = [client.post("/v1/decisions", json=r).json for r in requests]
        assert [a.get("decision") or a["error"]["code"] for a in alone] == [
            "allow", "deny", "invalid_request", "missing_field", "unknown_version", "allow", "allow",
            "invalid_request", "no_version_in_force", "allow"]
        check = client.application.extensions["bindpolicy"].holder.engine.check
        vouched = [check.vouch(json.dumps(r).encode()) is not None for r in requests]
        assert vouched == [True, True, False, True, True, False, False, False, True, True]
        # All read in one pass; then some the strict way (a request of those has its own error entry);
        # then each twice (the time and version chosen for an `at` and `policy_version` are kept for
        # the batch's next request with the same, a version or time refused is refused again).
        for chosen in ([n for n, ok in enumerate(vouched) if ok], list(range(len(requests))),
                       [*range(len(requests)), *range(len(requests))]):
            batch = client.post("/v1/decisions/batch", json={"requests": [requests[n] for n in chosen]})
            assert batch.status_code == 200
            assert [same(a) for a in batch.json["decisions"]] == [same(alone[n]) for n in chosen]
            assert [kept(logged(client, a["decision_id"])) for a in batch.json["decisions"]] == \
                [kept(logged(client, alone[n]["decision_id"])) for n in chosen]
            seqs = [logged(client, a["decision_id"])["seq"] for a in batch.json["decisions"]]
            assert seqs == list(range(seqs[0], seqs[0] + len(chosen)))  # in order, one after another
        assert store.verify() is None
        # (--data: the app's own folder, not the working directory's data/, whose checkpoints,
        # left there by `make run`, are another log's)
        assert main(["log", "verify", "--database-url", database_url, "--data", str(tmp_path)]) == 0

    def test_a_database_that_refuses_a_row_fails_the_batch_whole(self, client: FlaskClient, app: Flask) -> None:
        store = store_of(app)
        client.post("/v1/decisions/batch", json={"requests": [bind_request()] * 3})
        head = store.head()
        conn = store._connect()  # the 3rd row of the next batch is refused, after two went in
        trigger = ("CREATE TRIGGER refuse BEFORE INSERT ON decisions WHEN NEW.seq = {} "
                   "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        if database_url_of(store).startswith("postgresql"):
            conn.execute("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.seq = %s THEN "
                         "RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql" % (head[0] + 3))
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON decisions FOR EACH ROW EXECUTE FUNCTION refuse()")
        else:
            conn.execute(trigger.format(head[0] + 3))
        conn.commit()
        refused = client.post("/v1/decisions/batch", json={"requests": [bind_request()] * 5})
        assert refused.status_code == 503 and refused.json["error"]["code"] == "log_unavailable"
        assert "decisions" not in refused.json
        assert store.head() == head and store.verify() is None  # none of it: no half-written chain
        conn.execute("DROP TRIGGER refuse" + (" ON decisions" if database_url_of(store).startswith("postgresql")
                                              else ""))
        conn.commit()
        conn.close()
        answer = client.post("/v1/decisions/batch", json={"requests": [bind_request()] * 5})
        assert answer.status_code == 200 and store.head()[0] == head[0] + 5 and store.verify() is None


class TestLogAccess:
    def test_reading_the_log_needs_a_token(self, client: FlaskClient) -> None:
        decision_id = client.post("/v1/decisions", json=bind_request()).json["decision_id"]
        assert client.get(f"/v1/decisions/{decision_id}").status_code == 401
        response = client.get(f"/v1/decisions/{decision_id}", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/v1/decisions", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/decisions/unknown-id", headers=LOG).status_code == 404

    def test_deciding_can_need_a_token(self, tmp_path: Path, database_url: str) -> None:
        client = make_app(tmp_path, database_url, DECISION_TOKENS="caller-1,caller-2").test_client()
        store = client.application.extensions["bindpolicy"].store
        # A 401 is a rejection like any other: a decision id in the answer, its record in the log.
        for path, body, headers in (("/v1/decisions", bind_request(), {}),
                                    ("/v1/decisions/batch", {"requests": [bind_request()]},
                                     {"Authorization": "Bearer caller-3"})):
            refused = client.post(path, json=body, headers=headers)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            assert refused.json["error"]["code"] == "unauthorized"
            record = store.get(refused.json["decision_id"])
            assert record is not None and (record.status, record.outcome) == (401, "rejected")
            assert record.response == refused.json
        response = client.post("/v1/decisions", json=bind_request(), headers={"Authorization": "Bearer caller-2"})
        assert response.status_code == 200
        assert store.get(response.json["decision_id"]).status == 200

    def test_query_filters_and_paging(self, client: FlaskClient) -> None:
        young = bind_request()
        young["account"]["age"] = 16  # type: ignore[index]
        for request in (bind_request(), young, young, {"action": "nope"}):
            client.post("/v1/decisions", json=request)
        denied = client.get("/v1/decisions?decision=deny&rule_id=personal.min-age", headers=LOG).json
        assert len(denied["records"]) == 2 and denied["next"] is None
        page = client.get("/v1/decisions?limit=3", headers=LOG).json
        assert len(page["records"]) == 3 and page["next"] == page["records"][-1]["seq"]
        rest = client.get(f"/v1/decisions?after={page['next']}", headers=LOG).json
        assert [r["outcome"] for r in rest["records"]] == ["rejected"]
        assert client.get("/v1/decisions?shop_id=shop-1&action=bind", headers=LOG).json["records"][0]["shop_id"] \
            == "shop-1"
        bad = client.get("/v1/decisions?limit=0&since=yesterday&colour=red", headers=LOG)
        assert bad.status_code == 400
        assert [d["path"] for d in bad.json["error"]["details"]] == ["?colour", "?limit", "?since"]


class TestPoliciesAndHealth:
    def test_policies(self, client: FlaskClient) -> None:
        body = client.get("/v1/policies").json
        assert [v["version"] for v in body["versions"]] == ["v1", "v2"] and body["in_force"] == "v2"
        assert body["versions"][1]["in_force"] and body["versions"][1]["digest"].startswith("sha256:")
        v2 = client.get("/v1/policies/v2").json
        kyc = next(r for r in v2["rules"] if r["id"] == "personal.kyc")
        assert kyc["defined_in"] == "v2" and 'shop.market != "US"' in kyc["applies_when"]
        assert kyc["location"].startswith("v2/bind.yaml:") and v2["parameters"]["min_age"] == 18
        assert client.get("/v1/policies/v9").status_code == 404

    def test_health_and_readiness(self, client: FlaskClient) -> None:
        assert client.get("/healthz").json == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json["decision_log"] == "writable"
        assert set(ready.json["policies"]) == {"v1", "v2"}

    def test_metrics(self, client: FlaskClient) -> None:
        client.post("/v1/decisions", json=bind_request())
        client.post("/v1/decisions", json={"action": "nope"})
        text = client.get("/metrics").get_data(as_text=True)
        assert 'bindpolicy_decisions_total{action="bind",decision="allow",rule=""} 1.0' in text
        assert 'bindpolicy_rejections_total{code="invalid_request"} 1.0' in text
        assert 'bindpolicy_request_seconds_count{endpoint="decide"} 2.0' in text
        assert 'version="v2"} 2.0' in text and "bindpolicy_policy_reload_failures_total 0.0" in text

    def test_metrics_count_every_decision_of_a_batch(self, client: FlaskClient) -> None:
        # (a batch's decisions are counted once per label set: the counts must still be whole)
        batch = {"requests": [bind_request(), {"action": "nope"}, bind_request(), bind_request(), {"action": "x"}]}
        assert client.post("/v1/decisions/batch", json=batch).status_code == 200
        text = client.get("/metrics").get_data(as_text=True)
        assert 'bindpolicy_decisions_total{action="bind",decision="allow",rule=""} 3.0' in text
        assert 'bindpolicy_rejections_total{code="invalid_request"} 2.0' in text


class TestLogFailure:
    def test_no_answer_without_its_record(self, client: FlaskClient, app: Flask,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        store = store_of(app)

        def refuse(records: Any) -> Any:
            raise LogError("disk full")

        monkeypatch.setattr(store, "write_many", refuse)
        monkeypatch.setattr(store, "writable", lambda: False)
        response = client.post("/v1/decisions", json=bind_request())
        assert response.status_code == 503 and response.json["error"]["code"] == "log_unavailable"
        assert "decision" not in response.json
        assert client.get("/readyz").status_code == 503
        assert "bindpolicy_decision_log_write_failures_total 1.0" in client.get("/metrics").get_data(as_text=True)


class TestOpenAPI:
    def test_built_from_the_engines_schemas(self, client: FlaskClient) -> None:
        doc = client.get("/openapi.json").json
        assert doc["openapi"] == "3.1.0"
        request = load_schema("request")
        component = doc["components"]["schemas"]["DecisionRequest"]
        assert component["properties"]["action"] == request["properties"]["action"]
        assert set(request["$defs"]) <= {k.removeprefix("request.") for k in doc["components"]["schemas"]}
        assert doc["components"]["schemas"]["request.account"]["properties"]["age"] == \
            request["$defs"]["account"]["properties"]["age"]
        assert {"/v1/decisions", "/v1/decisions/batch", "/v1/decisions/{decision_id}", "/v1/policies",
                "/v1/policies/{version}", "/v1/policies/{old}/diff/{new}", "/healthz", "/readyz", "/metrics",
                "/openapi.json"} <= set(doc["paths"])  # the console's endpoints too (tests/test_console.py)

    def test_every_ref_resolves(self, client: FlaskClient) -> None:
        doc = client.get("/openapi.json").json
        refs: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                refs.extend(v for k, v in node.items() if k == "$ref")
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(doc)
        assert refs
        for ref in refs:
            assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in doc["components"]["schemas"]


class TestHotReload:
    def test_a_good_change_swaps_in_whole_and_a_bad_one_is_refused(self, tmp_path: Path, database_url: str,
                                                                   policy_copy: Path) -> None:
        app = make_app(tmp_path, database_url, POLICY_DIR=str(policy_copy))
        client, holder = app.test_client(), app.extensions["bindpolicy"].holder
        before = client.get("/v1/policies").json["versions"][1]["digest"]
        bind = policy_copy / "v1" / "bind.yaml"
        good = bind.read_text()
        bind.write_text(good.replace("at least {params.min_age} years old", "{params.min_age} or older"))
        assert holder.reload_if_changed()
        young = bind_request()
        young["account"]["age"] = 17  # type: ignore[index]
        answer = client.post("/v1/decisions", json=young).json
        assert answer["rule"]["message"] == "The holder of a personal account must be 18 or older."
        after = answer["policy"]["digest"]
        assert after != before
        # The new content is kept by digest, for replay.
        version, files = store_of(app).policy(after)
        assert version == "v2" and "{params.min_age} or older" in files["v1/bind.yaml"]

        bind.write_text(good.replace("fires_when: account.age < params.min_age", "fires_when: account.agee < 1"))
        assert not holder.reload_if_changed()
        assert client.post("/v1/decisions", json=young).json["policy"]["digest"] == after  # last good set serves
        ready = client.get("/readyz").json
        assert ready["last_reload"]["status"] == "refused" and "'agee' is not a field" in ready["last_reload"]["error"]
        assert "bindpolicy_policy_reload_failures_total 1.0" in client.get("/metrics").get_data(as_text=True)


def test_one_json_log_line_per_request_with_the_decision_id(client: FlaskClient,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bindpolicy.access"):
        body = client.post("/v1/decisions", json=bind_request()).json
    lines = [r for r in caplog.records if r.name == "bindpolicy.access"]
    assert len(lines) == 1
    assert lines[0].__dict__["decision_id"] == body["decision_id"] and lines[0].__dict__["status"] == 200


class TestStore:
    """The decision log itself: group commit and the hash chain, on both stores."""

    def record(self, n: int) -> Any:
        return new_record(decision_id=f"d-{n}", outcome="decided", status=200, request={"n": n},
                          response={"decision": "allow"}, duration_us=n)

    def test_records_made_without_init_are_the_dataclass_own(self) -> None:
        # new_record, chained and record_from_row fill a record's fields without __init__: the same
        # record as the dataclass makes, and the MAC as hmac.new's.
        request, response = {"action": "bind", "shop": {"id": "s\0"}, "n": 2**70}, {"decision": "deny", "policy": 3}
        made = new_record(decision_id="d", outcome="decided", status=200, request=request, response=response,
                          duration_us=7, logged_text="2025-01-01T00:00:00.000000Z", policy_digest="sha256:x")
        assert made == LogRecord(decision_id="d", logged_at="2025-01-01T00:00:00.000000Z", outcome="decided",
                                 status=200, request=request, response=response, duration_us=7, action="bind",
                                 decision="deny", policy_digest="sha256:x")
        key = MacKey(b"k" * 32)
        chained = made.chained(4, "h", MacKeyring((key,)))
        assert chained.hash == f"hmac-sha256:{key.id}:" + hmac.new(key.secret, ("h" + chained.content()).encode(),
                                                                  hashlib.sha256).hexdigest()
        assert made.content().startswith(canonical({c: getattr(made, c) for c in COLUMNS
                                                    if c not in ("request", "response", "prev_hash", "hash")}))
        row = tuple(getattr(chained, c) if c not in ("request", "response") else getattr(chained, f"{c}_text")
                    for c in COLUMNS)
        assert record_from_row(row) == chained and record_from_row((*row[:4], True, *row[5:])) == BrokenRecord(
            4, "d", "its status is bool, not int")

    def test_a_group_is_chained_as_each_record_would_be(self) -> None:
        # Store._chain writes LogRecord.chained out in one loop: the same records, hashes and MACs,
        # an integer beyond 64 bits (canonical's other way) included.
        records = [new_record(decision_id=f"d-{n}", outcome="decided", status=200, request={"n": n},
                              response={"decision": "allow", "é": "中"}, duration_us=2**70 if n == 1 else n,
                              request_text='{"n": 2}' if n == 2 else "") for n in range(4)]
        for keys in (None, MacKeyring((MacKey(b"k" * 32),))):
            store = Store(keys=keys)
            chained = store._chain(records, (6, "a" * 64))
            one_by_one, prev = [], "a" * 64
            for seq, record in enumerate(records, 7):
                one_by_one.append(record.chained(seq, prev, keys))
                prev = one_by_one[-1].hash
            assert chained == one_by_one and [r.hash for r in chained] == [r.hash for r in one_by_one]
            assert [r.seq for r in records] == [0] * 4  # the records given are not changed
            assert store.verify(chained) is None  # (their hashes or MACs taken again by the chain's verifier)

    def test_concurrent_writes_are_grouped_and_chained(self, database_url: str) -> None:
        store = open_store(database_url)
        threads = [threading.Thread(target=lambda i=i: [store.write(self.record(i * 100 + k)) for k in range(25)])
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records = list(store.query())
        assert [r.seq for r in records] == list(range(1, 201))
        assert store.records == 200 and store.batches < 200  # commits were grouped
        assert store.verify() is None
        store.close()

    def test_a_row_the_database_refuses_fails_its_caller_alone(self, database_url: str) -> None:
        # A decision id logged already: the database refuses the group's transaction (on
        # PostgreSQL, a small group is sent as one message with its COMMIT, which then never runs;
        # a larger one as rows bound by the server, then COMMIT); it is rolled back, each caller
        # is tried alone, and the connection goes on taking commits.
        store = open_store(database_url)
        store.write(self.record(1))
        callers = [_Pending([self.record(2)]), _Pending([self.record(1)]),
                   _Pending([self.record(n) for n in range(3, 9)])]
        store._commit(callers)
        assert [c.error is None for c in callers] == [True, False, True]
        store.write(self.record(9))
        assert [(r.seq, r.decision_id) for r in store.query()] == [(n, f"d-{n}") for n in range(1, 10)]
        assert store.verify() is None
        store.close()

    def test_tampering_is_found(self, database_url: str) -> None:
        store = open_store(database_url)
        for n in range(1, 6):
            store.write(self.record(n))
        conn = store._connect()
        conn.execute("UPDATE decisions SET request = '{\"n\": 99}' WHERE seq = 3")
        conn.commit()
        breach = store.verify()
        assert breach is not None and breach.seq == 3 and "altered" in breach.problem
        conn.execute("UPDATE decisions SET request = '{\"n\":3}' WHERE seq = 3")  # as stored
        conn.execute("DELETE FROM decisions WHERE seq = 4")
        conn.commit()
        conn.close()
        breach = store.verify()
        assert breach is not None and breach.seq == 4 and "missing" in breach.problem
        store.close()



def test_list_lengths_are_bounded_as_configured(tmp_path: Path, database_url: str) -> None:
    client = make_app(tmp_path, database_url, MAX_LIST_ITEMS=3).test_client()
    request = bind_request()
    request["shop"]["channel_unbinds"] = [f"2025-01-0{d}T00:00:00Z" for d in range(1, 5)]  # type: ignore[index]
    response = client.post("/v1/decisions", json=request)
    assert response.status_code == 400
    assert response.json["error"]["details"] == [
        {"path": "/shop/channel_unbinds", "problem": "has 4 items, more than the 3 allowed"}]
    maximum = client.get("/openapi.json").json["components"]["schemas"]["request.timestamps"]["maxItems"]
    assert maximum == 3


def test_time_filters_compare_as_times(tmp_path: Path, database_url: str) -> None:
    from datetime import datetime

    store = open_store(database_url)
    for n, moment in enumerate(["2025-06-01T00:00:00.000000Z", "2025-06-01T00:00:00.250000Z",
                                "2025-06-01T00:00:01.000000Z"]):
        store.write(new_record(decision_id=f"t{n}", outcome="decided", status=200, request={"n": n},
                               response={}, duration_us=1, logged_at=datetime.fromisoformat(moment)))
    assert [r.decision_id for r in store.query(since="2025-06-01T00:00:00Z")] == ["t0", "t1", "t2"]
    assert [r.decision_id for r in store.query(since="2025-06-01T00:00:00.1Z", until="2025-06-01T02:00:01+02:00")] \
        == ["t1"]
    assert list(store.requests(since="2025-06-01T00:00:00.5Z")) == ['{"n":2}']
    store.close()


@pytest.mark.slow
def test_a_reload_that_fails_for_the_environment_is_tried_again(tmp_path: Path, policy_copy: Path) -> None:
    app = make_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}", POLICY_DIR=str(policy_copy))
    holder = app.extensions["bindpolicy"].holder
    saved = holder.on_load
    calls = []

    def flaky(engine: Any) -> None:
        calls.append(engine)
        if len(calls) == 1:
            raise OSError("the log database is away")
        saved(engine)

    holder.on_load = flaky
    bind = policy_copy / "v1" / "bind.yaml"
    bind.write_text(bind.read_text().replace("at least {params.min_age} years old", "{params.min_age} or older"))
    assert not holder.reload_if_changed() and "away" in holder.failure.error
    assert holder.reload_if_changed()  # same files, tried again: now it serves
    assert holder.failure is None and len(calls) == 2


def test_the_watcher_waits_for_the_files_to_settle(tmp_path: Path, policy_copy: Path) -> None:
    app = make_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}", POLICY_DIR=str(policy_copy))
    holder = app.extensions["bindpolicy"].holder
    bind = policy_copy / "v1" / "bind.yaml"
    bind.write_text(bind.read_text().replace("at least {params.min_age} years old", "{params.min_age} or older"))
    assert not holder.reload_if_changed(settle=True)  # just changed: maybe still being written
    assert holder.reload_if_changed(settle=True)  # unchanged since the last check: loaded

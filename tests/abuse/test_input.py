"""Attacks through the request body (issue 8, items 1, 6, 7, 9, 10): each answered with a clean,
bounded 4xx naming what is wrong, and logged with a bounded record; never a decision on a
value read differently from what was sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine.decisionlog import open_store
from engine.errors import RequestError
from engine.request import MAX_DEPTH, MAX_PROBLEMS, check_request, parse_json

from ..conftest import bind_request, make_app

LOG = {"Authorization": "Bearer log-secret"}
BOUND = 8 * 1024  # bytes: no refusal answer is larger, whatever the body


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Flask:
    return make_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}")


@pytest.fixture
def client(sqlite_app: Flask) -> FlaskClient:
    return sqlite_app.test_client()


def post(client: FlaskClient, body: bytes | str, content_type: str = "application/json") -> Any:
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return client.post("/v1/decisions", data=data, content_type=content_type)


def logged(client: FlaskClient, decision_id: str) -> dict[str, Any]:
    record: dict[str, Any] = client.get(f"/v1/decisions/{decision_id}", headers=LOG).json["record"]
    return record


def with_list(field: str, items: list[Any]) -> bytes:
    request = bind_request()
    request["shop"][field] = items  # type: ignore[index]
    return orjson.dumps(request)


# Item 1: a refusal costs a bounded answer and a bounded record, however many problems it has.
@pytest.mark.parametrize("body", [
    with_list("channel_unbinds", [1] * 30_000),  # the reported attack, within the value bound
    with_list("channel_unbinds", ["not a time"] * 1000),  # 1000 problems within the list bound
    with_list("channel_accounts", [{"account_id": 1, "x": 2}] * 1000),
    b'{"action": "bind", "x": "' + b"y" * 900_000 + b'"}',
], ids=["long-list", "1000-bad-items", "1000-bad-objects", "900k-string"])
def test_a_refusal_is_bounded_in_answer_and_record(client: FlaskClient, body: bytes) -> None:
    response = post(client, body)
    assert response.status_code == 400
    assert len(response.data) <= BOUND, len(response.data)
    error = response.json["error"]
    assert len(error["details"]) <= MAX_PROBLEMS + 1
    record = logged(client, response.json["decision_id"])
    assert len(orjson.dumps(record)) <= 80 * 1024  # the body kept up to 64 KiB, then its size and hash
    if len(body) > 64 * 1024:
        assert record["request"]["body_bytes"] == len(body)


def test_a_batch_is_bounded_in_requests_and_bytes_and_says_which(client: FlaskClient, tmp_path: Path) -> None:
    """A batch costs about as much as one request: at most MAX_BATCH requests and MAX_BATCH_BYTES
    bytes; past either, a 413 naming the limit, checked before the requests are read strictly."""
    config = client.application.config
    full = [bind_request()] * config["MAX_BATCH"]
    answer = client.post("/v1/decisions/batch", json={"requests": full})
    assert answer.status_code == 200 and len(answer.json["decisions"]) == config["MAX_BATCH"]
    over = client.post("/v1/decisions/batch", json={"requests": [*full, bind_request()]})
    assert over.status_code == 413 and over.json["error"]["code"] == "batch_too_large"
    assert f"at most {config['MAX_BATCH']} requests" in over.json["error"]["message"]
    assert over.json["error"]["details"][0]["problem"].startswith(f"has {config['MAX_BATCH'] + 1} requests")
    big = {"requests": [bind_request(x="y" * config["MAX_BATCH_BYTES"])]}
    refused = client.post("/v1/decisions/batch", json=big)
    assert refused.status_code == 413
    assert f"at most {config['MAX_BATCH_BYTES']} bytes" in refused.json["error"]["message"]
    record = logged(client, refused.json["decision_id"])
    assert record["request"]["body_bytes"] == len(orjson.dumps(big))
    spec = client.get("/openapi.json").json["components"]["schemas"]["BatchRequest"]
    assert spec["properties"]["requests"]["maxItems"] == config["MAX_BATCH"]
    assert f"{config['MAX_BATCH_BYTES']} bytes" in spec["description"]
    from engine.replay import REPRODUCED, replay

    store = open_store(config["DATABASE_URL"], read_only=True)
    for decision_id in (over.json["decision_id"], refused.json["decision_id"]):
        assert replay(store, decision_id).status == REPRODUCED, decision_id  # type: ignore[arg-type]


def test_a_refusal_with_many_problems_says_how_many(client: FlaskClient) -> None:
    response = post(client, with_list("channel_unbinds", ["not a time"] * 60))
    error = response.json["error"]
    assert "60 places" in error["message"] and len(error["details"]) == MAX_PROBLEMS + 1
    summary = [d["problem"] for d in error["details"] if d["path"] == ""]
    assert summary == [f"... and 60 problems in all; the first {MAX_PROBLEMS} are listed"]


def test_a_list_past_its_bound_is_refused_without_checking_its_items(client: FlaskClient) -> None:
    response = post(client, with_list("channel_unbinds", [{}] * 1001))
    assert response.json["error"]["details"] == [
        {"path": "/shop/channel_unbinds", "problem": "has 1001 items, more than the 1000 allowed"}]


# Item 9: JSON read strictly, as the client wrote it.
def valid_with(field: str, text: str) -> str:
    """The text of an allowed bind request with one more account field, written as `text`."""
    return orjson.dumps(bind_request()).decode()[:-2] + f',"{field}":{text}' + "}}"


@pytest.mark.parametrize(("body", "words"), [
    ('{"action": "login", ' + orjson.dumps(bind_request()).decode()[1:], "the key 'action' appears twice"),
    (valid_with("upgrade", '{"state": "trial", "state": "none"}'), "the key 'state' appears twice"),
    (valid_with("upgrade", '{"state": "none", "unwithdrawn_earnings": 17.9999999999999999}'),
     "17.9999999999999999 would be read as 18.0"),
    (valid_with("upgrade", '{"state": "none", "unwithdrawn_earnings": 1e-400}'), "would be read as 0.0"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"at most {MAX_DEPTH} deep"),
    ('{"a": ' + "[" * 1000 + "]" * 1000 + "}", f"at most {MAX_DEPTH} deep"),
    ("[" + "{}," * 25_000 + "{}]", "a body holds at most"),
])
def test_json_is_read_strictly(client: FlaskClient, body: str, words: str) -> None:
    response = post(client, body)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json", response.json
    assert words in response.json["error"]["details"][0]["problem"]


def test_the_same_requests_without_the_trap_are_decided(client: FlaskClient) -> None:
    for body in (valid_with("upgrade", '{"state": "none"}'),
                 valid_with("upgrade", '{"state": "none", "unwithdrawn_earnings": 17.99}')):
        assert post(client, body).status_code == 200


@pytest.mark.parametrize("text", ["18446744073709551616", "9007199254740993", "-9007199254740993"])
def test_integers_beyond_2_53_are_refused(text: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_json('{"n": ' + text + "}")
    assert caught.value.details[0].problem == f"{text} is beyond +-2^53"


def test_a_huge_integer_in_a_request_is_refused_never_rounded(client: FlaskClient) -> None:
    response = post(client, valid_with("violation_points", "18446744073709551616"))
    assert response.status_code == 400 and response.json["error"]["details"][0]["path"] == "/account/violation_points"


def test_numbers_that_survive_exactly_are_kept() -> None:
    assert parse_json('{"a": 9007199254740992, "b": 0.1, "c": 1e20, "d": 1.10}') == {
        "a": 2**53, "b": 0.1, "c": 1e20, "d": 1.1}


def test_a_deep_body_is_logged_as_text_and_the_log_tools_still_read_it(client: FlaskClient,
                                                                      tmp_path: Path) -> None:
    response = post(client, '{"a": ' + "[" * 1000 + "]" * 1000 + "}")
    record = logged(client, response.json["decision_id"])
    assert isinstance(record["request"], str)  # the text, not a nested value
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    assert store.verify() is None and len(list(store.query())) == 1


@pytest.mark.parametrize("content_type", ["application/json; charset=latin-1", "application/json; charset=utf-16"])
def test_a_charset_other_than_utf8_is_refused(client: FlaskClient, content_type: str) -> None:
    response = post(client, json.dumps(bind_request()), content_type)
    assert response.status_code == 415 and "utf-8" in response.json["error"]["message"].lower()


def test_utf8_named_either_way_is_read(client: FlaskClient) -> None:
    for content_type in ("application/json; charset=UTF-8", "application/json;charset=utf8"):
        assert post(client, json.dumps(bind_request()), content_type).status_code == 200


def test_the_log_keeps_the_body_exactly_as_sent(client: FlaskClient, tmp_path: Path) -> None:
    body = '{ "action":"login",  "at": "2025-07-01T00:00:00Z", "account": {"type": "personal", "id": "é"},\n' \
           '  "login": {"target": "app", "method": "otp"} }'
    response = post(client, body)
    assert response.status_code == 200
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    stored = store.get(response.json["decision_id"])
    assert stored is not None and stored.request_text == body and store.verify() is None


# Item 10: null in an optional field is the field left out.
def test_null_in_an_optional_field_reads_as_absent(client: FlaskClient) -> None:
    request = bind_request()
    request["account"]["kyc"] = {"verified": True, "document_type": None}  # type: ignore[index]
    request["account"]["created_by_shop"] = None  # type: ignore[index]
    request["shop"]["name"] = None  # type: ignore[index]
    response = client.post("/v1/decisions", json=request)
    assert response.status_code == 200 and response.json["decision"] == "allow", response.json


def test_null_for_a_field_a_rule_needs_is_missing_as_if_absent(client: FlaskClient) -> None:
    request = bind_request()
    request["account"]["age"] = None  # type: ignore[index]
    absent = bind_request()
    del absent["account"]["age"]  # type: ignore[attr-defined]
    with_null, without = (client.post("/v1/decisions", json=r).json for r in (request, absent))
    assert with_null["error"]["code"] == without["error"]["code"] == "missing_field"
    assert with_null["error"]["details"] == without["error"]["details"]


def test_null_where_a_field_is_required_is_still_missing() -> None:
    with pytest.raises(Exception, match="1 place") as caught:
        check_request({"action": None})
    assert [d.path for d in caught.value.details] == ["/action"]  # type: ignore[attr-defined]


# Item 7, the contract's side: what PostgreSQL cannot store or index never passes the contract.
@pytest.mark.parametrize(("where", "value", "problem"), [
    ("account.id", "acct\u0000", "NUL"), ("shop.id", "\u0000", "NUL"), ("shop.name", "a\u0000b", "NUL"),
    ("account.id", "a" * 3000, "more than the 128 allowed"), ("action", "bind\u0000", "is not one of"),
    ("policy_version", "v\u0000", "NUL"), ("account.name", "n" * 600, "more than the 512 allowed"),
])
def test_strings_the_log_stores_are_bounded_and_never_nul(client: FlaskClient, where: str, value: str,
                                                          problem: str) -> None:
    request: dict[str, Any] = bind_request()
    target = request
    *path, last = where.split(".")
    for key in path:
        target = target[key]
    target[last] = value
    response = client.post("/v1/decisions", json=request)
    assert response.status_code == 400
    details = response.json["error"]["details"]
    assert any(d["path"] == "/" + where.replace(".", "/") and problem in d["problem"] for d in details), details

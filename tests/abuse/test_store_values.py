"""Values a store could refuse (issue 8, item 7), on SQLite and on a real PostgreSQL: a NUL or a
3,000-character id, shop id or action, in a single request, a batch or a body that is not JSON,
is refused with a 400 and logged, never a 503; reads answer 503 when the database is away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from ..conftest import bind_request, make_app

LOG = {"Authorization": "Bearer log-secret"}


def with_value(where: str, value: str) -> dict[str, Any]:
    request: dict[str, Any] = bind_request()
    if where == "action":
        request["action"] = value
    else:
        part, name = where.split(".")
        request[part][name] = value
    return request


ODD_VALUES = [(where, value) for where in ("account.id", "shop.id", "action")
              for value in ("a\u0000b", "x" * 3000, "\u00e9" * 3000)]


def log_failures(app: Flask) -> float:
    return float(app.extensions["bindpolicy"].metrics.log_failures._value.get())


def test_values_a_store_could_refuse_are_refused_and_logged(tmp_path: Path, database_url: str) -> None:
    app = make_app(tmp_path, database_url)
    client = app.test_client()
    for where, value in ODD_VALUES:
        answer = client.post("/v1/decisions", json=with_value(where, value))
        assert answer.status_code == 400, (where, value[:5], answer.json)
        record = client.get(f"/v1/decisions/{answer.json['decision_id']}", headers=LOG).json["record"]
        assert record["outcome"] == "rejected" and record["status"] == 400
        kept = record["request"]  # whole, or its bounded text: the value is there either way
        assert kept == with_value(where, value) or value[:100] in kept.get("body_prefix", kept)
        assert None in (record["action"], record["shop_id"], record["account_id"])
    # A body that is not JSON, with raw NUL bytes and a long id in it.
    raw = b'{"action":"bind\x00","shop":{"id":"' + b"s" * 3000 + b'"}'
    answer = client.post("/v1/decisions", data=raw, content_type="application/json")
    assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_json"
    assert client.get(f"/v1/decisions/{answer.json['decision_id']}", headers=LOG).status_code == 200
    # A batch: every item answered and logged, the odd ones refused, the good one decided.
    batch = [bind_request(), *(with_value(where, value) for where, value in ODD_VALUES)]
    answer = client.post("/v1/decisions/batch", json={"requests": batch})
    assert answer.status_code == 200
    decisions = answer.json["decisions"]
    assert decisions[0]["decision"] == "allow" and all("error" in d for d in decisions[1:])
    for decision in decisions:
        assert client.get(f"/v1/decisions/{decision['decision_id']}", headers=LOG).status_code == 200
    assert log_failures(app) == 0
    listed = client.get("/v1/decisions?limit=1000", headers=LOG).json["records"]
    assert len(listed) == 2 * len(ODD_VALUES) + 2


@pytest.mark.slow
def test_reads_answer_503_when_postgresql_is_away(tmp_path: Path, postgres_url: str) -> None:
    from ..postgres import free_port, fresh_schema

    app = make_app(tmp_path, fresh_schema(postgres_url, "away_test"))
    client = app.test_client()
    decided = client.post("/v1/decisions", json=bind_request()).json["decision_id"]
    store = app.extensions["bindpolicy"].store
    store.close()
    store.url = f"postgresql://bindpolicy@127.0.0.1:{free_port()}/postgres"  # nothing listens there now
    for path in ("/v1/decisions", f"/v1/decisions/{decided}", "/v1/decisions?shop_id=shop-1"):
        response = client.get(path, headers=LOG)
        assert response.status_code == 503 and response.json["error"]["code"] == "log_unavailable", path
        assert "127.0.0.1" not in response.get_data(as_text=True)
    answer = client.post("/v1/decisions", json=bind_request())
    assert answer.status_code == 503 and answer.json["error"]["code"] == "log_unavailable"
    assert client.get("/readyz").status_code == 503

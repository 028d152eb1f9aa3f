"""The service's lean Flask dispatch (api/app.py ServiceFlask, api/answer.py Answer) against Flask's own."""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, g, redirect, request, url_for

from api.answer import Answer
from api.app import ServiceFlask, _Lane, _static_lanes
from tests.conftest import bind_request, make_app


def _environ(method: str, path: str, body: bytes = b"", **extra: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8080", **extra}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    folder = tmp_path_factory.mktemp("dispatch")
    return make_app(folder, f"sqlite:///{folder}/decisions.db")


def test_every_lane_is_the_rule_werkzeugs_matcher_gives(service: Flask) -> None:
    app = service
    lanes = _static_lanes(app)
    assert lanes[("POST", "/v1/decisions")].endpoint == "bindpolicy.decide"
    assert lanes[("GET", "/healthz")].endpoint == "bindpolicy.healthz"
    assert ("HEAD", "/healthz") in lanes  # (werkzeug adds HEAD to a GET rule)
    assert not any(method == "OPTIONS" for method, _ in lanes)  # Flask answers those itself
    assert not any("<" in path for _, path in lanes)
    assert ("GET", "/v1/decisions/batch") not in lanes  # a GET there is /v1/decisions/<decision_id>'s
    for (method, path), rule in lanes.items():
        adapter = app.url_map.bind_to_environ(_environ(method, path))
        assert adapter.match(path, method=method, return_rule=True) == (rule, {})
    app.config["SERVER_NAME"] = "bind.example:8080"
    try:
        assert _static_lanes(app) == {}  # the host takes part in matching: Flask's own way
    finally:
        app.config["SERVER_NAME"] = None


def _twin_apps() -> tuple[Flask, Flask, list[str]]:
    """The same routes and hooks on Flask and on ServiceFlask; `calls` records what ran, in order."""
    calls: list[str] = []
    apps = []
    for kind in (Flask, ServiceFlask):
        app = kind(__name__)
        part = Blueprint("part", __name__)

        @app.url_value_preprocessor
        def _values(endpoint: str | None, values: Any) -> None:
            calls.append(f"values {endpoint}")

        @app.before_request
        def _app_before() -> None:
            calls.append("app before")
            g.seen = request.path

        @part.before_request
        def _part_before() -> Response | None:
            calls.append("part before")
            return Response("stopped", status=202) if request.args.get("stop") else None

        @part.after_request
        def _part_after(response: Response) -> Response:
            calls.append("part after")
            response.headers["X-Part"] = "1"
            return response

        @app.after_request
        def _app_after(response: Response) -> Response:
            calls.append("app after")
            return response

        @app.teardown_request
        def _app_teardown(exc: BaseException | None) -> None:
            calls.append(f"app teardown {type(exc).__name__ if exc else None}")

        @part.teardown_request
        def _part_teardown(exc: BaseException | None) -> None:
            calls.append("part teardown")

        @part.get("/plain")
        def plain() -> Any:
            return {"seen": g.seen, "link": url_for("part.item", name="x"),
                    "abs": url_for("part.plain", _external=True)}

        @part.post("/moved")
        def moved() -> Any:
            return redirect("/plain", code=303)

        @part.get("/fails")
        def fails() -> Any:
            raise ValueError("boom")

        @part.get("/item/<name>")
        def item(name: str) -> Any:
            return {"name": name}

        @app.errorhandler(ValueError)
        def _value_error(exc: ValueError) -> Any:
            calls.append("handler")
            return {"error": str(exc)}, 500

        app.register_blueprint(part)
        apps.append(app)
    return apps[0], apps[1], calls


def _call(app: Flask, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started["status"], started["headers"] = status, headers

    body = b"".join(app.wsgi_app(environ, start_response))
    return started["status"], started["headers"], body


def test_lean_dispatch_answers_and_calls_hooks_as_flask_does() -> None:
    flask_app, lean_app, calls = _twin_apps()
    cases = [("GET", "/plain", ""), ("HEAD", "/plain", ""), ("GET", "/plain", "stop=1"), ("POST", "/moved", ""),
             ("GET", "/fails", ""), ("GET", "/item/y", ""), ("OPTIONS", "/plain", ""), ("DELETE", "/plain", ""),
             ("GET", "/nowhere", ""), ("GET", "/plain/", "")]
    for method, path, query in cases:
        answers, orders = [], []
        for app in (flask_app, lean_app):
            calls.clear()
            answers.append(_call(app, _environ(method, path, QUERY_STRING=query)))
            orders.append(list(calls))
        assert answers[0] == answers[1], (method, path, query)
        assert orders[0] == orders[1], (method, path, query)
    lean_app.request_context(_environ("GET", "/plain"))
    assert isinstance(lean_app.request_context(_environ("GET", "/plain")), _Lane)
    assert not isinstance(lean_app.request_context(_environ("GET", "/item/y")), _Lane)


def test_the_decision_route_through_its_lane(service: Flask) -> None:
    client = service.test_client()
    answer = client.post("/v1/decisions", json=bind_request(), headers={"Accept-Language": "zh-CN"})
    assert answer.status_code == 200 and answer.headers["Content-Language"] == "zh"
    assert answer.headers["Content-Length"] == str(len(answer.data))
    record = client.get(f"/v1/decisions/{answer.json['decision_id']}", headers={"Authorization": "Bearer log-secret"})
    assert record.status_code == 200 and record.json["record"]["status"] == 200
    refused = client.post("/v1/decisions", data=b"{}", content_type="application/json; charset=latin-1")
    assert refused.status_code == 415 and "latin-1" in refused.json["error"]["message"]
    assert client.post("/v1/decisions", data=b"{}", content_type="text/plain").status_code == 415
    assert client.post("/v1/decisions", data=b"{}", content_type="Application/JSON").status_code == 400  # read on


def test_answer_is_what_werkzeugs_response_gives() -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("GET", {"response": b'{"a":1}', "status": 200, "headers": [("Content-Type", "application/json")]}),
        ("HEAD", {"response": b'{"a":1}', "status": 200, "mimetype": "application/json"}),
        ("GET", {"response": b"", "status": 204}),
        ("GET", {"response": b"x", "status": 304, "headers": [("Content-Type", "text/plain")]}),
        ("GET", {"response": b"moved", "status": 302, "headers": [("Location", "/é")]}),
        ("GET", {"response": [b"a", b"b"], "status": 200}),
        ("GET", {"response": [b"abc"], "status": 200}),  # (no Content-Length yet: werkzeug's way adds it)
        ("GET", {"response": "text", "status": 418}),
    ]
    for method, kwargs in cases:
        got = [_call_response(kind(**kwargs), method) for kind in (Response, Answer)]
        assert got[0] == got[1], (method, kwargs)


def _call_response(response: Response, method: str) -> tuple[str, list[tuple[str, str]], bytes]:
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started["status"], started["headers"] = status, headers

    body = b"".join(response(_environ(method, "/x"), start_response))
    return started["status"], started["headers"], body

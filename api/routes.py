"""HTTP routes: they carry requests to the engine and its answers back, nothing more."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from api.errors import error_response
from engine.decider import Engine
from engine.errors import Detail, RequestError
from engine.model import PolicyVersion
from engine.versions import format_timestamp

routes = Blueprint("bindpolicy", __name__)


def _engine() -> Engine:
    engine: Engine = current_app.extensions["bindpolicy.engine"]
    return engine


def _json_body() -> Any:
    """The request body as JSON; 415 for another media type, 400 for broken JSON."""
    if request.mimetype != "application/json":
        raise _UnsupportedMedia()
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
            else "the body is not UTF-8"
        raise RequestError("invalid_json", "the request body is not valid JSON", [Detail("", where)]) from exc


class _UnsupportedMedia(Exception):
    pass


@routes.app_errorhandler(_UnsupportedMedia)
def _unsupported(_: _UnsupportedMedia) -> Response:
    return error_response(415, "unsupported_media_type", "send the request as application/json")


def _explain() -> bool:
    return request.args.get("explain", "false").lower() in ("1", "true", "yes")


@routes.post("/v1/decisions")
def decide() -> Response:
    body = _json_body()
    decision = _engine().decide(body, now=datetime.now(UTC), explain=_explain())
    return jsonify(decision.to_dict())


@routes.post("/v1/decisions/batch")
def decide_batch() -> Response:
    body = _json_body()
    limit = current_app.config["MAX_BATCH"]
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise RequestError("invalid_request", "a batch is {\"requests\": [...]}",
                           [Detail("/requests", "expected an array of requests")])
    if len(body["requests"]) > limit:
        return error_response(413, "batch_too_large", f"a batch holds at most {limit} requests",
                              [Detail("/requests", f"has {len(body['requests'])} requests")])
    engine, now, explain = _engine(), datetime.now(UTC), _explain()
    answers: list[dict[str, Any]] = []
    for one in body["requests"]:
        try:
            answers.append(engine.decide(one, now=now, explain=explain).to_dict())
        except RequestError as exc:
            answers.append(exc.to_dict())
    return jsonify({"decisions": answers})


def _version_summary(version: PolicyVersion, in_force: PolicyVersion | None) -> dict[str, Any]:
    return {"version": version.name, "effective_from": format_timestamp(version.effective_from),
            "description": version.description, "extends": version.extends, "digest": version.digest,
            "rules": len(version.rules), "in_force": version is in_force}


@routes.get("/v1/policies")
def list_policies() -> Response:
    policies = _engine().policies
    in_force = policies.in_force(datetime.now(UTC))
    return jsonify({"versions": [_version_summary(v, in_force) for v in policies],
                    "in_force": in_force.name if in_force else None})


@routes.get("/v1/policies/<version>")
def show_policy(version: str) -> Response:
    policies = _engine().policies
    found = policies.get(version)
    if found is None:
        return error_response(404, "unknown_version", f"no policy version '{version}'")
    body = _version_summary(found, policies.in_force(datetime.now(UTC)))
    body["parameters"] = dict(found.parameters)
    body["rules"] = [{
        "id": r.id, "actions": list(r.actions), "roles": list(r.roles) if r.roles else None,
        "effect": r.effect, "applies_when": r.applies_when.text if r.applies_when else None,
        "fires_when": r.fires_when.text, "message": r.message, "source": r.source,
        "location": r.where, "defined_in": r.defined_in} for r in found.rules]
    body["outputs"] = [{
        "name": o.name, "actions": list(o.actions), "applies_when": o.applies_when.text if o.applies_when else None,
        "value": o.value.text, "source": o.source, "defined_in": o.defined_in} for o in found.outputs]
    body["files"] = list(found.files)
    return jsonify(body)


@routes.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@routes.get("/readyz")
def readyz() -> Response:
    policies = _engine().policies
    return jsonify({"status": "ready", "versions": policies.names()})

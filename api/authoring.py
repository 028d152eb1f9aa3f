"""Endpoints for policy authors: the policy files in force, example requests, and scratch copies.

A scratch copy is a set of policy files sent in the request body: it is loaded in memory for
that request only (engine/scratch.py bounds its size and time), never written, never served.
It is allowed when the service listens on loopback, otherwise only if configured (SCRATCH).
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from api.errors import error_response
from api.routes import _body, _explain, _language, _Rejected, _say_language, _service
from engine.errors import Detail, RequestError
from engine.generator import generate_requests
from engine.scratch import (
    Deadline,
    ScratchLimits,
    compare_sets,
    load_scratch,
    loaded_scratch,
    run_scratch_suites,
    scratch_files,
    suite_report,
)
from engine.tester import SUITE_FOLDER

authoring = Blueprint("authoring", __name__)
EXAMPLE_POOL = 600  # generated requests looked through for examples (seed 1, as examples/requests.jsonl)


@authoring.get("/v1/sources")
def sources() -> Response:
    """Every file of the set in force (each version's, as loaded) and the suites beside them."""
    holder = _service().holder
    files: dict[str, str] = {}
    for version in holder.engine.policies:
        files.update(version.sources)
    folder = holder.folder / SUITE_FOLDER
    for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")) if folder.is_dir() else []:
        try:
            files[f"{SUITE_FOLDER}/{path.name}"] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a suite being rewritten: the next call sees it
    return jsonify({"files": dict(sorted(files.items()))})


@authoring.get("/v1/examples")
def examples() -> Response:
    """Generated requests to start from: per action and role, one allowed and one denied where there are."""
    service = _service()
    engine = service.holder.engine
    cached = service.console_cache.get(("examples", id(engine)))
    if cached is None:
        found: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        now = datetime.now(UTC)
        for request in generate_requests(EXAMPLE_POOL, seed=1):
            try:
                decision = engine.decide(request, now=now, decision_id="example")
            except RequestError:
                continue
            found.setdefault((request["action"], request.get("role"), decision.decision), request)
        cached = [{"label": f"{action}{' ' + role if role else ''}: {outcome}", "request": request}
                  for (action, role, outcome), request in sorted(found.items(), key=lambda kv: (
                      kv[0][0], kv[0][1] or "", kv[0][2]))]
        service.console_cache = {("examples", id(engine)): cached}
    return jsonify({"examples": cached})


@authoring.errorhandler(_Rejected)
def _rejected(exc: _Rejected) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.details)


def _scratch_allowed() -> Response | None:
    if not current_app.config["SCRATCH_ENABLED"]:
        return error_response(403, "scratch_disabled",
                              "scratch policies are off: the service does not listen on loopback "
                              "(set BINDPOLICY_SCRATCH=on to allow them)")
    # auto also wants the caller on this machine: a server started without BINDPOLICY_BIND (say
    # `gunicorn -b 0.0.0.0:80`) is taken for loopback, and the caller's address says otherwise.
    if current_app.config["SCRATCH"] == "auto" and not _loopback(request.remote_addr or ""):
        return error_response(403, "scratch_disabled",
                              "scratch policies are only taken from this machine's own users "
                              "(set BINDPOLICY_SCRATCH=on to allow them from elsewhere)")
    return None


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _limits() -> ScratchLimits:
    config = current_app.config
    return ScratchLimits(bytes=int(config["SCRATCH_MAX_BYTES"]), seconds=float(config["SCRATCH_MAX_SECONDS"]))


def _scratch_body(*extra: str) -> tuple[dict[str, Any], dict[str, bytes], Deadline]:
    body, _ = _body()  # _Rejected (413, 415, broken JSON): answered by _rejected below, unlogged
    allowed = ("files", *extra)
    if not isinstance(body, dict) or "files" not in body or set(body) - set(allowed):
        unknown = [str(k) for k in body if k not in allowed] if isinstance(body, dict) else []
        raise RequestError("invalid_request", f"a scratch request is an object with {', '.join(allowed)}",
                           [Detail(f"/{k}", "unknown field") for k in unknown] or [Detail("/files", "required")])
    limits = _limits()
    return body, scratch_files(body["files"], limits), Deadline(limits.seconds)


@authoring.get("/v1/scratch")
def scratch_settings() -> Response:
    limits = _limits()
    return jsonify({"enabled": bool(current_app.config["SCRATCH_ENABLED"]),
                    "limits": {"files": limits.files, "bytes": limits.bytes, "seconds": limits.seconds}})


@authoring.post("/v1/scratch/check")
def scratch_check() -> Response:
    """Load the scratch copy; every problem with its file, line and column (an empty list: it loads)."""
    refused = _scratch_allowed()
    if refused is not None:
        return refused
    _, files, deadline = _scratch_body()
    policies, problems = load_scratch(files, deadline)
    versions = [{"version": v.name, "digest": v.digest, "rules": len(v.rules)} for v in policies or []]
    return jsonify({"ok": policies is not None, "problems": [p.to_dict() for p in problems], "versions": versions})


@authoring.post("/v1/scratch/decisions")
def scratch_decide() -> Response:
    """Decide one request against the scratch copy (not logged: no decision is made)."""
    refused = _scratch_allowed()
    if refused is not None:
        return refused
    body, files, deadline = _scratch_body("request")
    engine = loaded_scratch(files, deadline, current_app.config["RUNTIME"], int(current_app.config["MAX_LIST_ITEMS"]))
    try:
        decision = engine.decide(body.get("request"), now=datetime.now(UTC), explain=_explain(), language=_language())
    except RequestError as exc:
        raise RequestError(exc.code, exc.message, [Detail("/request" + d.path, d.problem) for d in exc.details]) \
            from None
    response = jsonify(decision.to_dict())
    _say_language(response, _language())
    return response


@authoring.post("/v1/scratch/tests")
def scratch_tests() -> Response:
    """Run the suites of the scratch copy (its `tests/*.yaml`) against its policies."""
    refused = _scratch_allowed()
    if refused is not None:
        return refused
    _, files, deadline = _scratch_body()
    engine = loaded_scratch(files, deadline, current_app.config["RUNTIME"], int(current_app.config["MAX_LIST_ITEMS"]))
    return jsonify(suite_report(run_scratch_suites(engine, files, deadline)))


@authoring.post("/v1/scratch/diff")
def scratch_diff() -> Response:
    """The semantic diff from the set in force to the scratch copy, and its impact on the corpus."""
    refused = _scratch_allowed()
    if refused is not None:
        return refused
    _, files, deadline = _scratch_body()
    service = _service()
    engine = loaded_scratch(files, deadline, current_app.config["RUNTIME"], int(current_app.config["MAX_LIST_ITEMS"]))
    return jsonify(compare_sets(service.holder.engine, engine, service.corpus(), datetime.now(UTC), deadline))

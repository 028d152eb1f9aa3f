"""HTTP routes: they carry requests to the engine and its answers back, and log every one."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections import Counter
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import msgspec
import orjson
from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from api.answer import Answer
from api.errors import error_response
from api.openapi import build_openapi
from engine.decider import new_decision_id, new_decision_ids
from engine.decisionlog import FILTERS, BrokenRecordError, LogError, log_time, new_record
from engine.differ import diff_versions
from engine.differ import render as render_diff
from engine.errors import Detail, RequestError
from engine.messages import DEFAULT_LANGUAGE, LANGUAGES, negotiate
from engine.model import PolicyVersion
from engine.replay import render_record
from engine.request import (
    batch_bytes_problem,
    batch_count_problem,
    parse_json,
    strict_json,
    within_bounds,
)
from engine.versions import format_timestamp, parse_timestamp

routes = Blueprint("bindpolicy", __name__)
WHOLE_BODY = "bindpolicy.body"  # the environ's key of the whole body, where the front read it (api/front.py)
JSON_HEADERS = [("Content-Type", "application/json")]


def _language_headers(language: str) -> dict[str, str]:
    return {"Content-Language": language, "Vary": "Accept-Language"}  # Vary: the only one these answers have


LANGUAGE_HEADERS = {language: [*JSON_HEADERS, *_language_headers(language).items()] for language in LANGUAGES}
access_log = logging.getLogger("bindpolicy.access")


def _service() -> Any:
    return current_app.extensions["bindpolicy"]


@routes.before_app_request
def _start() -> None:
    g.started = time.perf_counter()
    g.decision_ids = []
    service = _service()
    service.holder.ensure_watching()
    service.watch.ensure_running()


@routes.after_app_request
def _access_log(response: Response) -> Response:
    if not access_log.isEnabledFor(logging.INFO):  # (BINDPOLICY_LOG_LEVEL=WARNING: no line, nothing to gather)
        return response
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    access_log.info("request", extra={
        "event": "request", "method": request.method, "path": request.path, "status": response.status_code,
        "duration_ms": round(elapsed * 1000, 3), "decision_id": ",".join(g.get("decision_ids", [])) or None,
        "remote": request.remote_addr})
    return response


def _tokens(key: str) -> tuple[str, ...]:
    tokens: tuple[str, ...] = _service().tokens[key]
    return tokens


def _authorized(key: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return any(hmac.compare_digest(given.encode(), t.encode()) for t in _tokens(key))


def _unauthorized() -> Response:
    response = error_response(401, "unauthorized", "a valid bearer token is required")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _unauthorized_and_logged() -> Response:
    """A decision request without a valid token: refused and logged like any other rejection."""
    response = _reject_and_log(_Rejected(401, "unauthorized", "a valid bearer token is required"))
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _explain() -> bool:
    if not request.query_string:  # most requests: no query to parse
        return False
    return request.args.get("explain", "false").lower() in ("1", "true", "yes")


class _Rejected(Exception):
    """A request refused before the engine sees it; `logged` is what the log keeps of it."""

    def __init__(self, status: int, code: str, message: str, details: list[Detail] | None = None,
                 logged: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or []
        self.logged = logged


LOGGED_BODY_BYTES = 64 * 1024  # of a refused body, the log keeps this much, its size and its SHA-256


def _logged_body(raw: bytes) -> Any:
    """What the log keeps of a body it refused: the text as received, bounded."""
    text = raw[:LOGGED_BODY_BYTES].decode("utf-8", "replace")
    if len(raw) <= LOGGED_BODY_BYTES:
        return text
    return {"body_prefix": text, "body_bytes": len(raw), "body_sha256": hashlib.sha256(raw).hexdigest()}


def _bounded(value: Any, raw: bytes) -> Any:
    """The parsed body when it is small enough to keep whole, else what _logged_body keeps."""
    return value if len(raw) <= LOGGED_BODY_BYTES else _logged_body(raw)


def _decidable(value: Any) -> bool:
    """Whether a body may be decided: a batch, or a request the contract's fast check accepts."""
    if isinstance(value, dict) and set(value) == {"requests"}:
        return True
    check = _service().holder.engine.check
    return isinstance(value, dict) and (check.fast.is_valid(value) or check.fast.is_valid(check.drop_nulls(value)))


def _body(batch: bool = False) -> tuple[Any, bytes]:
    """The body's JSON (strict: see parse_json) and its bytes; _Rejected for a body we cannot take.
    A batch is held to its own bounds (bytes, then requests) before the strict reading."""
    raw = _body_bytes()
    return _parsed(raw, batch), raw


def _decision_body(engine: Any) -> tuple[Any, bytes, bool]:
    """As _body for a single request, and whether it is checked already: where the engine's
    one-pass reader vouches for the bytes (engine/reader.py: read strictly and checked against the
    contract at once), the decision takes the request without checking it again."""
    raw = _body_bytes()
    vouched = engine.check.vouch(raw)
    if vouched is not None:
        return vouched, raw, True
    return _parsed(raw, False), raw, False


def _parsed(raw: bytes, batch: bool) -> Any:
    if batch and len(raw) > current_app.config["MAX_BATCH_BYTES"]:
        limit = current_app.config["MAX_BATCH_BYTES"]
        raise _Rejected(413, "batch_too_large", f"a batch's body holds at most {limit} bytes",
                        [Detail("/requests", batch_bytes_problem(len(raw)))],
                        logged=_logged_body(raw))
    try:
        value = parse_json(raw, strict=False)
        if batch:
            _check_batch(value, raw)
        if _decidable(value):  # the strict reading costs a call per object: only for what may be decided
            strict_json(raw)
        return value
    except RequestError as exc:
        # The raw text is what the log keeps of a body that is not JSON.
        raise _Rejected(400, exc.code, exc.message, exc.details, logged=_logged_body(raw)) from exc


def _body_bytes() -> bytes:
    """The body's bytes, if it is JSON in UTF-8 and within the size limit; else _Rejected."""
    environ = request.environ
    if environ.get("CONTENT_TYPE") != "application/json":  # (as most send it: nothing to parse)
        if request.mimetype != "application/json":
            raise _Rejected(415, "unsupported_media_type", "send the request as application/json")
        charset = request.mimetype_params.get("charset", "utf-8").lower()
        if charset not in ("utf-8", "utf8"):  # JSON is UTF-8 (RFC 8259); any other is refused, never misread
            raise _Rejected(415, "unsupported_media_type", f"the body must be UTF-8 JSON, not {charset[:40]}",
                            [Detail("/headers/content-type", "charset must be utf-8 or absent")])
    whole = environ.get(WHOLE_BODY)  # the front read it already (api/front.py): no stream to wrap
    if whole is not None and int(environ.get("CONTENT_LENGTH") or 0) <= current_app.config["MAX_CONTENT_LENGTH"]:
        return whole  # type: ignore[no-any-return]
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge as exc:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raise _Rejected(413, "payload_too_large", f"the body is larger than {limit} bytes") from exc
    return raw


def _check_batch(value: Any, raw: bytes) -> None:
    """A batch's shape and number of requests, before anything costs per request."""
    if not isinstance(value, dict) or not isinstance(value.get("requests"), list) or set(value) != {"requests"}:
        raise _Rejected(400, "invalid_request", 'a batch is {"requests": [...]}',
                        [Detail("/requests", "expected an object with one field, an array of requests")],
                        logged=_bounded(value, raw))
    limit = current_app.config["MAX_BATCH"]
    if len(value["requests"]) > limit:
        raise _Rejected(413, "batch_too_large", f"a batch holds at most {limit} requests",
                        [Detail("/requests", batch_count_problem(len(value["requests"])))],
                        logged=_bounded(value, raw))


def _language() -> str:
    """The language of the answer's messages: Chinese for Accept-Language zh, zh-CN, zh-Hans...; else English."""
    header = request.environ.get("HTTP_ACCEPT_LANGUAGE")  # (request.headers' own lookup, without building them)
    return negotiate(header) if header else DEFAULT_LANGUAGE


def _say_language(response: Response, language: str) -> None:
    response.headers.update(_language_headers(language))


def _json(body: Any, status: int = 200, language: str | None = None) -> Response:
    """A JSON answer, serialized once by orjson (jsonify's provider takes about 3x as long); with
    its language, its headers are given whole (no mimetype to work out, no header set one by one)."""
    headers = JSON_HEADERS if language is None else LANGUAGE_HEADERS[language]
    return Answer(orjson.dumps(body), status=status, headers=headers)


def _decide_one(raw: Any, now: datetime, explain: bool, language: str, engine: Any = None,
                checked: bool = False, decision_id: str | None = None,
                chosen: dict[Any, Any] | None = None) -> tuple[int, dict[str, Any], str, str | None]:
    """(status, body, outcome, the digest of a rejection past the schema check); `engine`, a
    batch's, taken once for all its requests; `checked`: read and checked already (_decision_body);
    `decision_id`, if made already (a batch's, at once); `chosen`: the batch's versions chosen so
    far (Engine.decide_checked)."""
    if engine is None:
        engine = _service().holder.engine  # taken once: this request sees one whole policy set
    if decision_id is None:
        decision_id = new_decision_id()
    try:
        if checked:
            decision = engine.decide_checked(raw, True, now=now, decision_id=decision_id, explain=explain,
                                             language=language, chosen=chosen)
        else:
            decision = engine.decide(raw, now=now, decision_id=decision_id, explain=explain, language=language)
    except RequestError as exc:
        return 400, {**exc.to_dict(), "decision_id": decision_id}, "rejected", exc.policy_digest
    except Exception:  # a bug of ours: answered as such, and logged like every other answer
        logging.getLogger("bindpolicy.api").exception("decision failed", extra={"decision_id": decision_id})
        return 500, {"error": {"code": "internal_error", "message": "the decision failed; the error is logged",
                               "details": []}, "decision_id": decision_id}, "failed", None
    return 200, decision.to_dict(), "decided", None


def _commit(records: list[Any], service: Any = None) -> Response | None:
    """Commit the records; a 503 to answer instead if the log cannot take them. Metrics count
    what was answered, so they are counted only once the records are in."""
    if service is None:
        service = _service()
    try:
        service.log.write_many(records)
    except LogError as exc:
        service.metrics.log_failures.inc(len(records))
        logging.getLogger("bindpolicy.log").error("decision log write failed", extra={
            "event": "log_write_failed", "error": str(exc), "decision_id": [r.decision_id for r in records]})
        return error_response(503, "log_unavailable",
                              "the decision log cannot commit, so nothing is answered; retry later")
    metrics = service.metrics
    if len(records) == 1:  # a single decision: its one count
        g.decision_ids.append(records[0].decision_id)
        counted = _counted_in(metrics, records[0])
        if counted is not None:
            metrics.child(*counted).inc()
        return None
    g.decision_ids.extend(map(_DECISION_ID, records))
    # Counted once per label set (a batch's hundred decisions are a few increments of the
    # multiprocess files, not a hundred); the records grouped first by the fields that decide
    # a decision's labels (in C), the labels then worked out once a group.
    counts: Counter[tuple[Any, tuple[str, ...]]] = Counter()
    others = False
    for fields, count in Counter(map(_COUNTED_BY, records)).items():
        if fields[0] != "decided":
            others = True
        elif (counted := _counted_in(metrics, records[0], fields)) is not None:
            counts[counted] += count
    if others:  # rejections and failures: their labels are in their answers
        for record in records:
            if record.outcome != "decided" and (counted := _counted_in(metrics, record)) is not None:
                counts[counted] += 1
    for (counter, labels), count in counts.items():
        metrics.child(counter, labels).inc(count)
    return None


_DECISION_ID = attrgetter("decision_id")
_COUNTED_BY = attrgetter("outcome", "action", "decision", "rule_id")  # a decided record's labels


def _counted_in(metrics: Any, record: Any,
                fields: tuple[Any, ...] | None = None) -> tuple[Any, tuple[str, ...]] | None:
    """The counter a committed record is counted in and its labels: a decision by action,
    decision and rule, a refusal by its code; None for neither. `fields`: its _COUNTED_BY, if
    taken already (those of a group of decided records: `record` then stands for any of them)."""
    outcome, action, decision, rule_id = _COUNTED_BY(record) if fields is None else fields
    if outcome == "decided":
        return metrics.decisions, (str(action), str(decision), rule_id or "")
    if isinstance(record.response, dict):
        return metrics.rejections, (record.response.get("error", {}).get("code", "unknown"),)
    return None


def _reject_and_log(exc: _Rejected) -> Response:
    decision_id = new_decision_id()
    body = {"error": {"code": exc.code, "message": exc.message, "details": [d.to_dict() for d in exc.details]},
            "decision_id": decision_id}
    record = new_record(decision_id=decision_id, outcome="rejected", status=exc.status, request=exc.logged,
                        response=body, duration_us=_elapsed_us())
    failure = _commit([record])
    if failure is not None:
        return failure
    return _json(body, exc.status)


def _elapsed_us() -> int:
    return int((time.perf_counter() - g.started) * 1_000_000)


@routes.post("/v1/decisions")
def decide() -> Response:
    service = _service()
    if service.tokens["DECISION_TOKENS"] and not _authorized("DECISION_TOKENS"):
        return _unauthorized_and_logged()
    engine = service.holder.engine  # taken once: this request is read and decided by one policy set
    try:
        raw, received, checked = _decision_body(engine)
    except _Rejected as exc:
        return _reject_and_log(exc)
    language = _language()
    status, body, outcome, digest = _decide_one(raw, datetime.now(UTC), _explain(), language, engine, checked)
    logged = raw if status == 200 else _bounded(raw, received)
    record = new_record(decision_id=body["decision_id"], outcome=outcome, status=status, request=logged,
                        response=body, duration_us=_elapsed_us(),
                        # the body's exact bytes (valid UTF-8, checked by the parser)
                        request_text=received.decode("utf-8") if logged is raw else "", policy_digest=digest)
    failure = _commit([record], service)
    if failure is not None:
        return failure
    metrics = service.metrics
    metrics.child(metrics.latency, ("decide",)).observe(time.perf_counter() - g.started)
    return _json(body, status, language)


@routes.post("/v1/decisions/batch")
def decide_batch() -> Response:
    if _tokens("DECISION_TOKENS") and not _authorized("DECISION_TOKENS"):
        return _unauthorized_and_logged()
    engine = _service().holder.engine  # taken once: one policy set reads and decides the whole batch
    try:
        items = _batch_items(engine)
    except _Rejected as exc:
        return _reject_and_log(exc)
    now, explain, language = datetime.now(UTC), _explain(), _language()
    started, clock = g.started, time.perf_counter
    logged_at = log_time(now)  # the batch's records are committed together: one time for all
    # What the requests share is worked out once: their ids, made at once, and the time and
    # version chosen for each `at` and `policy_version` (most of a batch's requests share theirs).
    chosen: dict[Any, Any] = {}
    answers, records = [], []
    for (one, checked, text), decision_id in zip(items, new_decision_ids(len(items)), strict=True):
        status, body, outcome, digest = _decide_one(one, now, explain, language, engine, checked, decision_id,
                                                    chosen)
        answers.append(body)
        records.append(new_record(decision_id=body["decision_id"], outcome=outcome, status=status, request=one,
                                  response=body, duration_us=int((clock() - started) * 1_000_000),
                                  request_text=text, logged_text=logged_at, policy_digest=digest))
    failure = _commit(records)
    if failure is not None:
        return failure
    metrics = _service().metrics
    metrics.child(metrics.latency, ("batch",)).observe(time.perf_counter() - g.started)
    return _json({"decisions": answers}, language=language)


class _BatchShape(msgspec.Struct, forbid_unknown_fields=True):
    """A batch's body as its one-pass reading takes it: one field, each request's text apart."""

    requests: list[msgspec.Raw]


_BATCH_SHAPE = msgspec.json.Decoder(_BatchShape)


def _batch_items(engine: Any) -> list[tuple[Any, bool, str]]:
    """A batch's requests: (the request, whether it is read and checked already, the text the log
    keeps of it: its exact bytes, or "" for its canonical JSON); _Rejected for a batch refused
    whole. Each request is read by the engine's one-pass reader where it vouches for the request's
    bytes (engine/reader.py, as a single decision's), the batch's own text being proven to be
    `{"requests": [...]}` and nothing else. Where the reader vouches for every request, that is
    the whole reading; else the body is read the strict way too, as before (_parsed: the same
    refusals of the whole batch, in the same words), and a request the reader did not vouch for is
    decided from that reading, checked by the engine (its own error entry, if it is refused)."""
    raw = _body_bytes()
    if len(raw) > current_app.config["MAX_BATCH_BYTES"]:
        _parsed(raw, True)  # refused for its size, as ever (nothing else is read first)
    texts, colons = _batch_texts(raw)
    vouched: list[Any] = []
    if texts is not None:  # all at once where the reader vouches for every request, else each alone
        # (bounded: the body's own count of its values, within vouch()'s bounds, holds its requests')
        vouched = engine.check.vouch_all(texts, bounded=True, colons=colons) or [
            engine.check.vouch(text) for text in texts]
    if texts is not None and None not in vouched:
        return [(one, True, text.decode("utf-8")) for one, text in zip(vouched, texts, strict=True)]
    requests = _parsed(raw, True)["requests"]
    if len(vouched) != len(requests):  # (the one-pass reading did not read this body)
        return [(one, False, "") for one in requests]
    return [(one, False, "") if mine is None else (mine, True, text.decode("utf-8"))
            for one, mine, text in zip(requests, vouched, texts or (), strict=True)]


def _batch_texts(raw: bytes) -> tuple[list[bytes] | None, int]:
    """The text of each request of a batch body and their colons, where its one-pass reading
    proves that the body is `{"requests": [...]}` (whitespace aside) within the batch's bounds;
    else None (read it the strict way). msgspec reads the body's syntax in C (strict: UTF-8, no
    NaN, nothing after the value), refuses a field other than `requests`, and keeps each request's
    text; a field written twice, which it takes the last of in silence, shows in the colons: each
    key has one, so the body holds one more colon than its requests' texts only where `requests`
    is its one key."""
    if not within_bounds(raw):
        return None, 0  # too many values: the strict reading says so
    try:
        requests = _BATCH_SHAPE.decode(raw).requests
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None, 0
    if len(requests) > current_app.config["MAX_BATCH"]:
        return None, 0
    texts = [bytes(one) for one in requests]
    colons = b"".join(texts).count(b":")
    if raw.count(b":") != 1 + colons:
        return None, 0
    return texts, colons


@routes.get("/v1/decisions/<decision_id>")
def get_decision(decision_id: str) -> Response:
    if not _authorized("LOG_TOKENS"):
        return _unauthorized()
    try:
        record = _service().store.get(decision_id)
    except BrokenRecordError as exc:
        return jsonify({"record": exc.broken.to_dict()})
    if record is None:
        return error_response(404, "unknown_decision", f"no decision '{decision_id}' in the log")
    # ?lang=zh|en, or Accept-Language: the logged decision's messages in that language as well,
    # rendered from the rule ids, the request and the policy content the log keeps.
    wanted = request.args.get("lang")
    if wanted is not None and wanted not in LANGUAGES:
        raise RequestError("invalid_query", "the log query is not valid",
                           [Detail("?lang", f"expected one of {', '.join(LANGUAGES)}")])
    if wanted is None and "Accept-Language" not in request.headers:
        return jsonify({"record": record.to_dict()})
    language = wanted or _language()
    rendered, why = render_record(_service().store, record, language)
    response = jsonify({"record": record.to_dict(),
                        "rendered": {"language": language, **({"response": rendered} if rendered is not None
                                                               else {"error": why})}})
    _say_language(response, language)
    return response


@routes.get("/v1/decisions")
def list_decisions() -> Response:
    if not _authorized("LOG_TOKENS"):
        return _unauthorized()
    args = request.args
    problems = [Detail(f"?{name}", "unknown filter") for name in args
                if name not in (*FILTERS, "limit", "after")]
    filters: dict[str, str | None] = {name: args.get(name) for name in FILTERS}
    for name in ("since", "until"):
        if filters[name] is not None:
            try:
                parse_timestamp(str(filters[name]))
            except ValueError:
                problems.append(Detail(f"?{name}", "expected an RFC 3339 timestamp within the years 1 to 9999"))
    limit_text, after_text = args.get("limit", "100"), args.get("after", "0")
    if not re.fullmatch(r"[0-9]{1,4}", limit_text) or not 1 <= int(limit_text) <= 1000:
        problems.append(Detail("?limit", "expected a whole number from 1 to 1000"))
    if not re.fullmatch(r"[0-9]{1,18}", after_text):
        problems.append(Detail("?after", "expected a record's seq"))
    if problems:
        raise RequestError("invalid_query", "the log query is not valid", problems)
    limit = int(limit_text)
    records = list(_service().store.scan(limit=limit + 1, after_seq=int(after_text), **filters))
    more = len(records) > limit
    records = records[:limit]  # a record that cannot be read comes as {seq, decision_id, broken}
    return jsonify({"records": [r.to_dict() for r in records], "next": records[-1].seq if more else None})


def _version_summary(version: PolicyVersion, in_force: PolicyVersion | None) -> dict[str, Any]:
    return {"version": version.name, "effective_from": format_timestamp(version.effective_from),
            "description": version.description, "extends": version.extends, "digest": version.digest,
            "rules": len(version.rules), "in_force": version is in_force}


@routes.get("/v1/policies")
def list_policies() -> Response:
    policies = _service().holder.engine.policies
    in_force = policies.in_force(datetime.now(UTC))
    return jsonify({"versions": [_version_summary(v, in_force) for v in policies],
                    "in_force": in_force.name if in_force else None})


@routes.get("/v1/policies/<version>")
def show_policy(version: str) -> Response:
    policies = _service().holder.engine.policies
    found = policies.get(version)
    if found is None:
        return error_response(404, "unknown_version", f"no policy version '{version}'")
    body = _version_summary(found, policies.in_force(datetime.now(UTC)))
    body["parameters"] = dict(found.parameters)
    body["rules"] = [{
        "id": r.id, "actions": list(r.actions), "roles": list(r.roles) if r.roles else None,
        "effect": r.effect, "applies_when": r.applies_when.text if r.applies_when else None,
        "fires_when": r.fires_when.text, "message": r.message, "source": r.source,
        "messages": dict(r.messages.templates) if r.messages else {"en": r.message},
        "location": r.where, "defined_in": r.defined_in} for r in found.rules]
    body["outputs"] = [{
        "name": o.name, "actions": list(o.actions), "applies_when": o.applies_when.text if o.applies_when else None,
        "value": o.value.text, "source": o.source, "defined_in": o.defined_in} for o in found.outputs]
    body["files"] = list(found.files)
    return jsonify(body)


@routes.get("/v1/policies/<old>/diff/<new>")
def diff_policies(old: str, new: str) -> Response:
    policies = _service().holder.engine.policies
    for name in (old, new):
        if policies.get(name) is None:
            return error_response(404, "unknown_version", f"no policy version '{name}'")
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "text", "markdown", "html"):
        raise RequestError("invalid_query", "unknown format",
                           [Detail("?format", "expected json, text, markdown or html")])
    result = diff_versions(policies.get(old), policies.get(new))
    from engine.prover.diff import cached_proof  # z3 is loaded by the first diff, not by every worker

    result.proof = cached_proof(policies, policies.get(old), policies.get(new))
    if fmt == "json":
        return jsonify(result.to_dict())
    mimetype = {"text": "text/plain", "markdown": "text/markdown", "html": "text/html"}[fmt]
    return Response(render_diff(result, fmt), mimetype=mimetype)


@routes.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@routes.get("/readyz")
def readyz() -> Response:
    """Ready: policies loaded, the last commits went through (or a probe commit does), the
    log's chain intact. The body names no database host, port or credential."""
    service = _service()
    holder, store, watch = service.holder, service.store, service.watch
    commits = store.commits_ok()
    writable = commits and store.writable()
    breach = watch.breach
    ready = writable and breach is None
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "policies": {v.name: v.digest for v in holder.engine.policies},
        "loaded_at": format_timestamp(holder.loaded_at), "decision_log": "writable" if writable else "unwritable"}
    if breach is not None:
        body["decision_log_chain"] = f"broken at {breach.describe()}"
    elif (silent := watch.stale()) is not None:  # a warning: the service still decides and logs
        body["decision_log_watch"] = (f"stale: the log's watch has not checked for {silent:.0f} s (the watcher "
                                      "process may be stuck; a breach since would not be seen yet)")
    if store.last_error is not None:  # the kind only: the message may name the server
        body["decision_log_last_error"] = (f"{type(store.last_error).__name__}: the last commit failed "
                                           "(details in the service's log)")
    body["decision_log_integrity"] = _integrity(store, watch)
    if writable:
        try:
            seq, head = store.head()
            body["decision_log_head"] = {"seq": seq, "hash": head}  # to notice records removed from the end
        except LogError:
            pass
    if holder.failure is not None:
        body["last_reload"] = {"status": "refused", "at": holder.failure.at, "error": holder.failure.error,
                               "serving": holder.fallback or "the last good policy set"}
    if holder.fallback is not None:
        body["policies_from"] = holder.fallback  # the files on disk did not load when this worker started
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    return response


def _integrity(store: Any, watch: Any) -> dict[str, Any]:
    keys = store.keys
    integrity: dict[str, Any] = {
        "mac": f"hmac-sha256, key {keys.current.id}" if keys else
        "off: records are chained with plain SHA-256, which anyone can recompute (set BINDPOLICY_LOG_MAC_KEY_FILE)",
        "verified_through": watch.verified_through,
        "checked_at": format_timestamp(datetime.fromtimestamp(watch.checked_at, UTC))
        if watch.checked_at is not None else None,
        "checked_by": "this worker" if watch.watching else
        f"the worker of pid {watch.watcher_pid}" if watch.watcher_pid else "no worker yet"}
    if watch.signing_key is None:
        integrity["checkpoints"] = "off: no signing key (set BINDPOLICY_CHECKPOINT_KEY_FILE)"
    else:
        latest = watch.latest_checkpoint()
        integrity["checkpoints"] = {"every_seconds": watch.checkpoint_interval,
                                    "latest_tree_size": latest[0] if latest else None,
                                    "latest_written_at": latest[1] if latest else None}
    return integrity


@routes.get("/metrics")
def metrics() -> Response:
    service = _service()
    engine = service.holder.engine
    in_force = engine.policies.in_force(datetime.now(UTC))
    service.metrics.policies_loaded(engine, in_force.name if in_force else None)
    service.metrics.log_verified.set(service.watch.verified_through)
    return Response(service.metrics.render(), mimetype="text/plain", headers={"Content-Type":
                                                                               "text/plain; version=0.0.4"})


@routes.get("/openapi.json")
def openapi() -> Response:
    return jsonify(build_openapi(current_app.config["MAX_BATCH"], _service().holder.engine.check.schema,
                                 current_app.config["MAX_BATCH_BYTES"]))

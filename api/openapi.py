"""The OpenAPI 3.1 document, built from the very JSON Schemas the engine checks with."""

from __future__ import annotations

from typing import Any

from engine.generator import generate_requests
from engine.schemas import load_schema

JSON = "application/json"


def _rehome(schema: Any, prefix: str) -> Any:
    """Point a schema's local $refs (#/$defs/x) at its components (#/components/schemas/prefix.x)."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = f"#/components/schemas/{prefix}.{value[len('#/$defs/'):]}"
            elif key not in ("$schema", "$id", "$defs"):
                out[key] = _rehome(value, prefix)
        return out
    if isinstance(schema, list):
        return [_rehome(item, prefix) for item in schema]
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {400: "The request cannot be decided: every offending field, by JSON pointer",
             401: "A bearer token is missing or not accepted", 404: "Not found",
             403: "Scratch policies are off on this service (see BINDPOLICY_SCRATCH)",
             413: "The body or the batch is larger than allowed", 415: "The body is not application/json",
             503: "Not ready, or the decision log cannot commit: nothing was decided"}
    return {str(s): _json(_ref("response.error"), words[s]) for s in statuses}


def _examples() -> dict[str, Any]:
    """Requests the contract accepts, from the corpus generator: fuzzers start from these, so that
    what they try reaches decisions, not only the refusals."""
    return {f"generated-{i}": {"value": request} for i, request in enumerate(generate_requests(24, seed=1))}


def build_openapi(max_batch: int, request: dict[str, Any], max_batch_bytes: int = 64 * 1024) -> dict[str, Any]:
    """The document; `request` is the request schema the service checks with (its list bounds)."""
    response = load_schema("response")
    schemas: dict[str, Any] = {"DecisionRequest": _rehome(request, "request")}
    schemas.update({f"request.{k}": _rehome(v, "request") for k, v in request["$defs"].items()})
    schemas.update({f"response.{k}": _rehome(v, "response") for k, v in response["$defs"].items()})
    schemas["BatchRequest"] = {
        "type": "object", "required": ["requests"], "additionalProperties": False,
        "description": f"At most {max_batch} requests and {max_batch_bytes} bytes of body (a 413 "
                       "`batch_too_large` names the limit): a batch is bounded so that it costs about as "
                       "much CPU as the costliest single request; send more as several batches.",
        "properties": {"requests": {"type": "array", "maxItems": max_batch,
                                    "items": {"description": "A decision request; a bad one gets its own error"}}}}
    schemas["LogRecord"] = {
        "type": "object", "required": ["seq", "decision_id", "logged_at", "outcome", "status", "request",
                                       "response", "prev_hash", "hash"],
        "properties": {"seq": {"type": "integer"}, "decision_id": {"type": "string"},
                       "logged_at": {"type": "string", "format": "date-time"},
                       "outcome": {"enum": ["decided", "rejected", "failed"]}, "status": {"type": "integer"},
                       "request": {}, "response": {}, "duration_us": {"type": "integer"},
                       "prev_hash": {"type": "string"}, "hash": {"type": "string"}}}
    schemas["PolicyVersionSummary"] = {
        "type": "object", "required": ["version", "effective_from", "digest", "in_force"],
        "properties": {"version": {"type": "string"}, "effective_from": {"type": "string", "format": "date-time"},
                       "description": {"type": "string"}, "extends": {"type": ["string", "null"]},
                       "digest": {"type": "string"}, "rules": {"type": "integer"}, "in_force": {"type": "boolean"}}}
    explain = {"name": "explain", "in": "query", "required": False,
               "description": "List every rule evaluated, its outcome and the values it read",
               "schema": {"type": "string", "enum": ["true", "false"]}}
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    log_filters = [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                   for n in ("since", "until", "action", "decision", "rule_id", "shop_id", "account_id", "outcome")]
    log_filters.append({"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,4}$"}})
    log_filters.append({"name": "after", "in": "query", "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}})
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "bindpolicy", "version": "1",
                 "description": "Decisions on binding TikTok accounts to a TikTok Shop, each naming its rule."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/decisions": {
                "post": {"operationId": "decide", "summary": "Decide one request", "parameters": [explain],
                         "requestBody": {"required": True, "content": {JSON: {
                             "schema": _ref("DecisionRequest"), "examples": _examples()}}},
                         "responses": {"200": _json(_ref("response.decision"), "The decision"),
                                       **_errors(400, 401, 413, 415, 503)}},
                "get": {"operationId": "listDecisions", "summary": "Query the decision log", "security": bearer,
                        "parameters": log_filters,
                        "responses": {"200": _json({"type": "object", "required": ["records", "next"],
                                                    "properties": {"records": {"type": "array",
                                                                               "items": _ref("LogRecord")},
                                                                   "next": {"type": ["integer", "null"]}}},
                                                   "Records in log order"),
                                      **_errors(400, 401)}},
            },
            "/v1/decisions/batch": {
                "post": {"operationId": "decideBatch", "summary": f"Decide up to {max_batch} requests "
                                                                   f"({max_batch_bytes} bytes), in order",
                         "parameters": [explain],
                         "requestBody": {"required": True, "content": {JSON: {
                             "schema": _ref("BatchRequest"),
                             "examples": {"generated": {"value": {"requests": list(generate_requests(8, seed=2))}}}}}},
                         "responses": {"200": _json(_ref("response.batch"), "One answer per request, in order"),
                                       **_errors(400, 401, 413, 415, 503)}}},
            "/v1/decisions/{decision_id}": {
                "get": {"operationId": "getDecision", "summary": "A logged request and its response",
                        "security": bearer,
                        "parameters": [{"name": "decision_id", "in": "path", "required": True,
                                        "schema": {"type": "string"}},
                                       {"name": "lang", "in": "query", "required": False,
                                        "description": "also render the messages in this language (or send "
                                                       "Accept-Language)", "schema": {"enum": ["en", "zh"]}}],
                        "responses": {"200": _json({"type": "object", "required": ["record"], "properties": {
                            "record": _ref("LogRecord"),
                            "rendered": {"type": "object", "required": ["language"], "properties": {
                                "language": {"enum": ["en", "zh"]}, "response": {"type": "object"},
                                "error": {"type": "string"}}}}}, "The record"),
                                      **_errors(400, 401, 404)}}},
            "/v1/policies": {
                "get": {"operationId": "listPolicies", "summary": "Versions, dates, digests, the one in force",
                        "responses": {"200": _json({"type": "object", "required": ["versions", "in_force"],
                                                    "properties": {"versions": {"type": "array", "items": _ref(
                                                        "PolicyVersionSummary")},
                                                                   "in_force": {"type": ["string", "null"]}}},
                                                   "The versions")}}},
            "/v1/policies/{version}": {
                "get": {"operationId": "getPolicy", "summary": "One version: parameters, rules, outputs",
                        "parameters": [{"name": "version", "in": "path", "required": True,
                                        "schema": {"type": "string"}}],
                        "responses": {"200": _json({"type": "object"}, "The version"), **_errors(404)}}},
            "/v1/policies/{old}/diff/{new}": {
                "get": {"operationId": "diffPolicies", "summary": "What changed in meaning between two versions",
                        "parameters": [{"name": "old", "in": "path", "required": True, "schema": {"type": "string"}},
                                       {"name": "new", "in": "path", "required": True, "schema": {"type": "string"}},
                                       {"name": "format", "in": "query", "required": False,
                                        "schema": {"enum": ["json", "text", "markdown", "html"]}}],
                        "responses": {"200": {"description": "The diff", "content": {
                            JSON: {"schema": {"type": "object"}},
                            **{kind: {"schema": {"type": "string"}}
                               for kind in ("text/plain", "text/markdown", "text/html")}}},
                            **_errors(400, 404)}}},
            **_console_paths(explain, bearer),
            "/healthz": {"get": {"operationId": "health", "summary": "The process is alive",
                                 "responses": {"200": _json({"type": "object"}, "Alive")}}},
            "/readyz": {"get": {"operationId": "ready", "summary": "Policies loaded and the log writable",
                                "responses": {"200": _json({"type": "object"}, "Ready"),
                                              "503": _json({"type": "object"}, "Not ready, and why")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
        },
    }



def _console_paths(explain: dict[str, Any], bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    """What the console calls besides the decision and policy endpoints: authors' and auditors' tools."""
    files = {"type": "object", "description": "A scratch copy: {'v1/bind.yaml': text, 'tests/x_test.yaml': text}",
             "additionalProperties": {"type": "string"}}

    def scratch(operation: str, summary: str, properties: dict[str, Any], answer: str,
                parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"post": {
            "operationId": operation, "summary": summary, "parameters": parameters or [],
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["files"], "additionalProperties": False,
                "properties": {"files": files, **properties}}}}},
            "responses": {"200": _json({"type": "object"}, answer), **_errors(400, 403, 413, 415)}}}

    version = {"in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/sources": {"get": {"operationId": "getSources",
                                "summary": "The policy files of the set in force and the suites beside them",
                                "responses": {"200": _json({"type": "object", "required": ["files"], "properties": {
                                    "files": {"type": "object", "additionalProperties": {"type": "string"}}}},
                                    "Files by path")}}},
        "/v1/examples": {"get": {"operationId": "getExamples",
                                 "summary": "Generated requests to start from, per action and role and outcome",
                                 "responses": {"200": _json({"type": "object"}, "Examples")}}},
        "/v1/scratch": {"get": {"operationId": "getScratchSettings",
                                "summary": "Whether scratch policies are on here, and their bounds",
                                "responses": {"200": _json({"type": "object"}, "Settings")}}},
        "/v1/scratch/check": scratch("checkScratch", "Load a scratch copy; every problem with file, line, column",
                                     {}, "ok, the problems, the versions it builds"),
        "/v1/scratch/decisions": scratch("decideScratch", "Decide one request against a scratch copy (not logged)",
                                         {"request": _ref("DecisionRequest")}, "The decision", [explain]),
        "/v1/scratch/tests": scratch("testScratch", "Run a scratch copy's suites (tests/*.yaml) against it",
                                     {}, "Every case, problems and coverage gaps"),
        "/v1/scratch/diff": scratch("diffScratch",
                                    "Semantic diff from the set in force to a scratch copy, and its impact on "
                                    "the corpus", {}, "Diffs by version and the impact"),
        "/v1/decisions/{decision_id}/replay": {"post": {
            "operationId": "replayDecision", "security": bearer,
            "summary": "Decide a logged request again under the policy content that judged it, and compare",
            "parameters": [{"name": "decision_id", **version}],
            "responses": {"200": _json({"type": "object", "required": ["status", "differences"], "properties": {
                "status": {"enum": ["reproduced", "different", "cannot_replay"]},
                "differences": {"type": "array"}, "message": {"type": "string"},
                "policy_digest": {"type": ["string", "null"]}, "decision_id": {"type": "string"}}},
                "reproduced, or every difference"), **_errors(401, 404)}}},
        "/v1/log/chain": {"get": {
            "operationId": "getChain", "security": bearer,
            "summary": "The chain's head and a verification of its most recent records",
            "parameters": [{"name": "recent", "in": "query", "required": False,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,6}$"}}],
            "responses": {"200": _json({"type": "object"}, "Head, records checked, intact or the breach"),
                          **_errors(400, 401)}}},
        "/v1/policies/{old}/impact/{new}": {"get": {
            "operationId": "impactPolicies",
            "summary": "The corpus judged under two versions: the decisions that flip, by rule",
            "parameters": [{"name": "old", **version}, {"name": "new", **version}],
            "responses": {"200": _json({"type": "object"}, "The impact"), **_errors(400, 404)}}},
    }

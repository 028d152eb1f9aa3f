"""The one place where errors become HTTP answers: JSON bodies, never HTML, never a stack trace."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from engine.decisionlog import LogError
from engine.errors import Detail, InputError, RequestError

log = logging.getLogger("bindpolicy.api")

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
    429: "too_many_requests", 500: "internal_error", 503: "unavailable",
}


def error_body(code: str, message: str, details: list[Detail] | None = None) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "details": [d.to_dict() for d in details or []]}}


def error_response(status: int, code: str, message: str, details: list[Detail] | None = None) -> Response:
    response = jsonify(error_body(code, message, details))
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError) -> Response:
        response = jsonify(exc.to_dict())
        response.status_code = 400
        return response

    @app.errorhandler(LogError)
    def _log_error(exc: LogError) -> Response:  # the database is away: say so, never a 500
        log.error("decision log unavailable", extra={"event": "log_read_failed", "error": str(exc)})
        return error_response(503, "log_unavailable", "the decision log cannot be read right now; retry later")

    @app.errorhandler(InputError)
    def _input_error(exc: InputError) -> Response:  # the configured corpus (BINDPOLICY_CORPUS) cannot be read
        log.error("corpus unreadable", extra={"event": "corpus_unreadable", "error": str(exc)})
        return error_response(503, "corpus_unreadable", f"the corpus cannot be read: {exc}")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = error_response(status, STATUS_CODES.get(status, "http_error"), exc.description or exc.name)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server failed to answer; the error is logged")

"""Endpoints for auditors: replay a logged decision, the chain's state, and impact between versions."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify, request

from api.errors import error_response
from api.routes import _authorized, _service, _unauthorized
from engine.errors import Detail, RequestError
from engine.impact import judge_engines
from engine.replay import replay
from engine.scratch import Deadline

auditing = Blueprint("auditing", __name__)
CHAIN_RECENT = 1000  # records verified by default


@auditing.post("/v1/decisions/<decision_id>/replay")
def replay_decision(decision_id: str) -> Response:
    """Decide a logged request again under the very policy content that judged it, and compare."""
    if not _authorized("LOG_TOKENS"):
        return _unauthorized()
    store = _service().store
    if store.get(decision_id) is None:
        return error_response(404, "unknown_decision", f"no decision '{decision_id}' in the log")
    return jsonify(replay(store, decision_id).to_dict())


@auditing.get("/v1/log/chain")
def chain_state() -> Response:
    """The chain's head and a verification of its most recent records."""
    if not _authorized("LOG_TOKENS"):
        return _unauthorized()
    recent = request.args.get("recent", str(CHAIN_RECENT))
    if not re.fullmatch(r"[0-9]{1,6}", recent) or not 1 <= int(recent) <= 100_000:
        raise RequestError("invalid_query", "the chain query is not valid",
                           [Detail("?recent", "expected a whole number from 1 to 100000")])
    service = _service()
    records = service.store.tail(int(recent))
    breach = service.store.verify(records)
    seq, head = service.store.head()
    at_start = service.chain_breach
    return jsonify({
        "head": {"seq": seq, "hash": head},
        "checked": {"records": len(records), "from_seq": records[0].seq if records else None,
                    "to_seq": records[-1].seq if records else None},
        "intact": breach is None,
        "breach": None if breach is None else {"seq": breach.seq, "decision_id": breach.decision_id,
                                               "problem": breach.problem},
        "at_start": None if at_start is None else {"seq": at_start.seq, "problem": at_start.problem}})


@auditing.get("/v1/policies/<old>/impact/<new>")
def impact_between(old: str, new: str) -> Response:
    """Every corpus request judged under both versions: the decisions that flip, by rule."""
    service = _service()
    engine = service.holder.engine
    for name in (old, new):
        if engine.policies.get(name) is None:
            return error_response(404, "unknown_version", f"no policy version '{name}'")
    deadline = Deadline(float(current_app.config["SCRATCH_MAX_SECONDS"]))
    corpus = service.corpus()
    report = judge_engines((engine, old), (engine, new), deadline.through(corpus.requests, "judging the corpus"),
                           datetime.now(UTC), origins=corpus.origins)
    return jsonify({**report.to_dict(), "corpus": str(current_app.config["CORPUS"])})

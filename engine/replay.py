"""Exact replay: a logged request, decided again by the very policy content that judged it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from engine.decider import Engine
from engine.decisionlog import LogRecord, Store
from engine.errors import PolicyLoadError, RequestError
from engine.loader import load_policies
from engine.messages import DEFAULT_LANGUAGE
from engine.sources import ArchiveSource, PolicySource, UnknownDigestError
from engine.versions import parse_timestamp

REPRODUCED, DIFFERENT, CANNOT = "reproduced", "different", "cannot_replay"
BROKEN = "broken"  # the record, or the policy content it names, fails its integrity check (exit 1)
NOTHING = "nothing_to_replay"  # a rejection whose body was never kept (413, 415): said so, exit 0
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\.ya?ml")
REPLAY_MAX_LIST_ITEMS = 1_000_000


@dataclass
class ReplayResult:
    status: str
    decision_id: str
    differences: list[dict[str, Any]]
    message: str = ""
    policy_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "decision_id": self.decision_id, "policy_digest": self.policy_digest,
                "differences": self.differences, "message": self.message}


def _differences(logged: Any, again: Any, path: str = "") -> list[dict[str, Any]]:
    if isinstance(logged, dict) and isinstance(again, dict):
        out: list[dict[str, Any]] = []
        for key in sorted(set(logged) | set(again)):
            out += _differences(logged.get(key), again.get(key), f"{path}/{key}")
        return out
    if isinstance(logged, list) and isinstance(again, list) and len(logged) == len(again):
        pairs = enumerate(zip(logged, again, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{path}/{i}")]
    return [] if logged == again else [{"path": path or "/", "logged": logged, "replayed": again}]


def replay(store: Store, decision_id: str) -> ReplayResult:
    """Decide the logged request again under the logged policy content (by digest), and compare."""
    record = store.get(decision_id)
    if record is None:
        return ReplayResult(CANNOT, decision_id, [], f"no decision '{decision_id}' in the log")
    return replay_record(store, record)


def replay_record(store: Store, record: LogRecord) -> ReplayResult:
    response = record.response if isinstance(record.response, dict) else {}
    policy = response.get("policy") or {}
    digest = policy.get("digest") or record.policy_digest
    if record.outcome == "rejected" and digest is None:
        return _replay_rejection(store, record)
    try:
        source = ArchiveSource(store, digest or "")
    except UnicodeEncodeError:
        return ReplayResult(BROKEN, record.decision_id, [], f"the stored policy content {digest} is not valid "
                            "text (altered)", digest)
    except UnknownDigestError:
        return ReplayResult(CANNOT, record.decision_id, [], f"the policy content {digest} is not in the log",
                            digest)
    version = source.version
    if content_digest(source.files) != digest:  # checked before any of it is parsed
        return ReplayResult(BROKEN, record.decision_id, [], f"the stored policy content {digest} does not match "
                            "its digest (altered); it was not parsed", digest)
    unsafe = [name for name in source.files if not SAFE_NAME.fullmatch(name)]
    if unsafe:  # the stored names are not under the chain's protection: only policy files are read
        return ReplayResult(CANNOT, record.decision_id, [], f"stored file names are not policy files: {unsafe}",
                            digest)
    engine = _engine(source, policy.get("runtime") or record.runtime or "native")
    judged = engine.policies.get(version)
    if judged is None or judged.digest != digest:
        return ReplayResult(CANNOT, record.decision_id, [], "the stored content does not rebuild that version",
                            digest)
    request = record.request
    if not isinstance(request, dict) or not isinstance(response.get("at"), str):
        return ReplayResult(BROKEN, record.decision_id, [], "the logged request or response is not the shape "
                            "of a decision", digest)
    try:
        now = parse_timestamp(response["at"])
    except ValueError:
        return ReplayResult(BROKEN, record.decision_id, [], "the logged response's time is not a timestamp", digest)
    try:
        decision = engine.decide({**request, "policy_version": version} if "policy_version" not in request
                                 else request, now=now, decision_id=record.decision_id, explain="explain" in response,
                                 language=response.get("language", DEFAULT_LANGUAGE))
    except RequestError as exc:  # a logged decision whose request no longer passes: say so, as a difference
        return ReplayResult(DIFFERENT, record.decision_id, [{"path": "/", "logged": response.get("decision"),
                                                             "replayed": exc.to_dict()}],
                            "the logged request is now rejected", digest)
    replayed = decision.to_dict()
    if "language" not in response:  # logged before responses said their language (always English then)
        replayed.pop("language")
    differences = _differences(response, replayed)
    return ReplayResult(REPRODUCED if not differences else DIFFERENT, record.decision_id, differences,
                        "" if not differences else f"{len(differences)} difference(s)", digest)


def content_digest(files: dict[str, bytes]) -> str:
    """A policy version's digest from its stored files: the loader's formula (names and bytes,
    sorted), so stored content is checked before anything parses it."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0" + files[name] + b"\0")
    return f"sha256:{digest.hexdigest()}"


def _replay_rejection(store: Store, record: LogRecord) -> ReplayResult:
    """A rejection is replayed for what it is: the body's framing (too large, not JSON, not
    JSON at all), a batch's shape, or the request's contract."""
    from engine.request import check_request, parse_json

    response = record.response if isinstance(record.response, dict) else {}
    error: dict[str, Any] = response["error"] if isinstance(response.get("error"), dict) else {}
    code, message = error.get("code"), str(error.get("message", ""))
    details = error.get("details") if isinstance(error.get("details"), list) else []

    def judged(again: dict[str, Any] | None, what: str) -> ReplayResult:
        if again is None:
            return ReplayResult(DIFFERENT, record.decision_id, [{"path": "/error", "logged": error,
                                                                 "replayed": None}], f"{what}: now accepted")
        differences = _differences({k: error.get(k) for k in again}, again)
        return ReplayResult(REPRODUCED if not differences else DIFFERENT, record.decision_id, differences,
                            f"{what}: " + ("the same rejection" if not differences else
                                           f"{len(differences)} difference(s)"))

    if record.status in (413, 415) and record.request is None:
        return ReplayResult(NOTHING, record.decision_id, [], f"a {record.status} rejection ({code}): the body was "
                            "not kept, so there is nothing to decide again")
    if code == "batch_too_large" or (message.startswith("a batch") and details
                                     and isinstance(details[0], dict) and details[0].get("path") == "/requests"):
        return judged(_batch_problem(record.request, message), "a whole-batch rejection")
    if isinstance(record.request, str):  # the body as received, when it was not JSON
        try:
            parse_json(record.request.encode("utf-8", "surrogateescape"))
        except RequestError as exc:
            return judged({"code": exc.code, "details": [d.to_dict() for d in exc.details]}, "a body that is not JSON")
        return judged(None, "a body that was not JSON")
    try:
        check_request(record.request)
    except RequestError as exc:
        again = {**exc.to_dict(), "decision_id": record.decision_id}
        differences = _differences(record.response, again)
        return ReplayResult(REPRODUCED if not differences else DIFFERENT, record.decision_id, differences,
                            "a request refused by the contract")
    return ReplayResult(CANNOT, record.decision_id, [], "the rejection came after the schema check; "
                        "its policy content is not recorded")


def _batch_problem(raw: Any, message: str) -> dict[str, Any] | None:
    """The whole-batch checks of POST /v1/decisions/batch, again: its shape, then its size
    (the limit in force then is the one its message names)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("requests"), list) or set(raw) != {"requests"}:
        return {"code": "invalid_request"}
    limit = re.search(r"at most ([0-9]+)", message)
    if limit and len(raw["requests"]) > int(limit.group(1)):
        return {"code": "batch_too_large", "details": [{"path": "/requests",
                                                        "problem": f"has {len(raw['requests'])} requests"}]}
    return None


def _engine(source: PolicySource, runtime: str) -> Engine:
    try:  # the logged request passed the service's own list bound: judge it with no lower one
        return Engine(load_policies(source), runtime=runtime, max_list_items=REPLAY_MAX_LIST_ITEMS)
    except PolicyLoadError as exc:  # content that loaded once always loads again; say so if not
        raise RuntimeError(f"stored policy content no longer loads: {exc}") from exc

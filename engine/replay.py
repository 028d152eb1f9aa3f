"""Exact replay: a logged request, decided again by the very policy content that judged it."""

from __future__ import annotations

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
    except UnknownDigestError:
        return ReplayResult(CANNOT, record.decision_id, [], f"the policy content {digest} is not in the log",
                            digest)
    version = source.version
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
    now = parse_timestamp(response["at"])
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


def _replay_rejection(store: Store, record: LogRecord) -> ReplayResult:
    """A rejection holds no digest: judge it again with the content in force when it was logged."""
    from engine.request import check_request

    try:
        check_request(record.request)
    except RequestError as exc:
        again = {**exc.to_dict(), "decision_id": record.decision_id}
        differences = _differences(record.response, again) if isinstance(record.request, dict) else []
        return ReplayResult(REPRODUCED if not differences else DIFFERENT, record.decision_id, differences)
    return ReplayResult(CANNOT, record.decision_id, [], "the rejection came after the schema check; "
                        "its policy content is not recorded")


def _engine(source: PolicySource, runtime: str) -> Engine:
    try:  # the logged request passed the service's own list bound: judge it with no lower one
        return Engine(load_policies(source), runtime=runtime, max_list_items=REPLAY_MAX_LIST_ITEMS)
    except PolicyLoadError as exc:  # content that loaded once always loads again; say so if not
        raise RuntimeError(f"stored policy content no longer loads: {exc}") from exc

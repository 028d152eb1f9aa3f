"""Exact replay: a logged request, decided again by the very policy content that judged it."""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.decider import Engine
from engine.decisionlog import Breach, BrokenRecord, ChainVerifier, LogRecord, Store
from engine.errors import PolicyLoadError, RequestError
from engine.loader import load_policies
from engine.messages import DEFAULT_LANGUAGE
from engine.request import batch_bytes_problem, batch_count_problem
from engine.sources import SET_VERSION, ArchiveSource, PolicyArchive, PolicySource, UnknownDigestError, set_digest
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
    rendered: dict[str, Any] | None = None  # with a language: the logged response in it (see render_record)

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
    # The record's own hash or MAC, checked as `log verify` checks it (its links need its neighbours).
    breach = ChainVerifier(store.keys, from_first_seen=True).feed(record)
    if breach is not None:
        return ReplayResult(BROKEN, decision_id, [], f"the record fails the chain check: {breach.problem}",
                            record.policy_digest)
    return replay_record(store, record)


def replay_record(store: PolicyArchive, record: LogRecord,
                  engines: dict[tuple[str, str], _Built] | None = None, language: str | None = None) -> ReplayResult:
    """Replay one record; `engines` keeps the engine built for each (digest, runtime) across records.
    With `language`, also render the logged response in it (only a reproduced decision is
    rendered: the same rules, so the same ids)."""
    response = record.response if isinstance(record.response, dict) else {}
    policy = response.get("policy") or {}
    digest = policy.get("digest") or record.policy_digest
    if record.outcome == "rejected" and digest is None:
        return _replay_rejection(record)
    if record.outcome == "failed":
        return ReplayResult(CANNOT, record.decision_id, [], "the decision failed on a bug of ours (answered 500)",
                            digest)
    runtime = policy.get("runtime") or record.runtime or "native"
    key = (digest or "", runtime)
    built = engines.get(key) if engines is not None else None
    if built is None:
        built = _build(store, digest or "", runtime)
        if engines is not None:
            engines[key] = built
    engine, version = built.engine, built.version
    if engine is None:
        return ReplayResult(built.status, record.decision_id, [], built.why, digest)
    request = record.request
    if not isinstance(request, dict):
        return ReplayResult(BROKEN, record.decision_id, [], "the logged request is not a JSON object", digest)
    if record.outcome == "rejected":
        return _replay_late_rejection(engine, version, record, digest)
    if not isinstance(response.get("at"), str):
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
    result = ReplayResult(REPRODUCED if not differences else DIFFERENT, record.decision_id, differences,
                          "" if not differences else f"{len(differences)} difference(s)", digest)
    if language is not None and not differences:
        again = engine.decide(request if "policy_version" in request else {**request, "policy_version": version},
                              now=now, decision_id=record.decision_id, explain="explain" in response,
                              language=language).to_dict()
        result.rendered = again
    return result


def render_record(store: PolicyArchive, record: LogRecord, language: str) -> tuple[dict[str, Any] | None, str]:
    """A logged decision with every message in `language` (the log keeps rule ids, the request and
    the policy content by digest, not only the text it answered in): the response, or None and why."""
    response = record.response if isinstance(record.response, dict) else {}
    if response.get("language", DEFAULT_LANGUAGE) == language:
        return response, ""
    if record.outcome != "decided":
        return None, "only a decision has messages to render; this record is a rejection"
    result = replay_record(store, record, language=language)
    if result.rendered is None:
        return None, f"{result.status}: {result.message}"
    return result.rendered, ""


def content_digest(files: dict[str, bytes]) -> str:
    """A policy version's digest from its stored files: the loader's formula (names and bytes,
    sorted), so stored content is checked before anything parses it."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0" + files[name] + b"\0")
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class _Built:
    """The engine over one stored content and the version it judges by, or why there is none."""

    engine: Engine | None
    version: str = ""
    status: str = ""
    why: str = ""


def _build(store: PolicyArchive, digest: str, runtime: str) -> _Built:
    try:
        source = ArchiveSource(store, digest)
    except UnicodeEncodeError:
        return _Built(None, status=BROKEN, why=f"the stored policy content {digest} is not valid text (altered)")
    except UnknownDigestError:
        return _Built(None, status=CANNOT, why=f"the policy content {digest or None} is not in the log")
    whole = source.version == SET_VERSION  # a whole set: it judged a rejection no version took
    if (set_digest(source.files) if whole else content_digest(source.files)) != digest:  # before any parsing
        return _Built(None, status=BROKEN, why=f"the stored policy content {digest} does not match its digest "
                      "(altered); it was not parsed")
    unsafe = [name for name in source.files if not SAFE_NAME.fullmatch(name)]
    if unsafe:  # the stored names are not under the chain's protection: only policy files are read
        return _Built(None, status=CANNOT, why=f"stored file names are not policy files: {unsafe}")
    key = (digest, source.version, runtime)
    engine = _LOADED.get(key)  # the content was just checked against its digest: the same content
    if engine is not None:
        _LOADED.move_to_end(key)  # least recently used first out
        return _Built(engine, source.version)
    engine = _engine(source, runtime)
    if whole:
        rebuilt = engine.policies.digest == digest
    else:
        judged = engine.policies.get(source.version)
        rebuilt = judged is not None and judged.digest == digest
    if not rebuilt:
        return _Built(None, status=CANNOT, why="the stored content does not rebuild that version")
    _LOADED[key] = engine
    while len(_LOADED) > LOADED_KEPT:
        _LOADED.popitem(last=False)
    return _Built(engine, source.version)


# Engines kept in one process (the service's ?lang renderings, replays), least recently used
# out first, by (digest, version, runtime): the archive is still read and its digest checked at
# every call (an altered archive is caught), but the set is built once, not per call.
LOADED_KEPT = 16
_LOADED: OrderedDict[tuple[str, str, str], Engine] = OrderedDict()


def _replay_late_rejection(engine: Engine, version: str, record: LogRecord, digest: str | None) -> ReplayResult:
    """A rejection past the schema check (missing_field, unknown_version...): judged again by its content
    (a version's, or the whole set's when no version took it), at the moment it was logged (which
    stood in for a missing `at`)."""
    request = record.request
    if version != SET_VERSION and "policy_version" not in request:
        request = {**request, "policy_version": version}
    try:
        decision = engine.decide(request, now=parse_timestamp(record.logged_at), decision_id=record.decision_id)
    except RequestError as exc:
        again = {**exc.to_dict(), "decision_id": record.decision_id}
        differences = _differences(record.response, again)
        return ReplayResult(REPRODUCED if not differences else DIFFERENT, record.decision_id, differences,
                            "" if not differences else f"{len(differences)} difference(s)", digest)
    except ValueError:
        return ReplayResult(BROKEN, record.decision_id, [], "the record's logged time is not a timestamp", digest)
    return ReplayResult(DIFFERENT, record.decision_id, [{"path": "/", "logged": record.response,
                                                         "replayed": decision.to_dict()}],
                        "the logged rejection is now decided", digest)


def _replay_rejection(record: LogRecord) -> ReplayResult:
    """A rejection with no digest is replayed for what it is: the body's framing (too large, not
    JSON, not JSON at all), a batch's shape, or the request's contract."""
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
        if message.startswith("a batch's body"):
            return judged(_batch_bytes_problem(record.request, message), "a batch refused for its bytes")
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
                        "its policy content is not recorded (logged before rejections carried their digest)")


def _batch_problem(raw: Any, message: str) -> dict[str, Any] | None:
    """The whole-batch checks of POST /v1/decisions/batch, again: its shape, then its size
    (the limit in force then is the one its message names)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("requests"), list) or set(raw) != {"requests"}:
        return {"code": "invalid_request"}
    limit = re.search(r"at most ([0-9]+)", message)
    if limit and len(raw["requests"]) > int(limit.group(1)):
        return {"code": "batch_too_large", "details": [{"path": "/requests",
                                                        "problem": batch_count_problem(len(raw["requests"]))}]}
    return None


def _batch_bytes_problem(raw: Any, message: str) -> dict[str, Any] | None:
    """A batch refused for its bytes: what the log kept of it says how many there were."""
    limit = re.search(r"at most ([0-9]+) bytes", message)
    size = raw.get("body_bytes") if isinstance(raw, dict) else len(raw.encode()) if isinstance(raw, str) else None
    if limit and isinstance(size, int) and size > int(limit.group(1)):
        return {"code": "batch_too_large", "details": [{"path": "/requests", "problem": batch_bytes_problem(size)}]}
    return None


def _engine(source: PolicySource, runtime: str) -> Engine:
    try:  # the logged request passed the service's own list bound: judge it with no lower one
        return Engine(load_policies(source), runtime=runtime, max_list_items=REPLAY_MAX_LIST_ITEMS)
    except PolicyLoadError as exc:  # content that loaded once always loads again; say so if not
        raise RuntimeError(f"stored policy content no longer loads: {exc}") from exc


# --- a whole window ---------------------------------------------------------------------------------

EXAMPLE_IDS = 20  # decision ids listed per reason a record cannot be replayed (all are counted)


@dataclass
class ReplaySummary:
    """Every logged decision of a window, replayed: how many reproduce, which differ, which cannot and why.

    `breach` is where the chain failed to hold (the same check as `log verify`): the replay
    stops there, as nothing after it can be trusted to be what was logged.
    """

    total: int = 0
    reproduced: int = 0
    nothing: int = 0  # rejections whose body was never kept (413, 415)
    different: list[ReplayResult] = field(default_factory=list)
    broken: list[ReplayResult] = field(default_factory=list)
    cannot: dict[str, int] = field(default_factory=dict)  # reason -> records
    cannot_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first decision ids
    breach: Breach | None = None

    def add(self, result: ReplayResult) -> None:
        self.total += 1
        if result.status == REPRODUCED:
            self.reproduced += 1
        elif result.status == NOTHING:
            self.nothing += 1
        elif result.status == DIFFERENT:
            self.different.append(result)
        elif result.status == BROKEN:
            self.broken.append(result)
        else:
            self.cannot[result.message] = self.cannot.get(result.message, 0) + 1
            ids = self.cannot_ids.setdefault(result.message, [])
            if len(ids) < EXAMPLE_IDS:
                ids.append(result.decision_id)

    def merge(self, other: ReplaySummary) -> None:
        self.total += other.total
        self.reproduced += other.reproduced
        self.nothing += other.nothing
        self.different.extend(other.different)
        self.broken.extend(other.broken)
        for reason, count in other.cannot.items():
            self.cannot[reason] = self.cannot.get(reason, 0) + count
            ids = self.cannot_ids.setdefault(reason, [])
            ids.extend(other.cannot_ids.get(reason, [])[: EXAMPLE_IDS - len(ids)])
        self.breach = self.breach or other.breach

    @property
    def exit_code(self) -> int:
        return 1 if self.different or self.broken or self.breach else 2 if self.cannot else 0

    def to_dict(self) -> dict[str, Any]:
        return {"replayed": self.total, "reproduced": self.reproduced, "different": len(self.different),
                "broken": len(self.broken), "nothing_to_replay": self.nothing,
                "cannot_replay": sum(self.cannot.values()),
                "chain": "holds" if self.breach is None else f"BROKEN at {self.breach.describe()}",
                "differences": [r.to_dict() for r in self.different],
                "broken_records": [r.to_dict() for r in self.broken],
                "reasons": [{"reason": reason, "records": count, "decision_ids": self.cannot_ids.get(reason, [])}
                            for reason, count in sorted(self.cannot.items(), key=lambda kv: -kv[1])]}

    def describe(self) -> str:
        lines = [f"{self.total:,} logged records replayed: {self.reproduced:,} reproduced, "
                 f"{len(self.different):,} differ, {sum(self.cannot.values()):,} cannot be replayed"
                 + (f", {len(self.broken):,} broken" if self.broken else "")
                 + (f", {self.nothing:,} with nothing to replay (body not kept)" if self.nothing else "")]
        if self.breach is not None:
            lines.append(f"  BROKEN chain at {self.breach.describe()}: replay stopped there")
        for result in self.different:
            lines.append(f"  differs {result.decision_id}: {result.message}")
            lines += [f"      {d['path']}: logged {json.dumps(d['logged'], ensure_ascii=False)[:120]}, "
                      f"replayed {json.dumps(d['replayed'], ensure_ascii=False)[:120]}" for d in result.differences]
        lines += [f"  BROKEN {r.decision_id}: {r.message}" for r in self.broken]
        for reason, count in sorted(self.cannot.items(), key=lambda kv: -kv[1]):
            shown = ", ".join(self.cannot_ids.get(reason, []))
            lines.append(f"  cannot replay {count:,}: {reason} (e.g. {shown})")
        return "\n".join(lines) + "\n"


def replay_records(archive: PolicyArchive, items: Iterable[LogRecord | BrokenRecord],
                   verifier: ChainVerifier | None = None, *, since: str | None = None,
                   until: str | None = None) -> ReplaySummary:
    """Replay every record logged in [since, until), each engine built once per policy content.
    With a `verifier`, every record read (in the window or not) is first fed to the chain walk of
    `log verify`, and the replay stops at a breach."""
    summary = ReplaySummary()
    engines: dict[tuple[str, str], _Built] = {}
    for item in items:
        if verifier is not None:
            summary.breach = verifier.feed(item)
            if summary.breach is not None:
                break
        if isinstance(item, BrokenRecord):
            summary.add(ReplayResult(BROKEN, str(item.decision_id), [], f"the record cannot be read: {item.problem}"))
            continue
        if (since is not None and item.logged_at < since) or (until is not None and item.logged_at >= until):
            continue
        summary.add(replay_record(archive, item, engines))
    return summary

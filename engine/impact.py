"""Decision impact: decide the same requests under two versions and group every decision that flips.

Requests stream in (a JSON Lines file, or the decision log), are cut into chunks and judged in
worker processes, one per core, each with its own engine; only counts and a few examples come
back. A million requests never sit in memory at once.
"""

from __future__ import annotations

import gc
import html
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, TextIO

import msgspec

from engine.codegen import Verdict, joint_verdict
from engine.decider import Engine
from engine.errors import RequestError
from engine.gcpause import collector_paused
from engine.lines import NamedLines, line_blocks
from engine.loader import load_policies
from engine.model import Decision, Output, Rule
from engine.sources import MemorySource
from engine.versions import PolicySet, parse_timestamp

ALLOW_TO_DENY, DENY_TO_ALLOW, OTHER_RULE = "allow→deny", "deny→allow", "same decision, another rule"
KINDS = (ALLOW_TO_DENY, DENY_TO_ALLOW, OTHER_RULE)
EXAMPLES = 3
CHUNK = 500


@dataclass
class Group:
    kind: str
    rule: str  # the rule responsible: the new denial, the old one lifted, or "old → new"
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Rejections:
    """Requests that were not decided under one version or both, for one reason: not decisions."""

    reason: str
    count: int = 0
    inputs: list[str] = field(default_factory=list)  # where the first few were read


@dataclass
class ImpactReport:
    """Requests read, and the decisions made on them under both versions. A request rejected
    under either version (bad input) is counted apart, by reason: it made no decision to compare."""

    old: str
    new: str
    total: int = 0  # requests read
    same: int = 0
    rejected: int = 0
    rejections: dict[str, Rejections] = field(default_factory=dict)
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process and its workers while judging (run_impact): per core
    # run_impact: each chunk's (requests decided under both versions, CPU seconds of its judging, in
    # whichever process judged it): the steady rate, without a run's fixed costs (bench_impact)
    chunk_cpu: list[tuple[int, float]] = field(default_factory=list)

    @property
    def decided(self) -> int:
        """Requests decided under both versions: each is two decisions."""
        return self.total - self.rejected

    def count(self, kind: str) -> int:
        return sum(g.count for (k, _), g in self.groups.items() if k == kind)

    def reject(self, reason: str, origin: str) -> None:
        self.rejected += 1
        found = self.rejections.setdefault(reason, Rejections(reason))
        found.count += 1
        if len(found.inputs) < EXAMPLES:
            found.inputs.append(origin)

    def merge(self, other: ImpactReport) -> None:
        self.total += other.total
        self.same += other.same
        self.rejected += other.rejected
        for reason, theirs in other.rejections.items():
            mine = self.rejections.setdefault(reason, Rejections(reason))
            mine.count += theirs.count
            mine.inputs.extend(theirs.inputs[: EXAMPLES - len(mine.inputs)])
        for key, group in other.groups.items():
            mine_group = self.groups.setdefault(key, Group(group.kind, group.rule))
            mine_group.count += group.count
            mine_group.examples.extend(group.examples[: EXAMPLES - len(mine_group.examples)])

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.groups.values(), key=lambda g: (KINDS.index(g.kind), -g.count, g.rule))
        return {
            "old": self.old, "new": self.new, "requests": self.total, "decided": self.decided,
            "decisions": 2 * self.decided, "unchanged": self.same, "rejected": self.rejected,
            "rejections": [{"reason": r.reason, "count": r.count, "inputs": r.inputs}
                           for r in sorted(self.rejections.values(), key=lambda r: (-r.count, r.reason))],
            "flips": {k: self.count(k) for k in KINDS},
            "groups": [{"kind": g.kind, "rule": g.rule, "count": g.count, "examples": g.examples} for g in ordered],
            "seconds": round(self.seconds, 3),
            "decisions_per_second": round(2 * self.decided / self.seconds) if self.seconds else None,
        }


MISSING_FIELD = "missing_field"  # the code of a request lacking a field the rules need (engine/evaluator.py)
NOT_JSON = object()  # a line that is not JSON at all (its text is no request)
Side = tuple[Engine, str | None]


def judge(engine: Engine, old: str, new: str, requests: Iterable[Any], now: datetime,
          origins: Sequence[str] | None = None) -> ImpactReport:
    """The impact over some requests, in this process."""
    return judge_engines((engine, old), (engine, new), requests, now, origins=origins)


def judge_engines(old: Side, new: Side, requests: Iterable[Any], now: datetime, *,
                  labels: tuple[str, str] | None = None, origins: Sequence[str] | None = None,
                  quick: bool = True, explain: bool = True, read: bool = False) -> ImpactReport:
    """The impact between two (engine, version) sides; a version None judges each request by the
    version it selects itself (its `at`, or its pin), as that engine would serve it. `origins`
    says where each request was read (a file's line, a part's row), for the examples. `quick`:
    the common request is judged by QuickJudge (the same figures; False: every request the plain
    way, each side's whole decision, as the tests compare). `explain`: each group's examples
    explained (False: only where they were read and the request, for explain_examples to do
    once for a whole run, as run_impact does). `read`: the requests come as read_values gives
    them, each with whether its text had no escape."""
    report = ImpactReport(*(labels or (str(old[1]), str(new[1]))))
    tally = _Tally()
    judge_quickly = QuickJudge.of(old, new, now) if quick else None
    if judge_quickly is not None:
        judge_quickly.judge(requests if read else zip(requests, repeat(False)), report, tally, origins, old, new)
    else:
        if read:
            requests = map(itemgetter(0), requests)
        for index, request in enumerate(requests):
            report.total += 1
            judged = _judged_plainly(old, new, request, now, report)
            if isinstance(judged, str):
                report.reject(judged, _origin(origins, index))
            elif judged[0] == judged[1]:
                report.same += 1
            else:
                tally.flip(judged, index, request)
    tally.into(report, origins)
    if explain:
        explain_examples(report, old, new, now)
    return report


class _Tally:
    """The flips of some requests, by (old verdict, new verdict): how many, and the first few
    (index, request) of each, in the order they were read."""

    def __init__(self) -> None:
        self.counts: dict[tuple[Verdict, Verdict], int] = {}
        self.firsts: dict[tuple[Verdict, Verdict], list[tuple[int, Any]]] = {}

    def flip(self, pair: tuple[Verdict, Verdict], index: int, request: Any) -> None:
        seen = self.counts.get(pair, 0)
        self.counts[pair] = seen + 1
        if seen < EXAMPLES:
            self.firsts.setdefault(pair, []).append((index, request))

    def into(self, report: ImpactReport, origins: Sequence[str] | None) -> None:
        """The flips as the report's groups (the change, the rule responsible), each with its first
        few examples (where read and the request: explain_examples says what each side did)."""
        found: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        for pair, count in self.counts.items():
            (old_decision, old_rule), (new_decision, new_rule) = pair
            if old_decision == "allow":
                kind, rule = ALLOW_TO_DENY, str(new_rule)
            elif new_decision == "allow":
                kind, rule = DENY_TO_ALLOW, str(old_rule)
            else:
                kind, rule = OTHER_RULE, f"{old_rule} → {new_rule}"
            group = report.groups.setdefault((kind, rule), Group(kind, rule))
            group.count += count
            found.setdefault((kind, rule), []).extend(self.firsts.get(pair, ()))
        for key, firsts in found.items():
            examples = report.groups[key].examples
            for index, request in sorted(firsts, key=lambda first: first[0])[: EXAMPLES - len(examples)]:
                examples.append({"input": _origin(origins, index), "request": request})


def explain_examples(report: ImpactReport, old: Side, new: Side, now: datetime) -> None:
    """Each example of the report, not yet explained, with what each side did: its decision, the
    rule, where it is written and the fields it read (two decisions explained, each costing many
    plain ones: done once for the examples a run keeps, not for every chunk's)."""
    for group in report.groups.values():
        for example in group.examples:
            if "old" not in example:
                example["old"] = _explained(old, example["request"], now)
                example["new"] = _explained(new, example["request"], now)


def _judged_plainly(old: Side, new: Side, request: Any, now: datetime,
                    report: ImpactReport) -> tuple[Verdict, Verdict] | str:
    """Each side's whole decision through Engine.decide: (old verdict, new verdict), or why the
    request is not a decision under both."""
    if not isinstance(request, dict):
        return "not JSON" if request is NOT_JSON else "not a JSON object"
    before, after = _decide(old, request, now), _decide(new, request, now)
    if isinstance(before, RequestError) or isinstance(after, RequestError):
        return _why_rejected(before, after, report.old, report.new)
    return ((before.decision, before.rule.id if before.rule else None),
            (after.decision, after.rule.id if after.rule else None))


def _origin(origins: Sequence[str] | None, index: int) -> str:
    """Where the request at `index` was read: as `origins` says, else its line."""
    return origins[index] if origins is not None else f"line {index + 1}"


class QuickJudge:
    """The plain judging (each side's whole decision through Engine.decide) short-cut for the
    common request, with the same outcome: the request is checked once (both sides pin a
    version and share the checker, so the schema judges both pinned requests alike); it goes
    straight to each side's generated path's verdict (engine/codegen.py: the decision and its
    rule, no Decision built), and where both versions generate the same function for its action
    and role (the same source once the version's name and digest are taken out, the same
    constants and rules), it is decided once. A path that finds a field missing (its verdict
    LACKING) refuses the request as the evaluator would (missing_field), without it. Anything
    else (a request the check or its timestamps refuse in another way, a path that hands over
    to the evaluator for another reason, any exception) is judged the plain way."""

    def __init__(self, old: Side, new: Side, now: datetime) -> None:
        (old_engine, old_name), (new_engine, new_name) = old, new
        assert old_name is not None and new_name is not None
        self.old_version = old_engine.policies.get(old_name)
        self.new_version = new_engine.policies.get(new_name)
        self.check = old_engine.check
        self.usable = self.check.usable.is_valid
        self.unescaped = self.check.usable_unescaped.is_valid  # (no NUL patterns: read_values says there is none)
        self.names = (old_name, new_name)
        self.now = now
        self.paths: dict[tuple[str, str | None], tuple[Any, Any, bool, Any] | tuple[()]] = {}
        self.times: dict[str, datetime] = {}  # `at` as read -> as parsed (a log's requests share seconds)
        self.handed_over = 0  # requests judged the plain way (the bench says how many)

    @classmethod
    def of(cls, old: Side, new: Side, now: datetime) -> QuickJudge | None:
        """A quick judge of the two sides, or None where it cannot judge as the plain way does;
        the same one for the same engines (a worker judges chunk after chunk: the paths compared
        once)."""
        key = (id(old[0]), old[1], id(new[0]), new[1], now)
        found = _QUICK.get(key)
        if found is None or found.engines != (old[0], new[0]):
            if len(_QUICK) >= 8:
                _QUICK.clear()
            found = _QUICK[key] = _Made((old[0], new[0]), cls._judge(old, new, now))
        return found.judge

    @classmethod
    def _judge(cls, old: Side, new: Side, now: datetime) -> QuickJudge | None:
        (old_engine, old_name), (new_engine, new_name) = old, new
        if old_name is None or new_name is None or old_engine.check is not new_engine.check:
            return None
        if not (old_engine.generated and new_engine.generated):
            return None
        if old_engine.policies.get(old_name) is None or new_engine.policies.get(new_name) is None:
            return None
        login = {"action": "login", "account": {"id": "a"}, "login": {"method": "otp", "target": "app"}}
        fast = old_engine.check.fast
        if not all(fast.is_valid({**login, "policy_version": name}) for name in (old_name, new_name)):
            return None  # a pin the schema refuses: every request is rejected, the plain way says how
        return cls(old, new, now)

    def judge(self, requests: Iterable[tuple[Any, bool]], report: ImpactReport, tally: _Tally,
              origins: Sequence[str] | None, old: Side, new: Side) -> None:
        """Judge each request (with whether it was read from a text without escapes) into the
        report (counts) and the tally (flips); one loop, with what it looks up held in locals: a
        request costs its check and its verdicts, little more."""
        usable, unescaped, paths, times, now = self.usable, self.unescaped, self.paths, self.times, self.now
        old_pin, new_pin = self.names
        flip = tally.flip
        total = same = 0
        for index, (request, plain_text) in enumerate(requests):
            total += 1
            pair: Any = None
            twins = settle = False
            if type(request) is dict and (unescaped(request) if plain_text else usable(request)):
                key = (request["action"], request.get("role"))
                found = paths.get(key)
                if found is None:
                    found = self.paths_of(*key)
                if found:
                    old_path, new_path, reads_pin, both = found
                    twins = new_path is None
                    try:
                        if "at" in request:
                            text = request["at"]
                            at = times.get(text)
                            if at is None:
                                at = parse_timestamp(text)  # ValueError: the plain way says how it is refused
                                if len(times) >= 4096:
                                    times.clear()
                                times[text] = at
                        else:
                            at = now
                        if both is not None and (verdicts := both(request, at)) is not None:
                            before, after = verdicts  # the two paths' rules in common judged once
                        elif reads_pin:
                            before = old_path.verdict({**request, "policy_version": old_pin}, at)
                            after = None if new_path is None or before is None else \
                                new_path.verdict({**request, "policy_version": new_pin}, at)
                        else:
                            before = old_path.verdict(request, at)
                            after = None if new_path is None or before is None else new_path.verdict(request, at)
                    except Exception:  # a Defer, a bug, a timestamp Python cannot hold: the plain way judges it
                        before = None
                    if before:  # a verdict (None: handed over; LACKING, falsy too: a field missing)
                        if new_path is None or before == after:
                            same += 1
                            continue
                        if after:
                            pair = (before, after)
                    # a side LACKING, the other a verdict or LACKING too (or its twin): settled below
                    settle = before is not None and (twins or after is not None)
            elif type(request) is dict and self._invalid_both_ways(request):
                report.reject("invalid_request", _origin(origins, index))  # as RequestChecker says under both pins
                continue
            if settle and pair is None:  # a side found a field missing: refused without the evaluator
                report.reject(self._lacking(before, after, twins, report), _origin(origins, index))
                continue
            if pair is None:
                self.handed_over += 1
                if twins:  # one side the plain way: twin paths, the same rules, the same outcome
                    decided = _decide(old, request, now)
                    if isinstance(decided, RequestError):
                        report.reject(decided.code, _origin(origins, index))  # the same code under both
                    else:
                        same += 1
                    continue
                judged = _judged_plainly(old, new, request, now, report)
                if isinstance(judged, str):
                    report.reject(judged, _origin(origins, index))
                    continue
                if judged[0] == judged[1]:
                    same += 1
                    continue
                pair = judged
            flip(pair, index, request)
        report.total += total
        report.same += same

    @staticmethod
    def _lacking(before: Any, after: Any, twins: bool, report: ImpactReport) -> str:
        """Why a request is refused where a side's verdict is LACKING (and the other's a verdict,
        or LACKING too): in the plain way's words (_why_rejected), its code missing_field."""
        if twins or before == after:
            return MISSING_FIELD
        if not before:
            return f"{MISSING_FIELD} under {report.old} only (decided under {report.new})"
        return f"{MISSING_FIELD} under {report.new} only (decided under {report.old})"

    def _invalid_both_ways(self, request: dict[str, Any]) -> bool:
        """Whether RequestChecker refuses the request under both pins (as invalid_request): the
        schema judges both pinned requests alike."""
        pinned = {**request, "policy_version": self.names[0]}
        check = self.check
        return not check.fast.is_valid(pinned) and not check.fast.is_valid(check.drop_nulls(pinned))

    def paths_of(self, action: str, role: str | None) -> tuple[Any, Any, bool, Any] | tuple[()]:
        """(old path, new path or None if it is the old one's twin, whether a rule reads the pin,
        both versions' joint verdict or None), or () if a side has no generated path for them;
        remembered. Each path's verdict is written on first use; the joint verdict (codegen's
        joint_verdict: the rules the two have in common judged once) where the two paths differ
        and read no pin."""
        assert self.old_version is not None and self.new_version is not None
        old, new = self.old_version.path(action, role), self.new_version.path(action, role)
        if old is None or new is None:
            found: tuple[Any, Any, bool, Any] | tuple[()] = ()
        else:
            old_text, new_text = _judging_text(old, self.old_version), _judging_text(new, self.new_version)
            reads_pin = "policy_version" in old_text or "policy_version" in new_text
            twins = not reads_pin and old_text == new_text and _same_constants(old, new)
            joint = None if twins or reads_pin or old.inputs is None or new.inputs is None else \
                joint_verdict(old.inputs, new.inputs)
            found = (old, None if twins else new, reads_pin, None if joint is None else joint.function)
        self.paths[(action, role)] = found
        return found


def _judging_text(path: Any, version: Any) -> str:
    """A generated path's source without what names its version (comments, the Decision's version
    and digest): two versions' paths with the same text and constants judge alike."""
    text = path.source.replace(f"policy_version={version.name!r}", "").replace(
        f"policy_digest={version.digest!r}", "")
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _same_constants(old: Any, new: Any) -> bool:
    """Whether the two paths' modules hold the same constants under the same names: equal values,
    and the same rules (id, effect, expressions) and outputs; each version's own helpers aside."""
    if old.native_calls or new.native_calls:
        return False
    mine, theirs = old.function.__globals__, new.function.__globals__
    if mine.keys() != theirs.keys():
        return False
    for name, value in mine.items():
        other = theirs[name]
        if value is other or name in _VERSION_HELPERS or name.startswith("__"):
            continue
        if isinstance(value, Rule) and isinstance(other, Rule):
            if (value.id, value.effect, _text(value.applies_when), _text(value.fires_when)) != \
                    (other.id, other.effect, _text(other.applies_when), _text(other.fires_when)):
                return False
        elif isinstance(value, Output) and isinstance(other, Output):
            if (value.name, _text(value.applies_when), _text(value.value)) != \
                    (other.name, _text(other.applies_when), _text(other.value)):
                return False
        elif name.startswith("_found") and isinstance(value, dict) and isinstance(other, dict):
            if {k: f.id for k, f in value.items()} != {k: f.id for k, f in other.items()}:
                return False
        elif name in ("_always", "_everything") or name.startswith(("_needs_", "decide_")):
            continue  # written in the source compared
        elif type(value) is not type(other) or value != other:
            return False
    return True


@dataclass(frozen=True)
class _Made:
    engines: tuple[Engine, Engine]  # held: their ids stay theirs while the judge is kept
    judge: QuickJudge | None


_QUICK: dict[tuple[int, str | None, int, str | None, datetime], _Made] = {}
_VERSION_HELPERS = frozenset({"_again_rule", "_again_output", "_activation", "_render"})


def _text(expression: Any) -> str | None:
    return None if expression is None else str(expression.text)


def _decide(side: Side, request: dict[str, Any], now: datetime, explain: bool = False) -> Decision | RequestError:
    engine, version = side
    pinned = request if version is None else {**request, "policy_version": version}
    try:
        return engine.decide(pinned, now=now, decision_id="impact", explain=explain)
    except RequestError as exc:
        # without its traceback: its frames (the request, its activation) would be a cycle that
        # only a collection frees, and each chunk's collection would walk them all
        return exc.with_traceback(None)


def _why_rejected(before: Decision | RequestError, after: Decision | RequestError, old: str, new: str) -> str:
    if isinstance(before, RequestError) and isinstance(after, RequestError):
        return before.code if before.code == after.code else f"{old}: {before.code}, {new}: {after.code}"
    if isinstance(before, RequestError):
        return f"{before.code} under {old} only (decided under {new})"
    assert isinstance(after, RequestError)
    return f"{after.code} under {new} only (decided under {old})"


def _explained(side: Side, request: dict[str, Any], now: datetime) -> dict[str, Any]:
    """One side of an example: the version, its decision, the deciding rule, where it is written
    and the request fields it read (with their values)."""
    decision = _decide(side, request, now, explain=True)
    assert not isinstance(decision, RequestError)  # it was decided a moment ago
    rule = decision.rule.id if decision.rule else None
    trace = next((t for t in decision.explain or () if t.id == rule), None)
    return {"version": decision.policy_version, "decision": decision.decision, "rule": rule,
            "where": trace.source if trace else None, "read": dict(trace.values) if trace else {}}


# --- in parallel ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


@dataclass(frozen=True)
class Sides:
    """What a worker needs to judge: each side's policy set by digest (its files travel along),
    the versions, and the labels of the report."""

    contents: dict[str, dict[str, str]]  # set digest -> its files
    old_digest: str
    new_digest: str
    old: str
    new: str
    labels: tuple[str, str]

    @classmethod
    def of(cls, policies: PolicySet, old: str, new: str, new_policies: PolicySet | None = None,
           new_label: str | None = None) -> Sides:
        other = new_policies or policies
        return cls({policies.digest: policies.sources, other.digest: other.sources}, policies.digest,
                   other.digest, old, new, (old, new_label or new))


def load_shipped(contents: Mapping[str, Mapping[str, str]], runtime: str) -> dict[str, Engine]:
    """On a worker: one engine per shipped set, each checked to rebuild the digest it came under."""
    engines = {}
    for digest, files in contents.items():
        policies = load_policies(MemorySource(files, label=f"shipped set {digest}"))
        if policies.digest != digest:
            raise RuntimeError(f"the shipped policy set {digest} loads as {policies.digest}")
        engines[digest] = Engine(policies, runtime=runtime)
    return engines


def _start_worker(sides: Sides, runtime: str, now: datetime, loaded: Mapping[str, PolicySet] | None = None) -> None:
    """`loaded`: the sets this process (or its parent, before a fork) already holds, by digest;
    else each is loaded from its shipped files."""
    engines = {digest: Engine(policies, runtime=runtime) for digest, policies in loaded.items()} if loaded \
        else load_shipped(sides.contents, runtime)
    _WORKER.update(old=(engines[sides.old_digest], sides.old), new=(engines[sides.new_digest], sides.new),
                   labels=sides.labels, now=now)
    gc.freeze()  # the loaded policies stay for the worker's life: no collection walks them again


def parse_lines(lines: Iterable[str | bytes]) -> list[Any]:
    """Each line's JSON value as json.loads reads it (NOT_JSON where it is not JSON): parsed()
    into a list."""
    return list(parsed(lines))


def parsed(lines: Iterable[str | bytes]) -> Iterator[Any]:
    """Each line's JSON value as json.loads reads it (NOT_JSON where it is not JSON, or where
    Python cannot read it: an integer of more than 4,300 digits, nesting past the recursion
    limit), one at a time (a chunk's request judged while it is fresh in the cache, then freed:
    the next one is built in the same memory): read_values' values."""
    for value, _ in read_values(lines):
        yield value


def read_values(lines: Iterable[str | bytes]) -> Iterator[tuple[Any, bool]]:
    """Each line's JSON value, as parsed() gives it, and whether its text has no backslash (no
    escape: then no string in it holds NUL, which JSON writes only escaped). Read at msgspec's
    cost where it reads as json.loads does: it reads every integer exactly (orjson, used before,
    reads one beyond 64 bits as a float: each line was searched for 19 digits in a row first, a
    translation of the line, about a third of orjson's own cost); it refuses what json.loads may
    read otherwise (NaN and Infinity, 1e400, a lone surrogate, bytes that are not UTF-8...: then
    json.loads reads the text, undecodable bytes replaced as a text file read with
    errors="replace" would). A line is text or its UTF-8 bytes (read as a file's bytes: no
    decoding and encoding again)."""
    decode, refused = _DECODE, _REFUSED
    for line in lines:
        try:
            yield decode(line), (b"\\" if type(line) is bytes else "\\") not in line  # type: ignore[operator]
            continue
        except refused:
            pass
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, or what Python cannot hold
            value = NOT_JSON
        yield value, False


def parse_lines_plainly(lines: Iterable[str]) -> list[Any]:
    """parse_lines the plain way, json.loads on every line (what the tests compare it with)."""
    requests: list[Any] = []
    for line in lines:
        try:
            requests.append(json.loads(line))
        except (ValueError, RecursionError):
            requests.append(NOT_JSON)
    return requests


_DECODE = msgspec.json.Decoder().decode
# what msgspec raises where json.loads may read the line otherwise (or refuse it too)
_REFUSED = (msgspec.DecodeError, UnicodeError, RecursionError, ValueError)


@dataclass(frozen=True)
class Corpus:
    """Requests read once and judged again and again (the console's), each with where it was read."""

    requests: list[Any] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)


def read_corpus(locations: Sequence[str]) -> Corpus:
    """Requests read as `bindpolicy impact` reads them (engine.inputs, then parse_lines): a line that
    is not JSON stays in, to be reported as such; InputError naming a path that cannot be read."""
    from engine.inputs import numbered_lines

    lines = [(origin, text) for origin, text in numbered_lines(locations) if text.strip()]
    return Corpus(parse_lines(text for _, text in lines), [origin for origin, _ in lines])


# (where each line was read: the name and number of the first of consecutive lines, or each
# line's origin; the lines)
Chunk = tuple[tuple[str, int] | list[str], list[str] | list[bytes]]


class _Numbered:
    """The origins of consecutive lines of one input: `line N` or `FILE:N`, from the first one's."""

    def __init__(self, name: str, first: int) -> None:
        self.name, self.first = name, first

    def __getitem__(self, index: int) -> str:
        return f"{self.name}{self.first + index}"


def _judge_chunk(chunk: Chunk) -> ImpactReport:
    where, texts = chunk
    origins: Any = _Numbered(*where) if isinstance(where, tuple) else where
    # a chunk's parsed requests (some 100 objects each) would start a collection every few
    # requests, each walking them all (a quarter of the time, measured)
    started = time.process_time()
    with collector_paused():
        report = judge_engines(_WORKER["old"], _WORKER["new"], read_values(texts), _WORKER["now"],
                               labels=_WORKER["labels"], origins=origins, explain=False, read=True)
    report.cpu_seconds = time.process_time() - started
    return report


LINE = "line "  # the name of a line that says nothing else of where it was read: `line N`


def _chunks(lines: Iterable[str | tuple[str, str] | NamedLines], size: int) -> Iterator[Chunk]:
    """The non-blank lines in chunks of `size`, each with where its lines were read: plain text
    lines are numbered from 1 as `line N`, a named file's blocks of bytes (engine/inputs.py's
    request_blocks) by their own numbers as `FILE:N`, a (where, text) pair by its where (a chunk
    of consecutive numbered lines carries only the first's name and number, the rest are named
    when an example or a rejection needs them)."""
    def blocks() -> Iterator[tuple[str, Sequence[tuple[int | None, Any]]]]:
        number = 0
        for line in lines:
            if isinstance(line, NamedLines):
                yield f"{line.name}:", line.lines
                continue
            number += 1
            if isinstance(line, str):
                if line.strip():
                    yield LINE, ((number, line),)
            elif line[1].strip():
                yield line[0], ((None, line[1]),)

    return _in_chunks(blocks(), size)


def _byte_chunks(stream: IO[bytes], size: int, name: str = LINE) -> Iterator[Chunk]:
    """The non-blank lines of a binary stream in chunks of `size`, as bytes (no decoding: msgspec
    reads them as they are), numbered and skipped as _chunks numbers and skips a text file's
    lines (read in 64 KB blocks and cut in C, as `decide --jsonl` reads its input)."""
    return _in_chunks(((name, block) for block in line_blocks(stream)), size)


_TEXT = itemgetter(1)


def _in_chunks(blocks: Iterable[tuple[str, Sequence[tuple[int | None, Any]]]], size: int) -> Iterator[Chunk]:
    """Blocks of (number, text), each line read at `{name}{number}` (or at `name` where its number
    is None; numbers grow within a block), in chunks of `size`: a chunk of lines of one name
    numbered one after another carries only its name and the first number; any other names each
    line. A block's lines are taken a slice at a time (no step per line where they follow on)."""
    texts: list[Any] = []
    origins: list[str] | None = None  # None: consecutive lines of `first_name` from `first`
    first_name, first = LINE, 0
    for name, lines in blocks:
        start, count = 0, len(lines)
        while start < count:
            room = size - len(texts)
            part = lines if start == 0 and count <= room else lines[start:start + room]
            start += len(part)
            head, tail = part[0][0], part[-1][0]
            if not texts:
                first_name, first, origins = name, head or 0, None if head is not None else []
            expected = first + len(texts)
            if origins is None and not (head == expected and tail == expected + len(part) - 1
                                        and name == first_name):
                origins = [f"{first_name}{first + index}" for index in range(len(texts))]
            if origins is not None:
                origins.extend(name if number is None else f"{name}{number}" for number, _ in part)
            texts.extend(map(_TEXT, part))
            if len(texts) >= size:
                yield ((first_name, first) if origins is None else origins), texts
                texts = []
    if texts:
        yield ((first_name, first) if origins is None else origins), texts


def run_impact(policies: PolicySet | Path | str, old: str, new: str,
               lines: Iterable[str | tuple[str, str] | NamedLines] | IO[bytes], *,
               new_policies: PolicySet | Path | str | None = None, new_label: str | None = None,
               workers: int | None = None, runtime: str = "native", progress: TextIO | None = None,
               now: datetime | None = None) -> ImpactReport:
    """Judge every JSON line under `old` and `new` (taken from `new_policies` when given: another
    checkout) with one process per core (or `workers`; one: judged in this process, no pickling).
    Lines are text, or (where read, text), or blocks of a named file's lines as bytes (NamedLines:
    `bindpolicy impact FILE` reads its files so), or a binary stream (a file opened "rb": read as
    bytes in blocks, each line handed to msgspec as read)."""
    workers = workers or os.cpu_count() or 1
    now = now or datetime.now(UTC)
    loaded = policies if isinstance(policies, PolicySet) else load_policies(policies)
    other = new_policies if isinstance(new_policies, PolicySet | None) else load_policies(new_policies)
    sides = Sides.of(loaded, old, new, other, new_label)
    report = ImpactReport(*sides.labels)
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    last = started
    held = {loaded.digest: loaded, (other or loaded).digest: other or loaded}
    chunks = _byte_chunks(lines, CHUNK) if isinstance(lines, io.BufferedIOBase | io.RawIOBase) \
        else _chunks(lines, CHUNK)  # type: ignore[arg-type]
    if workers == 1:
        _start_worker(sides, runtime, now, held)
        results: Iterable[ImpactReport] = map(_judge_chunk, chunks)
        pool = None
    else:  # forked workers inherit the loaded sets (arguments are not copied through a pipe by a fork)
        method = "fork" if sys.platform != "win32" else "spawn"
        context = multiprocessing.get_context(method)
        pool = context.Pool(workers, initializer=_start_worker,
                            initargs=(sides, runtime, now, held if method == "fork" else None))
        results = pool.imap(_judge_chunk, chunks, chunksize=1)
    try:
        for part in results:
            report.merge(part)
            report.chunk_cpu.append((part.decided, part.cpu_seconds))
            if progress is not None and time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                rate = report.decided / (last - started)
                progress.write(f"\r{report.total:,} requests read ({2 * rate:,.0f} decisions/s)")
                progress.flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if workers == 1:
        old_side, new_side = _WORKER["old"], _WORKER["new"]
    else:
        engines = {digest: Engine(held[digest], runtime=runtime) for digest in held}
        old_side, new_side = (engines[sides.old_digest], old), (engines[sides.new_digest], new)
    explain_examples(report, old_side, new_side, now)  # the examples kept, once
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = _cpu_seconds() - cpu_started
    if progress is not None:
        progress.write(f"\r{report.total:,} requests read in {report.seconds:.1f} s{' ' * 20}\n")
    return report


def _cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the pool's workers, once joined)."""
    if sys.platform == "win32":
        return time.process_time()
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# --- rendering -----------------------------------------------------------------------------------------


def render(report: ImpactReport, fmt: str) -> str:
    data = report.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    head = (f"{data['requests']:,} requests read: {data['decided']:,} decided under both {report.old} and "
            f"{report.new} ({data['decisions']:,} decisions), {data['unchanged']:,} of them unchanged; "
            f"{data['rejected']:,} rejected (bad input, no decision)")
    flips = ", ".join(f"{k}: {v:,}" for k, v in data["flips"].items())
    if fmt == "markdown":
        lines = [f"# Decision impact: {report.old} → {report.new}", "", head + ".", "", f"Flips: {flips}.", "",
                 "| change | rule | requests |", "|---|---|---:|"]
        lines += [f"| {g['kind']} | `{g['rule']}` | {g['count']:,} |" for g in data["groups"]]
        if data["rejections"]:
            lines += ["", "| rejected (no decision) | requests | first inputs |", "|---|---:|---|"]
            lines += [f"| {r['reason']} | {r['count']:,} | {', '.join(r['inputs'])} |" for r in data["rejections"]]
        for g in data["groups"]:
            lines += ["", f"### {g['kind']}: `{g['rule']}`", ""]
            for x in g["examples"]:
                lines += [f"- {_example(x)}", "", f"  ```json\n  {json.dumps(x['request'], ensure_ascii=False)}\n  ```"]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        e = html.escape
        rows = "".join(f"<tr><td>{e(g['kind'])}</td><td><code>{e(g['rule'])}</code></td><td>{g['count']:,}</td></tr>"
                       for g in data["groups"])
        examples = "".join(
            f"<h3>{e(g['kind'])}: <code>{e(g['rule'])}</code></h3>"
            + "".join(f"<p>{e(_example(x))}</p><pre>{e(json.dumps(x['request'], indent=1, ensure_ascii=False))}</pre>"
                      for x in g["examples"])
            for g in data["groups"])
        rejected = "".join(f"<li>{e(r['reason'])}: {r['count']:,} ({e(', '.join(r['inputs']))})</li>"
                           for r in data["rejections"])
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Impact {e(report.old)} → "
                f"{e(report.new)}</title><style>body{{font:15px/1.5 system-ui,sans-serif;margin:2em auto;"
                f"max-width:60em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em}}"
                f"pre{{background:#f6f6f6;padding:.5em;font-size:12px;white-space:pre-wrap}}</style></head><body>"
                f"<h1>Decision impact: {e(report.old)} → {e(report.new)}</h1><p>{e(head)}.</p><p>Flips: {e(flips)}.</p>"
                f"<table><tr><th>change</th><th>rule</th><th>requests</th></tr>{rows}</table>"
                f"<h2>Rejected (no decision)</h2><ul>{rejected}</ul>{examples}"
                f"</body></html>\n")
    lines = [head + ".", f"flips: {flips}"]
    for g in data["groups"]:
        lines.append(f"  {g['kind']:<28} {g['rule']:<45} {g['count']:>9,}")
        lines.extend(f"      e.g. {_example(x)}" for x in g["examples"][:1])
    if data["rejections"]:
        lines.append("rejected, no decision:")
        lines += [f"  {r['reason']:<74} {r['count']:>9,}   e.g. {', '.join(r['inputs'])}" for r in data["rejections"]]
    return "\n".join(lines) + "\n"


def _example(x: dict[str, Any]) -> str:
    """`input: v1 allow → v2 deny by R7 (v2/bind.yaml:40, read account.age=17)`."""
    def side(s: dict[str, Any]) -> str:
        if s["rule"] is None:
            return f"{s['version']} {s['decision']}"
        read = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in s["read"].items())
        return f"{s['version']} {s['decision']} by {s['rule']} ({s['where']}; read {read or 'nothing'})"

    return f"{x['input']}: {side(x['old'])} → {side(x['new'])}"

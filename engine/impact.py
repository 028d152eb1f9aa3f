"""Decision impact: decide the same requests under two versions and group every decision that flips.

Requests stream in (a JSON Lines file, or the decision log), are cut into chunks and judged in
worker processes, one per core, each with its own engine; only counts and a few examples come
back. A million requests never sit in memory at once.
"""

from __future__ import annotations

import html
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from engine.decider import Engine
from engine.errors import RequestError
from engine.loader import load_policies
from engine.model import Decision
from engine.sources import MemorySource
from engine.versions import PolicySet

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


NOT_JSON = object()  # a line that is not JSON at all (its text is no request)
Side = tuple[Engine, str | None]


def judge(engine: Engine, old: str, new: str, requests: Iterable[Any], now: datetime,
          origins: Sequence[str] | None = None) -> ImpactReport:
    """The impact over some requests, in this process."""
    return judge_engines((engine, old), (engine, new), requests, now, origins=origins)


def judge_engines(old: Side, new: Side, requests: Iterable[Any], now: datetime, *,
                  labels: tuple[str, str] | None = None, origins: Sequence[str] | None = None) -> ImpactReport:
    """The impact between two (engine, version) sides; a version None judges each request by the
    version it selects itself (its `at`, or its pin), as that engine would serve it. `origins`
    says where each request was read (a file's line, a part's row), for the examples."""
    report = ImpactReport(*(labels or (str(old[1]), str(new[1]))))
    for index, request in enumerate(requests):
        origin = origins[index] if origins is not None else f"line {index + 1}"
        report.total += 1
        if not isinstance(request, dict):
            report.reject("not JSON" if request is NOT_JSON else "not a JSON object", origin)
            continue
        before, after = _decide(old, request, now), _decide(new, request, now)
        if isinstance(before, RequestError) or isinstance(after, RequestError):
            report.reject(_why_rejected(before, after, report.old, report.new), origin)
            continue
        old_rule = before.rule.id if before.rule else None
        new_rule = after.rule.id if after.rule else None
        if before.decision == after.decision and old_rule == new_rule:
            report.same += 1
            continue
        if before.decision == "allow":
            kind, rule = ALLOW_TO_DENY, str(new_rule)
        elif after.decision == "allow":
            kind, rule = DENY_TO_ALLOW, str(old_rule)
        else:
            kind, rule = OTHER_RULE, f"{old_rule} → {new_rule}"
        group = report.groups.setdefault((kind, rule), Group(kind, rule))
        group.count += 1
        if len(group.examples) < EXAMPLES:
            group.examples.append({"input": origin, "request": request, "old": _explained(old, request, now),
                                   "new": _explained(new, request, now)})
    return report


def _decide(side: Side, request: dict[str, Any], now: datetime, explain: bool = False) -> Decision | RequestError:
    engine, version = side
    pinned = request if version is None else {**request, "policy_version": version}
    try:
        return engine.decide(pinned, now=now, decision_id="impact", explain=explain)
    except RequestError as exc:
        return exc


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


def parse_lines(lines: Iterable[str]) -> list[Any]:
    requests: list[Any] = []
    for line in lines:
        try:
            requests.append(json.loads(line))
        except json.JSONDecodeError:
            requests.append(NOT_JSON)
    return requests


def _judge_chunk(chunk: list[tuple[str, str]]) -> ImpactReport:
    origins = [origin for origin, _ in chunk]
    return judge_engines(_WORKER["old"], _WORKER["new"], parse_lines(text for _, text in chunk), _WORKER["now"],
                         labels=_WORKER["labels"], origins=origins)


def numbered(lines: Iterable[str | tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(where it was read, text) for each line; plain text lines are numbered from 1."""
    for number, line in enumerate(lines, start=1):
        yield (f"line {number}", line) if isinstance(line, str) else line


def _chunks(lines: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    chunk: list[tuple[str, str]] = []
    for origin, line in lines:
        if line.strip():
            chunk.append((origin, line))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def run_impact(policies: PolicySet | Path | str, old: str, new: str, lines: Iterable[str | tuple[str, str]], *,
               new_policies: PolicySet | Path | str | None = None, new_label: str | None = None,
               workers: int | None = None, runtime: str = "native", progress: TextIO | None = None,
               now: datetime | None = None) -> ImpactReport:
    """Judge every JSON line under `old` and `new` (taken from `new_policies` when given: another
    checkout) with one process per core (or `workers`). Lines are text, or (where read, text)."""
    workers = workers or os.cpu_count() or 1
    now = now or datetime.now(UTC)
    loaded = policies if isinstance(policies, PolicySet) else load_policies(policies)
    other = new_policies if isinstance(new_policies, PolicySet | None) else load_policies(new_policies)
    sides = Sides.of(loaded, old, new, other, new_label)
    report = ImpactReport(*sides.labels)
    started = time.perf_counter()
    last = started
    held = {loaded.digest: loaded, (other or loaded).digest: other or loaded}
    if workers == 1:
        _start_worker(sides, runtime, now, held)
        results: Iterable[ImpactReport] = map(_judge_chunk, _chunks(numbered(lines), CHUNK))
        pool = None
    else:  # forked workers inherit the loaded sets (arguments are not copied through a pipe by a fork)
        method = "fork" if sys.platform != "win32" else "spawn"
        context = multiprocessing.get_context(method)
        pool = context.Pool(workers, initializer=_start_worker,
                            initargs=(sides, runtime, now, held if method == "fork" else None))
        results = pool.imap(_judge_chunk, _chunks(numbered(lines), CHUNK), chunksize=1)
    try:
        for part in results:
            report.merge(part)
            if progress is not None and time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                rate = report.decided / (last - started)
                progress.write(f"\r{report.total:,} requests read ({2 * rate:,.0f} decisions/s)")
                progress.flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    report.seconds = time.perf_counter() - started
    if progress is not None:
        progress.write(f"\r{report.total:,} requests read in {report.seconds:.1f} s{' ' * 20}\n")
    return report


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

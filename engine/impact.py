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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from engine.decider import Engine
from engine.errors import RequestError
from engine.loader import load_policies

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
class ImpactReport:
    old: str
    new: str
    total: int = 0
    same: int = 0
    rejected: int = 0  # requests that one version or both could not decide (bad input)
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, kind: str) -> int:
        return sum(g.count for (k, _), g in self.groups.items() if k == kind)

    def merge(self, other: ImpactReport) -> None:
        self.total += other.total
        self.same += other.same
        self.rejected += other.rejected
        for key, group in other.groups.items():
            mine = self.groups.setdefault(key, Group(group.kind, group.rule))
            mine.count += group.count
            mine.examples.extend(group.examples[: EXAMPLES - len(mine.examples)])

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.groups.values(), key=lambda g: (KINDS.index(g.kind), -g.count, g.rule))
        return {
            "old": self.old, "new": self.new, "requests": self.total, "unchanged": self.same,
            "rejected": self.rejected, "flips": {k: self.count(k) for k in KINDS},
            "groups": [{"kind": g.kind, "rule": g.rule, "count": g.count, "examples": g.examples} for g in ordered],
            "seconds": round(self.seconds, 3),
            "decisions_per_second": round(2 * self.total / self.seconds) if self.seconds else None,
        }


def judge(engine: Engine, old: str, new: str, requests: Iterable[Any], now: datetime) -> ImpactReport:
    """The impact over some requests, in this process."""
    return judge_engines((engine, old), (engine, new), requests, now)


def judge_engines(old: tuple[Engine, str | None], new: tuple[Engine, str | None], requests: Iterable[Any],
                  now: datetime, *, labels: tuple[str, str] | None = None) -> ImpactReport:
    """The impact between two (engine, version) sides; a version None judges each request by the
    version it selects itself (its `at`, or its pin), as that engine would serve it."""
    report = ImpactReport(*(labels or (str(old[1]), str(new[1]))))

    def decide(side: tuple[Engine, str | None], request: dict[str, Any]) -> Any:
        engine, version = side
        pinned = request if version is None else {**request, "policy_version": version}
        return engine.decide(pinned, now=now, decision_id="impact")

    for request in requests:
        report.total += 1
        if not isinstance(request, dict):
            report.rejected += 1
            continue
        try:
            before = decide(old, request)
            after = decide(new, request)
        except RequestError:
            report.rejected += 1
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
            group.examples.append(request)
    return report


# --- in parallel ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _start_worker(folder: str, runtime: str, old: str, new: str, now: datetime) -> None:
    _WORKER.update(engine=Engine(load_policies(folder), runtime=runtime), old=old, new=new, now=now)


def _judge_chunk(lines: list[str]) -> ImpactReport:
    requests = []
    for line in lines:
        try:
            requests.append(json.loads(line))
        except json.JSONDecodeError:
            requests.append(None)
    return judge(_WORKER["engine"], _WORKER["old"], _WORKER["new"], requests, _WORKER["now"])


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        if line.strip():
            chunk.append(line)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def run_impact(folder: Path | str, old: str, new: str, lines: Iterable[str], *, workers: int | None = None,
               runtime: str = "native", progress: TextIO | None = None, now: datetime | None = None) -> ImpactReport:
    """Judge every JSON line under `old` and `new` with one process per core (or `workers`)."""
    workers = workers or os.cpu_count() or 1
    now = now or datetime.now(UTC)
    report = ImpactReport(old, new)
    started = time.perf_counter()
    last = started
    if workers == 1:
        _start_worker(str(folder), runtime, old, new, now)
        results: Iterable[ImpactReport] = map(_judge_chunk, _chunks(lines, CHUNK))
        pool = None
    else:
        context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        pool = context.Pool(workers, initializer=_start_worker, initargs=(str(folder), runtime, old, new, now))
        results = pool.imap(_judge_chunk, _chunks(lines, CHUNK), chunksize=1)
    try:
        for part in results:
            report.merge(part)
            if progress is not None and time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                rate = report.total / (last - started)
                progress.write(f"\r{report.total:,} requests judged ({rate:,.0f}/s, {2 * rate:,.0f} decisions/s)")
                progress.flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    report.seconds = time.perf_counter() - started
    if progress is not None:
        progress.write(f"\r{report.total:,} requests judged in {report.seconds:.1f} s{' ' * 20}\n")
    return report


# --- rendering -----------------------------------------------------------------------------------------


def render(report: ImpactReport, fmt: str) -> str:
    data = report.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    head = (f"{data['requests']:,} requests judged under {report.old} and {report.new}: "
            f"{data['unchanged']:,} unchanged, {data['rejected']:,} rejected as bad input")
    flips = ", ".join(f"{k}: {v:,}" for k, v in data["flips"].items())
    if fmt == "markdown":
        lines = [f"# Decision impact: {report.old} → {report.new}", "", head + ".", "", f"Flips: {flips}.", "",
                 "| change | rule | decisions |", "|---|---|---:|"]
        lines += [f"| {g['kind']} | `{g['rule']}` | {g['count']:,} |" for g in data["groups"]]
        for g in data["groups"]:
            lines += ["", f"### {g['kind']}: `{g['rule']}`", ""]
            lines += [f"```json\n{json.dumps(x, ensure_ascii=False)}\n```" for x in g["examples"]]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        e = html.escape
        rows = "".join(f"<tr><td>{e(g['kind'])}</td><td><code>{e(g['rule'])}</code></td><td>{g['count']:,}</td></tr>"
                       for g in data["groups"])
        examples = "".join(
            f"<h3>{e(g['kind'])}: <code>{e(g['rule'])}</code></h3>"
            + "".join(f"<pre>{e(json.dumps(x, indent=1, ensure_ascii=False))}</pre>" for x in g["examples"])
            for g in data["groups"])
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Impact {e(report.old)} → "
                f"{e(report.new)}</title><style>body{{font:15px/1.5 system-ui,sans-serif;margin:2em auto;"
                f"max-width:60em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em}}"
                f"pre{{background:#f6f6f6;padding:.5em;font-size:12px;white-space:pre-wrap}}</style></head><body>"
                f"<h1>Decision impact: {e(report.old)} → {e(report.new)}</h1><p>{e(head)}.</p><p>Flips: {e(flips)}.</p>"
                f"<table><tr><th>change</th><th>rule</th><th>decisions</th></tr>{rows}</table>{examples}"
                f"</body></html>\n")
    lines = [head + ".", f"flips: {flips}"]
    for g in data["groups"]:
        lines.append(f"  {g['kind']:<28} {g['rule']:<45} {g['count']:>9,}")
        lines.extend(f"      e.g. {json.dumps(x, ensure_ascii=False)[:160]}" for x in g["examples"][:1])
    return "\n".join(lines) + "\n"

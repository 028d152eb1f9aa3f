"""Where impact's time goes, per request, in one process: the same generated requests judged in
chunks of 500 as a worker judges them (the cycle collector paused, as there), measured in turns
and the best of --rounds kept, in CPU time:

- the plain way (every request each side's whole decision through Engine.decide) against the
  quick way (engine/impact.py's QuickJudge), reading included: their ratio;
- the quick way's parts: reading each line (msgspec, and freeing what it built), the request check
  (jsonschema-rs), the generated paths' verdicts as the quick way calls them (twins once, both
  versions of a path that differs in one joint verdict where it judges), the
  requests judged the plain way (a path that hands over), and the rest (the loop, look-ups,
  counting), which is the whole less the others.

Run: .venv/bin/python bench/bench_impact_parts.py [--count 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.generator import generate_requests  # noqa: E402
from engine.impact import (  # noqa: E402
    _WORKER,
    CHUNK,
    QuickJudge,
    Sides,
    _chunks,
    _judge_chunk,
    _start_worker,
    judge_engines,
    parse_lines,
)
from engine.loader import load_policies  # noqa: E402
from engine.versions import parse_timestamp  # noqa: E402


def best_of(rounds: int, work: Callable[[], Any]) -> float:
    """The least CPU time of `rounds` runs of `work`, the collector paused as in a worker."""
    best = float("inf")
    for _ in range(rounds):
        gc.disable()
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
        gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lines = [json.dumps(r) for r in generate_requests(args.count, args.seed, broken=0.01)]
    policies = load_policies(ROOT / "policies")
    now = datetime.now(UTC)
    _start_worker(Sides.of(policies, "v1", "v2"), "native", now, {policies.digest: policies})
    old, new = _WORKER["old"], _WORKER["new"]
    chunks = list(_chunks(lines, CHUNK))
    texts = [chunk_texts for _, chunk_texts in chunks]
    judge = QuickJudge.of(old, new, now)
    assert judge is not None
    requests = [parse_lines(t) for t in texts]
    reports = [judge_engines(old, new, r, now, labels=("v1", "v2"), explain=False) for r in requests]
    decided = sum(r.decided for r in reports)
    handed_over: list[list[Any]] = []  # per chunk: the requests the quick way judges the plain way
    calls: list[tuple[Any, dict[str, Any], datetime]] = []  # each verdict call as the quick way makes it
    usable = judge.usable
    for chunk in requests:
        mine = []
        for request in chunk:
            found = judge.paths.get((request["action"], request.get("role"))) if type(request) is dict else None
            at = parse_timestamp(request["at"]) if found and "at" in request else now
            both = found[3] if found and usable(request) else None
            if both is not None and both(request, at) is not None:  # both versions' verdicts in one call
                calls.append((both, request, at))
                continue
            verdicts = [p.verdict for p in found[:2] if p is not None] if found and usable(request) else []
            answers = [f(request, at) for f in verdicts]
            calls += [(f, request, at) for f in verdicts]
            if not verdicts or None in answers:
                mine.append(request)
        handed_over.append(mine)

    def plain() -> None:
        for t in texts:
            judge_engines(old, new, parse_lines(t), now, labels=("v1", "v2"), quick=False, explain=False)

    def read() -> None:
        for t in texts:
            parse_lines(t)  # built and freed, as a chunk's requests are

    def whole() -> None:
        for chunk in chunks:
            _judge_chunk(chunk)

    parts = {
        "the plain way (Engine.decide per side), reading included": plain,
        "the quick way, reading included": whole,
        "  reading (msgspec, the objects built and freed)": read,
        "  the request check (jsonschema-rs)": lambda: [usable(r) for chunk in requests for r in chunk
                                                        if type(r) is dict],
        "  the generated paths' verdicts": lambda: [f(r, at) for f, r, at in calls],
        "  the requests judged the plain way": lambda: [judge_engines(old, new, r, now, labels=("v1", "v2"),
                                                                      explain=False) for r in handed_over],
    }
    seconds = {name: float("inf") for name in parts}
    for _ in range(args.rounds):  # in turns: what the machine's load does falls on every part alike
        for name, work in parts.items():
            seconds[name] = min(seconds[name], best_of(1, work))
    count = args.count
    names = list(parts)
    rest = seconds[names[1]] - sum(seconds[n] for n in names[2:])
    print(f"{count:,} generated requests ({decided:,} decided under both v1 and v2, {2 * decided:,} decisions); "
          f"{sum(len(h) for h in handed_over):,} judged the plain way by the quick one; {len(calls):,} verdicts "
          f"({len(calls) / count:.2f} per request); machine: {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; best of {args.rounds} in turns, CPU time")
    print("| part | µs per request | decisions per CPU second |")
    print("|---|---:|---:|")
    for name in names[:2]:
        print(f"| {name.strip()} | {seconds[name] / count * 1e6:.1f} | {2 * decided / seconds[name]:,.0f} |")
    for name in names[2:]:
        print(f"| {name.strip()} | {seconds[name] / count * 1e6:.1f} | |")
    print(f"| the rest (the loop, look-ups, counting) | {rest / count * 1e6:.1f} | |")
    print(f"quick / plain: {seconds[names[0]] / seconds[names[1]]:.2f}x the decisions per CPU second")


if __name__ == "__main__":
    main()

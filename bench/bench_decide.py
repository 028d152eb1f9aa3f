"""Median and p99 of one in-process bind decision, against plain Python over the same dict (the floor),
all rows in one run: the generated path, the native closures it replaced, and the first landing
(cel-python's InterpretedRunner with jsonschema), each with its ratio to the floor.

Run: make bench (or .venv/bin/python bench/bench_decide.py [--n 4000] [--json]).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.floor import bind_outputs, bind_violations  # noqa: E402
from engine.decider import Engine  # noqa: E402
from engine.evaluator import CEL_PYTHON, evaluate  # noqa: E402
from engine.loader import load_policies  # noqa: E402
from engine.versions import parse_timestamp  # noqa: E402

NOW = datetime(2025, 7, 1, tzinfo=UTC)


def realistic_bind() -> dict[str, Any]:
    """A personal account bound as a GB shop's channel account, with some history on both sides."""
    return {
        "action": "bind", "role": "channel", "at": "2025-07-01T12:00:00Z",
        "shop": {"id": "shop-7", "name": "Tea & Things", "market": "GB", "status": "normal",
                 "official_account": {"account_id": "org-7", "account_type": "organization",
                                      "bound_at": "2024-03-01T09:00:00Z"},
                 "channel_accounts": [{"account_id": f"ch-{i}", "bound_at": f"2025-02-0{i}T10:00:00Z"}
                                      for i in range(1, 4)],
                 "official_unbinds": ["2024-02-01T00:00:00Z"],
                 "channel_unbinds": [f"2025-0{m}-15T08:00:00Z" for m in range(1, 7)]},
        "account": {"id": "acct-42", "name": "teatime_creator", "type": "personal", "age": 27,
                    "location": "GB", "followers": 15400, "ecommerce_revoked": False,
                    "linked_to_revoked": False, "policy_compliant": True,
                    "kyc": {"verified": True, "document_type": "passport", "document_country": "GB"},
                    "commission_agreement_signed": True, "affiliate_enabled": True,
                    "created_by_shop": None,
                    "bind_history": [{"shop_id": "shop-2", "bound_at": "2024-05-01T00:00:00Z",
                                      "unbound_at": "2024-09-01T00:00:00Z"}],
                    "violation_points": 2, "health_score": 320, "recent_serious_violation": False,
                    "upgrade": {"state": "none", "shop_id": None, "trial_started_at": None,
                                "unwithdrawn_earnings": 0}},
        "invitation": {"shop_id": "shop-7", "status": "accepted"},
    }


def measure(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(median, p99) in microseconds over n calls, after a warm-up (bench/bench_scale.py's rows)."""
    return measure_all({"one": fn}, n, rounds=1)["one"]


def measure_all(rows: dict[str, Callable[[], object]], n: int, rounds: int = 20) -> dict[str, tuple[float, float]]:
    """(median, p99) in microseconds per row, over n calls each: the rows take turns in `rounds`
    rounds (their order rotating), so that drift of a shared machine falls on all of them alike."""
    for fn in rows.values():
        for _ in range(min(200, n)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    per_round = max(1, n // rounds)
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            fn, out = rows[name], times[name]
            for _ in range(per_round):
                start = time.perf_counter_ns()
                fn()
                out.append((time.perf_counter_ns() - start) / 1000)
    result = {}
    for name, found in times.items():
        found.sort()
        result[name] = (statistics.median(found), found[max(0, int(len(found) * 0.99) - 1)])
    return result


WHOLE, CHECK, GENERATED, FLOOR = ("whole decision (check + evaluate + response)", "request check (jsonschema-rs)",
                                  "evaluation alone (the generated path)", "floor: plain Python over the dict")
CLOSURES_WHOLE = "whole decision, native closures rule by rule (before the generated paths)"
CLOSURES_EVAL = "evaluation alone, native closures (conversion + evaluate)"
BEFORE = "before: cel-python InterpretedRunner + jsonschema, whole decision"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4000, help="decisions per measurement")
    parser.add_argument("--before-n", type=int, default=200, help="decisions for the cel-python row (3-5 ms each)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    policies = load_policies(ROOT / "policies")
    engine, closures = Engine(policies), Engine(policies, generated=False)
    before = Engine(policies, runtime=CEL_PYTHON)
    request = realistic_bind()
    for judge in (engine, closures, before):
        decision = judge.decide(request, now=NOW)
        assert [v.id for v in decision.violations] == bind_violations(request), decision.to_dict()
        assert dict(decision.outputs) == bind_outputs(request), decision.outputs

    at = parse_timestamp(request["at"])
    version = engine.policies.select(at, None)
    path = version.path("bind", "channel")
    assert path is not None and path.native_calls == 0
    checker = engine.check
    reference = checker.reference

    def before_decision() -> object:
        reference.validate(request)  # jsonschema, as the first landing checked every request
        return before.decide(request, now=NOW).to_dict()

    rows = measure_all({
        WHOLE: lambda: engine.decide(request, now=NOW).to_dict(),
        CHECK: lambda: checker.checked(request),
        GENERATED: lambda: path.function(request, at, "b", "en"),
        CLOSURES_EVAL: lambda: evaluate(version, request, closures.activation(request, version, at), at=at,
                                        decision_id="b"),
        CLOSURES_WHOLE: lambda: closures.decide(request, now=NOW).to_dict(),
        FLOOR: lambda: (bind_violations(request), bind_outputs(request)),
    }, args.n)
    rows.update(measure_all({BEFORE: before_decision}, args.before_n, rounds=1))
    floor = rows[FLOOR][0]
    if args.json:
        print(json.dumps({k: {"median_us": m, "p99_us": p, "x_floor": m / floor} for k, (m, p) in rows.items()},
                         indent=2))
        return
    print(f"bind decision, {len(version.rules_for('bind', 'channel'))} applicable rules, n={args.n}, "
          f"Python {platform.python_version()}, {platform.machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"| {'what':<72} | median µs | p99 µs | x floor |")
    print(f"|{'-' * 74}|----------:|-------:|--------:|")
    for name, (median, p99) in rows.items():
        print(f"| {name:<72} | {median:9.1f} | {p99:6.1f} | {median / floor:7.2f} |")
    whole, evaluation = rows[WHOLE][0] / floor, rows[GENERATED][0] / floor
    print(f"goals: whole decision ≤ 4x the floor: {whole:.2f}x ({'met' if whole <= 4 else 'NOT met'}); "
          f"evaluation alone ≤ 2x: {evaluation:.2f}x ({'met' if evaluation <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()

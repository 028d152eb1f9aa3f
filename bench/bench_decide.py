"""Median and p99 of one in-process bind decision, against plain Python over the same dict (the floor).

Run: make bench (or .venv/bin/python bench/bench_decide.py [--n 2000]).
"""

from __future__ import annotations

import argparse
import json
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
from engine.evaluator import evaluate  # noqa: E402
from engine.request import check_request  # noqa: E402
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
    """(median, p99) in microseconds over n calls, after a warm-up."""
    for _ in range(min(200, n)):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="decisions per measurement")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    engine = Engine.from_folder(ROOT / "policies")
    request = realistic_bind()
    decision = engine.decide(request, now=NOW)
    floor_ids = bind_violations(request)
    assert [v.id for v in decision.violations] == floor_ids, (decision.to_dict(), floor_ids)
    assert dict(decision.outputs) == bind_outputs(request), decision.outputs

    version = engine.policies.select(parse_timestamp(request["at"]), None)
    at = parse_timestamp(request["at"])
    activation = engine.activation(request, version, at)

    rows = {
        "whole decision (check + convert + evaluate + response)":
            measure(lambda: engine.decide(request, now=NOW).to_dict(), args.n),
        "request check (jsonschema-rs; jsonschema only on failure)": measure(lambda: check_request(request), args.n),
        "conversion to native values (timestamps, numbers)": measure(
            lambda: engine.activation(request, version, at), args.n),
        "evaluation alone (native closures)": measure(
            lambda: evaluate(version, request, activation, at=at, decision_id="b"), args.n),
        "floor: plain Python over the dict": measure(
            lambda: (bind_violations(request), bind_outputs(request)), args.n),
    }
    if args.json:
        print(json.dumps({k: {"median_us": m, "p99_us": p} for k, (m, p) in rows.items()}, indent=2))
        return
    print(f"bind decision, {len(version.rules_for('bind', 'channel'))} applicable rules, n={args.n}, "
          f"Python {platform.python_version()}, {platform.machine()}")
    print(f"| {'what':<58} | median µs | p99 µs |")
    print(f"|{'-' * 60}|----------:|-------:|")
    for name, (median, p99) in rows.items():
        print(f"| {name:<58} | {median:9.1f} | {p99:6.1f} |")


if __name__ == "__main__":
    main()

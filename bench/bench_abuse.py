"""What one request can cost: the CPU time of each crafted input, through the whole app in process.

    .venv/bin/python bench/bench_abuse.py [MAX_BATCH]

Batches are held to the service's bounds (BINDPOLICY_MAX_BATCH requests, BINDPOLICY_MAX_BATCH_BYTES
bytes; MAX_BATCH given here overrides the first, to see what a bigger batch would cost).

Every input is at most the body limit (1 MiB). Each is sent 3 times through the Flask app (SQLite
log, every request logged); the CPU time of the thread that served it (time.thread_time) is taken,
the best of 5 (the machine is shared). The reference is a plain allowed decision, measured the same
way in the same run. Prints every input's cost, the worst, the statuses and any 5xx.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.app import create_app  # noqa: E402
from engine.generator import generate_requests  # noqa: E402
from tests.conftest import bind_request  # noqa: E402

LIMIT = 1024 * 1024


def with_list(field: str, items: list[object]) -> bytes:
    request = bind_request()
    request["shop"][field] = items  # type: ignore[index]
    return orjson.dumps(request)


def fill(prefix: bytes, item: bytes, suffix: bytes) -> bytes:
    """As many items as fit the body limit."""
    count = (LIMIT - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * count) + suffix


def heavy(items: int = 1000) -> dict[str, object]:
    """An allowed request with its lists `items` long (1000: as long as the contract allows)."""
    request = bind_request()
    times = [f"2020-01-{1 + i % 28:02d}T00:00:00Z" for i in range(items)]
    request["shop"].update(official_unbinds=times, channel_unbinds=times)  # type: ignore[union-attr]
    request["account"]["bind_history"] = [  # type: ignore[index]
        {"shop_id": f"s{i}", "bound_at": "2020-01-01T00:00:00Z", "unbound_at": "2020-02-01T00:00:00Z"}
        for i in range(items)]
    return request


def batch(requests: list[object]) -> bytes:
    return orjson.dumps({"requests": requests})


def fit_batch(count: int, max_bytes: int) -> bytes:
    """`count` requests with lists as long as the batch's byte limit allows."""
    items = 1000
    while len(batch([heavy(items)] * count)) > max_bytes:
        items = int(items * 0.9)
    return batch([heavy(items)] * count)


def inputs(max_batch: int, max_bytes: int) -> dict[str, bytes]:
    ok = orjson.dumps(bind_request())
    found = {
        "reference: an allowed decision": ok,
        "issue: 100,000 ints in channel_unbinds (197 KiB)": with_list("channel_unbinds", [1] * 100_000),
        "1 MiB of ints in a list": fill(b'{"action":"bind","x":[', b"1", b"]}"),
        "1 MiB of empty objects": fill(b'{"action":"bind","x":[', b"{}", b"]}"),
        "1 MiB of timestamps": fill(b'{"action":"bind","shop":{"id":"s","channel_unbinds":[',
                                    b'"2025-01-01T00:00:00Z"', b"]}}"),
        "1000 bad timestamps": with_list("channel_unbinds", ["not a time"] * 1000),
        "1000 objects with 2 problems each": with_list("channel_accounts", [{"account_id": 1, "x": 2}] * 1000),
        "19,000 objects under an unknown field": fill(b'{"action":"bind","x":[', b'{"b":1}', b"]}")[:150_000]
        .rpartition(b",")[0] + b"]}",
        "900 KiB string": b'{"action":"bind","x":"' + b"y" * 900_000 + b'"}',
        "1 MiB of spaces then garbage": b'{"action":"login"}' + b" " * (LIMIT - 30) + b"garbage",
        "1000-deep array": b"[" * 1000 + b"]" * 1000,
        "16,000 brackets deep": b"[" * 8000 + b"]" * 8000,
        "duplicate keys": b'{"action":"bind","action":"login"}',
        "2^64": b'{"action":"login","account":{"id":"a","followers":18446744073709551616}}',
        "a decision with every list at 1000 items": orjson.dumps(heavy()),
        f"a full batch: {max_batch} generated decisions": batch(list(generate_requests(max_batch, seed=3))),
        "a full batch: 1 decision with lists to the batch's bytes": fit_batch(1, max_bytes),
        f"a full batch: {max_batch} decisions with lists to its bytes": fit_batch(max_batch, max_bytes),
        "a batch with its longest lists, to 1 MiB (over the limit)": batch([heavy()] * 7),
        "a batch of 1000 decisions (over the limit)": batch(list(generate_requests(1000, seed=3))),
        "many nulls": orjson.dumps({**bind_request(), "market": None, "region": None, "invitation": None}),
    }
    for name, body in found.items():
        assert len(body) <= LIMIT, (name, len(body))
    return found


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"POLICY_DIR": str(ROOT / "policies"), "DATA_DIR": tmp, "RELOAD_INTERVAL": 0,
                          "DATABASE_URL": f"sqlite:///{tmp}/log.db", "LOG_CHECK_INTERVAL": 0,
                          **({"MAX_BATCH": int(sys.argv[1])} if len(sys.argv) > 1 else {})})
        client = app.test_client()
        statuses: Counter[int] = Counter()
        results = []
        for name, body in inputs(app.config["MAX_BATCH"], app.config["MAX_BATCH_BYTES"]).items():
            path = "/v1/decisions/batch" if "batch" in name else "/v1/decisions"
            best, status, size = float("inf"), 0, 0
            for _ in range(5):
                started = time.thread_time()
                response = client.post(path, data=body, content_type="application/json")
                best = min(best, time.thread_time() - started)
                status, size = response.status_code, len(response.data)
            statuses[status] += 1
            results.append((name, len(body), status, size, best * 1000))
    reference = results[0][4]
    print(f"{'input':52} {'bytes':>9} {'status':>6} {'answer B':>9} {'CPU ms':>8} {'x ref':>7}")
    for name, length, status, size, ms in results:
        print(f"{name:52} {length:9,} {status:6} {size:9,} {ms:8.2f} {ms / reference:7.1f}")
    worst = max(results, key=lambda r: r[4])
    print(f"\n{len(results)} inputs, statuses {dict(statuses)}, 5xx: {sum(v for k, v in statuses.items() if k >= 500)}")
    print(f"worst request: {worst[0]}: {worst[4]:.1f} ms CPU ({worst[4] / reference:.0f}x the reference "
          f"{reference:.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How fast the running service re-checks older records (the sweep), and what it costs.

    .venv/bin/python bench/bench_logwatch.py [RECORDS]

Builds a keyed SQLite log of RECORDS (default 200,000) generated decisions, then times, in CPU
seconds of this thread, one whole pass of LogWatch's sweep the first time (every range checked
in full: links and MACs from the stored text) and the next time (each range's digest only), and,
as the reference in the same run, the check that the sweep replaced (records read and parsed,
then verified, as `log verify` does). Prints records per CPU second and how long a pass over a
million records takes at the default budget (10% of one core).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.decider import Engine  # noqa: E402
from engine.decisionlog import new_record, open_store  # noqa: E402
from engine.generator import generate_requests  # noqa: E402
from engine.loader import load_policies  # noqa: E402
from engine.logcheck import LogWatch  # noqa: E402
from engine.logkeys import MacKey, MacKeyring  # noqa: E402

BUDGET = 0.1


def build(url: str, count: int) -> None:
    store = open_store(url, keys=MacKeyring((MacKey(b"\x07" * 32),)))
    engine = Engine(load_policies(ROOT / "policies"))
    requests = list(generate_requests(500, seed=5))
    answers = []
    for i, request in enumerate(requests):
        try:
            answers.append(engine.decide(request, decision_id=f"d{i}").to_dict())
        except Exception as exc:  # a refused one is logged as such
            answers.append({"error": str(exc)})
    for start in range(0, count, 1000):
        store.write_many([new_record(decision_id=f"r{n}", outcome="decided", status=200,
                                     request=requests[n % 500], response=answers[n % 500], duration_us=50)
                          for n in range(start, min(count, start + 1000))])


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/log.db"
        started = time.perf_counter()
        build(url, count)
        print(f"built {count:,} records in {time.perf_counter() - started:.0f} s")
        store = open_store(url, keys=MacKeyring((MacKey(b"\x07" * 32),)))
        watch = LogWatch(store, interval=5.0, budget=1e9)  # no budget: one whole pass, timed
        watch.start()
        watch.verified_seq = count - count % watch.RANGE
        rates = {}
        for name in ("first pass (full check)", "later passes (digests)"):
            cpu = time.thread_time()
            assert watch._sweep() is None
            rates[name] = watch.verified_seq / (time.thread_time() - cpu)
        cpu = time.thread_time()
        checked = 0
        for after in range(0, watch.verified_seq, 1000):
            assert store.verify(list(store.scan(after_seq=after, limit=1000))) is None
            checked += 1000
        rates["reference: records parsed and verified (the old window)"] = checked / (time.thread_time() - cpu)
    reference = rates["reference: records parsed and verified (the old window)"]
    print(f"{'check':56} {'records/CPU s':>14} {'x ref':>6} {'1M records at 10% of a core':>28}")
    for name, rate in rates.items():
        print(f"{name:56} {rate:14,.0f} {rate / reference:6.1f} {1e6 / rate / BUDGET:26.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Memory of one service worker: RSS after loading the bundled policies, and every 10,000 decisions
up to 100,000 (through the Flask app, as a worker serves them), to show it stays flat.

Run: .venv/bin/python bench/bench_memory.py [--decisions 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.app import create_app  # noqa: E402

EXAMPLES = ROOT / "examples" / "requests.jsonl"


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=100_000)
    args = parser.parse_args()
    before = rss_mb()
    with tempfile.TemporaryDirectory() as data:
        app = create_app({"POLICY_DIR": str(ROOT / "policies"), "DATA_DIR": data})
        client = app.test_client()
        loaded = rss_mb()
        corpus = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
        print(f"python alone {before:.1f} MB; with the app and the bundled policies {loaded:.1f} MB")
        print("| decisions | RSS MB |")
        print("|---:|---:|")
        for done in range(1, args.decisions + 1):
            response = client.post("/v1/decisions", json=corpus[done % len(corpus)])
            assert response.status_code in (200, 400), response.status_code
            if done % 10_000 == 0:
                print(f"| {done} | {rss_mb():.1f} |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.1f} MB")


if __name__ == "__main__":
    main()

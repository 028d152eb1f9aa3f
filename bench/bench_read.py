"""The strict reading and check of one request from its bytes, old way against one pass, in one
process over the same lines: `checked(parse_json(bytes))` (orjson, its proof from the bytes, then
jsonschema-rs) against `RequestChecker.read` (engine/reader.py: msgspec against types generated
from the schema, the proofs from the bytes and the value), and orjson.loads alone as the floor
of any reading. CPU time per request (process time: on a shared machine it moves less than the
clock), the best of --repeat rounds of 2,000 requests, each way's rounds interleaved.

The lines: the official binds of bench/peers/corpus.py (about 1.2 KB each), written as a JSON
Lines file holds them (UTF-8 as is), and the same with every non-ASCII character escaped
(\\uXXXX, as json.dumps writes by default). Then the same in `decide --jsonl`'s loop, in process:
the old reading, the one pass (Engine.decide_bytes per line), and the command's Engine.line_decider.

Run: .venv/bin/python bench/bench_read.py [--repeat 25]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers.corpus import build_corpus  # noqa: E402
from engine.decider import Engine  # noqa: E402
from engine.lines import line_blocks  # noqa: E402
from engine.request import default_checker, parse_json  # noqa: E402


def per_request(ways: dict[str, Callable[[bytes], Any]], lines: list[bytes], repeat: int) -> dict[str, float]:
    best = dict.fromkeys(ways, float("inf"))
    gc.disable()  # what a line builds goes with it (refcounts); the collector's passes are not the reading's
    try:
        for _ in range(repeat):
            for name, way in ways.items():
                start = time.process_time()
                for line in lines:
                    way(line)
                best[name] = min(best[name], (time.process_time() - start) / len(lines) * 1e6)
    finally:
        gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    corpus = build_corpus(500, 20250701)
    checker = default_checker()
    ways: dict[str, Callable[[bytes], Any]] = {
        "old": lambda line: checker.checked(parse_json(line)),
        "one pass": checker.read,
        "orjson.loads": orjson.loads,
        "not strict": lambda line: checker.usable.is_valid(orjson.loads(line)),  # impact's way: json.loads's value
    }
    for label, ascii_only in (("UTF-8 as is", False), ("escaped \\uXXXX", True)):
        lines = [json.dumps(r, ensure_ascii=ascii_only).encode() for r in corpus] * 4
        for line in lines:  # the same answer, and the one pass reads every line itself
            assert repr(checker.read(line)) == repr(checker.checked(parse_json(line)))
            assert checker.vouch(line) is not None, line[:200]
        found = per_request(ways, lines, args.repeat)
        print(f"{label} ({sum(map(len, lines)) // len(lines)} bytes a request): "
              f"old {found['old']:.1f} µs, one pass {found['one pass']:.1f} µs "
              f"({found['one pass'] / found['old']:.2f}x), orjson.loads alone {found['orjson.loads']:.1f} µs, "
              f"orjson.loads and jsonschema-rs, not strict (impact's reading) {found['not strict']:.1f} µs")
    print(f"CPU time per request, best of {args.repeat}; load average {os.getloadavg()[0]:.1f}")
    loop(corpus, max(3, args.repeat // 3))


def loop(corpus: list[Any], repeat: int) -> None:
    """The command's loop over JSON lines (engine/cli.py: lines, decision, answer written), the old
    reading against the one pass, in turns over the same 5,000 lines of official binds."""
    engine = Engine.from_folder(ROOT / "policies")
    now = datetime(2025, 7, 1, tzinfo=UTC)
    data = "".join(json.dumps(corpus[i % len(corpus)], ensure_ascii=False) + "\n" for i in range(5000)).encode()

    def old() -> None:
        out = io.BytesIO()
        for block in line_blocks(io.BytesIO(data)):
            for _, text in block:
                out.write(engine.decide(parse_json(text), now=now).to_json_line())

    def one_pass() -> None:
        out = io.BytesIO()
        for block in line_blocks(io.BytesIO(data)):
            for _, text in block:
                out.write(engine.decide_bytes(text, now=now).to_json_line())

    def line_decider() -> None:  # what the command runs now: Engine.line_decider (each `at`'s version kept)
        out = io.BytesIO()
        decide = engine.line_decider(now=now)
        for block in line_blocks(io.BytesIO(data)):
            for _, text in block:
                out.write(decide(text).to_json_line())

    found = per_request({"old": lambda _: old(), "one pass": lambda _: one_pass(),
                         "line_decider": lambda _: line_decider()}, [data], repeat)
    print(f"decide --jsonl's loop per line (5,000 lines, best of {repeat}): old {found['old'] / 5000:.1f} µs, "
          f"one pass {found['one pass'] / 5000:.1f} µs ({found['one pass'] / found['old']:.2f}x), "
          f"the command's line_decider {found['line_decider'] / 5000:.1f} µs "
          f"({found['line_decider'] / found['one pass']:.2f}x the one pass); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Peer benchmark: one decision (bind an account as a shop's OFFICIAL account, policy v2),
written for bindpolicy, plain Python, OPA Rego (regopy), GoRules ZEN (zen-engine) and
AWS Cedar (cedarpy), checked to agree on every corpus request, then timed.

Run: .venv/bin/python bench/peers/run.py [--n 10000] [--json]

1. builds a seeded corpus of complete official-bind requests (bench/peers/corpus.py) and
   refuses it if it misses an edge or a rule never fires;
2. asks every engine for the fired rule ids of every request and exits non-zero, showing
   the first differing request, unless each gives exactly bindpolicy's set;
3. times each engine per whole decision (building its input from the request dict included),
   one thread, all engines in one run, over --n decisions that cycle through the corpus;
4. prints a Markdown table: engine | rules expressed | median µs | p99 µs | times bindpolicy's median.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.peers.corpus import EDGES, build_corpus, coverage_problems  # noqa: E402
from bench.peers.engines import NOW, Peer, all_peers, as_json  # noqa: E402
from engine.decider import Engine  # noqa: E402
from engine.errors import RequestError  # noqa: E402


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(1)


def check(peers: list[Peer], corpus: list[dict[str, Any]], engine: Engine) -> list[set[str]]:
    """bindpolicy's fired ids per request, after checking every peer gives the same set."""
    reference = peers[0]
    expected: list[set[str]] = []
    for index, request in enumerate(corpus):
        try:
            decision = engine.decide(request, now=NOW)
        except RequestError as exc:
            fail(f"corpus request {index} is incomplete for bindpolicy: {exc}\n{as_json(request)}")
        if decision.policy_version != "v2":
            fail(f"corpus request {index} was judged by {decision.policy_version}, not v2")
        failed = [v.id for v in decision.violations if "failed to evaluate" in v.message]
        if failed:
            fail(f"corpus request {index}: bindpolicy could not evaluate {failed}\n{as_json(request)}")
        expected.append(set(reference.decide(request)))
    for peer in peers[1:]:
        for index, (request, want) in enumerate(zip(corpus, expected, strict=True)):
            try:
                got = set(peer.decide(request))
            except Exception as exc:
                fail(f"{peer.name} failed on corpus request {index}: {exc!r}\n{as_json(request)}")
            if got != want:
                fail(f"MISMATCH: {peer.name} disagrees with bindpolicy on corpus request {index}\n"
                     f"  bindpolicy fires: {sorted(want)}\n  {peer.name} fires: {sorted(got)}\n"
                     f"  only bindpolicy: {sorted(want - got)}; only {peer.name}: {sorted(got - want)}\n"
                     f"request:\n{as_json(request)}")
    return expected


def time_all(peers: list[Peer], corpus: list[dict[str, Any]], n: int) -> dict[str, list[float]]:
    """Microseconds per decision for each engine: `n` decisions each, cycling through the corpus.

    The corpus is gone through in passes; within a pass every engine takes the whole corpus in
    turn (the order of engines rotates from pass to pass), so that drift of the machine over the
    run falls on all of them alike.
    """
    samples: dict[str, list[float]] = {p.name: [] for p in peers}
    for peer in peers:  # warm-up: one pass each, untimed
        for request in corpus:
            peer.decide(request)
    passes = -(-n // len(corpus))
    clock = time.perf_counter_ns
    for number in range(passes):
        todo = n - number * len(corpus)
        chunk = corpus if todo >= len(corpus) else corpus[:todo]
        shift = number % len(peers)
        for peer in peers[shift:] + peers[:shift]:
            decide, out = peer.decide, samples[peer.name]
            gc.collect()
            for request in chunk:
                start = clock()
                decide(request)
                out.append((clock() - start) / 1000)
    return samples


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def machine() -> dict[str, str]:
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(os.cpu_count())
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "nproc": nproc, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="timed decisions per engine (default 10000)")
    parser.add_argument("--corpus", type=int, default=500, help="corpus size (default 500)")
    parser.add_argument("--seed", type=int, default=20250701, help="corpus seed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--write", action="store_true",
                        help="write the table into README.md and bench/peers/README.md (between their markers)")
    args = parser.parse_args()
    if args.n < 1 or args.corpus < 1:
        parser.error("--n and --corpus must be positive")

    engine = Engine.from_folder(ROOT / "policies")
    v2 = engine.policies.get("v2")
    if v2 is None:
        fail("bindpolicy has no policy v2")
    rule_ids = [rule.id for rule in v2.rules_for("bind", "official")]
    try:
        peers = all_peers(engine)
    except ImportError as exc:
        fail(f"a peer engine is not installed ({exc}): .venv/bin/pip install -r bench/peers/requirements.txt")
    corpus = build_corpus(args.corpus, args.seed)

    expected = check(peers, corpus, engine)
    problems = coverage_problems(corpus, expected, rule_ids)
    if problems:
        fail("the corpus does not cover this decision:\n  " + "\n  ".join(problems))
    allowed = sum(1 for fired in expected if not fired)
    if not args.json:
        print(f"check: {len(peers)} engines agree with bindpolicy on all {len(corpus)} requests "
              f"({allowed} allowed, {len(corpus) - allowed} denied; {len(EDGES)} edges covered, "
              f"each of the {len(rule_ids)} rules fires and passes)", flush=True)

    samples = time_all(peers, corpus, args.n)
    base = statistics.median(samples[peers[0].name])
    rows: list[dict[str, Any]] = [{"engine": p.name, "version": p.version, "rules_expressed": p.expressed,
             "median_us": statistics.median(samples[p.name]), "p99_us": p99(samples[p.name]),
             "ratio": statistics.median(samples[p.name]) / base} for p in peers]
    info = machine()
    if args.json:
        print(json.dumps({"decision": "bind, role official, policy v2, at 2025-07-01", "rules": rule_ids,
                          "corpus": {"size": len(corpus), "seed": args.seed, "allowed": allowed},
                          "n": args.n, "machine": info, "engines": rows}, indent=2, ensure_ascii=False))
        return
    lines = table(rows, info, rule_ids, len(corpus), args)
    print("\n" + "\n".join(lines))
    if args.write:
        for path in (ROOT / "README.md", ROOT / "bench/peers/README.md"):
            write_between_markers(path, lines)
            print(f"written into {path.relative_to(ROOT)}")


START, END = "<!-- peers-table: written by bench/peers/run.py --write -->", "<!-- end of peers-table -->"


def table(rows: list[dict[str, Any]], info: dict[str, str], rule_ids: list[str], corpus: int,
          args: argparse.Namespace) -> list[str]:
    """The run as Markdown: what was measured, where, and one row per engine."""
    width = max(len(r["engine"]) for r in rows)
    expressed_width = max(len("rules expressed"), *(len(r["rules_expressed"]) for r in rows))
    out = [f"Measured by `bench/peers/run.py --write` (this table is written into README.md and "
           f"bench/peers/README.md by the same run): {info['platform']}, Python {info['python']}, "
           f"nproc {info['nproc']}" + (f", {info['cpu']}" if info["cpu"] else "") +
           f", load average {os.getloadavg()[0]:.1f} at the end; bind as official account, policy v2, "
           f"{len(rule_ids)} rules; corpus {corpus} requests (seed {args.seed}); {args.n} timed decisions "
           "per engine, one thread.", "",
           f"| {'engine':<{width}} | {'rules expressed':<{expressed_width}} | median µs | p99 µs | x bindpolicy |",
           f"|{'-' * (width + 2)}|{'-' * (expressed_width + 2)}|----------:|-------:|-------------:|"]
    for r in rows:
        out.append(f"| {r['engine']:<{width}} | {r['rules_expressed']:<{expressed_width}} | {r['median_us']:9.1f} "
                   f"| {r['p99_us']:6.1f} | {r['ratio']:12.2f} |")
    out += ["", "Versions: " + ", ".join(r["version"] for r in rows if r["version"]) + "."]
    return out


def write_between_markers(path: Path, lines: list[str]) -> None:
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        fail(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail, encoding="utf-8")


if __name__ == "__main__":
    main()

"""Impact throughput: a generated corpus (a million requests by default) judged under v1 and v2,
every core used (or --workers). Reports requests and decisions re-judged per second of the clock,
and per CPU second of the judging processes (per core: what a shared machine's load does not
change as much); only requests decided under both versions count, two decisions each.

The corpus file is read as `bindpolicy impact --requests FILE` reads it (engine/inputs.py's
request_blocks: its lines as bytes, each named `FILE:N`) and judged by run_impact, as the
command does (only the policies' loading and the report's rendering left out). --text: as the
command read it before (numbered_lines: text lines).

--repeats N (5): the corpus judged N times, each run in a fresh process (its fixed costs paid, as a
command pays them: the engine built, the verdict paths written on first use, the examples
explained), and the figure reported as the MEDIAN of the runs with their spread (lowest and
highest, and the half-range as a share of the median). On this shared machine one run moves by
30% either way with the other processes' load (the CPU time of the same work grows when the
other hyperthread is busy): one run says little, the median of several is the figure.

--before TREE: the same corpus judged in turns by TREE (another checkout: its own engine and
policies, the file read as that checkout's command reads it: request_blocks where it has one,
else text lines) and by this tree, --rounds turns of one run each: each tree's median and spread,
the ratio of the medians, and each turn's ratio (the two runs of a turn see about the same load).

Each run also reports the judging alone: the median of its chunks' decisions per CPU second (each
chunk of 500 requests timed where it is judged: ImpactReport.chunk_cpu), without the run's fixed
costs (the first chunk writes the verdict paths it uses) and the reading of the file.

Beside each run, the machine's state: a fixed calibration workload (bench/floor.py's plain-Python
bind rules and outputs over the corpus's first 2,000 bind requests, each line read by msgspec as
impact reads it; this script's own code whichever tree judges), timed in CPU time in slices of
25 requests taken in turns with the run's reading, one after every 400 lines read (about 100
slices in a run of 40,000, 2-3% of its CPU time, taken out of the run's CPU seconds): µs a
calibration request over the run's whole length. The same work moves 1.5-2x within seconds on
this shared machine: a run slow with its calibration slow is the machine, a run slow with its
calibration fast is the code. Each run is also given scaled to the median calibration of the
runs (its figure x its calibration / the median calibration), and --before gives each turn's
ratio so scaled too.

Run: .venv/bin/python bench/bench_impact.py [--count 1000000] [--workers N] [--repeats 5 | --repeats 1]
     [--before TREE --rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if "--tree" in sys.argv:  # the engine (and policies) of another checkout, judged by this script
    ROOT = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from engine import inputs  # noqa: E402
from engine.generator import generate_requests  # noqa: E402
from engine.impact import render, run_impact  # noqa: E402

GOAL = 80_000  # decisions re-judged per CPU second, per core (issue 10)
CALIBRATION = 2_000  # bind requests of the corpus in the calibration workload


def calibration_lines(corpus: Path) -> list[bytes]:
    """The corpus's first CALIBRATION bind lines (official and channel) that the floor judges."""
    floor = _floor()
    found: list[bytes] = []
    with corpus.open("rb") as lines:
        for line in lines:
            try:
                request = json.loads(line)
                if request.get("action") == "bind" and request.get("role") in ("official", "channel"):
                    floor.bind_violations(request), floor.bind_outputs(request)
                    found.append(line)
            except Exception:  # a broken request: not part of the workload
                continue
            if len(found) >= CALIBRATION:
                break
    return found


class Calibration:
    """The calibration workload, a slice at a time: each line read by msgspec, then the floor's bind
    rules and outputs over it (plain Python, no engine: the same whichever tree judges)."""

    EVERY, SLICE = 400, 25  # a slice of SLICE requests after every EVERY lines read

    def __init__(self, lines: list[bytes]) -> None:
        import msgspec

        floor = _floor()
        self.lines, self.decode = lines, msgspec.json.Decoder().decode
        self.violations, self.outputs = floor.bind_violations, floor.bind_outputs
        self.position = 0
        self.requests = 0
        self.cpu_seconds = 0.0

    def slice(self) -> None:
        """SLICE requests of the workload (the next ones, around), timed in CPU time."""
        decode, violations, outputs, lines = self.decode, self.violations, self.outputs, self.lines
        part = [lines[(self.position + i) % len(lines)] for i in range(self.SLICE)]
        started = time.process_time()
        for line in part:
            request = decode(line)
            violations(request), outputs(request)
        self.cpu_seconds += time.process_time() - started
        self.position += self.SLICE
        self.requests += self.SLICE

    def between(self, items: Iterable[Any]) -> Iterator[Any]:
        """The items (blocks of lines, or lines) as they come, a slice taken after every EVERY lines."""
        since = 0
        for item in items:
            yield item
            since += len(item.lines) if hasattr(item, "lines") else 1
            if since >= self.EVERY:
                since = 0
                self.slice()

    @property
    def micros(self) -> float:
        """µs of CPU a calibration request, over the slices taken."""
        return self.cpu_seconds / max(1, self.requests) * 1e6


def _floor() -> Any:
    """bench/floor.py of this script's own checkout (not --tree's)."""
    spec = importlib.util.spec_from_file_location("bench_floor", Path(__file__).resolve().parent / "floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--corpus", type=Path, help="judge this JSON Lines file instead of a generated one")
    parser.add_argument("--repeats", type=int, default=5, help="runs, each in a fresh process: their median "
                        "(1: one run, in this process)")
    parser.add_argument("--before", type=Path, metavar="TREE", help="another checkout judged in turns with this one")
    parser.add_argument("--rounds", type=int, default=5, help="with --before: turns, one run of each tree a turn")
    parser.add_argument("--tree", type=Path, help="judge with the engine and policies of this checkout")
    parser.add_argument("--text", action="store_true", help="read the corpus as text lines, as the command "
                        "did before it read bytes (engine/inputs.py's numbered_lines)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        corpus = args.corpus or Path(temp) / "corpus.jsonl"
        if args.corpus is None:
            start = time.perf_counter()
            with corpus.open("w") as out:
                for request in generate_requests(args.count, args.seed, broken=0.01):
                    out.write(json.dumps(request) + "\n")
            made = time.perf_counter() - start
            print(f"corpus: {args.count:,} requests, {corpus.stat().st_size / 2**20:.0f} MiB, written in {made:.0f} s",
                  file=sys.stderr)
        if args.before is not None:
            compare(args, corpus)
            return
        if args.repeats > 1:
            repeat(args, corpus)
            return
        calibration = Calibration(calibration_lines(corpus))
        read = getattr(inputs, "request_blocks", None)  # None: a checkout whose command reads text lines
        lines = (inputs.numbered_lines if args.text or read is None else read)([str(corpus)])
        report = run_impact(ROOT / "policies", "v1", "v2", calibration.between(lines), workers=args.workers,
                            progress=sys.stderr)
        report.cpu_seconds -= calibration.cpu_seconds  # the slices ran in this process, the run's time
    data = report.to_dict()
    per_cpu = 2 * report.decided / report.cpu_seconds
    chunks = [2 * decided / cpu for decided, cpu in getattr(report, "chunk_cpu", []) if cpu > 0]
    print(render(report, "text").splitlines()[0])
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("| requests | workers | seconds | requests/s | decisions re-judged/s | CPU seconds | the machine: "
          "calibration, µs a request | decisions re-judged per CPU second (goal >= 80,000 per core) | judging only: "
          "the median chunk's |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {data['requests']:,} | {args.workers} | {report.seconds:.1f} | {data['requests'] / report.seconds:,.0f} "
          f"| {data['decisions_per_second']:,} | {report.cpu_seconds:.3f} | {calibration.micros:.2f} "
          f"| {per_cpu:,.0f} | {statistics.median(chunks) if chunks else 0:,.0f} |")


class Run(NamedTuple):
    """One run in a fresh process: decisions re-judged per CPU second, the whole run's and its
    median chunk's (0 where that engine does not time its chunks), and the calibration's µs a
    request in its slices, taken in turns with the run's reading."""

    whole: float
    chunk: float
    calibration: float


def one_run(args: argparse.Namespace, corpus: Path, tree: Path | None = None) -> Run:
    """One run in a fresh process (of `tree`'s engine, this script's calibration)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--workers", str(args.workers),
               "--corpus", str(corpus), "--repeats", "1", *(["--tree", str(tree)] if tree is not None else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    micros, whole, chunk = re.findall(r"\| ([\d.]+) \| ([\d,]+) \| ([\d,]+) \|$", out.stdout.strip(), re.M)[-1]
    return Run(float(whole.replace(",", "")), float(chunk.replace(",", "")), float(micros))


def scaled(runs: list[Run], middle: float) -> list[float]:
    """Each run's figure as at the calibration `middle`: its figure x its calibration / middle (a
    run on a machine twice as slow as `middle` counts twice its figure)."""
    return [run.whole * run.calibration / middle for run in runs]


def spread(figures: list[float], form: str = ",.0f") -> str:
    """`median (lowest-highest, ±half-range as a share of the median)`."""
    middle = statistics.median(figures)
    half = (max(figures) - min(figures)) / 2
    return f"{middle:{form}} ({min(figures):{form}}-{max(figures):{form}}, ±{half / middle:.0%})"


def repeat(args: argparse.Namespace, corpus: Path) -> None:
    """The corpus judged --repeats times, each in a fresh process: the median and the spread."""
    load = os.getloadavg()[0]
    runs: list[Run] = []
    for _ in range(args.repeats):
        runs.append(one_run(args, corpus))
        print(f"{runs[-1].whole:,.0f} decisions re-judged per CPU second (calibration {runs[-1].calibration:.2f} µs)",
              file=sys.stderr)
    figures, chunks = [run.whole for run in runs], [run.chunk for run in runs]
    calibrations = [run.calibration for run in runs]
    middle = statistics.median(figures)
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
          f"end; {args.count:,} requests, --workers {args.workers}, {args.repeats} runs, each in a fresh process")
    print("| decisions re-judged per CPU second | runs | median (lowest-highest, ±half-range) |")
    print("|---|---|---:|")
    print(f"| the whole run (the goal's figure) | {' / '.join(f'{f:,.0f}' for f in figures)} | {spread(figures)} |")
    print(f"| judging only (each run's median chunk) | {' / '.join(f'{f:,.0f}' for f in chunks)} | {spread(chunks)} |")
    print(f"| the machine: calibration, µs a request (lower is faster) | "
          f"{' / '.join(f'{c:.2f}' for c in calibrations)} | {spread(calibrations, '.2f')} |")
    at_middle = scaled(runs, statistics.median(calibrations))
    print(f"| the whole run scaled to the median calibration | {' / '.join(f'{f:,.0f}' for f in at_middle)} "
          f"| {spread(at_middle)} |")
    print(f"goal {GOAL:,} per core: {'met' if middle >= GOAL else 'not met'} by the median ({middle / GOAL:.2f}x)")


def compare(args: argparse.Namespace, corpus: Path) -> None:
    """TREE and this tree, each judging the corpus in a fresh process, in turns: the medians."""
    load = os.getloadavg()[0]
    trees = {"before": args.before.resolve(), "after": None}
    runs: dict[str, list[Run]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(one_run(args, corpus, tree))
            print(f"{name}: {runs[name][-1].whole:,.0f} decisions re-judged per CPU second (calibration "
                  f"{runs[name][-1].calibration:.2f} µs)", file=sys.stderr)
    figures = {name: [run.whole for run in found] for name, found in runs.items()}
    before, after = (statistics.median(figures[name]) for name in trees)
    turns = [a / b for b, a in zip(figures["before"], figures["after"], strict=True)]
    calibrated_turns = [(a.whole * a.calibration) / (b.whole * b.calibration)
                        for b, a in zip(runs["before"], runs["after"], strict=True)]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
          f"end; {args.count:,} requests, --workers {args.workers}, {args.rounds} turns (before, then after), "
          f"each run in a fresh process")
    print("| tree | decisions re-judged per CPU second | runs | median (lowest-highest, ±half-range) |")
    print("|---|---|---|---:|")
    for name, label in (("before", f"before ({args.before})"), ("after", "after (this tree)")):
        chunks = [run.chunk for run in runs[name]]
        calibrations = [run.calibration for run in runs[name]]
        print(f"| {label} | the whole run | {' / '.join(f'{f:,.0f}' for f in figures[name])} "
              f"| {spread(figures[name])} |")
        if all(chunks):
            print(f"| {label} | judging only (the median chunk) | {' / '.join(f'{f:,.0f}' for f in chunks)} "
                  f"| {spread(chunks)} |")
        print(f"| {label} | the machine: calibration, µs a request | {' / '.join(f'{c:.2f}' for c in calibrations)} "
              f"| {spread(calibrations, '.2f')} |")
    print(f"after / before: {after / before:.2f}x on the medians; by turn {' / '.join(f'{t:.2f}x' for t in turns)} "
          f"(median {statistics.median(turns):.2f}x); by turn, each run scaled by its calibration "
          f"{' / '.join(f'{t:.2f}x' for t in calibrated_turns)} (median {statistics.median(calibrated_turns):.2f}x); "
          f"goal {GOAL:,}: {'met' if after >= GOAL else 'not met'} by the median after ({after / GOAL:.2f}x)")


if __name__ == "__main__":
    main()

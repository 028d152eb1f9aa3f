"""Impact and replay on Ray Data: the same judging as the local engine, spread over a cluster.

Files are read in Ray tasks by the local engine's reader (through pyarrow's file systems, so
every node reads its own share from an object store), requests are judged in `map_batches` by
actors that each load the engine once, and only small partial reports come back to be merged
in input order, so that the report is the local engine's, figure for figure. Policy sets
travel by digest: each side's set (two when --new-policies names another checkout) goes in the
actors' arguments keyed by its digest, and an actor loads it from memory and checks that it
rebuilds that digest. Ray is an optional extra: `pip install 'bindpolicy[ray]'`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from engine.decider import Engine
from engine.impact import CHUNK, ImpactReport, Sides, explain_examples, judge_engines, load_shipped, parse_lines
from engine.inputs import JSONL, InputFile, resolve
from engine.versions import PolicySet

if TYPE_CHECKING:
    from engine.decisionlog import Store

# Actors holding every CPU would leave none for the tasks that feed them (Ray Data's file
# listing asks a whole CPU): a deadlock on a small cluster. So readers ask a quarter of a CPU
# and each judging actor half of one (one actor per CPU still: Ray's CPUs are only counted).
READ_CPUS = 0.25
BLOCK_LINES = 5000
ACTOR_CPUS = 0.5
# Actors and readers spread over the nodes (two half-CPU actors would otherwise share one node's CPU).
SPREAD = "SPREAD"
WAIT_FOR_ACTORS_S = 600
INSTALL = "the Ray engine needs Ray: pip install 'bindpolicy[ray]' (or: pip install 'ray[data]>=2.40,<3')"


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def ray_module() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(INSTALL) from exc
    return ray


def connect(address: str | None = None) -> Any:
    """Join the cluster at `address` (`auto`, `ray://head:10001`, `head:6379`), or start a local Ray."""
    # No usage statistics sent by Ray on our behalf (its collector also polls a metrics server).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    ray = ray_module()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # merged in input order: the same examples as local
    # The work starts once every actor of the pool is up, so that it spreads over all of them
    # (else the first actor up, on one node, takes a small job whole).
    context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


class _ImpactJudge:
    """A Ray actor: loads each side's policy set once (shipped by digest, checked against it on
    arrival), then judges batch after batch."""

    def __init__(self, sides: Sides, runtime: str, now: datetime) -> None:
        engines = load_shipped(sides.contents, runtime)
        self.old, self.new = (engines[sides.old_digest], sides.old), (engines[sides.new_digest], sides.new)
        self.labels, self.now = sides.labels, now

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        report = judge_engines(self.old, self.new, parse_lines(str(t) for t in batch["line"]), self.now,
                               labels=self.labels, origins=[str(o) for o in batch["origin"]], explain=False)
        return {"report": np.array([pickle.dumps(report)], dtype=object), "node": np.array([_node()], dtype=object)}


def _node() -> str:
    """The id of the Ray node this runs on (which nodes did the work is said to the user)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _count(nodes: dict[str, int] | None, row: Mapping[str, Any]) -> None:
    if nodes is not None:
        nodes[str(row["node"])] = nodes.get(str(row["node"]), 0) + 1


def _file_rows(rows: bool) -> Callable[[dict[str, Any]], Iterator[dict[str, Any]]]:
    """Read the files named in a batch, in a Ray task, with the local engine's own reader (so the
    same lines come out), a few thousand at a time; `rows`: a log export's rows, for replay."""
    def read(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:

        from engine.inputs import read_lines

        for blob in batch["file"]:
            file: InputFile = pickle.loads(blob)
            chunk: list[tuple[str, str]] = []
            for item in (_export_rows(file) if rows else read_lines(file)):
                chunk.append(item)
                if len(chunk) >= BLOCK_LINES:
                    yield _block(chunk)
                    chunk = []
            if chunk:
                yield _block(chunk)

    return read


def _block(chunk: list[tuple[str, str]]) -> dict[str, Any]:
    import numpy as np

    return {"origin": np.array([o for o, _ in chunk], dtype=object), "line": np.array([t for _, t in chunk],
                                                                                       dtype=object)}


def _export_rows(file: InputFile) -> Iterator[tuple[str, str]]:
    """Every row of an export's part, as JSON text."""
    import orjson
    import pyarrow.parquet as pq

    if file.kind == JSONL:
        with file.filesystem.open_input_stream(file.path) as handle:
            yield from (("", line.decode("utf-8")) for line in handle.read().splitlines() if line.strip())
        return
    with file.filesystem.open_input_file(file.path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=BLOCK_LINES):
            yield from (("", orjson.dumps(row).decode()) for row in batch.to_pylist())


def dataset(files: Sequence[InputFile], *, rows: bool = False) -> Any:
    """One dataset of JSON texts (column `line`) over every file, in order. The files are read in
    Ray tasks (each node reads its share from the object store) by the local engine's reader:
    Ray Data's own file readers list files in a task that asks a whole CPU, which deadlocked a
    small cluster whose CPUs the judging actors held."""
    ray = ray_module()
    names = ray.data.from_items([{"file": pickle.dumps(f)} for f in files], override_num_blocks=len(files))
    return names.map_batches(_file_rows(rows), batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
                             scheduling_strategy=SPREAD)


def run_impact_ray(policies: PolicySet, old: str, new: str, locations: Sequence[str], *,
                   new_policies: PolicySet | None = None, new_label: str | None = None,
                   address: str | None = None, workers: int | None = None, runtime: str = "native",
                   now: datetime | None = None, nodes: dict[str, int] | None = None) -> ImpactReport:
    """Judge every request of `locations` under `old` and `new` (from `new_policies` when given)
    on Ray; the local engine's report, figure for figure. `nodes`, if given, gets how many
    batches each Ray node judged."""
    ray = connect(address)
    files = resolve(locations)
    now = now or datetime.now(UTC)
    started = time.perf_counter()
    sides = Sides.of(policies, old, new, new_policies, new_label)
    actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    judged = dataset(files).map_batches(
        _ImpactJudge, fn_constructor_args=(sides, runtime, now), batch_size=CHUNK,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ACTOR_CPUS,
        scheduling_strategy=SPREAD)
    report = ImpactReport(*sides.labels)
    for row in judged.iter_rows():
        report.merge(pickle.loads(row["report"]))
        _count(nodes, row)
    other = new_policies or policies  # the examples kept, explained once here (not in every batch)
    explain_examples(report, (Engine(policies, runtime=runtime), old), (Engine(other, runtime=runtime), new), now)
    report.seconds = time.perf_counter() - started
    return report


# --- replay -------------------------------------------------------------------------------------------


class _Replayer:
    """A Ray actor: replays rows of a log export, one engine per policy content, built once."""

    def __init__(self, contents: Mapping[str, tuple[str, dict[str, str]]], since: str | None,
                 until: str | None) -> None:
        self.archive = _Contents(contents)
        self.since, self.until = since, until
        self.engines: dict[tuple[str, str], Any] = {}

    def __call__(self, batch: Any) -> dict[str, Any]:
        import numpy as np

        from engine.logexport import record_of
        from engine.replay import ReplaySummary, replay_record

        summary = ReplaySummary()
        rows = [json.loads(str(text)) for text in batch["line"]]
        for row in rows:
            logged_at = row.get("logged_at") or ""
            if (self.since and logged_at < self.since) or (self.until and logged_at >= self.until):
                continue
            summary.add(replay_record(self.archive, record_of(row), self.engines))
        return {"summary": np.array([pickle.dumps(summary)], dtype=object), "node": np.array([_node()], dtype=object)}


class _Contents:
    def __init__(self, contents: Mapping[str, tuple[str, dict[str, str]]]) -> None:
        self.contents = contents

    def policy(self, digest: str) -> tuple[str, dict[str, str]] | None:
        return self.contents.get(digest)


def run_replay_ray(folder: str, *, since: str | None = None, until: str | None = None,
                   address: str | None = None, workers: int | None = None,
                   nodes: dict[str, int] | None = None) -> Any:
    """Replay every record of a log export (within the window) on Ray; the local replay's summary."""
    from engine.decisionlog import log_time
    from engine.logexport import ExportArchive
    from engine.replay import ReplaySummary

    ray = connect(address)
    files = resolve([folder])
    contents = ExportArchive(folder).contents  # by digest: what each actor loads from memory
    actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = [dataset(files, rows=True).map_batches(
        _Replayer, fn_constructor_args=(contents, since and log_time(since), until and log_time(until)),
        batch_size=CHUNK, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=ACTOR_CPUS, scheduling_strategy=SPREAD)] if files else []
    summary = ReplaySummary()
    if not parts:
        return summary
    merged = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    for row in merged.iter_rows():
        summary.merge(pickle.loads(row["summary"]))
        _count(nodes, row)
    return summary


# --- replay straight from the log's database -----------------------------------------------------------

RANGE_RECORDS = 20_000  # records a worker reads and replays at once (a few ranges per actor at least)


@dataclass(frozen=True)
class LogWindow:
    """The seqs `first..last` of a window: one unbroken piece of the chain, as `window_items` reads
    it (from the first record logged at or after `since` to the last before the first logged at
    or after `until`), and whether its first record's link is taken as it is (a window that does
    not start at the log's first record, as the local replay takes it)."""

    first: int
    last: int
    from_first_seen: bool

    def ranges(self, size: int) -> list[tuple[int, int]]:
        return [(start, min(start + size - 1, self.last)) for start in range(self.first, self.last + 1, size)]


def log_window(store: Store, since: str | None, until: str | None) -> LogWindow:
    """Where the window lies in the chain (read by the driver: two indexed look-ups)."""
    first = 1
    if since is not None:
        found = _first_seq(store, since, 0)
        if found is None:
            return LogWindow(1, 0, True)
        first = found
    last = store.head()[0]
    if until is not None:
        beyond = _first_seq(store, until, first - 1)
        if beyond is not None:
            last = beyond - 1
    return LogWindow(first, last, since is not None)


def _first_seq(store: Store, since: str, after: int) -> int | None:
    """The seq of the first record after `after` logged at or after `since`, or None."""
    records = store.scan(since=since, after_seq=after, limit=1)
    try:
        found = next(records, None)
    finally:
        records.close()  # type: ignore[attr-defined]
    return found.seq if found is not None and isinstance(found.seq, int) else None


class _RangeReplayer:
    """A Ray actor: opens the log (read-only, by its URL) once, then reads, checks and replays
    range after range of seqs; the policy contents come from the log's own archive by digest."""

    def __init__(self, url: str, keys: Any, window: LogWindow) -> None:
        from engine.decisionlog import open_store

        self.store = open_store(url, read_only=True, keys=keys)
        self.window = window

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [pickle.dumps(self.replay(int(first), int(last))) for first, last in zip(batch["first"], batch["last"],
                                                                                      strict=True)]
        return {"summary": np.array(out, dtype=object), "node": np.array([_node()] * len(out), dtype=object)}

    def replay(self, first: int, last: int) -> Any:
        """Records `first..last`, each through the chain walk of `log verify` first: the range's first
        link checked against the stored hash of the record before it (the range before checks
        that record), so that the ranges together check every link the local replay checks."""
        from engine.decisionlog import GENESIS, Breach, ChainVerifier
        from engine.replay import ReplaySummary, replay_records

        keys = self.store.keys
        if first == self.window.first:
            verifier = ChainVerifier(keys, from_first_seen=self.window.from_first_seen)
        else:
            before = self.store.hash_at(first - 1) if first > 1 else GENESIS
            if before is None:
                summary = ReplaySummary()
                summary.breach = Breach(first - 1, None, f"record {first - 1} is missing (the next is {first})")
                return summary
            verifier = ChainVerifier(keys, seq=first - 1, prev_hash=before)
        records = self.store.scan(after_seq=first - 1, limit=last - first + 1)
        try:
            return replay_records(self.store, records, verifier)
        finally:
            records.close()  # type: ignore[attr-defined]


def run_replay_log_ray(store: Store, url: str, *, since: str | None = None, until: str | None = None,
                       address: str | None = None, workers: int | None = None, range_records: int | None = None,
                       nodes: dict[str, int] | None = None, progress: Any = None) -> Any:
    """Replay the window straight from the log's database on Ray: the driver finds the window's
    seqs and hands out ranges of them; each worker reads its ranges from the database at `url`
    (so every node must reach it: PostgreSQL, or a SQLite file on a shared or the same disk),
    checks their chain and replays them. The local replay's summary, figure for figure."""
    ray = connect(address)
    window = log_window(store, since, until)
    actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = range_records or range_size(window, actors)
    ranges = window.ranges(size)
    if progress is not None:
        print(f"replaying on Ray: records {window.first:,}..{window.last:,} in {len(ranges)} range(s) of up to "
              f"{size:,}, each read by a worker from {store!r}", file=progress)
    if not ranges:
        return merged_ranges([])
    items = [{"first": first, "last": last} for first, last in ranges]
    replayed = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _RangeReplayer, fn_constructor_args=(url, store.keys, window), batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))), num_cpus=ACTOR_CPUS,
        scheduling_strategy=SPREAD)

    def summaries() -> Iterator[Any]:
        for row in replayed.iter_rows():
            _count(nodes, row)
            yield pickle.loads(row["summary"])

    return merged_ranges(summaries())


def range_size(window: LogWindow, actors: int) -> int:
    """Ranges of RANGE_RECORDS, or smaller for a small window: at least 4 ranges per actor."""
    count = max(0, window.last - window.first + 1)
    return max(1, min(RANGE_RECORDS, -(-count // (4 * actors))))


def merged_ranges(summaries: Iterable[Any]) -> Any:
    """The ranges' summaries, in chain order, as one: up to the first breach, as the local replay
    stops there (nothing after it counts)."""
    from engine.replay import ReplaySummary

    summary = ReplaySummary()
    for part in summaries:
        if summary.breach is None:
            summary.merge(part)
    return summary

"""Impact and replay on Ray Data: the same judging as the local engine, spread over a cluster.

Files are read in Ray tasks by the local engine's reader (through pyarrow's file systems, so
every node reads its own share from an object store), requests are judged in `map_batches` by actors that each load the
engine once, and only small partial reports come back to be merged in input order, so that the
report is the local engine's, figure for figure. Policy sets travel by digest: the driver puts
each content in Ray's object store under its digest, and an actor loads it from memory and
checks that it rebuilds that digest. Ray is an optional extra: `pip install 'bindpolicy[ray]'`.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from engine.decider import Engine
from engine.impact import CHUNK, ImpactReport, judge
from engine.inputs import JSONL, InputFile, resolve
from engine.loader import load_policies
from engine.sources import MemorySource
from engine.versions import PolicySet

# Actors holding every CPU would leave none for the tasks that feed them (Ray Data's file
# listing asks a whole CPU): a deadlock on a small cluster. So readers ask a quarter of a CPU
# and each judging actor half of one (one actor per CPU still: Ray's CPUs are only counted).
READ_CPUS = 0.25
BLOCK_LINES = 5000
ACTOR_CPUS = 0.5
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
    ray = ray_module()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # merged in input order: the same examples as local
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


def ship(policies: Iterable[Any]) -> dict[str, dict[str, str]]:
    """Each version's content by its digest: what the workers load (Ray Data puts the actors'
    arguments in the object store once; a reference inside them would block the actor's start)."""
    return {version.digest: dict(version.sources) for version in policies}


def load_shipped(contents: Mapping[str, Mapping[str, str]], runtime: str, **engine_options: Any) -> Engine:
    """On a worker: one engine over the shipped contents, each checked against its digest."""
    files: dict[str, str] = {}
    for content in contents.values():
        files.update(content)
    policies = load_policies(MemorySource(files, label="shipped policies"))
    loaded = {v.digest for v in policies}
    missing = [d for d in contents if d not in loaded]
    if missing:
        raise RuntimeError(f"shipped policy contents do not rebuild their digests: {missing}")
    return Engine(policies, runtime=runtime, **engine_options)


class _ImpactJudge:
    """A Ray actor: loads the engine once, then judges batch after batch."""

    def __init__(self, contents: Mapping[str, Any], runtime: str, old: str, new: str, now: datetime) -> None:
        self.engine = load_shipped(contents, runtime)
        self.old, self.new, self.now = old, new, now

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        requests = []
        for line in batch["line"]:
            try:
                requests.append(json.loads(line))
            except json.JSONDecodeError:
                requests.append(None)
        report = judge(self.engine, self.old, self.new, requests, self.now)
        return {"report": np.array([pickle.dumps(report)], dtype=object)}


def _file_rows(rows: bool) -> Callable[[dict[str, Any]], Iterator[dict[str, Any]]]:
    """Read the files named in a batch, in a Ray task, with the local engine's own reader (so the
    same lines come out), a few thousand at a time; `rows`: a log export's rows, for replay."""
    def read(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import numpy as np

        from engine.inputs import read_lines

        for blob in batch["file"]:
            file: InputFile = pickle.loads(blob)
            chunk: list[str] = []
            for text in (_export_rows(file) if rows else read_lines(file)):
                chunk.append(text)
                if len(chunk) >= BLOCK_LINES:
                    yield {"line": np.array(chunk, dtype=object)}
                    chunk = []
            if chunk:
                yield {"line": np.array(chunk, dtype=object)}

    return read


def _export_rows(file: InputFile) -> Iterator[str]:
    """Every row of an export's part, as JSON text."""
    import orjson
    import pyarrow.parquet as pq

    if file.kind == JSONL:
        with file.filesystem.open_input_stream(file.path) as handle:
            yield from (line.decode("utf-8") for line in handle.read().splitlines() if line.strip())
        return
    with file.filesystem.open_input_file(file.path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=BLOCK_LINES):
            yield from (orjson.dumps(row).decode() for row in batch.to_pylist())


def dataset(files: Sequence[InputFile], *, rows: bool = False) -> Any:
    """One dataset of JSON texts (column `line`) over every file, in order. The files are read in
    Ray tasks (each node reads its share from the object store) by the local engine's reader:
    Ray Data's own file readers list files in a task that asks a whole CPU, which deadlocked a
    small cluster whose CPUs the judging actors held."""
    ray = ray_module()
    names = ray.data.from_items([{"file": pickle.dumps(f)} for f in files], override_num_blocks=len(files))
    return names.map_batches(_file_rows(rows), batch_size=1, batch_format="numpy", num_cpus=READ_CPUS)


def run_impact_ray(policies: PolicySet, old: str, new: str, locations: Sequence[str], *,
                   address: str | None = None, workers: int | None = None, runtime: str = "native",
                   now: datetime | None = None) -> ImpactReport:
    """Judge every request of `locations` under `old` and `new` on Ray; the local engine's report."""
    ray = connect(address)
    files = resolve(locations)
    now = now or datetime.now(UTC)
    started = time.perf_counter()
    shipped = ship(v for v in policies if v.name in (old, new))
    actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    judged = dataset(files).map_batches(
        _ImpactJudge, fn_constructor_args=(shipped, runtime, old, new, now), batch_size=CHUNK,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ACTOR_CPUS)
    report = ImpactReport(old, new)
    for row in judged.iter_rows():
        report.merge(pickle.loads(row["report"]))
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
        return {"summary": np.array([pickle.dumps(summary)], dtype=object)}


class _Contents:
    def __init__(self, contents: Mapping[str, tuple[str, dict[str, str]]]) -> None:
        self.contents = contents

    def policy(self, digest: str) -> tuple[str, dict[str, str]] | None:
        return self.contents.get(digest)


def run_replay_ray(folder: str, *, since: str | None = None, until: str | None = None,
                   address: str | None = None, workers: int | None = None) -> Any:
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
        num_cpus=ACTOR_CPUS)] if files else []
    summary = ReplaySummary()
    if not parts:
        return summary
    merged = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    for row in merged.iter_rows():
        summary.merge(pickle.loads(row["summary"]))
    return summary

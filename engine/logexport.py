"""The decision log out of its database: day partitions of Parquet or JSON Lines, each record with its chain fields.

An export is a folder: `day=YYYY-MM-DD/part-NNNNN.parquet` (or `.jsonl`) with the records in chain
order, every column of the log (the request and response as the exact JSON text that was hashed,
`prev_hash` and `hash`), `policies.jsonl` with the policy content of every digest the records
name (for replay), and `manifest.json` saying what was written. It streams: one part's rows at
most are in memory, whatever the log's size. A window (`since`, `until`) is one unbroken piece
of the chain: from the first record logged at or after `since` up to the first logged at or
after `until`, so that the piece verifies on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.decisionlog import (
    COLUMNS,
    GENESIS,
    BrokenRecord,
    BrokenRecordError,
    LogRecord,
    Store,
    canonical,
    log_time,
)
from engine.logcheck import VerifyReport, own_checkpoints, read_checkpoints, verify_chain
from engine.logkeys import MacKeyring

EXPORT_FORMAT = "bindpolicy-log-export/1"
MANIFEST = "manifest.json"
POLICY_FILE = "policies.jsonl"
FORMATS = ("parquet", "jsonl")
ROWS_PER_GROUP = 10_000
_TEXT_COLUMNS = ("request", "response")  # kept as the stored JSON text: what the hash covers
_INT_COLUMNS = ("seq", "status", "duration_us")


class ExportError(Exception):
    """An export that cannot be written or read (names the file)."""


@dataclass
class ExportPart:
    path: str  # relative to the export folder
    day: str
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0


@dataclass
class ExportManifest:
    format: str
    file_format: str
    since: str | None
    until: str | None
    exported_at: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_prev_hash: str | None = None
    last_hash: str | None = None
    columns: list[str] = field(default_factory=lambda: list(COLUMNS))
    parts: list[ExportPart] = field(default_factory=list)
    policy_digests: list[str] = field(default_factory=list)
    origin: str | None = None  # the log's (None: exported before logs had one, or from a log without)

    @property
    def whole(self) -> bool:
        """From the log's first record: the chain must start on the genesis hash."""
        return self.since is None

    def describe(self, folder: Path | str) -> str:
        days = sorted({p.day for p in self.parts})
        span = f"seq {self.first_seq}..{self.last_seq}" if self.records else "no records"
        lines = [f"wrote {self.records:,} records ({span}) as {self.file_format} in {len(self.parts)} part(s) "
                 f"over {len(days)} day(s) to {folder}, with {len(self.policy_digests)} policy content(s)"]
        per_day: dict[str, int] = {}
        for part in self.parts:
            per_day[part.day] = per_day.get(part.day, 0) + part.records
        lines += [f"  day={day}: {count:,} records" for day, count in sorted(per_day.items())]
        if self.records:
            lines.append(f"  chain: previous hash {self.first_prev_hash}, head {self.last_hash}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, folder: Path) -> ExportManifest:
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != EXPORT_FORMAT:
                raise ExportError(f"{path}: not a bindpolicy log export (format {data.get('format')!r})")
            parts = [ExportPart(**p) for p in data.pop("parts")]
            return cls(**{**data, "parts": parts})
        except FileNotFoundError:
            raise ExportError(f"{path}: no manifest; is {folder} a log export?") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ExportError(f"{path}: unreadable manifest: {exc}") from exc


def _schema() -> pa.Schema:
    return pa.schema([(name, pa.int64() if name in _INT_COLUMNS else pa.string()) for name in COLUMNS])


def _row(record: LogRecord) -> dict[str, Any]:
    row = record.to_dict()
    row["request"], row["response"] = record.request_text, record.response_text
    return row


class _PartWriter:
    """One part file being written; rows go out a row group at a time."""

    def __init__(self, folder: Path, part: ExportPart, file_format: str) -> None:
        self.part = part
        path = folder / part.path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.file_format = file_format
        if file_format == "parquet":
            self.parquet: pq.ParquetWriter | None = pq.ParquetWriter(path, _schema(), compression="zstd")
            self.text = None
        else:
            self.parquet = None
            self.text = open(path, "wb")  # noqa: SIM115 - closed in close()

    def add(self, record: LogRecord) -> None:
        if not self.part.records:
            self.part.first_seq = record.seq
        self.part.records += 1
        self.part.last_seq = record.seq
        self.rows.append(_row(record))
        if len(self.rows) >= ROWS_PER_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self.parquet is not None:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=_schema()))
        elif self.text is not None:
            self.text.write(b"".join(orjson.dumps(row) + b"\n" for row in self.rows))
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self.parquet is not None:
            self.parquet.close()
        if self.text is not None:
            self.text.close()


def window(store: Store, since: str | None, until: str | None) -> Iterator[LogRecord]:
    """The records of a window as one unbroken piece of the chain, streamed in chain order
    (BrokenRecordError at a record that cannot be read)."""
    for item in window_items(store, since, until):
        if isinstance(item, BrokenRecord):
            raise BrokenRecordError(item)
        yield item


def window_items(store: Store, since: str | None, until: str | None) -> Iterator[LogRecord | BrokenRecord]:
    """As `window`, with a record that cannot be read in its place (for a check to name it)."""
    after = 0
    if since is not None:
        first = store.query(since=since, limit=1)
        found = next(first, None)
        _close(first)
        if found is None:
            return
        after = found.seq - 1
    limit = log_time(until) if until is not None else None
    records = store.scan(after_seq=after)
    try:
        for record in records:
            if limit is not None and isinstance(record, LogRecord) and record.logged_at >= limit:
                return
            yield record
    finally:
        _close(records)


def _close(records: Iterator[Any]) -> None:
    """End a query's generator now, so that its connection closes now."""
    close = getattr(records, "close", None)
    if close is not None:
        close()


def export_log(store: Store, folder: Path | str, *, since: str | None = None, until: str | None = None,
               file_format: str = "parquet") -> ExportManifest:
    """Write the log (or a window of it) to `folder`, which must not hold anything yet."""
    if file_format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}")
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder: export into a new one")
    out.mkdir(parents=True, exist_ok=True)
    manifest = ExportManifest(EXPORT_FORMAT, file_format, since and log_time(since), until and log_time(until),
                              log_time(datetime.now(UTC)), origin=store.origin())
    parts_per_day: dict[str, int] = {}
    digests: set[str] = set()
    writer: _PartWriter | None = None
    try:
        for record in window(store, since, until):
            day = record.logged_at[:10]
            if writer is None or writer.part.day != day:
                # Records come in chain order; near midnight days may alternate (replicas' clocks,
                # commit order): each run of one day gets its own part, so a part is one piece of chain.
                if writer is not None:
                    writer.close()
                number = parts_per_day.get(day, 0)
                parts_per_day[day] = number + 1
                part = ExportPart(f"day={day}/part-{number:05d}.{file_format}", day)
                manifest.parts.append(part)
                writer = _PartWriter(out, part, file_format)
            writer.add(record)
            if record.policy_digest:
                digests.add(record.policy_digest)
            if not manifest.records:
                manifest.first_seq, manifest.first_prev_hash = record.seq, record.prev_hash
            manifest.records += 1
            manifest.last_seq, manifest.last_hash = record.seq, record.hash
    finally:
        if writer is not None:
            writer.close()
    with open(out / POLICY_FILE, "w", encoding="utf-8") as policies:
        for digest in sorted(digests):
            stored = store.policy(digest)
            if stored is not None:
                policies.write(canonical({"digest": digest, "version": stored[0], "files": stored[1]}) + "\n")
                manifest.policy_digests.append(digest)
    (out / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


# --- reading an export -------------------------------------------------------------------------------


def is_export(path: Path | str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_rows(folder: Path | str, columns: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of an export in chain order, streamed a row group at a time."""
    root = Path(folder)
    manifest = ExportManifest.read(root)
    wanted = list(columns) if columns is not None else None
    for part in sorted(manifest.parts, key=lambda p: p.first_seq):
        path = root / part.path
        try:
            if manifest.file_format == "parquet":
                for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_GROUP, columns=wanted):
                    yield from batch.to_pylist()
            else:
                with open(path, "rb") as lines:
                    for number, line in enumerate(lines, start=1):
                        try:
                            row = orjson.loads(line)
                        except orjson.JSONDecodeError as exc:
                            raise ExportError(f"{path}:{number}: not JSON: {exc}") from exc
                        yield row if wanted is None else {k: row.get(k) for k in wanted}
        except (OSError, pa.ArrowException) as exc:
            raise ExportError(f"{path}: {exc}") from exc


def record_of(row: dict[str, Any], *, parse: bool = True) -> LogRecord:
    """A log record from an exported row; `parse=False` leaves the request and response as text."""
    values: dict[str, Any] = {name: row.get(name) for name in COLUMNS}
    try:
        values["request_text"], values["response_text"] = values["request"], values["response"]
        if parse:
            values["request"] = json.loads(values["request"])
            values["response"] = json.loads(values["response"])
        return LogRecord(**values)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"record {row.get('seq')}: unreadable: {exc}") from exc


def read_records(folder: Path | str, *, parse: bool = True) -> Iterator[LogRecord]:
    for row in read_rows(folder):
        yield record_of(row, parse=parse)


class ExportArchive:
    """The policy contents an export carries, by digest (what replay needs from the database)."""

    def __init__(self, folder: Path | str) -> None:
        self.contents: dict[str, tuple[str, dict[str, str]]] = {}
        path = Path(folder) / POLICY_FILE
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    item = json.loads(line)
                    self.contents[item["digest"]] = (item["version"], item["files"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ExportError(f"{path}:{number}: unreadable policy content: {exc}") from exc

    def policy(self, digest: str) -> tuple[str, dict[str, str]] | None:
        return self.contents.get(digest)


def verify_export(folder: Path | str, keys: MacKeyring | None = None, checkpoint_dir: Path | str | None = None,
                  public_keys: dict[str, Any] | None = None) -> VerifyReport:
    """Check an export on its own, with the walk of `log verify` (engine.logcheck.verify_chain):
    every part listed, every link, hash or MAC (with `keys`), the ends against the manifest, and,
    for an export from the log's first record, each signed checkpoint it reaches."""
    root = Path(folder)
    manifest = ExportManifest.read(root)
    report = VerifyReport()
    listed = {p.path for p in manifest.parts}
    present = {p.relative_to(root).as_posix() for p in root.glob(f"day=*/*.{manifest.file_format}")}
    report.problems += [f"part {p} is in the manifest but not in the folder" for p in sorted(listed - present)]
    report.problems += [f"part {p} is in the folder but not in the manifest" for p in sorted(present - listed)]
    if report.problems:
        return report
    first_seq = 1 if manifest.whole else manifest.first_seq
    if not manifest.records or first_seq is None:
        return report
    # A checkpoint can be compared from the genesis only, and only up to the export's end.
    # Another log's checkpoints are named as such (an export that names no origin, made before
    # logs had one, is compared with every checkpoint, as it was).
    found = read_checkpoints(checkpoint_dir, public_keys or {}, report)
    if manifest.origin is not None:
        found = own_checkpoints(found, manifest.origin, checkpoint_dir, report)
    pending = [c for c in found
               if manifest.whole and manifest.last_seq is not None and c.tree_size <= manifest.last_seq]
    verifier = verify_chain(read_records(root, parse=False), keys, report, pending, seq=first_seq - 1,
                            prev_hash=GENESIS if manifest.whole else manifest.first_prev_hash or "")
    if report.breach is None:
        if report.records != manifest.records:
            report.problems.append(f"the manifest says {manifest.records} records; the parts hold {report.records}")
        elif verifier.prev_hash != manifest.last_hash:
            report.problems.append(f"the last record's hash is not the manifest's head {manifest.last_hash}")
    return report

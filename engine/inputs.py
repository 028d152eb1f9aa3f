"""Requests to judge again, from files: JSON Lines, Parquet, or a log export, on local disk or an object store.

Every path goes through pyarrow's file systems, so `s3://bucket/prefix`, `gs://...` and
`hdfs://...` read like local folders. A folder is read whole (its `.jsonl` and `.parquet` files,
sorted by name), unless it holds a log export's manifest: then its parts are read in chain order,
the decided records only, each request judged at the time it was logged (its `at`, or the `at` of
its answer when it came without one). A Parquet file either has a `request` column of JSON text
(an export's part, or any table written that way) or one request per row, field by field.
Everything comes out as one JSON text per request, streamed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.decisionlog import canonical
from engine.errors import InputError as InputError  # its home is the error family; readers import it from here too
from engine.lines import NamedLines, named_blocks

JSONL, PARQUET = "jsonl", "parquet"
SUFFIXES = {".jsonl": JSONL, ".ndjson": JSONL, ".json": JSONL, ".parquet": PARQUET}
MANIFEST = "manifest.json"
BATCH_ROWS = 5000


@dataclass(frozen=True)
class InputFile:
    filesystem: pafs.FileSystem
    path: str
    kind: str  # JSONL or PARQUET
    logged: bool  # a log export's part: keep decided records, judged at their logged time
    name: str = ""  # as reports show it (relative to the working folder, named where it was resolved)


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        if "://" in location:
            fs, path = pafs.FileSystem.from_uri(location)
            return fs, path
        return pafs.LocalFileSystem(), os.path.abspath(location)
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(f"{location}: {exc}") from exc


def resolve(locations: Sequence[str]) -> list[InputFile]:
    """The files behind the given paths or URLs, in the order they will be read."""
    files: list[InputFile] = []
    for location in locations:
        fs, path = _filesystem(location)
        try:
            info = fs.get_file_info(path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{location}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{location}: no such file or folder")
        if info.type == pafs.FileType.File:
            kind = _kind(path)
            if kind is None:
                raise InputError(f"{location}: not a .jsonl or .parquet file")
            files.append(InputFile(fs, path, kind, logged=False, name=_shown(fs, path)))
            continue
        manifest = path.rstrip("/") + "/" + MANIFEST
        if fs.get_file_info(manifest).type == pafs.FileType.File:
            files += _export_parts(fs, path.rstrip("/"), manifest)
            continue
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        inside = sorted(i.path for i in found if i.type == pafs.FileType.File and _kind(i.path))
        if not inside:
            raise InputError(f"{location}: no .jsonl or .parquet file in this folder")
        files += [InputFile(fs, p, _kind(p) or JSONL, logged=False, name=_shown(fs, p)) for p in inside]
    return files


def _kind(path: str) -> str | None:
    lower = path.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if lower.endswith(suffix)), None)


def _export_parts(fs: pafs.FileSystem, root: str, manifest_path: str) -> list[InputFile]:
    try:
        with fs.open_input_stream(manifest_path) as stream:
            manifest = json.loads(stream.read())
        parts = sorted(manifest["parts"], key=lambda p: p["first_seq"])
        kind = manifest["file_format"]
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{manifest_path}: unreadable export manifest: {exc}") from exc
    return [InputFile(fs, f"{root}/{p['path']}", kind, logged=True, name=_shown(fs, f"{root}/{p['path']}"))
            for p in parts]


def judged_request(request_text: str, response_text: str | None) -> str:
    """A logged request as it was judged: with the `at` of its answer when it came without one."""
    if response_text is None or '"at":' in request_text:  # canonical JSON: only the top level is exactly "at"
        return request_text
    try:
        judged_at = json.loads(response_text).get("at")
        return request_text if judged_at is None else canonical({**json.loads(request_text), "at": judged_at})
    except (ValueError, AttributeError, TypeError):
        return request_text


def lines_of_rows(rows: list[dict[str, Any]], logged: bool, name: str = "",
                  first_row: int = 1) -> list[tuple[str, str]]:
    """(where, JSON text) per request, from Parquet rows (a `request` column of text, or one request
    per row); `where` is the file's name and the row's number (and a logged record's seq)."""
    out = []
    for number, row in enumerate(rows, start=first_row):
        if logged and row.get("outcome") != "decided":
            continue
        where = f"{name} row {number}" + (f" (seq {row.get('seq')})" if logged and "seq" in row else "")
        request = row.get("request") if "request" in row else None
        if isinstance(request, str):
            out.append((where, judged_request(request, row.get("response") if isinstance(row.get("response"), str)
                                              else None)))
        else:
            out.append((where, orjson.dumps(row, default=str).decode()))
    return out


def _shown(filesystem: pafs.FileSystem, path: str) -> str:
    """A file's name as reports show it: relative to the working folder when inside it."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def read_lines(file: InputFile) -> Iterator[tuple[str, str]]:
    """(where, JSON text) for each request of a file, streamed: `file:line` for JSON Lines,
    `file row N` for Parquet (with the seq of a logged record)."""
    name = file.name or file.path
    try:
        if file.kind == PARQUET:
            with file.filesystem.open_input_file(file.path) as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                columns = [c for c in ("seq", "request", "response", "outcome") if c in names] \
                    if "request" in names else None
                row = 1
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    yield from lines_of_rows(batch.to_pylist(), file.logged, name, row)
                    row += batch.num_rows
            return
        with file.filesystem.open_input_stream(file.path) as handle:
            for number, raw in enumerate(io.TextIOWrapper(handle, encoding="utf-8", errors="replace"), start=1):
                if not raw.strip():
                    continue
                if not file.logged:
                    yield f"{name}:{number}", raw
                    continue
                try:
                    row = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    yield f"{name}:{number}", raw  # judged as bad input, as any other broken line
                    continue
                for _, text in lines_of_rows([row], logged=True):
                    yield f"{name}:{number} (seq {row.get('seq')})", text
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{file.name}: {exc}") from exc


def numbered_lines(locations: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(where, JSON text) for every request of every path, in order."""
    for file in resolve(locations):
        yield from read_lines(file)


def request_blocks(locations: Sequence[str]) -> Iterator[tuple[str, str] | NamedLines]:
    """numbered_lines, but each JSON Lines file (not a log export's part) as blocks of its lines'
    bytes (NamedLines, each line at `file:N` as numbered_lines names it, blank ones skipped):
    what `bindpolicy impact` reads, so that no line is decoded and encoded again before orjson
    reads it (engine/impact.py's parsed reads bytes that are not UTF-8 as this text reading would,
    replaced)."""
    for file in resolve(locations):
        if file.kind != JSONL or file.logged:
            yield from read_lines(file)
            continue
        try:
            with file.filesystem.open_input_stream(file.path) as handle:
                yield from named_blocks(file.name or file.path, handle)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{file.name}: {exc}") from exc


def request_lines(locations: Sequence[str]) -> Iterator[str]:
    """Every request of every path, in order, as JSON text."""
    for _, text in numbered_lines(locations):
        yield text

"""The decision log: every decision and rejection, committed before it is answered, hash-chained.

One interface (`DecisionLog.write_many`), two stores (SQLite, the embedded default, and
PostgreSQL, chosen by a database URL). Writes from the threads of a process are grouped: the
first waiting thread commits whatever has queued up in one transaction, so that a commit's
cost is shared. Each record carries a hash over its content and the previous record's hash;
`verify` walks the chain.

Durability: a record is committed before its decision is answered. SQLite runs in WAL mode
with `synchronous=NORMAL` by default, which survives a killed process (the tests SIGKILL the
server) but may lose the last commits on power loss; `synchronous=FULL`
(BINDPOLICY_SQLITE_SYNCHRONOUS) fsyncs every group commit as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import orjson

from engine.versions import parse_timestamp

GENESIS = "0" * 64
COLUMNS = ("seq", "decision_id", "logged_at", "outcome", "status", "action", "decision", "rule_id",
           "shop_id", "account_id", "policy_version", "policy_digest", "runtime", "duration_us",
           "request", "response", "prev_hash", "hash")
FILTERS = ("since", "until", "action", "decision", "rule_id", "shop_id", "account_id", "outcome")


class LogError(Exception):
    """The log could not commit or read: no decision may be answered without its record."""


@dataclass(frozen=True)
class LogRecord:
    """One decision or rejection as logged."""

    decision_id: str
    logged_at: str
    outcome: str  # "decided", "rejected" (bad input), or "failed" (a bug of ours, answered 500)
    status: int  # the HTTP status answered (200, 400...)
    request: Any  # the request as received (the raw text when it was not JSON)
    response: Any
    duration_us: int
    action: str | None = None
    decision: str | None = None
    rule_id: str | None = None
    shop_id: str | None = None
    account_id: str | None = None
    policy_version: str | None = None
    policy_digest: str | None = None
    runtime: str | None = None
    seq: int = 0  # set by the store: position in the chain
    prev_hash: str = ""
    hash: str = ""
    # The request and response as stored (canonical JSON), made once: what the hash covers.
    request_text: str = field(default="", repr=False)
    response_text: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.request_text:
            object.__setattr__(self, "request_text", canonical(self.request))
        if not self.response_text:
            object.__setattr__(self, "response_text", canonical(self.response))

    def content(self) -> str:
        """What the hash covers: every field but the hashes, request and response as stored."""
        meta = {name: getattr(self, name) for name in COLUMNS if name not in _NOT_META}
        return canonical(meta) + "\n" + self.request_text + "\n" + self.response_text

    def chained(self, seq: int, prev_hash: str) -> LogRecord:
        record = replace(self, seq=seq, prev_hash=prev_hash)
        object.__setattr__(record, "hash", record_hash(record.content(), prev_hash))  # still being made
        return record

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}


_NOT_META = frozenset({"request", "response", "prev_hash", "hash"})


def canonical(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is: the bytes that are stored and hashed."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # integers beyond 64 bits: the standard library's encoder gives the same form
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(content: str, prev_hash: str) -> str:
    return hashlib.sha256((prev_hash + content).encode("utf-8")).hexdigest()


def new_record(*, decision_id: str, outcome: str, status: int, request: Any, response: Any,
               duration_us: int, logged_at: datetime | None = None) -> LogRecord:
    """A record with its index fields taken from the request and response."""
    req = request if isinstance(request, dict) else {}
    shop, account = req.get("shop"), req.get("account")
    rule = response.get("rule") if isinstance(response, dict) else None
    policy = response.get("policy") if isinstance(response, dict) else None
    return LogRecord(
        decision_id=decision_id,
        logged_at=log_time(logged_at or datetime.now(UTC)),
        outcome=outcome, status=status, request=request, response=response, duration_us=duration_us,
        action=_text(req.get("action")),
        decision=_text(response.get("decision")) if isinstance(response, dict) else None,
        rule_id=_text(rule.get("id")) if isinstance(rule, dict) else None,
        shop_id=_text(shop.get("id")) if isinstance(shop, dict) else None,
        account_id=_text(account.get("id")) if isinstance(account, dict) else None,
        policy_version=_text(policy.get("version")) if isinstance(policy, dict) else None,
        policy_digest=_text(policy.get("digest")) if isinstance(policy, dict) else None,
        runtime=_text(policy.get("runtime")) if isinstance(policy, dict) else None)


def log_time(moment: datetime | str) -> str:
    """Times as the log writes them, always with microseconds, so that they sort as text."""
    if isinstance(moment, str):
        moment = parse_timestamp(moment)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class DecisionLog(Protocol):
    """What the service needs to write: records, returned once committed (chained)."""

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]: ...


@dataclass
class Breach:
    """The first place where the chain does not hold."""

    seq: int
    decision_id: str | None
    problem: str


@dataclass
class _Pending:
    record: LogRecord
    done: bool = False  # guarded by the store's condition
    result: LogRecord | None = None
    error: BaseException | None = None


class Store:
    """The shared logic of both stores: group commit, the chain, queries, verification."""

    placeholder = "?"

    def __init__(self, *, max_batch: int = 256, timeout: float = 10.0) -> None:
        self.max_batch = max_batch
        self.timeout = timeout
        self._queue: list[_Pending] = []
        self._ready = threading.Condition()
        self._leading = False  # a thread is committing a batch right now
        self._conn: Any = None  # the leader's connection (one leader at a time)
        self.last_error: Exception | None = None  # of the last commit; None once one succeeds
        self.batches = 0  # committed transactions, for the metrics and the tests
        self.records = 0

    # --- to implement ---------------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin_exclusive(self, conn: Any) -> None:
        raise NotImplementedError

    def _end_exclusive(self) -> None:
        """Called once the transaction begun by _begin_exclusive has committed or rolled back."""

    @contextlib.contextmanager
    def _exclusive(self, conn: Any) -> Iterator[None]:
        """A write transaction under the log's write lock: committed, or rolled back on error."""
        self._begin_exclusive(conn)
        try:
            yield
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            self._end_exclusive()

    def _schema(self) -> Sequence[str]:
        raise NotImplementedError

    # --- writing --------------------------------------------------------------------------------
    def write(self, record: LogRecord) -> LogRecord:
        """Queue the record and wait until its transaction has committed."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        """Queue records (one decision, or a batch's) and return once all have committed.

        Group commit, leader and followers: the first waiting thread commits everything queued
        in one transaction, the others wait for it; there is no extra thread to hand over to.
        """
        pendings = [_Pending(r) for r in records]
        deadline = time.monotonic() + self.timeout
        with self._ready:
            self._queue.extend(pendings)
        while True:
            with self._ready:
                while not all(p.done for p in pendings) and self._leading:
                    if not self._ready.wait(max(0.0, deadline - time.monotonic())):
                        # Take back what no leader has taken yet: it will not be committed
                        # after its caller was told it failed. (A batch already being
                        # committed cannot be taken back; it is committed or not as a whole.)
                        self._queue = [p for p in self._queue if p not in pendings]
                        raise LogError("the decision log did not commit in time")
                if all(p.done for p in pendings):
                    break
                self._leading = True
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                self._commit(batch)
            finally:
                with self._ready:
                    self._leading = False
                    self._ready.notify_all()
        failed = next((p.error for p in pendings if p.error is not None), None)
        if failed is not None:
            raise LogError(f"the decision log could not commit: {failed}") from failed
        return [p.result for p in pendings if p.result is not None]

    def _commit(self, batch: list[_Pending]) -> None:
        """As the leader: one transaction for the batch; every waiter hears how it went. If the
        group fails, each record is tried alone, so that one bad record does not sink the rest."""
        groups = [batch]
        while groups:
            group = groups.pop(0)
            try:
                if self._conn is None:
                    self._conn = self._connect()
                results = self._append(self._conn, [p.record for p in group])
            except Exception as exc:
                if self._conn is not None:
                    self._close_quietly(self._conn)
                self._conn = None  # the next try reconnects
                if len(group) > 1:
                    groups[:0] = [[pending] for pending in group]
                    continue
                self.last_error = exc
                group[0].error = exc
                continue
            self.last_error = None
            for pending, result in zip(group, results, strict=True):
                pending.result = result
        with self._ready:
            for pending in batch:
                pending.done = True

    # --- policy contents, kept by digest so that any past decision can be replayed --------------
    def save_policy(self, digest: str, version: str, files: dict[str, str]) -> None:
        conn = self._connect()
        try:
            found = conn.execute(f"SELECT 1 FROM policy_contents WHERE digest = {self.placeholder}",
                                 (digest,)).fetchone()
            if not found:
                conn.execute(f"INSERT INTO policy_contents (digest, version, files, first_served) VALUES "
                             f"({self.placeholder}, {self.placeholder}, {self.placeholder}, {self.placeholder})",
                             (digest, version, canonical(files),
                              datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")))
            conn.commit()
        except Exception:
            conn.rollback()
            if self.policy(digest) is None:  # another worker may have saved it first
                raise
        finally:
            conn.close()

    def policy(self, digest: str) -> tuple[str, dict[str, str]] | None:
        """(version, {file name: text}) of a policy version ever served, by its digest."""
        conn = self._connect()
        try:
            row = conn.execute(f"SELECT version, files FROM policy_contents WHERE digest = {self.placeholder}",
                               (digest,)).fetchone()
        finally:
            conn.close()
        return (row[0], json.loads(row[1])) if row else None

    def _append(self, conn: Any, records: list[LogRecord]) -> list[LogRecord]:
        """One transaction: read the chain's head, chain the records on, commit."""
        with self._exclusive(conn):
            row = conn.execute("SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0], row[1]) if row else (0, GENESIS)
            chained = []
            for record in records:
                seq += 1
                record = record.chained(seq, prev)
                prev = record.hash
                chained.append(record)
            marks = ", ".join([self.placeholder] * len(COLUMNS))
            sql = f"INSERT INTO decisions ({', '.join(COLUMNS)}) VALUES ({marks})"
            rows = [self._row(r) for r in chained]
            (conn if hasattr(conn, "executemany") else conn.cursor()).executemany(sql, rows)
        self.batches += 1
        self.records += len(chained)
        return chained

    @staticmethod
    def _row(record: LogRecord) -> tuple[Any, ...]:
        stored = {"request": record.request_text, "response": record.response_text}
        return tuple(stored[c] if c in stored else getattr(record, c) for c in COLUMNS)

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        with self._ready:
            if self._conn is not None:
                self._close_quietly(self._conn)
                self._conn = None

    # --- reading --------------------------------------------------------------------------------
    def _record(self, row: Sequence[Any]) -> LogRecord:
        values = dict(zip(COLUMNS, row, strict=True))
        values["request_text"], values["response_text"] = values["request"], values["response"]
        values["request"] = json.loads(values["request"])
        values["response"] = json.loads(values["response"])
        return LogRecord(**values)

    def get(self, decision_id: str) -> LogRecord | None:
        conn = self._connect()
        try:
            row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE decision_id = "
                               f"{self.placeholder}", (decision_id,)).fetchone()
        finally:
            conn.close()
        return self._record(row) if row else None

    def query(self, *, limit: int | None = None, after_seq: int = 0, **filters: str | None) -> Iterator[LogRecord]:
        """Records in chain order, filtered (since/until on logged_at; equality on the rest)."""
        where: list[str] = ["seq > " + self.placeholder]
        args: list[Any] = [after_seq]
        for name, value in filters.items():
            if value is None:
                continue
            if name not in FILTERS:
                raise ValueError(f"unknown filter {name}")
            if name in ("since", "until"):
                where.append(f"logged_at {'>=' if name == 'since' else '<'} {self.placeholder}")
                value = log_time(value)
            else:
                where.append(f"{name} = {self.placeholder}")
            args.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        conn = self._connect()
        try:
            for row in self._stream(conn, sql, tuple(args)):
                yield self._record(row)
        finally:
            conn.close()

    def requests(self, since: str | None = None, until: str | None = None) -> Iterator[str]:
        """Every decided request as JSON text, in log order, streamed (for impact). A request
        that came without `at` gets the `at` it was judged at, so that it is judged again then."""
        sql = "SELECT request, response FROM decisions WHERE outcome = 'decided'"
        args: list[Any] = []
        if since is not None:
            sql += f" AND logged_at >= {self.placeholder}"
            args.append(log_time(since))
        if until is not None:
            sql += f" AND logged_at < {self.placeholder}"
            args.append(log_time(until))
        conn = self._connect()
        try:
            for text, response in self._stream(conn, sql + " ORDER BY seq", tuple(args)):
                judged_at = None if '"at":' in text else json.loads(response).get("at")
                # (canonical JSON: only the top-level field is named exactly "at")
                yield text if judged_at is None else canonical({**json.loads(text), "at": judged_at})
        finally:
            conn.close()

    def tail(self, count: int) -> list[LogRecord]:
        conn = self._connect()
        try:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM decisions ORDER BY seq DESC LIMIT "
                                f"{int(count)}").fetchall()
        finally:
            conn.close()
        return [self._record(r) for r in reversed(rows)]

    def verify(self, records: Iterable[LogRecord] | None = None) -> Breach | None:
        """Walk the chain; the first record altered, removed or inserted, or None if it holds.

        Without `records`, the whole log from its first record, which must be record 1 on the
        genesis hash; with them (say the tail), from wherever they start. Records removed from
        the very end leave no trace in the chain: keep the head (`/readyz` shows it) to know.
        """
        whole = records is None
        expected_seq: int | None = 1 if whole else None
        prev: str | None = GENESIS if whole else None
        for record in records if records is not None else self.query():
            if expected_seq is None:
                expected_seq, prev = record.seq, record.prev_hash
            if record.seq != expected_seq:
                return Breach(expected_seq, None, f"record {expected_seq} is missing (the next is {record.seq})")
            if record.prev_hash != prev:
                return Breach(record.seq, record.decision_id,
                              "its previous-hash does not match the record before it (removed or inserted)")
            if record_hash(record.content(), record.prev_hash) != record.hash:
                return Breach(record.seq, record.decision_id, "its content does not match its hash (altered)")
            expected_seq, prev = record.seq + 1, record.hash
        return None

    def writable(self) -> bool:
        """Can the log take writes: the database answers and accepts writes. No lock is taken,
        so that readiness never waits on a commit (`last_error` tells how the last one went)."""
        try:
            conn = self._connect()
            try:
                return self._accepts_writes(conn)
            finally:
                conn.close()
        except Exception:
            return False

    def _accepts_writes(self, conn: Any) -> bool:
        raise NotImplementedError

    def _stream(self, conn: Any, sql: str, args: tuple[Any, ...]) -> Iterable[Sequence[Any]]:
        """Rows as they come (a million logged decisions never sit in memory at once)."""
        rows: Iterable[Sequence[Any]] = conn.execute(sql, args)  # SQLite's cursor steps through the file
        return rows

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record: (0, genesis) for an empty log."""
        last = self.tail(1)
        return (last[0].seq, last[0].hash) if last else (0, GENESIS)

    def init(self) -> None:
        """Create the tables if need be; the workers of a service all do it at once, so under the
        write lock (PostgreSQL's CREATE ... IF NOT EXISTS is not safe against itself)."""
        conn = self._connect()
        try:
            with self._exclusive(conn):
                for statement in self._schema():
                    conn.execute(statement)
        finally:
            conn.close()


# Each index costs every write: time, shop and account (the auditors' lookups) are indexed;
# action, decision and rule have few values, and a query on them scans a time range.
_INDEXES = [f"CREATE INDEX IF NOT EXISTS decisions_{c} ON decisions ({c})"
            for c in ("logged_at", "shop_id", "account_id")]


_POLICY_TABLE = """CREATE TABLE IF NOT EXISTS policy_contents (
    digest TEXT PRIMARY KEY, version TEXT NOT NULL, files TEXT NOT NULL, first_served TEXT NOT NULL)"""


def _tables(big_int: str) -> list[str]:
    """The log's tables and indexes; the stores differ only in the name of a 64-bit integer."""
    return [f"""CREATE TABLE IF NOT EXISTS decisions (
        seq {big_int} PRIMARY KEY, decision_id TEXT NOT NULL UNIQUE, logged_at TEXT NOT NULL,
        outcome TEXT NOT NULL, status INTEGER NOT NULL, action TEXT, decision TEXT, rule_id TEXT,
        shop_id TEXT, account_id TEXT, policy_version TEXT, policy_digest TEXT, runtime TEXT,
        duration_us {big_int} NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""", *_INDEXES, _POLICY_TABLE]


class SQLiteStore(Store):
    """The embedded default: one SQLite file in WAL mode (survives a killed process)."""

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        # Writers of every process take this lock before SQLite's: the kernel hands it over at
        # once, where SQLite's own busy handler would sleep and poll.
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+b")  # noqa: SIM115
        self.init()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        return _SQLiteConnection(conn)  # type: ignore[return-value]

    def _begin_exclusive(self, conn: Any) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            raise

    def _end_exclusive(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _accepts_writes(self, conn: Any) -> bool:
        conn.execute("SELECT 1 FROM decisions LIMIT 1").fetchone()
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    def _schema(self) -> Sequence[str]:
        return _tables("INTEGER")

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path})"


class _SQLiteConnection:
    """sqlite3 in autocommit mode, with commit/rollback that end an explicit BEGIN."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)

    def commit(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()


class PostgresStore(Store):
    """PostgreSQL, chosen by a postgresql:// URL; an advisory lock keeps the chain in order."""

    placeholder = "%s"
    LOCK = 7_242_001

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.init()

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=False)

    def _begin_exclusive(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK,))

    def _accepts_writes(self, conn: Any) -> bool:
        row = conn.execute("SHOW transaction_read_only").fetchone()
        return bool(row) and row[0] == "off"

    def _stream(self, conn: Any, sql: str, args: tuple[Any, ...]) -> Iterable[Sequence[Any]]:
        cursor = conn.cursor(name="bindpolicy_stream")  # server side: fetched 2000 rows at a time
        cursor.itersize = 2000
        cursor.execute(sql, args)
        return cast(Iterable[Sequence[Any]], cursor)

    def _schema(self) -> Sequence[str]:
        return _tables("BIGINT")

    def __repr__(self) -> str:
        return "PostgresStore(" + self.url.split("@")[-1] + ")"


SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")


def open_store(url: str) -> Store:
    """`sqlite:///path/to/file.db` (or a plain path) or `postgresql://...`.

    For SQLite, BINDPOLICY_SQLITE_SYNCHRONOUS picks NORMAL (the default: survives a killed
    process), FULL or EXTRA (survive power loss too, an fsync per group commit).
    """
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if "://" in url and not url.startswith("sqlite:///"):
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://")
    synchronous = os.environ.get("BINDPOLICY_SQLITE_SYNCHRONOUS", "NORMAL").upper()
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"BINDPOLICY_SQLITE_SYNCHRONOUS must be one of {', '.join(SYNCHRONOUS)}")
    return SQLiteStore(url.removeprefix("sqlite:///"), synchronous=synchronous)

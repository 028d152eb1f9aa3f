"""The decision log: every decision and rejection, committed before it is answered, hash-chained.

One interface (`DecisionLog.write`), two stores (SQLite, the embedded default, and
PostgreSQL, chosen by a database URL). Writes from the threads of a process are grouped:
one writer thread commits whatever has queued up in one transaction, so that durability
does not cost one fsync per decision. Each record carries a hash over its content and the
previous record's hash; `verify` walks the chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

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
    outcome: str  # "decided" or "rejected"
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

    def content(self) -> dict[str, Any]:
        """What the hash covers: everything but the hashes themselves."""
        out = asdict(self)
        del out["prev_hash"], out["hash"]
        return out

    def chained(self, seq: int, prev_hash: str) -> LogRecord:
        record = replace(self, seq=seq, prev_hash=prev_hash)
        return replace(record, hash=record_hash(record.content(), prev_hash))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(content: dict[str, Any], prev_hash: str) -> str:
    return hashlib.sha256((prev_hash + canonical(content)).encode("utf-8")).hexdigest()


def new_record(*, decision_id: str, outcome: str, status: int, request: Any, response: Any,
               duration_us: int, logged_at: datetime | None = None) -> LogRecord:
    """A record with its index fields taken from the request and response."""
    req = request if isinstance(request, dict) else {}
    shop, account = req.get("shop"), req.get("account")
    rule = response.get("rule") if isinstance(response, dict) else None
    policy = response.get("policy") if isinstance(response, dict) else None
    return LogRecord(
        decision_id=decision_id,
        logged_at=(logged_at or datetime.now(UTC)).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        outcome=outcome, status=status, request=request, response=response, duration_us=duration_us,
        action=_text(req.get("action")),
        decision=_text(response.get("decision")) if isinstance(response, dict) else None,
        rule_id=_text(rule.get("id")) if isinstance(rule, dict) else None,
        shop_id=_text(shop.get("id")) if isinstance(shop, dict) else None,
        account_id=_text(account.get("id")) if isinstance(account, dict) else None,
        policy_version=_text(policy.get("version")) if isinstance(policy, dict) else None,
        policy_digest=_text(policy.get("digest")) if isinstance(policy, dict) else None,
        runtime=_text(policy.get("runtime")) if isinstance(policy, dict) else None)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class DecisionLog(Protocol):
    """What the service needs of a log: a write that returns once the record is committed."""

    def write(self, record: LogRecord) -> LogRecord: ...


@dataclass
class Breach:
    """The first place where the chain does not hold."""

    seq: int
    decision_id: str | None
    problem: str


@dataclass
class _Pending:
    record: LogRecord
    done: threading.Event = field(default_factory=threading.Event)
    result: LogRecord | None = None
    error: BaseException | None = None


class Store:
    """The shared logic of both stores: group commit, the chain, queries, verification."""

    placeholder = "?"

    def __init__(self, *, max_batch: int = 256, timeout: float = 10.0) -> None:
        self.max_batch = max_batch
        self.timeout = timeout
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # committed transactions, for the metrics and the tests
        self.records = 0

    # --- to implement ---------------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin_exclusive(self, conn: Any) -> None:
        raise NotImplementedError

    def _schema(self) -> Sequence[str]:
        raise NotImplementedError

    # --- writing --------------------------------------------------------------------------------
    def write(self, record: LogRecord) -> LogRecord:
        """Queue the record and wait until its transaction has committed."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        """Queue records together (a batch of decisions) and wait until all have committed."""
        self._ensure_writer()
        pendings = [_Pending(r) for r in records]
        for pending in pendings:
            self._queue.put(pending)
        results = []
        for pending in pendings:
            if not pending.done.wait(self.timeout):
                raise LogError("the decision log did not commit in time")
            if pending.error is not None or pending.result is None:
                raise LogError(f"the decision log could not commit: {pending.error}") from pending.error
            results.append(pending.result)
        return results

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

    def _ensure_writer(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            with self._lock:
                if self._writer is None or not self._writer.is_alive():
                    self._writer = threading.Thread(target=self._write_loop, name="decision-log", daemon=True)
                    self._writer.start()

    def _write_loop(self) -> None:
        conn = None
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                if conn is None:
                    conn = self._connect()
                results = self._append(conn, [p.record for p in batch])
            except BaseException as exc:  # every waiter hears of it; the next batch reconnects
                for pending in batch:
                    pending.error = exc
                    pending.done.set()
                if conn is not None:
                    self._close_quietly(conn)
                conn = None
                continue
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()
        if conn is not None:
            self._close_quietly(conn)

    def _append(self, conn: Any, records: list[LogRecord]) -> list[LogRecord]:
        """One transaction: read the chain's head, chain the records on, commit."""
        self._begin_exclusive(conn)
        try:
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
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        self.batches += 1
        self.records += len(chained)
        return chained

    @staticmethod
    def _row(record: LogRecord) -> tuple[Any, ...]:
        values = record.to_dict()
        values["request"] = canonical(values["request"])
        values["response"] = canonical(values["response"])
        return tuple(values[c] for c in COLUMNS)

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=5)

    # --- reading --------------------------------------------------------------------------------
    def _record(self, row: Sequence[Any]) -> LogRecord:
        values = dict(zip(COLUMNS, row, strict=True))
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
            if name == "since":
                where.append(f"logged_at >= {self.placeholder}")
            elif name == "until":
                where.append(f"logged_at < {self.placeholder}")
            else:
                where.append(f"{name} = {self.placeholder}")
            args.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        conn = self._connect()
        try:
            for row in conn.execute(sql, tuple(args)):
                yield self._record(row)
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
        """Walk the chain; the first record altered, removed or inserted, or None if it holds."""
        expected_seq, prev = None, None
        for record in records if records is not None else self.query():
            if expected_seq is None:
                expected_seq, prev = record.seq, record.prev_hash
                if record.seq == 1 and record.prev_hash != GENESIS:
                    return Breach(record.seq, record.decision_id, "the first record does not start the chain")
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
        """Can the log take a write right now (a probe transaction, rolled back)."""
        try:
            conn = self._connect()
            try:
                self._begin_exclusive(conn)
                conn.rollback()
            finally:
                conn.close()
        except Exception:
            return False
        return True

    def init(self) -> None:
        conn = self._connect()
        try:
            for statement in self._schema():
                conn.execute(statement)
            conn.commit()
        finally:
            conn.close()


_INDEXES = [f"CREATE INDEX IF NOT EXISTS decisions_{c} ON decisions ({c})"
            for c in ("logged_at", "action", "decision", "rule_id", "shop_id", "account_id")]


_POLICY_TABLE = """CREATE TABLE IF NOT EXISTS policy_contents (
    digest TEXT PRIMARY KEY, version TEXT NOT NULL, files TEXT NOT NULL, first_served TEXT NOT NULL)"""


class SQLiteStore(Store):
    """The embedded default: one SQLite file in WAL mode (survives a killed process)."""

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self.init()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        return _SQLiteConnection(conn)  # type: ignore[return-value]

    def _begin_exclusive(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _schema(self) -> Sequence[str]:
        return ["""CREATE TABLE IF NOT EXISTS decisions (
            seq INTEGER PRIMARY KEY, decision_id TEXT NOT NULL UNIQUE, logged_at TEXT NOT NULL,
            outcome TEXT NOT NULL, status INTEGER NOT NULL, action TEXT, decision TEXT, rule_id TEXT,
            shop_id TEXT, account_id TEXT, policy_version TEXT, policy_digest TEXT, runtime TEXT,
            duration_us INTEGER NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
            prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""", *_INDEXES, _POLICY_TABLE]

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

    def _schema(self) -> Sequence[str]:
        return ["""CREATE TABLE IF NOT EXISTS decisions (
            seq BIGINT PRIMARY KEY, decision_id TEXT NOT NULL UNIQUE, logged_at TEXT NOT NULL,
            outcome TEXT NOT NULL, status INTEGER NOT NULL, action TEXT, decision TEXT, rule_id TEXT,
            shop_id TEXT, account_id TEXT, policy_version TEXT, policy_digest TEXT, runtime TEXT,
            duration_us BIGINT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
            prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""", *_INDEXES, _POLICY_TABLE]

    def __repr__(self) -> str:
        return "PostgresStore(" + self.url.split("@")[-1] + ")"


def open_store(url: str) -> Store:
    """`sqlite:///path/to/file.db` (or a plain path) or `postgresql://...`."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])
    if "://" in url:
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://")
    return SQLiteStore(url)

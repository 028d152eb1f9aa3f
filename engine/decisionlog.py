"""The decision log: every decision and rejection, committed before it is answered, hash-chained.

One interface (`DecisionLog.write_many`), two stores (SQLite, the embedded default, and
PostgreSQL, chosen by a database URL). Writes from the threads of a process are grouped: the
first waiting thread commits whatever has queued up in one transaction, so that a commit's
cost is shared; the records of one call (a batch's) commit together or not at all. Each record
carries a MAC (HMAC-SHA256 under a key from configuration, see `engine.logkeys`) over its
content and the previous record's MAC; logs written without a key, and older ones, carry a
plain SHA-256 instead. `ChainVerifier` walks the chain; `engine.logcheck` adds checkpoints.

Reading never trusts a row: a cell of the wrong type or that is not JSON is a `BrokenRecord`
naming the record, never an exception; a store opened `read_only` creates nothing (no table,
no lock file) and says so if the log's table is missing.

Durability: a record is committed before its decision is answered. SQLite runs in WAL mode
with `synchronous=NORMAL` by default, which survives a killed process (the tests SIGKILL the
server) but may lose the last commits on power loss; `synchronous=FULL`
(BINDPOLICY_SQLITE_SYNCHRONOUS) fsyncs every group commit as well. On PostgreSQL a write returns
once the WAL holding its records is flushed, which is waited for after the chain's lock is
given back (see PostgresStore._OPEN).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import operator
import os
import select
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import orjson

from engine.logkeys import MAC_PREFIX, MacKeyring
from engine.merkle import Frontier, leaf_hash
from engine.versions import parse_timestamp

GENESIS = "0" * 64
COLUMNS = ("seq", "decision_id", "logged_at", "outcome", "status", "action", "decision", "rule_id",
           "shop_id", "account_id", "policy_version", "policy_digest", "runtime", "duration_us",
           "request", "response", "prev_hash", "hash")
FILTERS = ("since", "until", "action", "decision", "rule_id", "shop_id", "account_id", "outcome")
INDEXED_MAX = 512  # characters of an indexed field; longer (or with NUL) is kept in the request only
Condition = tuple[str, str, Any]  # (column, operator, value) of a query on the log


class LogError(Exception):
    """The log could not commit or read: no decision may be answered without its record."""


class MissingTableError(LogError):
    """The database holds no decision log (read-only stores never create one)."""


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
        return _content(self.__dict__)

    def chained(self, seq: int, prev_hash: str, keys: MacKeyring | None = None) -> LogRecord:
        return _linked(self, seq, prev_hash, keys.current.mac if keys is not None else None)

    def leaf(self) -> bytes:
        """Its leaf hash in the log's Merkle tree: over its content, keyless, so anyone can check it."""
        return leaf_hash(self.content().encode("utf-8"))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}


_INSERT = f"INSERT INTO decisions ({', '.join(COLUMNS)}) VALUES "  # then each row's values
_NOT_META = frozenset({"request", "response", "prev_hash", "hash"})
_META = tuple(sorted(name for name in COLUMNS if name not in _NOT_META))  # what content() writes, in order


def _meta(fields: dict[str, Any]) -> dict[str, Any]:
    """A record's metadata, its keys in _META's order (one dict display: about half the cost of
    building it from _META by zip, and content() is taken once a record is chained and once by
    the log's watch)."""
    return {"account_id": fields["account_id"], "action": fields["action"], "decision": fields["decision"],
            "decision_id": fields["decision_id"], "duration_us": fields["duration_us"],
            "logged_at": fields["logged_at"], "outcome": fields["outcome"],
            "policy_digest": fields["policy_digest"], "policy_version": fields["policy_version"],
            "rule_id": fields["rule_id"], "runtime": fields["runtime"], "seq": fields["seq"],
            "shop_id": fields["shop_id"], "status": fields["status"]}


assert tuple(_meta(dict.fromkeys(COLUMNS))) == _META  # (a column added to COLUMNS must be added here too)


def _meta_text(fields: dict[str, Any]) -> str:
    """A record's metadata as its content writes it: canonical JSON (sorted already)."""
    meta = _meta(fields)
    try:
        return orjson.dumps(meta).decode()
    except TypeError:  # an integer beyond 64 bits: canonical's other way, the same form
        return canonical(meta)


def _content(fields: dict[str, Any]) -> str:
    """What the hash covers (LogRecord.content), from a record's fields."""
    return f"{_meta_text(fields)}\n{fields['request_text']}\n{fields['response_text']}"


def _linked(record: LogRecord, seq: int, prev_hash: str, mac: Callable[[str], str] | None) -> LogRecord:
    """The record at its place in the chain (LogRecord.chained; `mac`: the current key's, None for
    plain SHA-256): a copy of its fields (dataclasses.replace would run __init__ again: a tenth of
    a batched decision's CPU), its place, and its hash over the previous hash and its content."""
    copy = _new_object(type(record))
    values = copy.__dict__
    values.update(record.__dict__)
    values["seq"], values["prev_hash"] = seq, prev_hash
    values["hash"] = _digest(prev_hash + _content(values), mac)
    return copy


def _digest(text: str, mac: Callable[[str], str] | None) -> str:
    return mac(text) if mac is not None else _sha256(text.encode("utf-8")).hexdigest()


_new_object = object.__new__
_sha256 = hashlib.sha256
# A record's row as stored: every column, the request and response as their stored text.
_STORED_COLUMNS = operator.attrgetter(*(f"{c}_text" if c in ("request", "response") else c for c in COLUMNS))


_HEAD = "SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1"  # the chain's head: (seq, hash)


def canonical(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is: the bytes that are stored and hashed."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # integers beyond 64 bits: the standard library's encoder gives the same form
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(content: str, prev_hash: str, keys: MacKeyring | None = None) -> str:
    """The MAC under the current key (`hmac-sha256:<key id>:<hex>`), or plain SHA-256 (hex) without one."""
    return _digest(prev_hash + content, keys.current.mac if keys is not None else None)


def hash_problem(record: LogRecord, keys: MacKeyring | None, keyed_before: bool,
                 content: str | None = None) -> str | None:
    # (`keyed_before`: the record before was keyed; a keyed log never goes back to plain hashes)
    """What is wrong with the record's own hash or MAC, or None. A MAC without `keys` is not
    checked here (the links and the checkpoints still are). `content`: record.content(), made
    already."""
    text = record.prev_hash + (record.content() if content is None else content)
    if record.hash.startswith(MAC_PREFIX):
        if keys is None:
            return None
        kid = record.hash[len(MAC_PREFIX):].split(":", 1)[0]
        key = keys.get(kid)
        if key is None:
            return f"its MAC names key {kid}, which is not among the keys given (a rotated key left out, or forged)"
        return None if hmac.compare_digest(key.mac(text), record.hash) else "its content does not match its MAC " \
                                                                             "(altered)"
    if keyed_before:
        return "an unkeyed record after keyed ones (the chain was re-made without the key)"
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != record.hash:
        return "its content does not match its hash (altered)"
    return None


def new_record(*, decision_id: str, outcome: str, status: int, request: Any, response: Any,
               duration_us: int, logged_at: datetime | None = None, request_text: str = "",
               logged_text: str = "", policy_digest: str | None = None) -> LogRecord:
    """A record with its index fields taken from the request and response; `request_text`, if
    given, is what is stored of the request (the body's exact bytes), else its canonical JSON;
    `logged_text`, if given, is its time as log_time wrote it already (a batch's records share
    one); `policy_digest`, if given, is the digest of what judged a request no version took."""
    req = request if isinstance(request, dict) else {}
    shop, account = req.get("shop"), req.get("account")
    answer = response if isinstance(response, dict) else {}
    rule, policy = answer.get("rule"), answer.get("policy")
    if not isinstance(policy, dict):
        policy = {}
    # Made as the dataclass would make it, without its __init__ (a frozen dataclass sets each of
    # its 20 fields through object.__setattr__: a tenth of a batched decision's CPU).
    record = object.__new__(LogRecord)
    _set_attribute(record, "__dict__", {  # (its own dict, not a copy of one)
        "decision_id": decision_id,
        "logged_at": logged_text or log_time(logged_at or datetime.now(UTC)),
        "outcome": outcome, "status": status, "request": request, "response": response, "duration_us": duration_us,
        "action": _indexed(req.get("action")),
        "decision": _indexed(answer.get("decision")),
        "rule_id": _indexed(rule.get("id")) if isinstance(rule, dict) else None,
        "shop_id": _indexed(shop.get("id")) if isinstance(shop, dict) else None,
        "account_id": _indexed(account.get("id")) if isinstance(account, dict) else None,
        "policy_version": _indexed(policy.get("version")),
        "policy_digest": _indexed(policy.get("digest")) if policy_digest is None else policy_digest,
        "runtime": _indexed(policy.get("runtime")),
        "seq": 0, "prev_hash": "", "hash": "",
        "request_text": request_text or canonical(request), "response_text": canonical(response)})
    return record


_set_attribute = object.__setattr__


def log_time(moment: datetime | str) -> str:
    """Times as the log writes them, always with microseconds, so that they sort as text."""
    if isinstance(moment, str):
        moment = parse_timestamp(moment)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _indexed(value: Any) -> str | None:
    """A value for an indexed column: every store takes it (PostgreSQL refuses NUL in text, and
    a btree entry past about 2.7 kB). Anything else is kept in the request only."""
    if not isinstance(value, str) or len(value) > INDEXED_MAX or "\0" in value:
        return None
    return value


class DecisionLog(Protocol):
    """What the service needs to write: records, returned once committed (chained)."""

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]: ...


@dataclass
class Breach:
    """The first place where the log does not hold."""

    seq: int
    decision_id: str | None
    problem: str

    def describe(self) -> str:
        return (f"record {self.seq}" + (f" ({self.decision_id})" if self.decision_id else "")
                + f": {self.problem}")


@dataclass(frozen=True)
class BrokenRecord:
    """A stored row that cannot be read as a record: which one, and why."""

    seq: Any
    decision_id: Any
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "decision_id": self.decision_id, "broken": self.problem}


class BrokenRecordError(LogError):
    """A record that was asked for cannot be read."""

    def __init__(self, broken: BrokenRecord) -> None:
        super().__init__(f"record {broken.seq} ({broken.decision_id}) cannot be read: {broken.problem}")
        self.broken = broken


_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int, "decision_id": str, "logged_at": str, "outcome": str, "status": int, "duration_us": int,
    "request": str, "response": str, "prev_hash": str, "hash": str}


_KINDS = tuple((name, _TYPES.get(name, (str, type(None)))) for name in COLUMNS)


def parse_cell(text: str) -> Any:
    """A stored JSON cell: exact numbers (the standard library), and no RecursionError for deep
    nesting (orjson takes up to 1024 levels without the stack; deeper is a ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        return orjson.loads(text)


def record_from_row(row: Sequence[Any], *, parse: bool = True) -> LogRecord | BrokenRecord:
    """A row as a record, or what makes it unreadable; never an exception. Without `parse`, the
    request and response are left as stored text (None as values): enough to check the chain,
    whose hashes cover the stored text, at a fraction of the cost."""
    values = dict(zip(COLUMNS, row, strict=True))
    kinds = tuple(map(type, row))
    # The common row in one look-up and one encoding (each running watch reads every new record):
    # its cells' types, a set seen valid before, and no cell holding a lone surrogate (its text
    # cells taken by the positions kept for those types, in C: a Python step per cell was a
    # quarter of the watch's reading).
    texts = _VALID_KINDS.get(kinds)
    if texts is None or _has_surrogate("".join(texts(row))):
        broken = _row_problem(values)
        if broken is not None:
            return broken
        _VALID_KINDS[kinds] = _text_cells(kinds)
    request_text, response_text = values["request"], values["response"]
    values["request"] = values["response"] = None
    for name, text in (("request", request_text), ("response", response_text)) if parse else ():
        try:
            values[name] = parse_cell(text)
        except ValueError as exc:
            return BrokenRecord(values["seq"], values["decision_id"], f"its {name} is not JSON ({str(exc)[:120]})")
    # (an empty text is taken as __post_init__ takes it)
    values["request_text"] = request_text or canonical(values["request"])
    values["response_text"] = response_text or canonical(values["response"])
    # All its fields, as __init__ would set them, at a fraction of the cost: the row's dict becomes
    # the record's own (the log's watch reads every new record back, and the sweep older ones).
    record = object.__new__(LogRecord)
    _set_attribute(record, "__dict__", values)
    return record


# The types of each cell of rows found valid (few: a few nulls), and how to take their text cells.
_VALID_KINDS: dict[tuple[type, ...], Callable[[Sequence[Any]], Iterable[str]]] = {}


def _text_cells(kinds: tuple[type, ...]) -> Callable[[Sequence[Any]], Iterable[str]]:
    at = [number for number, kind in enumerate(kinds) if kind is str]
    if len(at) > 1:
        return operator.itemgetter(*at)
    return lambda row: [row[number] for number in at]


def _row_problem(values: dict[str, Any]) -> BrokenRecord | None:
    """What makes a row unreadable before its JSON is read: a cell of the wrong type, or text
    that is not valid Unicode."""
    seq, decision_id = values["seq"], values["decision_id"]
    for name, kind in _KINDS:
        value = values[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return BrokenRecord(seq, decision_id, f"its {name} is {type(value).__name__}, not "
                                f"{getattr(kind, '__name__', 'text or null')}")
        # (a surrogate is not ASCII: ASCII text, most cells, is known as such without a scan)
        if isinstance(value, str) and not value.isascii() and _has_surrogate(value):
            return BrokenRecord(seq, decision_id, f"its {name} holds text that is not valid Unicode")
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ChainVerifier:
    """Takes records in order and says where the chain first fails to hold.

    From the genesis (`seq=0`) it also builds the Merkle frontier of the log, for checkpoints;
    `from_first_seen` starts wherever the first record fed starts (a tail), without one.
    """

    def __init__(self, keys: MacKeyring | None = None, *, seq: int = 0, prev_hash: str = GENESIS,
                 frontier: Frontier | None = None, from_first_seen: bool = False) -> None:
        self.keys = keys
        self.seq, self.prev_hash = seq, prev_hash
        # The tree is built from the genesis, or carried on from a frontier of `seq` records.
        self.frontier = frontier if frontier is not None or seq or from_first_seen else Frontier()
        self._started = not from_first_seen
        self.keyed = self.unkeyed = self.unchecked = 0  # records by kind of hash, for the report
        self.first_keyed: int | None = None

    def feed(self, item: LogRecord | BrokenRecord) -> Breach | None:
        if isinstance(item, BrokenRecord):
            return Breach(item.seq if isinstance(item.seq, int) else self.seq + 1,
                          item.decision_id if isinstance(item.decision_id, str) else None, item.problem)
        record = item
        if not self._started:
            self._started, self.seq, self.prev_hash = True, record.seq - 1, record.prev_hash
        if record.seq != self.seq + 1:
            if record.seq > self.seq + 1:
                return Breach(self.seq + 1, None, f"record {self.seq + 1} is missing (the next is {record.seq})")
            return Breach(record.seq, record.decision_id, f"out of order after record {self.seq}")
        if record.prev_hash != self.prev_hash:
            return Breach(record.seq, record.decision_id,
                          "its previous-hash does not match the record before it (removed or inserted)")
        content = record.content()  # (once: its hash, then its leaf)
        problem = hash_problem(record, self.keys, record.prev_hash.startswith(MAC_PREFIX), content)
        if problem is not None:
            return Breach(record.seq, record.decision_id, problem)
        if record.hash.startswith(MAC_PREFIX):
            self.keyed += 1
            self.unchecked += self.keys is None
            if self.first_keyed is None:
                self.first_keyed = record.seq
        else:
            self.unkeyed += 1
        if self.frontier is not None:
            self.frontier.append(leaf_hash(content.encode("utf-8")))  # (record.leaf())
        self.seq, self.prev_hash = record.seq, record.hash
        return None


def _held_lock() -> Any:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class _Pending:
    """One caller's records: committed together, or not at all."""

    records: Sequence[LogRecord]
    done: bool = False  # guarded by the store's lock
    leads: bool = False  # its caller commits the next group (guarded by the store's lock)
    results: list[LogRecord] | None = None
    error: BaseException | None = None
    # Held from the start; released when the caller is done or its turn to lead comes. A bare
    # lock: a threading.Event (a Condition, a new lock for each wait, a list of waiters, all in
    # Python) cost each call about a twentieth of the store's own CPU in the profile.
    wake: Any = field(default_factory=_held_lock)

    def woken(self) -> None:
        """Wake its caller (once: a caller found leading after its wait timed out is woken again
        with its group)."""
        try:
            self.wake.release()
        except RuntimeError:  # (released already, not taken back since)
            return


class Store:
    """The shared logic of both stores: group commit, the chain, queries, verification."""

    placeholder = "?"

    def __init__(self, *, max_batch: int = 256, timeout: float = 10.0, keys: MacKeyring | None = None,
                 read_only: bool = False) -> None:
        self.max_batch = max_batch
        self.timeout = timeout
        self.keys = keys  # the MAC keys: the first chains new records
        self.read_only = read_only
        self._queue: list[_Pending] = []
        self._ready = threading.Condition()
        self._leading = False  # a thread is committing a batch right now
        self._conn: Any = None  # the leader's connection (one leader at a time)
        self.last_error: Exception | None = None  # of the last commit; None once one succeeds
        self.last_error_at: float | None = None
        self._probed_at = 0.0
        self.batches = 0  # committed transactions, for the metrics and the tests
        self.records = 0
        self._origin: tuple[str | None] | None = None  # (the log's origin,) once read

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
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        finally:
            self._end_exclusive()

    def _schema(self) -> Sequence[str]:
        raise NotImplementedError

    def _has_table(self, conn: Any, name: str) -> bool:
        raise NotImplementedError

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        """A connection for reading; whatever the database says becomes a LogError (so the
        service answers 503, and the audit commands exit 2 saying what could not be read)."""
        conn = None
        try:
            conn = self._connect()
            yield conn
        except LogError:
            raise
        except Exception as exc:
            raise LogError(f"the decision log cannot be read: {type(exc).__name__}: {exc}") from exc
        finally:
            if conn is not None:
                self._close_quietly(conn)

    def check_readable(self) -> None:
        """MissingTableError if there is no log here (a read-only store never makes one)."""
        with self._reading() as conn:
            if not self._has_table(conn, "decisions"):
                raise MissingTableError(f"{self!r} holds no decision log (no 'decisions' table)")

    # --- writing --------------------------------------------------------------------------------
    def write(self, record: LogRecord) -> LogRecord:
        """Queue the record and wait until its transaction has committed."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        """Queue records (one decision, or a batch's) and return once all have committed; they
        commit together or not at all.

        Group commit, leader and followers: the first waiting thread commits everything queued
        in one transaction, the others wait for it; there is no extra thread to hand over to.
        """
        if self.read_only:
            raise LogError("this decision log was opened read-only")
        pending = _Pending(records)
        deadline = time.monotonic() + self.timeout
        with self._ready:
            self._queue.append(pending)
            if not self._leading:  # (the queue was empty: this caller is its first)
                self._leading = pending.leads = True
        while not pending.leads and not pending.done:
            if not pending.wake.acquire(True, max(0.0, deadline - time.monotonic())):
                with self._ready:
                    if pending.leads or pending.done:
                        break
                    # Take back what no leader has taken yet: it will not be committed
                    # after its caller was told it failed. (A group already being
                    # committed cannot be taken back; it is committed or not as a whole.)
                    self._queue = [p for p in self._queue if p is not pending]
                    raise LogError("the decision log did not commit in time")
        if not pending.done:
            self._lead()
        if pending.error is not None:
            raise LogError(f"the decision log could not commit: {pending.error}") from pending.error
        return pending.results or []

    def settle(self) -> None:
        """Make every commit seen so far durable, before anything is signed about the log (its
        watch's checkpoints): nothing to do where a commit is durable once it is seen."""

    def _hold(self, conn: Any) -> None:
        """Take the log's write lock for the leader's first append to find held (see _lead)."""

    def _release_unused(self) -> None:
        """Give back the lock _hold took where no append used it."""

    def _lead(self) -> None:
        """The write lock first, then the group: the leader takes the lock (_hold: waiting while
        another process commits) and only then takes the callers queued, so that those who came
        while it waited commit with it, in one transaction, instead of waiting for the next (one
        more lock handed between the processes, one more wake-up, and with PostgreSQL one more
        flush). If the lock cannot be taken here, _append takes it as before and says what went
        wrong."""
        try:
            if self._conn is None:
                self._conn = self._connect()
            self._hold(self._conn)
        except Exception:
            if self._conn is not None:
                self._close_quietly(self._conn)
            self._conn = None
        try:
            self._lead_group()
        finally:
            self._release_unused()

    def _lead_group(self) -> None:
        """Commit the group at the head of the queue (this caller's first), then hand over: the
        next caller in the queue leads, woken alone; each caller of the group is woken alone. (A
        condition's notify_all woke every waiting thread at every commit, to find most of them
        not done yet: under load, more thread switches than commits.)"""
        with self._ready:
            group, self._queue = self._take(self._queue)
        try:
            self._commit(group)
        finally:
            with self._ready:
                for pending in group:
                    if not pending.done:  # (the commit itself raised)
                        pending.done, pending.error = True, pending.error or LogError("the group commit failed")
                if self._queue:
                    self._queue[0].leads = True
                    self._queue[0].woken()
                else:
                    self._leading = False
                    self._ready.notify_all()  # (a close waiting for the commit to end)
            for pending in group:
                pending.woken()

    def _take(self, queue: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """Whole callers, up to max_batch records (at least one caller)."""
        count = 0
        for index, pending in enumerate(queue):
            count += len(pending.records)
            if count > self.max_batch and index > 0:
                return queue[:index], queue[index:]
        return queue, []

    def _commit(self, group: list[_Pending]) -> None:
        """As the leader: one transaction for the group; every waiter hears how it went. If the
        group fails, each caller's records are tried alone, so that one bad record does not
        sink the others, and never commits part of its own caller's."""
        tries = [group]
        while tries:
            attempt = tries.pop(0)
            try:
                if self._conn is None:
                    self._conn = self._connect()
                results = self._append(self._conn, [r for p in attempt for r in p.records])
            except Exception as exc:
                if self._conn is not None:
                    self._close_quietly(self._conn)
                self._conn = None  # the next try reconnects
                if len(attempt) > 1:
                    tries[:0] = [[pending] for pending in attempt]
                    continue
                self._failed(exc)
                attempt[0].error = exc
                continue
            self.last_error = None
            start = 0
            for pending in attempt:
                pending.results = results[start:start + len(pending.records)]
                start += len(pending.records)
        with self._ready:
            for pending in group:
                pending.done = True

    def _failed(self, exc: Exception) -> None:
        self.last_error, self.last_error_at = exc, time.monotonic()

    def commits_ok(self, probe_every: float = 1.0) -> bool:
        """Readiness from the commits themselves: True if the last one went through. After a
        failure, a real commit (one row of `log_probe`) is tried at most every `probe_every`
        seconds, so that the service becomes ready again once the database takes writes,
        even while no traffic comes to prove it."""
        if self.last_error is None:
            return True
        now = time.monotonic()
        if now - self._probed_at < probe_every:
            return False
        self._probed_at = now
        try:
            conn = self._connect()
            try:
                with self._exclusive(conn):  # a record's worth of new space, given back at once
                    p = self.placeholder
                    conn.execute(f"INSERT INTO log_probe (id, probed_at) VALUES (2, {p})", ("x" * 8192,))
                    conn.execute("DELETE FROM log_probe WHERE id = 2")
                    conn.execute(f"UPDATE log_probe SET probed_at = {p} WHERE id = 1", (log_time(datetime.now(UTC)),))
            finally:
                self._close_quietly(conn)
        except Exception as exc:
            self._failed(exc)
            return False
        self.last_error = None
        return True

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
        """(version, {file name: text}) of a policy version ever served, by its digest; a
        stored row that is not that shape is a LogError naming the digest."""
        with self._reading() as conn:
            row = conn.execute(f"SELECT version, files FROM policy_contents WHERE digest = {self.placeholder}",
                               (digest,)).fetchone()
        if row is None:
            return None
        try:
            files = parse_cell(row[1]) if isinstance(row[1], str) else None
        except ValueError:
            files = None
        if not isinstance(row[0], str) or not isinstance(files, dict) or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise LogError(f"the stored policy content {digest} cannot be read (not a version and its files)")
        return row[0], files

    def _append(self, conn: Any, records: list[LogRecord]) -> list[LogRecord]:
        """One transaction: read the chain's head, chain the records on, commit."""
        with self._exclusive(conn):
            chained = self._chain(records, conn.execute(_HEAD).fetchone())
            (conn if hasattr(conn, "executemany") else conn.cursor()).executemany(
                self._insert(), [self._row(r) for r in chained])
            self._with_rows(conn, chained)
        self.batches += 1
        self.records += len(chained)
        return chained

    def _with_rows(self, conn: Any, chained: list[LogRecord]) -> None:
        """Whatever else the transaction that adds these rows writes (SQLite: see LOOKUP_EVERY)."""

    def _chain(self, records: list[LogRecord], head: Sequence[Any] | None) -> list[LogRecord]:
        """The records chained on after the head (seq, hash) read under the write lock (the
        current key's MAC looked up once for the group)."""
        seq, prev = (head[0], head[1]) if head else (0, GENESIS)
        mac = self.keys.current.mac if self.keys is not None else None
        chained = []
        for record in records:
            seq += 1
            record = _linked(record, seq, prev, mac)
            prev = record.hash
            chained.append(record)
        return chained

    def _insert(self) -> str:
        """The INSERT of a record's columns, with their placeholders."""
        return _INSERT + "(" + ", ".join([self.placeholder] * len(COLUMNS)) + ")"

    @staticmethod
    def _row(record: LogRecord) -> tuple[Any, ...]:
        return _STORED_COLUMNS(record)

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        with self._ready:
            # Not under a commit in flight: its connection is in use in libpq's C code (the GIL
            # released), where closing it would free what that call is using.
            self._ready.wait_for(lambda: not self._leading, timeout=self.timeout)
            if self._conn is not None:
                self._close_quietly(self._conn)
                self._conn = None

    # --- reading --------------------------------------------------------------------------------
    def get(self, decision_id: str) -> LogRecord | None:
        """One record; BrokenRecordError if it is stored but cannot be read."""
        with self._reading() as conn:
            rows = list(self._rows(conn, COLUMNS, [("decision_id", "=", decision_id)], 1))
        if not rows:
            return None
        record = record_from_row(rows[0])
        if isinstance(record, BrokenRecord):
            raise BrokenRecordError(record)
        return record

    def scan(self, *, limit: int | None = None, after_seq: int = 0,
             **filters: str | None) -> Iterator[LogRecord | BrokenRecord]:
        """Records in chain order, filtered (since/until on logged_at; equality on the rest);
        a row that cannot be read comes as a BrokenRecord, in its place."""
        return self._scan(limit, after_seq, filters, parse=True)

    def scan_stored(self, *, limit: int | None = None, after_seq: int = 0) -> Iterator[LogRecord | BrokenRecord]:
        """As `scan`, the request and response left as stored text (see record_from_row): enough
        to check the chain, at a fraction of the cost."""
        return self._scan(limit, after_seq, {}, parse=False)

    def _scan(self, limit: int | None, after_seq: int, filters: dict[str, str | None], *,
              parse: bool) -> Iterator[LogRecord | BrokenRecord]:
        where: list[Condition] = [("seq", ">", after_seq)]
        for name, value in filters.items():
            if value is None:
                continue
            if name not in FILTERS:
                raise ValueError(f"unknown filter {name}")
            if name in ("since", "until"):
                where.append(("logged_at", ">=" if name == "since" else "<", log_time(value)))
            else:
                where.append((name, "=", value))
        with self._reading() as conn:
            for row in self._rows(conn, COLUMNS, where, limit):
                yield record_from_row(row, parse=parse)

    def query(self, *, limit: int | None = None, after_seq: int = 0, **filters: str | None) -> Iterator[LogRecord]:
        """As `scan`, but a record that cannot be read is a BrokenRecordError."""
        for item in self.scan(limit=limit, after_seq=after_seq, **filters):
            if isinstance(item, BrokenRecord):
                raise BrokenRecordError(item)
            yield item

    def requests(self, since: str | None = None, until: str | None = None) -> Iterator[str]:
        """Every decided request as JSON text, in log order, streamed (for impact). A request
        that came without `at` gets the `at` it was judged at, so that it is judged again then."""
        where: list[Condition] = [("outcome", "=", "decided")]
        if since is not None:
            where.append(("logged_at", ">=", log_time(since)))
        if until is not None:
            where.append(("logged_at", "<", log_time(until)))
        with self._reading() as conn:
            for text, response in self._rows(conn, ("request", "response"), where, None):
                if not isinstance(text, str) or not isinstance(response, str):
                    continue  # `log verify` names such a record; impact judges what it can read
                judged_at = None if '"at":' in text else _answered_at(response)
                # (canonical JSON: only the top-level field is named exactly "at")
                yield text if judged_at is None else canonical({**json.loads(text), "at": judged_at})

    def _rows(self, conn: Any, columns: Sequence[str], where: Sequence[Condition],
              limit: int | None) -> Iterable[Sequence[Any]]:
        """The `columns` of the records that meet every (column, operator, value) of `where`, in
        chain order, streamed."""
        p = self.placeholder
        sql = (f"SELECT {', '.join(columns)} FROM decisions WHERE "
               f"{' AND '.join(f'{column} {operator} {p}' for column, operator, _ in where)} ORDER BY seq")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._stream(conn, sql, tuple(value for _, _, value in where))

    def tail(self, count: int, *, parse: bool = True) -> list[LogRecord | BrokenRecord]:
        with self._reading() as conn:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM decisions ORDER BY seq DESC LIMIT "
                                f"{int(count)}").fetchall()
        return [record_from_row(r, parse=parse) for r in reversed(rows)]

    # Each row as one text in which any change of any cell, its type included, shows: what a
    # range's digest is taken over (engine.logcheck's sweep).
    row_text = " || ',' || ".join(f"quote({c})" for c in COLUMNS)

    def rows_between(self, first: int, last: int, *, full: bool) -> list[tuple[Any, ...]]:
        """Rows `first..last` in order: each as (row text,) or, `full`, (row text, *COLUMNS)."""
        columns = self.row_text + (", " + ", ".join(COLUMNS) if full else "")
        p = self.placeholder
        with self._reading() as conn:
            return [tuple(row) for row in conn.execute(
                f"SELECT {columns} FROM decisions WHERE seq >= {p} AND seq <= {p} ORDER BY seq",
                (first, last)).fetchall()]

    def hash_at(self, seq: int) -> str | None:
        """The stored hash of record `seq` (None if there is none)."""
        with self._reading() as conn:
            row = conn.execute(f"SELECT hash FROM decisions WHERE seq = {self.placeholder}", (seq,)).fetchone()
        return str(row[0]) if row else None

    def verify(self, records: Iterable[LogRecord | BrokenRecord] | None = None) -> Breach | None:
        """Walk the chain; the first record altered, removed, inserted or unreadable, or None.

        Without `records`, the whole log from its first record, which must be record 1 on the
        genesis hash; with them (say the tail), from wherever they start. Records removed from
        the very end leave no trace in the chain: checkpoints (engine.logcheck) find them.
        """
        verifier = ChainVerifier(self.keys, from_first_seen=records is not None)
        for record in records if records is not None else self.scan():
            breach = verifier.feed(record)
            if breach is not None:
                return breach
        return None

    def writable(self) -> bool:
        """Can the log take writes: the database answers and accepts writes. No lock is taken,
        so that readiness never waits on a commit (`commits_ok` tells how the last one went)."""
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
        with self._reading() as conn:
            row = conn.execute(_HEAD).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def init(self) -> None:
        """Create the tables if need be; the workers of a service all do it at once, so under the
        write lock (PostgreSQL's CREATE ... IF NOT EXISTS is not safe against itself)."""
        conn = self._connect()
        try:
            with self._exclusive(conn):
                for statement in self._schema():
                    conn.execute(statement)
                if conn.execute("SELECT 1 FROM log_probe WHERE id = 1").fetchone() is None:
                    conn.execute(f"INSERT INTO log_probe (id, probed_at) VALUES (1, {self.placeholder})",
                                 (log_time(datetime.now(UTC)),))
                if conn.execute("SELECT 1 FROM log_origin WHERE id = 1").fetchone() is None:
                    conn.execute(f"INSERT INTO log_origin (id, origin) VALUES (1, {self.placeholder})",
                                 (new_origin(),))
        finally:
            conn.close()

    def origin(self) -> str | None:
        """The log's identity (made when the log was; see _ORIGIN_TABLE), read once; None for a
        log opened read-only that was made before logs had one."""
        if self._origin is None:
            with self._reading() as conn:
                if self._has_table(conn, "log_origin"):
                    row = conn.execute("SELECT origin FROM log_origin WHERE id = 1").fetchone()
                    self._origin = (str(row[0]) if row else None,)
                else:
                    self._origin = (None,)
        return self._origin[0]


def _answered_at(response: str) -> Any:
    try:
        body = parse_cell(response)
    except ValueError:
        return None
    return body.get("at") if isinstance(body, dict) else None


# Each index costs every write: time, shop and account (the auditors' lookups) are indexed;
# action, decision and rule have few values, and a query on them scans a time range.
_INDEXES = [f"CREATE INDEX IF NOT EXISTS decisions_{c} ON decisions ({c})"
            for c in ("logged_at", "shop_id", "account_id")]


_POLICY_TABLE = """CREATE TABLE IF NOT EXISTS policy_contents (
    digest TEXT PRIMARY KEY, version TEXT NOT NULL, files TEXT NOT NULL, first_served TEXT NOT NULL)"""

# One row, rewritten when readiness must know whether a commit goes through (disk full...).
_PROBE_TABLE = "CREATE TABLE IF NOT EXISTS log_probe (id INTEGER PRIMARY KEY, probed_at TEXT NOT NULL)"

# One row, written once when the log is made: the log's identity, which its signed checkpoints
# name (as a Certificate Transparency checkpoint names its log), so that `log verify` tells
# another log's checkpoints from this log's.
_ORIGIN_TABLE = "CREATE TABLE IF NOT EXISTS log_origin (id INTEGER PRIMARY KEY, origin TEXT NOT NULL)"


def new_origin() -> str:
    return f"bindpolicy-log/{uuid.uuid4().hex}"


def _decisions_table(big_int: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS decisions (
        seq {big_int} PRIMARY KEY, decision_id TEXT NOT NULL UNIQUE, logged_at TEXT NOT NULL,
        outcome TEXT NOT NULL, status INTEGER NOT NULL, action TEXT, decision TEXT, rule_id TEXT,
        shop_id TEXT, account_id TEXT, policy_version TEXT, policy_digest TEXT, runtime TEXT,
        duration_us {big_int} NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"""


def _tables(big_int: str) -> list[str]:
    """The log's tables and indexes; the stores differ only in the name of a 64-bit integer."""
    return [_decisions_table(big_int), *_INDEXES, _POLICY_TABLE, _PROBE_TABLE, _ORIGIN_TABLE]


# A new SQLite log looks records up by time, shop and account in a table of their own, filled
# behind the commits (SQLiteStore.LOOKUP_EVERY): a single decision's commit then writes two
# B-trees, the table's and its decision id's (UNIQUE: a second record under an id is refused),
# where it wrote five, each changed page a WAL frame of its own. A query reads the lookup up to
# its reach and the records past it from the table (SQLiteStore._rows). Logs made before keep
# their indexes, and their cost.
LOOKUP_COLUMNS = ("logged_at", "shop_id", "account_id")
_LOOKUP = ["CREATE TABLE IF NOT EXISTS decision_lookup "
           f"(seq INTEGER PRIMARY KEY, {', '.join(f'{c} TEXT' for c in LOOKUP_COLUMNS)})",
           *(f"CREATE INDEX IF NOT EXISTS decision_lookup_{c} ON decision_lookup ({c})" for c in LOOKUP_COLUMNS)]
_SQLITE_TABLES = [_decisions_table("INTEGER"), *_LOOKUP, _POLICY_TABLE, _PROBE_TABLE, _ORIGIN_TABLE]
_LOOKUP_REACH = f"SELECT seq, {', '.join(LOOKUP_COLUMNS)} FROM decision_lookup ORDER BY seq DESC LIMIT 1"
_LOOKED_UP_AS = "SELECT 1 FROM decisions WHERE seq = ? AND " + " AND ".join(f"{c} IS ?" for c in LOOKUP_COLUMNS)
_LOOKUP_FILL = (f"INSERT INTO decision_lookup (seq, {', '.join(LOOKUP_COLUMNS)}) SELECT seq, "
                f"{', '.join(LOOKUP_COLUMNS)} FROM decisions WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?")
_LOOKUP_INSERT = f"INSERT INTO decision_lookup (seq, {', '.join(LOOKUP_COLUMNS)}) VALUES (?, ?, ?, ?)"
_LOOKED_UP = operator.attrgetter("seq", *LOOKUP_COLUMNS)  # a record's lookup entry


def _extend_lookup(conn: Any, most: int, through: int = 2**63 - 1) -> tuple[int, int]:
    """In a write transaction: the lookup's entries for up to `most` records past its reach (up to
    record `through`), read from the table (rows this transaction added included); (its reach
    now, entries added). A
    lookup whose last entry is not what the table holds at its seq (records removed or rewritten
    by hand) is made again from the first record: records are only ever added, so their entries
    never change."""
    reach = conn.execute(_LOOKUP_REACH).fetchone()
    if reach is not None and conn.execute(_LOOKED_UP_AS, tuple(reach)).fetchone() is None:
        conn.execute("DELETE FROM decision_lookup")
        reach = None
    first = int(reach[0]) if reach else 0
    added = int(conn.execute(_LOOKUP_FILL, (first, through, most)).rowcount)
    return first + added, added


class SQLiteStore(Store):
    """The embedded default: one SQLite file in WAL mode (survives a killed process).

    Read-only (the audit commands): no lock file, no table, no `-shm` or `-wal` made beside
    the log (see `_read_only_uri`); a read-only snapshot is read as it is.
    """

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.synchronous = synchronous
        self._held = False  # the leader holds the write lock, taken before its group (see _lead)
        self._read_uri = ""
        self._lookup = False  # the log looks records up in decision_lookup (a new log), else by its indexes
        self._reach = 0  # the lookup's last entry, where this process last saw it
        if self.read_only:
            if not self.path.is_file():
                raise MissingTableError(f"no decision log at {self.path}")
            self._read_uri = self._read_only_uri()
            self.check_readable()
            with self._reading() as conn:
                self._lookup = self._has_table(conn, "decision_lookup")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Writers of every process take this lock before SQLite's: the kernel hands it over at
        # once, where SQLite's own busy handler would sleep and poll.
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+b")  # noqa: SIM115
        self.init()

    def _read_only_uri(self) -> str:
        """How to read without creating a file beside the log (`mode=ro` alone would create the
        WAL's `-shm` and `-wal`): a live log (both there) read-only; a log whose WAL is empty
        or absent as immutable; a copy with a WAL but no index, from a private copy."""
        wal, shm = (self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm"))
        if wal.exists() and shm.exists():
            return f"file:{self.path}?mode=ro"
        if not wal.exists() or wal.stat().st_size == 0:
            return f"file:{self.path}?immutable=1"
        self._copy = tempfile.TemporaryDirectory(prefix="bindpolicy-log-")
        copy = Path(self._copy.name) / self.path.name
        shutil.copyfile(self.path, copy)
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        return f"file:{copy}?mode=ro"

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            conn = sqlite3.connect(self._read_uri, uri=True, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.text_factory = _lenient_text  # a cell that is not UTF-8 is named, not a crash
            return _SQLiteConnection(conn)  # type: ignore[return-value]
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.text_factory = _lenient_text
        # WAL is a property of the file, set once by `init` under the lock: setting it on every
        # connection made two workers starting on a fresh file fail with "database is locked".
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA wal_autocheckpoint={self.AUTOCHECKPOINT_PAGES}")
        self._start_checkpointer()
        return _SQLiteConnection(conn)  # type: ignore[return-value]

    # The WAL's checkpoints, off the requests' path. SQLite's own (every 1000 pages) ran inside a
    # commit: the leader copied the WAL into the database and flushed it (10-150 ms on a busy
    # disk) while every worker's decisions waited for the log, the slowest percent at half load.
    # A thread of each writing process checkpoints instead (PASSIVE: writers go on meanwhile);
    # SQLite's own stays as a backstop, should the thread fall behind.
    CHECKPOINT_EVERY = 0.5  # seconds between the thread's checkpoints (when something committed)
    AUTOCHECKPOINT_PAGES = 20_000  # SQLite's checkpoint in a commit, only past this many WAL pages

    # A new log's page: 8 KiB instead of SQLite's 4. A commit writes each page it changed to the
    # WAL, a frame (a header and the page) at a time: a batch of 100 records (about 120 kB of rows
    # in five B-trees) wrote some 45 frames of 4 KiB, half as many of 8. In the SQLite store alone
    # (bench rows, CPU a row, twice each): groups of 100 records 23.0 / 22.6 µs with 4 KiB pages,
    # 18.0 / 12.2 with 8, 17.5 / 17.1 with 16; but a commit of one record writes its five pages
    # whole: 93.9 / 93.9 µs with 4 KiB, 112.3 / 102.8 with 8, 136.2 / 120.7 with 16 (groups of
    # 4: 36.9-53.3, alike). 8 KiB: most of the batches' gain, a tenth of the cost for single ones.
    PAGE_SIZE = 8_192

    _checkpointer: threading.Thread | None = None
    _stopped: threading.Event | None = None  # the checkpoint thread ends
    _checkpointer_pid: int | None = None  # the process whose thread it is

    def close(self) -> None:
        """Also ends the checkpoint thread, once a checkpoint under way is done and its connection
        closed (the files are then as the last commit left them, for a copy)."""
        if self._stopped is not None and self._checkpointer is not None:
            self._stopped.set()
            if self._checkpointer is not threading.current_thread():
                self._checkpointer.join(timeout=30)
        super().close()
        if self.path.exists():  # (a log removed meanwhile: nothing to index, nothing to make again)
            with contextlib.suppress(sqlite3.Error, OSError):
                self.fill_lookup()

    def _start_checkpointer(self) -> None:
        """The checkpoint thread of this process (threads do not survive a fork); it ends with the store."""
        if self._checkpointer_pid == os.getpid() or self.CHECKPOINT_EVERY <= 0:
            return
        self._checkpointer_pid = os.getpid()
        self._stopped = threading.Event()
        self._checkpointer = threading.Thread(
            target=_checkpoint_wal, args=(weakref.ref(self), self.path, self.CHECKPOINT_EVERY, self._stopped),
            name="log-checkpoint", daemon=True)
        self._checkpointer.start()

    def init(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=30000")
                # A new file's pages (an existing log keeps its own: SQLite changes it for no
                # other file, nor once in WAL mode): see PAGE_SIZE.
                conn.execute(f"PRAGMA page_size={self.PAGE_SIZE}")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                # (two workers on a fresh file: both see no table, both make the same ones)
                self._lookup = "decision_lookup" in tables or "decisions" not in tables
            finally:
                conn.close()
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        super().init()
        self.fill_lookup()  # what a killed writer had left to index

    # The lookup is filled in the commit that takes the log LOOKUP_EVERY records or more past
    # where this process saw it reach (no SQL before that): one INSERT ... SELECT of those
    # records' cells, their rows still in SQLite's cache, four B-trees written once for them all
    # (about 6 µs of CPU a record, a millisecond for that commit), where each single record's
    # commit wrote three indexes (about 35 µs a record). A group of LOOKUP_GROUP records or more
    # (a batch's) adds its own entries from its records at hand, after the records before it.
    LOOKUP_EVERY = 128
    LOOKUP_GROUP = 32
    LOOKUP_MOST = 4096  # entries a commit reads back at most (a lag left by a killed writer is filled at open)

    def _with_rows(self, conn: Any, chained: list[LogRecord]) -> None:
        if not self._lookup or not chained:  # (an empty batch commits no record)
            return
        if len(chained) >= self.LOOKUP_GROUP:
            if _extend_lookup(conn, self.LOOKUP_MOST, chained[0].seq - 1)[0] == chained[0].seq - 1:
                conn.executemany(_LOOKUP_INSERT, [_LOOKED_UP(r) for r in chained])
                self._reach = chained[-1].seq
        elif chained[-1].seq - self._reach >= self.LOOKUP_EVERY:
            self._reach = _extend_lookup(conn, self.LOOKUP_MOST)[0]

    def fill_lookup(self) -> int:
        """Fill the lookup (a new log's: see LOOKUP_COLUMNS) up to the last record; how many
        entries it took. In transactions of LOOKUP_EVERY records, the write lock given back
        between them (a millisecond's pause: the kernel hands a file lock to whoever asks first,
        and a thread taking it again at once would keep the other process's writers waiting)."""
        if self.read_only or not self._lookup:
            return 0
        count = 0
        conn = self._connect()
        try:
            while True:
                with self._exclusive(conn):
                    self._reach, added = _extend_lookup(conn, self.LOOKUP_EVERY)
                count += added
                if added < self.LOOKUP_EVERY:
                    return count
                time.sleep(0.001)
        finally:
            self._close_quietly(conn)

    def _hold(self, conn: Any) -> None:
        """The file lock and SQLite's (BEGIN IMMEDIATE), for _begin_exclusive to find taken."""
        self._begin_exclusive(conn)
        self._held = True

    def _release_unused(self) -> None:
        if self._held:
            self._held = False
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.rollback()
            self._end_exclusive()

    def _begin_exclusive(self, conn: Any) -> None:
        if self._held and conn is self._conn:  # begun by _lead for this leader's first append
            self._held = False
            return
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            raise

    def _end_exclusive(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _has_table(self, conn: Any, name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (name,)).fetchone() is not None

    def _accepts_writes(self, conn: Any) -> bool:
        conn.execute("SELECT 1 FROM decisions LIMIT 1").fetchone()
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    def _schema(self) -> Sequence[str]:
        return _SQLITE_TABLES if self._lookup else _tables("INTEGER")

    def _rows(self, conn: Any, columns: Sequence[str], where: Sequence[Condition],
              limit: int | None) -> Iterable[Sequence[Any]]:
        if self._lookup and any(column in LOOKUP_COLUMNS for column, _, _ in where):
            return self._looked_up(conn, columns, where, limit)
        return super()._rows(conn, columns, where, limit)

    def _looked_up(self, conn: Any, columns: Sequence[str], where: Sequence[Condition],
                   limit: int | None) -> Iterator[Sequence[Any]]:
        """As _rows, in one snapshot: the records the lookup finds up to its reach (each checked
        against the table's own cells), then those past its reach, read from the table."""
        conn.execute("BEGIN")  # (deferred: a read transaction, one snapshot for both parts)
        reach = conn.execute("SELECT coalesce(max(seq), 0) FROM decision_lookup").fetchone()[0]
        values = tuple(value for _, _, value in where)
        found = (f"SELECT {', '.join('d.' + c for c in columns)} FROM decision_lookup l JOIN decisions d "
                 f"ON d.seq = l.seq WHERE "
                 + " AND ".join([f"l.{c} {op} ?" for c, op, _ in where if c in LOOKUP_COLUMNS or c == "seq"]
                                + [f"d.{c} {op} ?" for c, op, _ in where]) + " ORDER BY l.seq")
        count = 0
        for row in self._stream(conn, found + ("" if limit is None else f" LIMIT {int(limit)}"),
                                tuple(v for c, _, v in where if c in LOOKUP_COLUMNS or c == "seq") + values):
            yield row
            count += 1
        if limit is not None and count >= limit:
            return
        past = (f"SELECT {', '.join(columns)} FROM decisions WHERE seq > ? AND "
                + " AND ".join(f"{c} {op} ?" for c, op, _ in where) + " ORDER BY seq")
        yield from self._stream(conn, past + ("" if limit is None else f" LIMIT {int(limit) - count}"),
                                (reach, *values))

    def _stream(self, conn: Any, sql: str, args: tuple[Any, ...]) -> Iterator[Sequence[Any]]:
        """Rows as they come (`sql` orders them), their text decoded by SQLite's own strict UTF-8
        reading, in C: the service's watch reads every new record back, and a Python text factory
        called for each cell took about a third of that reading. A cell that is not UTF-8 stops
        it: from that row on, the rows are read again with the lenient factory, which keeps such
        a cell for record_from_row to name."""
        sqlite = conn.conn  # (the _SQLiteConnection's own)
        sqlite.text_factory = str
        done = 0
        try:
            for row in sqlite.execute(sql, args):
                yield row
                done += 1
            return
        except sqlite3.OperationalError as exc:
            if not str(exc).startswith("Could not decode to UTF-8"):
                raise
        finally:
            sqlite.text_factory = _lenient_text
        for number, row in enumerate(sqlite.execute(sql, args)):
            if number >= done:
                yield row

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path})"


def _checkpoint_wal(store: weakref.ref[SQLiteStore], path: Path, every: float, stopped: threading.Event) -> None:
    """Checkpoint the WAL every `every` seconds while commits come, until the store is closed or gone."""
    conn: sqlite3.Connection | None = None
    done = -1
    try:
        while not stopped.wait(every):
            live = store()
            if live is None:
                return
            committed, live = live.batches, None
            if committed == done:
                continue
            try:
                if conn is None:
                    # (mode=rw: a log removed meanwhile is not made again, empty)
                    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30, isolation_level=None,
                                           check_same_thread=False)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                done = committed
            except sqlite3.Error:  # (the next try, or SQLite's own checkpoint past the backstop)
                if conn is not None:
                    conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


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


# A transaction of its own whose commit waits for the WAL's flush up to it (see PostgresStore._OPEN).
_FLUSH = b"SELECT pg_logical_emit_message(true, 'bindpolicy', 'flush')"


class PostgresStore(Store):
    """PostgreSQL, chosen by a postgresql:// URL; an advisory lock keeps the chain in order."""

    placeholder = "%s"
    row_text = " || ',' || ".join(f"quote_nullable({c})" for c in COLUMNS)  # (typed columns: no type to show)
    LOCK = 7_242_001

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        # The chain's head as read by the leader once it holds the lock, before it takes its
        # group (see _lead): (head,), consumed by the next _append; None when no lock is held.
        self._held: tuple[tuple[int, str] | None] | None = None
        # The log writer (engine/logwriter.py), the only writer of this machine, keeps the head it
        # committed last and chains on it without reading it first (see _append_on).
        self.sole_writer = False
        self._known: tuple[int, str] | None = None
        self._prepared: dict[int, tuple[str, str, str] | None] = {}  # by id(record), while it is written (write_many)
        self._prepared_on: weakref.WeakSet[Any] = weakref.WeakSet()  # connections with _PREPARE's statements
        if self.read_only:
            self.check_readable()
        else:
            self.init()

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.url, autocommit=False)
        if self.read_only:
            conn.read_only = True
        return conn

    def _begin_exclusive(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK,))

    _insert_head = _INSERT.encode()
    SMALL_GROUP = 32  # records: the log writer's commit on its own head sends up to this many as literals
    # One message: BEGIN, the chain's lock, its head and the COPY of the rows with its COMMIT,
    # then the wait for that COMMIT's flush. It is answered up to the COPY (the head, once the
    # lock is held: the wait while another writer commits); the rows and the COPY's end go as a
    # second message, answered once the flush is done. Two round trips a commit whatever its size
    # (see _append).
    #
    # The flush is waited for after the lock is given back: the rows' transaction commits with
    # synchronous_commit off (its COMMIT returns, and its locks go, once its commit record is in
    # the WAL's buffers), and the statement after it is a transaction that writes a WAL record of
    # its own (a logical message, which any role may emit, into no table) and commits with the
    # session's synchronous_commit: its COMMIT returns once the WAL is flushed up to its own
    # commit record, which comes after the rows' one. So the answer still comes only once the
    # rows are on disk, and the next writer chains on them meanwhile: its commit record comes
    # after theirs in the WAL, so whatever flush makes its rows durable makes these durable too,
    # and a crash before the flush loses both, neither answered. (Before, the lock was held
    # through the flush, 4 ms and more on this disk, and the writers' flushes never overlapped.)
    # A transaction that only takes an id writes no WAL and is not flushed: the message is needed.
    # The lock and the head are statements prepared once a connection (_open): parsed and planned
    # at every commit, they cost the server about 100 µs of CPU more.
    _OPEN = (b"BEGIN; SET LOCAL synchronous_commit = off; EXECUTE bindpolicy_lock; EXECUTE bindpolicy_head; "
             b"COPY decisions (%s) FROM STDIN; COMMIT; %s" % (", ".join(COLUMNS).encode(), _FLUSH))
    _PREPARE = (b"PREPARE bindpolicy_lock AS SELECT pg_advisory_xact_lock(%d); PREPARE bindpolicy_head AS %s"
                % (LOCK, _HEAD.encode()))

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        """As Store.write_many, each record's text that does not depend on its place in the chain
        made first, in the caller's thread, before the chain's lock (_copy_pieces: its content
        around `seq`, its COPY row between `seq` and the hashes): under the lock, the leader only
        hashes and joins. A record whose pieces cannot be made is left to _append, which fails
        its caller alone saying why."""
        prepared = self._prepared
        for record in records:
            prepared[id(record)] = _pieces_if_any(record.__dict__)
        try:
            return super().write_many(records)
        finally:
            for record in records:
                prepared.pop(id(record), None)

    def _hold(self, conn: Any) -> None:
        """The chain's lock and its head, in one round trip (which waits while another process
        commits), for _append to find: sent before the leader takes its group, so
        that the callers who came while it waited commit with it. (Taken before the lock, the
        group was fixed when the wait began: under load the processes' commits alternate, each a
        flush of 2-4 ms, and the records that came during the wait went to the next commit, one
        flush later.)"""
        self._held = (self._open(conn),)

    def _release_unused(self) -> None:
        if self._held is not None:
            self._held = None
            if self._conn is not None:
                self._abandon(self._conn)

    def _open(self, conn: Any) -> tuple[int, str] | None:
        """Send _OPEN and read its answer up to the COPY: the chain's head (None for an empty
        log). The transaction stays open, its COPY waiting for the rows, until _append sends them
        or _abandon ends it."""
        if conn not in self._prepared_on:
            self._run(conn, self._PREPARE)
            self._prepared_on.add(conn)
        try:
            conn.pgconn.send_query(self._OPEN)
            _flush(conn.pgconn)
            head = self._answers(conn)[3]  # (BEGIN, SET, the lock, the head, COPY)
        except BaseException:
            self._abandon(conn)
            raise
        if not head.ntuples:
            return None
        return int(head.get_value(0, 0)), head.get_value(0, 1).decode()

    @staticmethod
    def _answers(conn: Any) -> list[Any]:
        """The results of what was sent, up to a COPY waiting for its rows or the answer's end,
        waited for on the socket (select releases the GIL; libpq's PQgetResult, as psycopg calls
        it, would hold it while another process commits). The first error is raised as psycopg
        raises it, once the whole answer is read."""
        from psycopg import errors, pq

        pgconn, results, error = conn.pgconn, [], None
        while True:
            pgconn.consume_input()
            while pgconn.is_busy():
                select.select([pgconn.socket], [], [])
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:
                break
            if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COPY_IN):
                error = error or result
                continue
            results.append(result)
            if result.status == pq.ExecStatus.COPY_IN:
                break
        if error is not None:
            raise errors.error_from_result(error, encoding=conn.info.encoding)
        return results

    def _abandon(self, conn: Any) -> None:
        """End whatever this connection's transaction was doing: a COPY waiting for rows fails
        (nothing of it is stored), its answer is read, then ROLLBACK (nothing if the connection
        is gone)."""
        with contextlib.suppress(Exception):
            while not conn.pgconn.put_copy_end(b"abandoned"):  # (an error if no COPY is waiting)
                _flush(conn.pgconn)
        with contextlib.suppress(Exception):
            _flush(conn.pgconn)
            self._answers(conn)
        self._rollback(conn)

    @staticmethod
    def _run(conn: Any, statements: bytes) -> Any:
        """Send one message of statements and wait for the answer in libpq (PQexec: the GIL is
        released while it waits); the last statement's result, or its error raised as psycopg
        raises it. Statements that read no rows from the client go this way: psycopg's `execute`
        (a cursor, its adapters, a generator waiting on the socket) cost the service about 100 µs
        of CPU a call where this costs about 25. The transaction is begun and ended by the
        statements sent (the connection is in autocommit)."""
        from psycopg import errors, pq

        if not conn.autocommit:
            conn.autocommit = True
        result = conn.pgconn.exec_(statements)
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            raise errors.error_from_result(result, encoding=conn.info.encoding)
        return result

    @classmethod
    def _rollback(cls, conn: Any) -> None:
        """End whatever transaction is open (nothing if it is gone with its connection)."""
        with contextlib.suppress(Exception):
            cls._run(conn, b"ROLLBACK")

    def _append(self, conn: Any, records: list[LogRecord]) -> list[LogRecord]:
        """As Store._append, in two round trips to the server whatever the group's size: BEGIN,
        the lock, the read of the head and the start of a COPY go as one message (_OPEN, sent by
        _hold before the leader takes its group), the rows and the COPY's end as another, whose
        answer comes once the COMMIT that followed the COPY in the first message has flushed.
        Under the lock only the hashes are taken and the rows' ends joined (the rest of each row
        and of its content was made before, _copy_pieces); the records returned are made after
        the commit, outside it. (Before, a group of up to 32 records went as an INSERT of
        literal rows, parsed and planned by the server for each group, and a larger one by
        psycopg's COPY, four round trips under the lock.) The head is read by a statement of its
        own once the lock is held: a statement sees what was committed when it started, so read
        within the lock's, a head committed while it waited for the lock would be missed."""
        held, self._held = self._held, None
        known, self._known = self._known, None  # (set again once this commit is through)
        if held is None and known is not None and len(records) <= self.SMALL_GROUP:
            done = self._append_on(conn, records, known)
            if done is not None:
                return done
        try:
            head = held[0] if held is not None else self._open(conn)
            seq, prev = head if head is not None else (0, GENESIS)
            prev_cell = _copy_cell(prev)
            mac = self.keys.current.mac if self.keys is not None else None
            prepared = self._prepared
            parts: list[str] = []
            links: list[tuple[LogRecord, int, str, str]] = []
            for record in records:
                before, after, row = prepared.get(id(record)) or _copy_pieces(record.__dict__)
                seq += 1
                digest = _digest(f"{prev}{before}{seq}{after}", mac)
                cell = _copy_cell(digest)
                parts += (str(seq), row, prev_cell, "\t", cell, "\n")
                links.append((record, seq, prev, digest))
                prev, prev_cell = digest, cell
            _copy_rows(conn.pgconn, "".join(parts).encode(conn.info.encoding))
            self._answers(conn)
        except BaseException:
            self._abandon(conn)
            raise
        chained = []
        for record, seq, prev, digest in links:
            copy = _new_object(LogRecord)
            values = copy.__dict__
            values.update(record.__dict__)
            values["seq"], values["prev_hash"], values["hash"] = seq, prev, digest
            chained.append(copy)
        return self._committed(chained)

    def _committed(self, chained: list[LogRecord]) -> list[LogRecord]:
        self.batches += 1
        self.records += len(chained)
        if self.sole_writer:
            self._known = (chained[-1].seq, chained[-1].hash)
        return chained

    def _literal_rows(self, conn: Any, chained: list[LogRecord]) -> bytes:
        from psycopg import pq

        quote, encoding = pq.Escaping(conn.pgconn).escape_literal, conn.info.encoding
        return self._insert_head + b", ".join([_values(self._row(r), quote, encoding) for r in chained])

    def _append_on(self, conn: Any, records: list[LogRecord], head: tuple[int, str]) -> list[LogRecord] | None:
        """The log writer's commit (sole_writer): the records chained on the head it committed
        last, sent with BEGIN, the chain's lock and COMMIT in one message, one round trip. None
        if that head has moved (another process wrote: its next `seq` is taken), for _append to
        chain them again on the head read under the lock."""
        from psycopg import errors

        chained = self._chain(records, head)
        try:
            self._run(conn, b"BEGIN; SELECT pg_advisory_xact_lock(%d); " % self.LOCK
                      + self._literal_rows(conn, chained) + b"; COMMIT")
        except errors.UniqueViolation as exc:
            self._rollback(conn)
            if exc.diag.constraint_name != "decisions_pkey":
                raise
            return None
        except BaseException:
            self._rollback(conn)
            raise
        return self._committed(chained)

    def settle(self) -> None:
        """A commit is seen by others once its commit record is in the WAL's buffers, a moment
        before its flush (see _OPEN): what the watch signs (its checkpoints) must not name a
        record a crash could still take back, so it flushes first (a logical message committed
        with the session's synchronous_commit: the WAL is flushed up to it, past every commit seen
        before)."""
        with self._reading() as conn:
            self._run(conn, _FLUSH)

    def _has_table(self, conn: Any, name: str) -> bool:
        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        return bool(row) and row[0] is not None

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
        return "PostgresStore(" + self.url.split("@")[-1].split("?")[0] + ")"


def _values(row: Sequence[Any], quote: Callable[[bytes], bytes], encoding: str) -> bytes:
    """A stored row as SQL literals: NULL, integers, and text quoted by libpq (PQescapeLiteral,
    for the connection's encoding and standard_conforming_strings)."""
    cells = []
    for value in row:
        if value is None:
            cells.append(b"NULL")
        elif isinstance(value, str):
            if "\0" in value:
                raise ValueError("PostgreSQL text cannot hold the NUL character")
            cells.append(quote(value.encode(encoding)))
        elif isinstance(value, int) and not isinstance(value, bool):
            cells.append(b"%d" % value)
        else:
            raise TypeError(f"a stored cell cannot be {type(value).__name__}")
    return b"(" + b", ".join(cells) + b")"


# The columns of a COPY row between `seq` and the hashes, as stored (request and response as their text).
_MIDDLE_CELLS = operator.itemgetter(*(f"{c}_text" if c in ("request", "response") else c for c in COLUMNS[1:-2]))


def _copy_pieces(values: dict[str, Any]) -> tuple[str, str, str]:
    """What of a record's content and of its COPY row does not depend on its place in the chain,
    from its fields: (before, after, row), its content being before + str(seq) + after (the
    metadata's canonical JSON cut at its "seq" member: a key's quotes are the only unescaped ones
    in it, so the cut is found whatever the values hold) and its row str(seq) + row + its
    previous hash, a tab and its hash (row: every other cell, between tabs)."""
    meta = _meta(values)
    meta["seq"] = 0
    try:
        meta_text = orjson.dumps(meta).decode()
    except TypeError:  # an integer beyond 64 bits: as _meta_text
        meta_text = canonical(meta)
    cut = meta_text.index(',"seq":0,') + 7
    cells = _MIDDLE_CELLS(values)
    # Most rows hold nothing COPY reads specially: each cell as it is (NULL as \N), checked once
    # over the joined row (its only backslashes the NULLs', its only tabs the separators); any
    # other row is escaped cell by cell.
    row = "\t".join([cell if cell.__class__ is str else _copy_cell(cell) for cell in cells])
    if row.count("\\") != cells.count(None) or row.count("\t") != len(cells) - 1 or "\n" in row or "\r" in row \
            or "\0" in row:
        row = "\t".join(map(_copy_cell, cells))
    return (meta_text[:cut], f"{meta_text[cut + 1:]}\n{values['request_text']}\n{values['response_text']}",
            f"\t{row}\t")


def _pieces_if_any(values: dict[str, Any]) -> tuple[str, str, str] | None:
    try:
        return _copy_pieces(values)
    except (ValueError, TypeError, KeyError):  # (a cell that cannot be stored: _append says so)
        return None


def _copy_cell(value: Any) -> str:
    """A cell in COPY's text format: \\N for NULL, an integer, or text with its backslashes,
    tabs, newlines and carriage returns escaped (COPY reads nothing else specially); a NUL is
    refused, as PostgreSQL text cannot hold it."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        text: str = value
        if "\0" in text:
            raise ValueError("PostgreSQL text cannot hold the NUL character")
        if "\\" in text:
            text = text.replace("\\", "\\\\")
        if "\t" in text:
            text = text.replace("\t", "\\t")
        if "\n" in text:
            text = text.replace("\n", "\\n")
        if "\r" in text:
            text = text.replace("\r", "\\r")
        return text
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}"
    raise TypeError(f"a stored cell cannot be {type(value).__name__}")


def _copy_rows(pgconn: Any, rows: bytes) -> None:
    """The rows of the COPY the connection is in, then its end, all sent (the connection is
    non-blocking: a write that would block waits on the socket, the GIL released)."""
    while not pgconn.put_copy_data(rows):
        _flush(pgconn)
    while not pgconn.put_copy_end(None):
        _flush(pgconn)
    _flush(pgconn)


def _flush(pgconn: Any) -> None:
    """Send what libpq holds, waiting on the socket while it cannot take more (reading what
    the server sends meanwhile, so that neither side waits for the other)."""
    while pgconn.flush():
        readable, _, _ = select.select([pgconn.socket], [pgconn.socket], [])
        if readable:
            pgconn.consume_input()


SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")


def open_store(url: str, *, read_only: bool = False, keys: MacKeyring | None = None) -> Store:
    """`sqlite:///path/to/file.db` (or a plain path) or `postgresql://...`.

    For SQLite, BINDPOLICY_SQLITE_SYNCHRONOUS picks NORMAL (the default: survives a killed
    process), FULL or EXTRA (survive power loss too, an fsync per group commit). `read_only`
    (the audit commands) creates nothing and fails with MissingTableError where there is no log.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, read_only=read_only, keys=keys)
    if "://" in url and not url.startswith("sqlite:///"):
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://")
    synchronous = os.environ.get("BINDPOLICY_SQLITE_SYNCHRONOUS", "NORMAL").upper()
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"BINDPOLICY_SQLITE_SYNCHRONOUS must be one of {', '.join(SYNCHRONOUS)}")
    return SQLiteStore(url.removeprefix("sqlite:///"), synchronous=synchronous, read_only=read_only, keys=keys)

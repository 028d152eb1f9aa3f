"""One log writer per machine: every worker's records chained and committed in one group.

With the workers each committing their own groups, a worker can chain its records only on the
other's committed head: the log's lock passes from worker to worker and is held through each
commit's flush (PostgreSQL with fsync on: about 4 ms here), so the two workers' flushes never
overlap and a decision waits for one or two of them. Here one process, the writer (started and
watched by api/supervisor.py), owns the log's writing: the workers send it their records over
a Unix socket (`WriterClient`, each thread on a connection of its own) and each call returns
once the writer has committed them, so every record that came while a commit flushed goes into
the next one, whichever worker sent it, with no lock handed over. The writer keeps the chain's
head it committed last and sends the lock, the rows and COMMIT in one message
(`PostgresStore.sole_writer`); a head moved by anyone else shows as a taken `seq` and the group
is chained again on the head read under the lock.

Nothing changes in what is stored: the records and their chain are the ones the workers would
have written (`bindpolicy log verify` reads either). A writer that dies fails the calls it had
not answered (their callers answer 503: a record is committed with its whole group or not at
all, and is never sent twice), the supervisor starts another on the same listening socket, and
the next calls are served by it. A frame that is not a list of records as sent here is answered
with an error naming what is wrong; the writer goes on.

Measured, it does not pay on the 2-core machine of the README (`bindpolicy serve --log-writer
process` against the default `inline`, A/B in bench/bench_service.py): a commit that must not
outlive a failed one before it starts only once that one has ended, after its flush, so the
writer too flushes one group at a time with as many records as the workers' own group commits
had, while every call pays a frame, the writer's reading and answer, and two more wake-ups.

Frames, both ways: 4 bytes of length (big-endian), then JSON. To the writer: a list of records,
each a list of the `WIRE` fields. Back: `{"ok": [[seq, prev_hash, hash], ...]}` or `{"error": "..."}`.
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from engine.decisionlog import LogError, LogRecord, Store, _Pending, open_store

# A record as sent to the writer: every stored column but those the chain sets.
WIRE = ("decision_id", "logged_at", "outcome", "status", "action", "decision", "rule_id", "shop_id", "account_id",
        "policy_version", "policy_digest", "runtime", "duration_us", "request_text", "response_text")
_WIRE_VALUES = operator.attrgetter(*WIRE)
_TEXT, _INT, _OPTIONAL = (str,), (int,), (str, type(None))
_WIRE_KINDS = tuple(_INT if name in ("status", "duration_us") else
                    _TEXT if name in ("decision_id", "logged_at", "outcome", "request_text", "response_text")
                    else _OPTIONAL for name in WIRE)
MAX_FRAME = 64 * 1024 * 1024  # bytes of one frame: far above a batch's records (about 1.2 kB each)
_LENGTH = 4


class FrameError(ValueError):
    """A frame that is not a list of records as WriterClient sends them."""


def records_from_frame(payload: bytes) -> list[LogRecord]:
    """The records of one frame, or a FrameError naming what is wrong (never another exception)."""
    try:
        items = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise FrameError("expected a non-empty list of records")
    records = []
    for number, cells in enumerate(items):
        if not isinstance(cells, list) or len(cells) != len(WIRE):
            raise FrameError(f"record {number}: expected a list of {len(WIRE)} fields ({', '.join(WIRE)})")
        for name, kinds, value in zip(WIRE, _WIRE_KINDS, cells, strict=True):
            if type(value) not in kinds:
                raise FrameError(f"record {number}: {name} cannot be {type(value).__name__}")
        record = object.__new__(LogRecord)  # (its fields as new_record sets them; the objects are not needed)
        values = record.__dict__
        values.update(zip(WIRE, cells, strict=True))
        values.update(request=None, response=None, seq=0, prev_hash="", hash="")
        records.append(record)
    return records


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_LENGTH, "big") + payload


class _Connection:
    """A worker thread's connection: bytes read so far, and the frames it waits on, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False


class LogWriter:
    """The writer: reads frames from every connection, commits what came in one group, answers.

    One thread. While a group commits, new frames wait in the sockets; the next turn takes
    them all, so a group is whatever came during the last commit (as the workers' own group
    commit did, but across workers)."""

    def __init__(self, store: Store, listener: socket.socket, parent: int | None = None) -> None:
        self.store = store
        self.listener = listener
        self.parent = parent  # the supervisor: once it is gone (killed), the writer stops too
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.commits = self.records = self.calls = 0  # (for the benches: records a commit)
        self.committing = 0.0  # seconds spent in commits

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        waiting: list[tuple[_Connection, _Pending]] = []
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0 if waiting else 0.2):
                if key.data is None:
                    self._accept()
                else:
                    waiting.extend(self._read(key.data))
            if waiting:
                self._commit(waiting)
                waiting = []
            elif self.parent is not None and os.getppid() != self.parent:
                break
        self.selector.close()

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                sock, _ = self.listener.accept()
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ, _Connection(sock))

    def _read(self, conn: _Connection) -> list[tuple[_Connection, _Pending]]:
        try:
            data = conn.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return []
        conn.buffer += data
        found: list[tuple[_Connection, _Pending]] = []
        while len(conn.buffer) >= _LENGTH:
            size = int.from_bytes(conn.buffer[:_LENGTH], "big")
            if size > MAX_FRAME:
                self._answer(conn, {"error": f"a frame of {size} bytes is over the writer's {MAX_FRAME}"})
                self._close(conn)  # (the stream cannot be followed past it)
                return found
            if len(conn.buffer) < _LENGTH + size:
                break
            payload = bytes(conn.buffer[_LENGTH:_LENGTH + size])
            del conn.buffer[:_LENGTH + size]
            try:
                found.append((conn, _Pending(records_from_frame(payload))))
            except FrameError as exc:
                # (answered in its turn: after the frames before it on this connection)
                found.append((conn, _Pending([], done=True, error=exc)))
        return found

    def _commit(self, waiting: list[tuple[_Connection, _Pending]]) -> None:
        """Every caller's records, in groups of up to the store's max_batch, then the answers."""
        group = [pending for _, pending in waiting if not pending.done]
        began = time.perf_counter()
        self.calls += len(group)
        while group:
            taken, group = self.store._take(group)
            self.store._commit(taken)
            self.commits += 1
            self.records += sum(len(p.records) for p in taken)
        self.committing += time.perf_counter() - began
        for conn, pending in waiting:
            if pending.error is not None:
                self._answer(conn, {"error": str(pending.error)})
            else:
                self._answer(conn, {"ok": [[r.seq, r.prev_hash, r.hash] for r in pending.results or ()]})

    def _answer(self, conn: _Connection, body: dict[str, Any]) -> None:
        if conn.closed:
            return
        data = _frame(orjson.dumps(body))
        try:
            sent = conn.sock.send(data)  # (a few hundred bytes a record: the socket's buffer takes them)
            if sent < len(data):  # (a batch's answer to a worker slow to read: wait for it, up to 5 s)
                conn.sock.settimeout(5.0)
                conn.sock.sendall(data[sent:])
                conn.sock.setblocking(False)
        except OSError:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if not conn.closed:
            conn.closed = True
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.sock.close()


class WriterClient:
    """What a worker writes through (`DecisionLog`): the records go to the writer, and the call
    returns once they are committed. Any failure to hear back (the writer died, timed out,
    refused) is a LogError, after which the connection is dropped and the next call opens a new
    one; a call is never sent twice."""

    def __init__(self, path: str, store: Store, timeout: float = 10.0) -> None:
        self.path = path
        self.store = store  # (its last_error is what readiness reads)
        self.timeout = timeout
        self._local = threading.local()

    def write_many(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        payload = _frame(orjson.dumps([_WIRE_VALUES(record) for record in records]))
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None and _gone(sock):  # (a writer replaced since this thread's last call)
            self._drop()
            sock = None
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._local.sock = sock
                sock.settimeout(self.timeout)
                sock.connect(self.path)
            sock.sendall(payload)
            answer = orjson.loads(_receive(sock))
        except (OSError, orjson.JSONDecodeError, EOFError) as exc:
            self._drop()
            failure = LogError(f"the decision log's writer did not answer ({type(exc).__name__}: {exc})")
            self.store._failed(failure)
            raise failure from exc
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), list) \
                or len(answer["ok"]) != len(records):
            message = answer.get("error") if isinstance(answer, dict) else None
            failure = LogError(f"the decision log could not commit: {message or 'an answer the client cannot read'}")
            self.store._failed(failure)
            raise failure
        self.store.last_error = None
        chained = []
        for record, (seq, prev_hash, digest) in zip(records, answer["ok"], strict=True):
            copy = object.__new__(LogRecord)
            copy.__dict__.update(record.__dict__)
            copy.__dict__.update(seq=seq, prev_hash=prev_hash, hash=digest)
            chained.append(copy)
        return chained

    def _drop(self) -> None:
        sock = getattr(self._local, "sock", None)
        self._local.sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _gone(sock: socket.socket) -> bool:
    """The other end has closed (or sent what nobody asked for): nothing is sent on it then."""
    # (readable before anything was sent: its end of file. Not a recv: under a timeout, Python
    # waits for data before it reads, whatever the flags say.)
    try:
        return bool(select.select((sock,), (), (), 0)[0])
    except (OSError, ValueError):
        return True


def _receive(sock: socket.socket) -> bytes:
    head = _exactly(sock, _LENGTH)
    return _exactly(sock, int.from_bytes(head, "big"))


def _exactly(sock: socket.socket, size: int) -> bytes:
    if size > MAX_FRAME:
        raise EOFError(f"an answer of {size} bytes")
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the writer closed the connection")
        data += chunk
    return bytes(data)


def listening_socket(path: str) -> socket.socket:
    """The writer's socket, bound and listening (a stale file from an earlier run is replaced);
    only this user may connect (the folder's permissions, and the socket's own)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(512)
    return sock


def socket_path(data: Path) -> str:
    """Where the writer listens: in the data folder, or, if that path is too long for a Unix
    socket (108 bytes), in a private folder of its own."""
    path = str((data / "log-writer.sock").absolute())
    if len(path.encode()) < 100:
        return path
    import tempfile

    return str(Path(tempfile.mkdtemp(prefix="bindpolicy-")) / "log-writer.sock")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.logwriter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fd", type=int, required=True, help="the listening Unix socket, inherited")
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args(argv)
    from engine.logkeys import read_mac_keys

    key_file = os.environ.get("BINDPOLICY_LOG_MAC_KEY_FILE")
    store = open_store(args.database_url, keys=read_mac_keys(key_file) if key_file else None)
    if hasattr(store, "sole_writer"):
        store.sole_writer = True
    writer = LogWriter(store, socket.socket(fileno=args.fd), parent=os.getppid())
    # The supervisor stops the writer (SIGUSR1) once the workers have stopped: a SIGTERM or ^C
    # sent to the whole process group must not stop it while they still answer what they serve.
    # A stop ends the turn under way: the group being committed is committed and answered first.
    signal.signal(signal.SIGUSR1, lambda *_: writer.stopping.set())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        writer.serve()
    finally:
        store.close()
        stats = os.environ.get("BINDPOLICY_LOG_WRITER_STATS")  # (the benches': what the writer did)
        if stats:
            Path(stats).write_text(orjson.dumps({
                "commits": writer.commits, "records": writer.records, "calls": writer.calls,
                "committing_s": writer.committing, "cpu_s": time.process_time()}).decode())
    sys.exit(0)


if __name__ == "__main__":
    main()

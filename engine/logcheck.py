"""Checking the decision log as evidence: the auditor's full verification, the service's
incremental watch, and inclusion proofs of one decision against a signed checkpoint.

- `verify_log` walks every record (links, hashes or MACs) and compares the Merkle tree at each
  checkpoint's size with the signed root: a record rewritten, removed or inserted, the end cut
  off, or a checkpoint altered, is named.
- `LogWatch` is in each worker, but one worker of a service checks (the watcher: the first to
  take a lock in the checkpoint folder; another takes it at its next step when that worker
  ends): every few seconds it checks the records written since, the last records, and that the
  records it verified are still there; it sweeps the older records again within a CPU budget
  (see `LogWatch._sweep`); it writes a signed checkpoint at the configured interval, and at
  shutdown (`close`). It writes its verdict (the first broken record, how far the chain is
  verified, when it last checked) to a small file the other workers read at their own steps.
- `prove` and `verify_proof`: RFC 6962 inclusion proofs, checked with the public key only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.checkpoints import (
    HEAD,
    Checkpoint,
    CheckpointError,
    checkpoint_files,
    latest_valid,
    make_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from engine.decisionlog import (
    COLUMNS,
    GENESIS,
    Breach,
    BrokenRecord,
    ChainVerifier,
    LogError,
    LogRecord,
    Store,
    canonical,
    record_from_row,
)
from engine.logkeys import MacKeyring, public_key_id
from engine.merkle import Frontier, inclusion_proof, leaf_hash, root_of, verify_inclusion

log = logging.getLogger("bindpolicy.log")

PROOF_FORMAT = "bindpolicy-inclusion-proof/1"
_NOT_META = ("request", "response", "prev_hash", "hash")


@dataclass
class VerifyReport:
    records: int = 0
    breach: Breach | None = None
    problems: list[str] = field(default_factory=list)  # integrity failures beside the chain (exit 1)
    unreadable: list[str] = field(default_factory=list)  # what could not be read or checked (exit 2)
    keyed: int = 0
    unkeyed: int = 0
    unchecked: int = 0  # keyed records whose MAC was not checked (no key given)
    checkpoints: int = 0
    latest: Checkpoint | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.breach or self.problems else 2 if self.unreadable else 0

    def describe(self) -> str:
        lines = []
        if self.breach is not None:
            lines.append(f"BROKEN at {self.breach.describe()}")
        lines += [f"BROKEN: {p}" for p in self.problems]
        lines += [f"cannot check: {u}" for u in self.unreadable]
        if self.breach is None and not self.problems:
            kinds = []
            if self.keyed:
                kinds.append(f"{self.keyed} with a keyed MAC" + (f" ({self.unchecked} not checked: no MAC key "
                                                                  "given)" if self.unchecked else ""))
            if self.unkeyed:
                kinds.append(f"{self.unkeyed} in the older unkeyed format (plain SHA-256: anyone could re-make "
                             "them; only checkpoints protect them)")
            head = f"ok: the chain holds over {self.records} records"
            lines.insert(0, head + (f" ({'; '.join(kinds)})" if kinds else ""))
            if self.latest is not None:
                lines.append(f"checkpoints: {self.checkpoints} verified; the latest covers records "
                             f"1..{self.latest.tree_size}, written {self.latest.written_at} (key "
                             f"{self.latest.key_id}); records after it are protected by the chain only")
            else:
                lines.append("checkpoints: none (records removed from the very end would leave no trace)")
        return "\n".join(lines) + "\n"


def verify_log(store: Store, checkpoint_dir: Path | str | None,
               public_keys: dict[str, Ed25519PublicKey], *, guessed: bool = False) -> VerifyReport:
    """Every record and every checkpoint; never raises for what it reads (LogError if the
    database itself cannot be read). `guessed`: the checkpoint folder is a default nobody named
    (see own_checkpoints)."""
    report = VerifyReport()
    pending = own_checkpoints(read_checkpoints(checkpoint_dir, public_keys, report), store.origin(),
                              checkpoint_dir, report, guessed=guessed)
    verify_chain(store.scan(), store.keys, report, pending)
    if report.breach is None:
        for checkpoint in pending:
            if checkpoint.tree_size > report.records:
                report.problems.append(
                    f"checkpoint {_name(checkpoint)} covers {checkpoint.tree_size} records but the log ends at "
                    f"record {report.records}: records were removed from the end (truncated)")
    return report


def read_checkpoints(checkpoint_dir: Path | str | None, public_keys: dict[str, Ed25519PublicKey],
                     report: VerifyReport) -> list[Checkpoint]:
    """The checkpoints that are readable and signed by one of `public_keys`, smallest first;
    the others are named in `report`."""
    pending: list[Checkpoint] = []
    head = Path(checkpoint_dir) / HEAD if checkpoint_dir else None
    for path in [*checkpoint_files(checkpoint_dir), *([head] if head and head.exists() else [])] \
            if checkpoint_dir else []:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as exc:
            report.unreadable.append(str(exc))
            continue
        if public_keys:
            problem = checkpoint.verify(public_keys)
            if problem is not None:
                report.problems.append(f"checkpoint {path.name}: {problem}")
                continue
        elif checkpoint.frontier_state() is None:
            report.problems.append(f"checkpoint {path.name}: its Merkle frontier does not fold to its root")
            continue
        pending.append(checkpoint)
    if pending and not public_keys:
        report.unreadable.append(f"{len(pending)} checkpoints found but no public key given: their signatures "
                                 "were not checked (--public-key or BINDPOLICY_CHECKPOINT_PUBLIC_KEYS)")
    pending.sort(key=lambda c: c.tree_size)
    return pending


def own_checkpoints(checkpoints: list[Checkpoint], origin: str | None, folder: Path | str | None,
                    report: VerifyReport, *, guessed: bool = False) -> list[Checkpoint]:
    """The checkpoints that are this log's (`origin`; those without an origin are compared as
    before logs had one). Another log's is not compared with this log's records: it is named as
    another log's, a failure (exit 1: either the folder given is another log's, or this log was
    replaced by another) unless the folder was only `guessed` (the default folder, where a log
    given by --database-url alone need not keep its checkpoints) and holds none of this log's:
    then they could not be used (exit 2)."""
    own = [c for c in checkpoints if not c.of_another_log(origin)]
    others = [c for c in checkpoints if c.of_another_log(origin)]
    if not others:
        return own
    names = sorted({c.origin for c in others})
    this = f"this log is {origin}" if origin else "this log names none (it was made before logs had an origin)"
    if guessed and not any(c.origin for c in own):
        report.unreadable.append(
            f"the checkpoints in {folder} (the default folder: no --data or --checkpoint-dir given) are another "
            f"log's ({', '.join(names)}); {this}: give this log's checkpoint folder")
        return own
    for checkpoint in others:
        report.problems.append(
            f"checkpoint {_name(checkpoint)} is of another log ({checkpoint.origin}; {this}): the folder holds "
            "another log's checkpoints, or this log was replaced by another")
    return own


def verify_chain(items: Iterable[LogRecord | BrokenRecord], keys: MacKeyring | None, report: VerifyReport,
                 checkpoints: list[Checkpoint], *, seq: int = 0, prev_hash: str = GENESIS) -> ChainVerifier:
    """The walk of `log verify` over any records in chain order (the database's, or an export's):
    links, hashes or MACs, and each checkpoint met compared with the Merkle tree so far (from the
    genesis only). Starts after record `seq` on `prev_hash`; the checkpoints met are taken out
    of `checkpoints`."""
    verifier = ChainVerifier(keys, seq=seq, prev_hash=prev_hash)
    for item in items:
        breach = verifier.feed(item)
        if breach is not None:
            report.breach = breach
            break
        while checkpoints and checkpoints[0].tree_size <= verifier.seq:
            _compare(checkpoints.pop(0), verifier, report)
    report.records = verifier.seq - seq
    report.keyed, report.unkeyed, report.unchecked = verifier.keyed, verifier.unkeyed, verifier.unchecked
    return verifier


def _digest(texts: Any) -> bytes:
    return hashlib.sha256("\n".join(texts).encode("utf-8", "surrogateescape")).digest()


def _compare(checkpoint: Checkpoint, verifier: ChainVerifier, report: VerifyReport) -> None:
    assert verifier.frontier is not None
    if checkpoint.tree_size == 0:
        return
    if verifier.frontier.root().hex() != checkpoint.root or verifier.prev_hash != checkpoint.head_hash:
        report.problems.append(
            f"checkpoint {_name(checkpoint)}: records 1..{checkpoint.tree_size} no longer give its signed Merkle "
            "root and head (records before it were rewritten, removed or inserted)")
        return
    report.checkpoints += 1
    report.latest = checkpoint


def _name(checkpoint: Checkpoint) -> str:
    return checkpoint.path.name if checkpoint.path else f"of {checkpoint.tree_size} records"


class LogWatch:
    """The running service's check of its own log, a step every `interval` seconds.

    A breach found stays until the service restarts (readiness shows it); a database that
    cannot be read is no breach (the commits say whether the log is usable). Records are checked
    from their stored text (links, MACs), never parsed: a cell made unreadable breaks its MAC
    anyway, and parsing every record twice in every worker cost a serving worker about a tenth
    of its CPU (`log verify` still parses, and names a cell that is not JSON as such).

    One worker of a service checks: the watcher, which holds an exclusive lock on `.watch.lock`
    in the checkpoint folder (the kernel frees it when that process ends; another worker takes
    it at its next step, and goes on from the newest signed checkpoint or head, or else from
    where it was itself). Every worker checked every new record again before (a fifth of a
    serving worker's CPU). The watcher writes its verdict to `.watch.json` there at every step
    (replaced whole); the others read it at their steps: a breach it found is theirs too (until
    the service restarts), and they report how far it verified and when it last checked
    (`stale` once that is older than STALE_INTERVALS steps).
    """

    CHUNK = 20_000  # new records read in one step (a log met for the first time takes a few)
    RANGE = 2000  # records the sweep checks, and keeps a digest of, at a time
    LOCK, STATE = ".watch.lock", ".watch.json"  # in the checkpoint folder: who checks, what it found
    STALE_INTERVALS, STALE_MIN = 3, 15.0  # the watcher's verdict is stale after max(3 steps, 15 s)

    def __init__(self, store: Store, *, interval: float = 5.0, tail: int = 1000, budget: float = 0.1,
                 signing_key: Ed25519PrivateKey | None = None, checkpoint_dir: Path | None = None,
                 checkpoint_interval: float = 60.0,
                 on_breach: Callable[[Breach], None] | None = None) -> None:
        self.store = store
        self.interval, self.tail = interval, tail
        self.budget = budget  # of one core, for the sweep: CPU seconds per second of wall time
        self._digests: dict[int, bytes] = {}  # range number -> digest of its rows, once verified
        self.swept = 0  # records the sweep has checked, for the metrics and the bench
        self.sweep_cpu = 0.0  # CPU seconds it took
        self.signing_key = signing_key
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_interval = checkpoint_interval
        self.on_breach = on_breach
        self.breach: Breach | None = None
        self.read_error: str | None = None
        self.verified_seq, self.verified_hash = 0, GENESIS
        self.frontier: Frontier | None = None
        self.last_checkpoint: Checkpoint | None = None
        self.origin: str | None = None  # the log's, read at start: its checkpoints name it
        self._last_checkpoint_at = 0.0
        self._cursor = 0  # the range the sweep checks next
        self._head_written = 0
        self._watch_lock: Any = None  # the open lock file, while this process is the watcher
        self._lock_pid = 0  # the process that took it (a forked child has not)
        self.checked_at: float | None = None  # wall time of the last check, this worker's or the watcher's
        self.watcher_pid: int | None = None  # the process that checks (this one's, when it is the watcher)
        self._shared: dict[str, Any] = {}  # the watcher's verdict, as last read
        self._shared_stamp: tuple[int, int] | None = None  # the state file's (mtime, size) when read
        self._started_at = time.time()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.paced = False  # steps pause between their pieces (the background thread's steps)
        self._closing = False  # shutting down: no more pauses
        self._piece_started = 0.0  # thread CPU time when the current piece began

    # --- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """At service start: the tail of the chain, then where the tree goes on from. The newest
        checkpoint of this service's key being another log's is a breach (this log replaced by
        another, or the folder another log's): it names both logs."""
        self._found(self.store.verify(self.store.tail(self.tail, parse=False)))
        self.origin = self.store.origin()
        if self.signing_key is not None and self.checkpoint_dir is not None:
            own = {public_key_id(self.signing_key.public_key()): self.signing_key.public_key()}
            checkpoint = latest_valid(self.checkpoint_dir, own)
            if checkpoint is not None and checkpoint.of_another_log(self.origin):
                if self.breach is None:
                    self._found(Breach(checkpoint.tree_size, None, (
                        f"checkpoint {_name(checkpoint)} is of another log ({checkpoint.origin}; this log is "
                        f"{self.origin}): this log was replaced by another, or the checkpoint folder is "
                        "another log's")))
                checkpoint = None
            if checkpoint is not None and (state := checkpoint.frontier_state()) is not None:
                self.frontier, self.last_checkpoint = state, checkpoint
                self.verified_seq, self.verified_hash = checkpoint.tree_size, checkpoint.head_hash
            else:
                self.frontier = Frontier()  # built from the first record, in the background
        else:  # no tree to build: go on from the head, whose tail was just checked
            self.verified_seq, self.verified_hash = self.store.head()

    def ensure_running(self) -> None:
        """Start the watcher in this process (after a fork, threads do not survive)."""
        if self.interval <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="log-watch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        self.paced = True
        spent = 0.0
        while True:
            # A paced step lasts a while (its sweep spread over about an interval at the budget):
            # the next begins an interval after this one began, so the sweep keeps its pace.
            time.sleep(max(self.interval - spent, 0.0))
            began = time.monotonic()
            self._piece_started = time.thread_time()
            try:
                self.step()
            except Exception:  # never let the watcher die
                log.exception("decision log watcher error")
            spent = time.monotonic() - began

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> None:
        """The watcher's check and verdict, or the other workers' reading of that verdict."""
        with self._lock:
            if not self._elect():
                self._follow()
                return
            try:
                self._step()
                self.read_error = None
            except LogError as exc:
                self.read_error = str(exc)
            self.checked_at, self.watcher_pid = time.time(), os.getpid()
            self._publish()

    # --- one watcher for the workers of a service -----------------------------------------------
    @property
    def watching(self) -> bool:
        """Whether this process is the one that checks (always, without a checkpoint folder)."""
        return self.checkpoint_dir is None or (self._watch_lock is not None and self._lock_pid == os.getpid())

    def _elect(self) -> bool:
        """This process is the watcher, or becomes it now if the lock is free (none holds it, or
        its holder ended)."""
        if self.watching:
            return True
        assert self.checkpoint_dir is not None
        self._watch_lock = None  # (one inherited through a fork is the parent's)
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.checkpoint_dir / self.LOCK, "a+b")  # noqa: SIM115 - held while this process lives
        except OSError:
            return False
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return False
        self._watch_lock, self._lock_pid = lock, os.getpid()
        self._take_over()
        return True

    def _take_over(self) -> None:
        """Becoming the watcher: go on from the newest signed checkpoint or head of this service's
        key if it is ahead of where this worker was (the records after it are checked as new),
        else from there. A breach the last watcher published stays found."""
        self._follow()
        if self.breach is not None or self.signing_key is None or self.checkpoint_dir is None:
            return
        own = {public_key_id(self.signing_key.public_key()): self.signing_key.public_key()}
        found = latest_valid(self.checkpoint_dir, own)
        if found is not None and found.of_another_log(self.origin):
            found = None  # (found at start: a breach already)
        best = found
        with contextlib.suppress(CheckpointError, OSError):
            head = read_checkpoint(self.checkpoint_dir / HEAD)
            if head.verify(own) is None and not head.of_another_log(self.origin) and \
                    (best is None or head.tree_size > best.tree_size):
                best = head
        if best is None or best.tree_size <= self.verified_seq or (state := best.frontier_state()) is None:
            return
        self.frontier, self.verified_seq, self.verified_hash = state, best.tree_size, best.head_hash
        if found is not None and (self.last_checkpoint is None or found.tree_size > self.last_checkpoint.tree_size):
            self.last_checkpoint = found

    def _publish(self) -> None:
        """The verdict, for the other workers: replaced whole, so a reader sees one or the other."""
        if self.checkpoint_dir is None:
            return
        breach = self.breach
        latest = self.last_checkpoint
        state = {"pid": os.getpid(), "checked_at": self.checked_at, "interval": self.interval,
                 "verified_seq": self.verified_seq, "read_error": self.read_error,
                 "breach": None if breach is None else {"seq": breach.seq, "decision_id": breach.decision_id,
                                                        "problem": breach.problem},
                 "checkpoint": None if latest is None else {"tree_size": latest.tree_size,
                                                            "written_at": latest.written_at}}
        temporary = self.checkpoint_dir / f"{self.STATE}.{os.getpid()}"
        with contextlib.suppress(OSError):
            temporary.write_text(json.dumps(state))
            temporary.replace(self.checkpoint_dir / self.STATE)

    def _follow(self) -> None:
        """The watcher's verdict, read again when its file changed; a file that cannot be read
        or is not the watcher's shape is ignored (the verdict then goes stale)."""
        assert self.checkpoint_dir is not None
        path = self.checkpoint_dir / self.STATE
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._shared_stamp:
                return
            state = json.loads(path.read_bytes())
            breach = state["breach"]
            shared = {"pid": int(state["pid"]), "checked_at": float(state["checked_at"]),
                      "verified_seq": int(state["verified_seq"]), "read_error": state["read_error"],
                      "checkpoint": state["checkpoint"]}
            found = None if breach is None else Breach(int(breach["seq"]), breach["decision_id"],
                                                       str(breach["problem"]))
        except (OSError, ValueError, TypeError, KeyError):
            return
        self._shared, self._shared_stamp = shared, stamp
        self.checked_at, self.watcher_pid = shared["checked_at"], shared["pid"]
        if found is not None and self.breach is None:
            self._found(found)

    @property
    def verified_through(self) -> int:
        """How far the chain is verified: by this process if it checks, else by the watcher."""
        if self.watching or "verified_seq" not in self._shared:
            return self.verified_seq
        return int(self._shared["verified_seq"])

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """(records covered, written at) of the newest checkpoint the watcher wrote or started from."""
        if not self.watching and self._shared:
            shared = self._shared.get("checkpoint")
            if isinstance(shared, dict) and isinstance(shared.get("tree_size"), int):
                return shared["tree_size"], str(shared.get("written_at"))
        latest = self.last_checkpoint
        return None if latest is None else (latest.tree_size, latest.written_at)

    def stale(self) -> float | None:
        """Seconds since the last check, when that is longer than the watch allows (none checked
        since this worker started counts from its start); None while the watch keeps up, or when
        it does not run (interval 0)."""
        if self.interval <= 0:
            return None
        since = time.time() - (self.checked_at if self.checked_at is not None else self._started_at)
        return since if since > max(self.STALE_INTERVALS * self.interval, self.STALE_MIN) else None

    def _step(self) -> None:
        if self.breach is not None:
            return
        if self.verified_seq and self.store.hash_at(self.verified_seq) != self.verified_hash:
            gone = self.store.hash_at(self.verified_seq) is None
            self._found(Breach(self.verified_seq, None, "verified earlier, it is now " + (
                "gone: records were removed from the end (truncated)" if gone else "rewritten")))
            return
        before = self.verified_seq
        verifier = ChainVerifier(self.store.keys, seq=self.verified_seq, prev_hash=self.verified_hash,
                                 frontier=self.frontier)
        if self._found(self._feed(verifier, self.verified_seq, self.CHUNK)):
            return
        self.verified_seq, self.verified_hash = verifier.seq, verifier.prev_hash
        # The last `tail` records again, but those verified in an earlier step only: the ones just
        # read as new were checked a moment ago (under load, a step's new records are the whole
        # tail, and checking them twice was a third of the watch's CPU); their first link was
        # checked from the last record verified before them.
        first = max(self.verified_seq - self.tail, 0)
        if before > first and self._found(self._feed(ChainVerifier(self.store.keys, from_first_seen=True),
                                                     first, before - first)):
            return
        if self._found(self._sweep()):
            return
        self._maybe_checkpoint()

    # --- pacing: a step in pieces, the serving threads free between them --------------------------
    PIECE = 50  # records read and checked between two pauses of a paced step (a few ms of CPU)
    NEW_DUTY = 0.5  # of one core, at most, for the new records and the tail (they must keep up)

    def _feed(self, verifier: ChainVerifier, after_seq: int, count: int) -> Breach | None:
        """The `count` records after `after_seq` (fewer at the log's end) fed to the verifier, read
        PIECE at a time with a pause after each piece when paced."""
        done = 0
        while done < count:
            piece = list(self.store.scan_stored(after_seq=after_seq, limit=min(self.PIECE, count - done)))
            for item in piece:
                if (breach := verifier.feed(item)) is not None:
                    return breach
            if len(piece) < min(self.PIECE, count - done):
                return None
            done, after_seq = done + len(piece), verifier.seq
            self._pause(self.NEW_DUTY)
        return None

    def _pause(self, duty: float) -> None:
        """In the background thread (`paced`), after a piece of a step: sleep so that the step's
        pieces take at most `duty` of a core. A step used to run whole: up to half a second of CPU
        in one stretch (the sweep's budget at the default interval), during which the worker's
        serving threads waited for the interpreter's lock at each turn (5 ms each: the switch
        interval); its requests were the slowest percent at half load. In pieces of a few ms with
        the lock free between them, a request meets at most one piece. Not at shutdown (`close`)."""
        if not self.paced or self._closing:
            return
        now = time.thread_time()
        time.sleep(min((now - self._piece_started) * (1.0 - duty) / duty, 1.0))
        self._piece_started = time.thread_time()

    # --- the sweep: older records, again and again, within a CPU budget -------------------------
    def _sweep(self) -> Breach | None:
        """Check ranges of RANGE verified records in turn, for at most `budget` x `interval` CPU
        seconds a step (one range at least, one pass at most).

        A range met for the first time is checked in full (links and MACs, from the text as
        stored, without parsing it), and the digest of its rows kept (each row as one text in
        which any change of a cell or of its type shows); after that, only the digest is taken
        again, a few times cheaper. A digest that changed sends the range to the full check,
        which names the record."""
        complete = self.verified_seq // self.RANGE
        if complete == 0 or not self.watching:  # (the watcher sweeps: steps run only there)
            return None
        allowed = self.budget * max(self.interval, 1.0)
        started = time.thread_time()
        try:
            for _ in range(complete):
                number = self._cursor % complete
                self._cursor = number + 1
                breach = self._check_range(number)
                self.swept += self.RANGE
                if breach is not None or time.thread_time() - started >= allowed:
                    return breach
            return None
        finally:
            self.sweep_cpu += time.thread_time() - started

    def _check_range(self, number: int) -> Breach | None:
        first, last = number * self.RANGE, (number + 1) * self.RANGE
        known = self._digests.get(number)
        if known is not None and _digest(row[0] for row in self._rows(first + 1, last, full=False)) == known:
            return None
        rows = self._rows(max(first, 1), last, full=True)
        if first:  # the record before the range anchors its first link
            row = next(rows, None)
            if row is None or row[1] != first or not isinstance(row[-1], str):
                return Breach(first, None, "verified earlier, it is now gone or unreadable")
            anchor = row[-1]
        else:
            anchor = GENESIS
        verifier = ChainVerifier(self.store.keys, seq=first, prev_hash=anchor, from_first_seen=False)
        verifier.frontier = None  # links and MACs only: the tree was checked when they were new
        texts = []
        for row in rows:
            texts.append(row[0])
            breach = verifier.feed(record_from_row(row[1:], parse=False))
            if breach is not None:
                return breach
        if verifier.seq != last:
            return Breach(verifier.seq + 1, None, "verified earlier, it is now missing")
        digest = _digest(texts)
        if known is not None and digest != known:
            return Breach(first + 1, None, f"records {first + 1}..{last} changed since they were verified "
                                           "(their MACs still hold: a cell's type or an unhashed field)")
        self._digests[number] = digest
        return None

    def _rows(self, first: int, last: int, *, full: bool) -> Iterator[tuple[Any, ...]]:
        """store.rows_between(first, last), read PIECE rows at a time, paced at the sweep's budget."""
        for start in range(first, last + 1, self.PIECE):
            yield from self.store.rows_between(start, min(start + self.PIECE - 1, last), full=full)
            self._pause(min(self.budget, 1.0))

    def _found(self, breach: Breach | None) -> bool:
        if breach is None:
            return False
        self.breach = breach
        log.error("decision log chain broken", extra={"event": "chain_broken", "seq": breach.seq,
                                                      "decision_id": breach.decision_id, "problem": breach.problem})
        if self.on_breach is not None:
            self.on_breach(breach)
        return True

    def close(self) -> None:
        """At shutdown: check what came since, and sign the head (records removed from the end
        while the service is stopped are then found by `log verify` and at the next start)."""
        self._closing = True  # a step under way goes on without pauses
        with self._lock, contextlib.suppress(LogError, OSError):
            if not self._elect():
                return  # the watcher signs it
            self._step()
            self._write_head(force=True)

    def _write_head(self, force: bool = False) -> None:
        """The head signed again, into one file replaced each time (at most every check)."""
        if self.signing_key is None or self.checkpoint_dir is None or self.frontier is None:
            return
        if self.frontier.size != self.verified_seq or self.verified_seq == 0:
            return
        if not force and self.verified_seq == self._head_written:
            return
        self.store.settle()  # (nothing signed that a crash of the database could take back)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(self.checkpoint_dir, make_checkpoint(self.frontier, self.verified_hash, self.signing_key,
                                                              origin=self.origin), HEAD)
        self._head_written = self.verified_seq

    def _maybe_checkpoint(self) -> None:
        if self.signing_key is None or self.checkpoint_dir is None or self.frontier is None:
            return
        if self.frontier.size != self.verified_seq or self.verified_seq == 0:
            return
        self._write_head()
        if self.store.head()[0] != self.verified_seq and time.monotonic() - self._last_checkpoint_at < 5 * \
                self.checkpoint_interval:
            return  # still catching up with the log (or it grows too fast): checkpoint once caught up
        if time.monotonic() - self._last_checkpoint_at < self.checkpoint_interval:
            return
        if self.last_checkpoint is not None and self.last_checkpoint.tree_size >= self.verified_seq:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with open(self.checkpoint_dir / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the workers of a service take turns
            newest = checkpoint_files(self.checkpoint_dir)[-1:]
            if newest and time.time() - newest[0].stat().st_mtime < self.checkpoint_interval and \
                    int(newest[0].name[11:23]) >= self.verified_seq - 1:
                self._last_checkpoint_at = time.monotonic()  # another worker just wrote one
                return
            self.store.settle()
            checkpoint = make_checkpoint(self.frontier, self.verified_hash, self.signing_key, origin=self.origin)
            write_checkpoint(self.checkpoint_dir, checkpoint)
        self.last_checkpoint, self._last_checkpoint_at = checkpoint, time.monotonic()
        log.info("decision log checkpoint written", extra={
            "event": "checkpoint", "tree_size": checkpoint.tree_size, "root": checkpoint.root})


# --- inclusion proofs ---------------------------------------------------------------------------
class ProofError(Exception):
    """A proof that cannot be made or checked; `code` is the exit code (1 broken, 2 unreadable)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def prove(store: Store, decision_id: str, checkpoint_dir: Path | str,
          public_keys: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """An inclusion proof of one decision against the newest signed checkpoint that covers it."""
    record = store.get(decision_id)
    if record is None:
        raise ProofError(f"no decision '{decision_id}' in the log")
    covering = None
    origin = store.origin()
    for path in reversed(checkpoint_files(checkpoint_dir)):
        with contextlib.suppress(CheckpointError):
            checkpoint = read_checkpoint(path)
            if checkpoint.tree_size >= record.seq and not checkpoint.of_another_log(origin) and \
                    (not public_keys or checkpoint.verify(public_keys) is None):
                covering = checkpoint
                break
    if covering is None:
        raise ProofError(f"no signed checkpoint in {checkpoint_dir} covers record {record.seq} yet; "
                         "the service writes one every checkpoint interval")
    leaves = []
    for item in store.scan(limit=covering.tree_size):
        if isinstance(item, BrokenRecord):
            raise ProofError(f"record {item.seq} cannot be read: {item.problem}", 1)
        leaves.append(item.leaf())
    if len(leaves) < covering.tree_size or root_of(leaves).hex() != covering.root:
        raise ProofError(f"the log no longer matches checkpoint {_name(covering)}: run `bindpolicy log verify`", 1)
    meta = {name: getattr(record, name) for name in COLUMNS if name not in _NOT_META}
    return {"format": PROOF_FORMAT, "decision_id": record.decision_id, "leaf_index": record.seq - 1,
            "tree_size": covering.tree_size,
            "record": {"meta": meta, "request": record.request_text, "response": record.response_text},
            "audit_path": [h.hex() for h in inclusion_proof(leaves, record.seq - 1)],
            "checkpoint": covering.to_dict()}


def verify_proof(proof: Any, public_keys: dict[str, Ed25519PublicKey]) -> str:
    """The decision the proof is about, if it holds; ProofError saying why not."""
    try:
        record, path = proof["record"], [bytes.fromhex(h) for h in proof["audit_path"]]
        meta, request, response = record["meta"], record["request"], record["response"]
        index, size = int(proof["leaf_index"]), int(proof["tree_size"])
        fields = {k: v for k, v in proof["checkpoint"].items() if k != "format"}
        checkpoint = Checkpoint(**{**fields, "frontier": tuple(fields["frontier"])})
        if not isinstance(meta, dict) or not isinstance(request, str) or not isinstance(response, str):
            raise TypeError("record")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProofError(f"not a {PROOF_FORMAT} document ({exc})") from exc
    if not public_keys:
        raise ProofError("no public key given to check the checkpoint's signature")
    problem = checkpoint.verify(public_keys)
    if problem is not None:
        raise ProofError(f"the checkpoint: {problem}", 1)
    if size != checkpoint.tree_size or meta.get("seq") != index + 1:
        raise ProofError("the proof's position does not match its record and checkpoint", 1)
    content = canonical(meta) + "\n" + request + "\n" + response
    if not verify_inclusion(leaf_hash(content.encode("utf-8")), index, size, path, bytes.fromhex(checkpoint.root)):
        raise ProofError(f"the record is not in the tree of {size} records that the checkpoint signs "
                         "(the record or the path was altered)", 1)
    return str(meta.get("decision_id"))

"""Signed checkpoints of the decision log: its size, Merkle root and head, signed with Ed25519.

A checkpoint is a small JSON file written outside the database (BINDPOLICY_CHECKPOINT_DIR),
named by the number of records it covers. It also carries the frontier of the Merkle tree
(the roots of its perfect subtrees), which folds to the signed root: a service that restarts
goes on from its last checkpoint without reading the whole log again.

It names the log it is of (`origin`, as a Certificate Transparency checkpoint's first line
does): the log's own identity, made once when the log is created (engine/decisionlog.py's
`log_origin` table). A checkpoint of another log is then told apart from a log that no longer
matches its checkpoint. Checkpoints written before logs had an origin have none, and are
signed and compared as they were.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.logkeys import public_key_id, sign, signature_holds
from engine.merkle import Frontier

FORMAT = "bindpolicy-checkpoint/1"
NAME = re.compile(r"checkpoint-([0-9]{12})\.json")
# The head, signed again at every check of the running service (one file, replaced): records
# removed from the end after it are found by `log verify` too, without a file per check.
HEAD = "head.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as one (named, with why)."""


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int  # records 1..tree_size are covered
    root: str  # hex Merkle root over their leaves
    head_hash: str  # the chain hash (or MAC) of record tree_size
    written_at: str
    frontier: tuple[str, ...]
    key_id: str
    signature: str = ""
    path: Path | None = field(default=None, compare=False)
    origin: str = ""  # the log it is of ("": written before logs had an origin)

    def payload(self) -> bytes:
        """The bytes signed: every field but the signature, as canonical JSON (the origin only
        when there is one, so that older checkpoints' signatures still hold)."""
        body = {"format": FORMAT, "tree_size": self.tree_size, "root": self.root, "head_hash": self.head_hash,
                "written_at": self.written_at, "frontier": list(self.frontier), "key_id": self.key_id,
                **({"origin": self.origin} if self.origin else {})}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def of_another_log(self, origin: str | None) -> bool:
        """Whether it names a log other than `origin` (a log's own, None for a log without one).
        A checkpoint without an origin is no log's in particular: it is compared, as before."""
        return bool(self.origin) and self.origin != origin

    def to_dict(self) -> dict[str, Any]:
        return {**json.loads(self.payload()), "signature": self.signature}

    def frontier_state(self) -> Frontier | None:
        """The Merkle frontier it carries, if it folds to its signed root."""
        try:
            state = Frontier(self.tree_size, [bytes.fromhex(h) for h in self.frontier])
        except ValueError:
            return None
        return state if state.consistent() and state.root().hex() == self.root else None

    def verify(self, public_keys: dict[str, Ed25519PublicKey]) -> str | None:
        """None if signed by one of the keys; else what is wrong."""
        key = public_keys.get(self.key_id)
        if key is None:
            return f"signed by key {self.key_id}, which is not among the public keys given"
        if not signature_holds(key, self.payload(), self.signature):
            return "its signature does not verify (the file was altered)"
        if self.frontier_state() is None:
            return "its Merkle frontier does not fold to its root"
        return None


def make_checkpoint(frontier: Frontier, head_hash: str, key: Ed25519PrivateKey,
                    now: datetime | None = None, origin: str | None = None) -> Checkpoint:
    at = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    unsigned = Checkpoint(frontier.size, frontier.root().hex(), head_hash, at,
                          tuple(r.hex() for r in frontier.roots), public_key_id(key.public_key()), origin=origin or "")
    return replace(unsigned, signature=sign(key, unsigned.payload()))


def write_checkpoint(folder: Path | str, checkpoint: Checkpoint, name: str | None = None) -> Path:
    """Written whole or not at all (a temporary file renamed), and synced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or f"checkpoint-{checkpoint.tree_size:012d}.json")
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(checkpoint.to_dict(), out, indent=1)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def read_checkpoint(path: Path | str) -> Checkpoint:
    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from exc
    try:
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise TypeError(f"not a {FORMAT} file")
        checkpoint = Checkpoint(
            tree_size=_typed(body, "tree_size", int), root=_typed(body, "root", str),
            head_hash=_typed(body, "head_hash", str), written_at=_typed(body, "written_at", str),
            frontier=tuple(_typed(body, "frontier", list)), key_id=_typed(body, "key_id", str),
            signature=_typed(body, "signature", str), path=path,
            origin=_typed(body, "origin", str) if "origin" in body else "")
        if not all(isinstance(h, str) for h in checkpoint.frontier) or checkpoint.tree_size < 0:
            raise TypeError("frontier must list hex strings, tree_size be a count")
    except TypeError as exc:
        raise CheckpointError(f"{path}: not a checkpoint: {exc}") from exc
    return checkpoint


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"'{name}' must be a {kind.__name__}")
    return value


def checkpoint_files(folder: Path | str) -> list[Path]:
    """Checkpoint files, by the number of records they cover."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.fullmatch(p.name))


def latest_valid(folder: Path | str, public_keys: dict[str, Ed25519PublicKey]) -> Checkpoint | None:
    """The checkpoint covering the most records among those that verify (of any log: the
    caller compares its origin)."""
    for path in reversed(checkpoint_files(folder)):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError:
            continue
        if checkpoint.verify(public_keys) is None:
            return checkpoint
    return None

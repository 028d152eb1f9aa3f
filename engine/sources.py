"""Where a policy set's files come from: a folder, the decision log's archive by digest, or bytes in memory.

The loader reads through this interface only, as Cerbos reads through its `Store`: replay and
remote workers load a set by its digest without writing it to a temporary folder first. File
names are relative to the set's root, one version folder deep (`v1/bind.yaml`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

POLICY_SUFFIXES = (".yaml", ".yml")
LAST_GOOD = "last-good-policies"  # in the data folder: the digest of the last set that loaded
SET_VERSION = "(set)"  # the archive's version name for a whole set kept under its own digest


def set_digest(files: Mapping[str, bytes | str]) -> str:
    """A whole policy set's digest (`set:sha256:...`): SHA-256 over its file names, lengths and
    bytes, in name order. The archive keeps the set under it as version SET_VERSION; it judged
    the rejections no version took (unknown_version), and a worker starting on broken files
    serves it as the last good set."""
    hashed = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        hashed.update(f"{name}\0{len(raw)}\0".encode("utf-8", "surrogateescape") + raw)
    return "set:sha256:" + hashed.hexdigest()


class PolicySource(Protocol):
    """A policy set's files, by name relative to its root."""

    def exists(self) -> bool:
        """False if there is no such set at all (a folder that is not there)."""
        ...

    def names(self) -> list[str]:
        """Every candidate policy file: `<version folder>/<file>.yaml` (or `.yml`)."""
        ...

    def read(self, name: str) -> bytes:
        """The bytes of one file; OSError if it cannot be read."""
        ...


class UnknownDigestError(LookupError):
    """No policy content with that digest was ever kept."""


class PolicyArchive(Protocol):
    """What keeps every policy content served, by digest (the decision log's store)."""

    def policy(self, digest: str) -> tuple[str, dict[str, str]] | None: ...


def _policy_file(name: str) -> bool:
    folder, _, file = name.partition("/")
    return folder not in ("", ".", "..") and "/" not in file and file.endswith(POLICY_SUFFIXES)


class FolderSource:
    """The files of a folder on disk: `<root>/<version>/*.yaml`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def names(self) -> list[str]:
        found = [p for suffix in POLICY_SUFFIXES for p in self.root.glob(f"*/*{suffix}")]
        return [p.relative_to(self.root).as_posix() for p in found]

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def __str__(self) -> str:
        return str(self.root)


class MemorySource:
    """Files held in memory ({name: bytes or text}): a set shipped to a worker, or read from a store."""

    def __init__(self, files: Mapping[str, bytes | str], label: str = "<memory>") -> None:
        self.files = {name: data.encode("utf-8") if isinstance(data, str) else bytes(data)
                      for name, data in files.items()}
        self.label = label

    def exists(self) -> bool:
        return True

    def names(self) -> list[str]:
        return [name for name in self.files if _policy_file(name)]

    def read(self, name: str) -> bytes:
        try:
            return self.files[name]
        except KeyError:
            raise FileNotFoundError(name) from None

    def __str__(self) -> str:
        return self.label


class ArchiveSource(MemorySource):
    """The content kept under one digest (a version and the versions it extends)."""

    def __init__(self, archive: PolicyArchive, digest: str) -> None:
        stored = archive.policy(digest)
        if stored is None:
            raise UnknownDigestError(f"the policy content {digest} is not in the log")
        self.version, files = stored
        self.digest = digest
        super().__init__(files, label=digest)

"""A real PostgreSQL server for the tests: initdb into a temporary folder, started and stopped here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    raise RuntimeError(f"PostgreSQL's {name} is not installed (make test installs the Debian postgresql package)")


def _as_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@dataclass
class Cluster:
    """A PostgreSQL server of the suite's own: its URL, and a crash and restart for the tests."""

    data: Path
    root: Path
    port: int
    fsync: bool

    @property
    def url(self) -> str:
        return f"postgresql://bindpolicy@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1" + ("" if self.fsync else " -F -c fsync=off")
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                                  "-w", "-t", "60", "-o", options, "start"]),
                       check=True, capture_output=True, env=_ENV)
        _wait(self.url)

    def postmaster(self) -> int:
        """The pid of the running server's first process (the parent of every backend)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def crash(self) -> None:
        """Stop as a crash would: no checkpoint, so the next start replays the WAL."""
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       capture_output=True, check=False, env=_ENV)


_ENV = {**os.environ, "LC_ALL": "C"}


@contextmanager
def postgres_cluster(*, fsync: bool = False) -> Iterator[Cluster]:
    """A fresh server (trust auth on 127.0.0.1), stopped afterwards. Without `fsync` (the
    default, for speed) a crash of the machine could lose commits; with it, a crash of the
    server cannot."""
    root = Path(tempfile.mkdtemp(prefix="bindpolicy-pg-"))
    cluster = Cluster(root / "data", root, free_port(), fsync)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(_as_owner([_binary("initdb"), "-D", str(cluster.data), "-A", "trust", "-U", "bindpolicy",
                              "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, env=_ENV)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.crash()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a fresh server (fsync off: the suite's shared one), stopped afterwards."""
    with postgres_cluster() as cluster:
        yield cluster.url


def _wait(url: str) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(url).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fresh_schema(url: str, name: str) -> str:
    """A new, empty schema on the server, and a URL whose connections use it."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{name}"

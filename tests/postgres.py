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


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a fresh server (trust auth on 127.0.0.1), stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="bindpolicy-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(_as_owner([_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "bindpolicy",
                              "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, env=env)
    subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                              "-o", f"-p {port} -k {root} -h 127.0.0.1 -F -c fsync=off", "start"]),
                   check=True, capture_output=True, env=env)
    try:
        url = f"postgresql://bindpolicy@127.0.0.1:{port}/postgres"
        _wait(url)
        yield url
    finally:
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, check=False, env=env)
        shutil.rmtree(root, ignore_errors=True)


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

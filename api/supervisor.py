"""The workers of `bindpolicy serve`: uvicorn's, each on a listening socket of its own (SO_REUSEPORT).

`uvicorn --workers N` hands one listening socket to every worker: whichever worker's loop
wakes first accepts a new connection, and keep-alive clients stay with it. Under load the
busiest of two workers took 53-86% of the answers (bench/bench_service.py): half the machine
idled while one worker queued. Here the supervisor binds one socket per worker to the same
address with SO_REUSEPORT before it starts them: the kernel spreads new connections over the
sockets by a hash of their addresses, whichever worker is busy.

The sockets belong to the supervisor, the workers get them at start: a worker that dies is
replaced on the same socket (connections queued on it wait for the replacement instead of
being refused), and a stop (SIGTERM, SIGINT) stops every worker gracefully, as uvicorn's own
supervisor does (this one is uvicorn's, with a socket per worker slot).

With `--log-writer process`, the supervisor also runs the decision log's writer
(engine/logwriter.py: one process that commits every worker's records in one group) on a Unix
socket it holds itself: it starts the writer before the workers, replaces it if it dies (calls
it had not answered fail with 503; calls made meanwhile wait in the socket's queue for the
replacement) and stops it after the workers, once they have answered what they were serving.

Run by `bindpolicy serve` (python -m api.supervisor ...); the options are uvicorn's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from engine.cli import LOG_WRITERS


def reuseport_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """`count` listening sockets bound to one address, in one SO_REUSEPORT group; OSError if
    anything listens there already (SO_REUSEPORT alone would join another service's group, of
    the same user, in silence). Port 0: the first socket's port, for all of them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # not in any group: refused if taken
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            for other in sockets:
                other.close()
            raise
        port = sock.getsockname()[1]
        sock.listen(backlog)  # listening from now: the kernel counts it in the group's spread
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


class LogWriterProcess:
    """The decision log's writer (python -m engine.logwriter), on the supervisor's socket."""

    def __init__(self, listener: socket.socket, database_url: str) -> None:
        self.listener = listener
        self.database_url = database_url
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        fd = self.listener.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.logwriter", "--fd", str(fd), "--database-url", self.database_url],
            pass_fds=(fd,))

    def keep_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            print(f"the decision log's writer (pid {self.process.pid}) exited with {self.process.returncode}; "
                  "starting another", file=sys.stderr, flush=True)
            self.restarts += 1
            self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)  # (it ignores SIGTERM: see engine/logwriter.py)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ReusePortSupervisor(Multiprocess):
    """uvicorn's supervisor (health checks, replacement of a dead worker, graceful stop, HUP),
    with worker slot i always served from socket i, and the log's writer if there is one."""

    def __init__(self, config: Config, sockets: list[socket.socket], writer: LogWriterProcess | None = None) -> None:
        super().__init__(config, sockets)
        self.slots = sockets
        self.writer = writer

    def _process(self, slot: int) -> Process:
        return Process(self.config, [self.slots[slot]])

    def init_processes(self) -> None:
        if self.writer is not None:  # (before the workers: their first records go to it)
            self.writer.start()
        for slot in range(self.processes_num):
            process = self._process(slot)
            process.start()
            self.processes.append(process)

    def join_all(self) -> None:
        super().join_all()
        if self.writer is not None:  # (after the workers: what they were serving is committed first)
            self.writer.stop()

    def keep_subprocess_alive(self) -> None:
        if self.writer is not None and not self.should_exit.is_set():
            self.writer.keep_alive()
        # uvicorn's loop, but the replacement gets the dead worker's socket.
        for slot, process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # it would fail the same way again
                self.should_exit.set()
                return
            replacement = self._process(slot)
            replacement.start()
            self.processes[slot] = replacement

    def restart_all(self) -> None:
        for slot, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._process(slot)
            new.start()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                return
            old.terminate()
            old.join()
            self.processes[slot] = new

    def handle_ttin(self) -> None:  # the slots are fixed at start
        pass

    def handle_ttou(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api.supervisor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--backlog", type=int, default=2048)
    parser.add_argument("--log-writer", choices=LOG_WRITERS, default="inline",
                        help="process: one writer process commits every worker's records (engine/logwriter.py); "
                             "inline: each worker commits its own")
    parser.add_argument("--database-url", default="", help="the log (for the writer process)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        sys.exit("--workers must be 1 or more")
    config = Config(
        "api.asgi:app", host=args.host, port=args.port, workers=args.workers,
        http="api.server:JsonHttpProtocol",  # httptools straight to the pool, every error of its own in JSON
        # uvloop (libuv, C): measured against asyncio's loop, it took the server's CPU per logged
        # decision down and about doubled the decisions per second (README, "The service")
        loop=args.loop, ws="none", lifespan="on", server_header=False, timeout_keep_alive=5,
        timeout_graceful_shutdown=15, log_level="warning",
        access_log=False,  # the app writes one JSON line per request itself
        # X-Forwarded-For and -Proto trusted from FORWARDED_ALLOW_IPS (uvicorn's default: 127.0.0.1, ::1),
        # as uvicorn's ProxyHeadersMiddleware trusts them: api/server.py applies its rules per request
        proxy_headers=True,
        backlog=args.backlog)
    try:
        sockets = reuseport_sockets(args.host, args.port, args.workers, args.backlog)
    except OSError as exc:
        sys.exit(f"cannot listen on {args.host}:{args.port}: {exc}")
    writer = None
    if args.log_writer == "process":
        from pathlib import Path

        from engine.logwriter import listening_socket, socket_path

        path = socket_path(Path(os.environ.get("BINDPOLICY_DATA", "data")))
        writer = LogWriterProcess(listening_socket(path), args.database_url)
        os.environ["BINDPOLICY_LOG_WRITER_SOCKET"] = path  # (the workers, spawned, write through it)
    try:
        ReusePortSupervisor(config, sockets, writer).run()
    finally:
        if writer is not None:
            writer.stop()
            with contextlib.suppress(OSError):
                os.unlink(os.environ["BINDPOLICY_LOG_WRITER_SOCKET"])


if __name__ == "__main__":
    main()

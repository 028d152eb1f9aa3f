"""A bench-only probe of where bindpolicy's slow requests spend their time (bench/bench_latency.py).

Put this folder first on a server's PYTHONPATH with BENCH_PROBE=PREFIX: every process of the
server appends to PREFIX.PID, as it happens, one line per

- cyclic collection of 0.5 ms or more, or of the oldest generation: `gc WALL GEN MS COLLECTED`;
- step of the log watch: `watch WALL MS CPU_MS WATCHING SWEEP_CPU_MS NEW_RECORDS`;
- SQLite commit of 3 ms or more: `commit WALL MS`; wait of 3 ms or more for the log's write
  lock (another worker's commit): `lockwait WALL MS`;

and to PREFIX.req.PID, by thousands, each request's wall time, its times from the loop's hand-over
to a pool thread, in the app (decision and commit), and writing its answer: `WALL QUEUE APP WRITE`
(ms). Nothing here runs in production.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

_prefix = os.environ.get("BENCH_PROBE")


def _install(prefix: str) -> None:
    out = open(f"{prefix}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115 - for the process's life
    starts: dict[int, float] = {}

    def collected(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            starts[threading.get_ident()] = time.perf_counter()
            return
        began = starts.pop(threading.get_ident(), None)
        if began is not None and ((took := time.perf_counter() - began) > 0.0005 or info["generation"] == 2):
            out.write(f"gc {time.time():.4f} {info['generation']} {took * 1000:.2f} {info['collected']}\n")

    gc.callbacks.append(collected)

    import api.front as front
    import engine.decisionlog as decisionlog
    import engine.logcheck as logcheck

    step = logcheck.LogWatch.step

    def timed_step(self: Any) -> None:
        wall, cpu, sweep, seq = time.time(), time.thread_time(), self.sweep_cpu, self.verified_seq
        try:
            step(self)
        finally:
            out.write(f"watch {wall:.4f} {(time.time() - wall) * 1000:.2f} {(time.thread_time() - cpu) * 1000:.2f} "
                      f"{self.watching} {(self.sweep_cpu - sweep) * 1000:.1f} {self.verified_seq - seq}\n")

    logcheck.LogWatch.step = timed_step  # type: ignore[method-assign]

    def timed(method: Any, name: str) -> Any:
        def run(*args: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(*args)
            finally:
                if (took := time.perf_counter() - began) > 0.003:
                    out.write(f"{name} {time.time():.4f} {took * 1000:.2f}\n")
        return run

    decisionlog._SQLiteConnection.commit = timed(decisionlog._SQLiteConnection.commit, "commit")  # type: ignore[method-assign]
    decisionlog.SQLiteStore._begin_exclusive = timed(decisionlog.SQLiteStore._begin_exclusive, "lockwait")  # type: ignore[method-assign]

    answer = front.BufferedFront._answer
    requests: list[tuple[float, float, float, float]] = []

    def serve(self: Any, request: Any, answered: Any) -> None:
        handed = time.perf_counter()

        def work() -> None:
            began = time.perf_counter()
            made = answer(self, request)
            decided = time.perf_counter()
            answered(made)
            requests.append((time.time(), began - handed, decided - began, time.perf_counter() - decided))
            if len(requests) >= 1000:
                with open(f"{prefix}.req.{os.getpid()}", "a") as file:
                    file.write("".join(f"{r[0]:.4f} {r[1] * 1000:.3f} {r[2] * 1000:.3f} {r[3] * 1000:.3f}\n"
                                       for r in requests))
                requests.clear()

        self.pool.submit(work)

    front.BufferedFront.serve = serve  # type: ignore[method-assign]


if _prefix:
    _install(_prefix)

"""gunicorn settings for `bindpolicy serve` and `make run` (values come from the environment)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

bind = os.environ.get("BINDPOLICY_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("BINDPOLICY_WORKERS", "2"))
worker_class = os.environ.get("BINDPOLICY_WORKER_CLASS", "gthread")  # threads let the log group commits
threads = int(os.environ.get("BINDPOLICY_THREADS", "8"))
timeout = 30
graceful_timeout = 10
accesslog = None  # the app writes one JSON line per request itself
errorlog = "-"
loglevel = "warning"


def on_starting(server: Any) -> None:
    """Metrics of earlier runs would be summed in: start the multiprocess folder empty."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

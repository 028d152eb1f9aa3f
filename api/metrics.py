"""Prometheus metrics: decisions, latency, the policy in force, reload and log failures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from engine.decider import Engine
from engine.evaluator import FALLBACKS

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def forget_dead_workers() -> None:
    """Drop the live gauges of worker processes that are gone (a worker replaced after a crash):
    uvicorn has no hook when a worker exits, so each new worker does it as it starts."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            multiprocess.mark_process_dead(int(pid), folder)  # type: ignore[no-untyped-call]


class Metrics:
    """One set per app; with several workers, PROMETHEUS_MULTIPROC_DIR makes them span the workers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("bindpolicy_decisions", "Decisions answered, by action, decision and rule",
                                 ["action", "decision", "rule"], registry=r)
        self.rejections = Counter("bindpolicy_rejections", "Requests rejected without a decision, by code",
                                  ["code"], registry=r)
        self.latency = Histogram("bindpolicy_request_seconds", "Time to answer a decision request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.policy = Gauge("bindpolicy_policy_version_info",
                            "Policy versions: in force now (2), loaded (1), replaced by a reload (0)",
                            ["version", "digest"], registry=r, multiprocess_mode="liveall")
        self._shown: set[tuple[str, str]] = set()
        self.from_archive = Gauge("bindpolicy_policy_from_archive",
                                  "1 while a worker serves the last good set from the log's archive, because the "
                                  "policy files did not load when it started", registry=r, multiprocess_mode="liveall")
        self.reload_failures = Counter("bindpolicy_policy_reload_failures", "Policy reloads refused", registry=r)
        self.log_breach = Gauge("bindpolicy_decision_log_broken_record",
                                "The first record of the log found altered, removed or unreadable (0: none)",
                                registry=r, multiprocess_mode="max")
        self.log_verified = Gauge("bindpolicy_decision_log_verified_records",
                                  "Records of the log whose chain this service has verified", registry=r,
                                  multiprocess_mode="max")
        self.log_failures = Counter("bindpolicy_decision_log_write_failures", "Decision log writes that failed",
                                    registry=r)
        self.native_fallbacks = Counter(
            "bindpolicy_native_fallbacks", "Expressions the native runtime handed to cel-python, by why: "
            "unsupported (outside it), deferred (it said so), native_bug (it failed: a bug)", ["kind"], registry=r)
        FALLBACKS.subscribe(self)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """metric.labels(*labels), kept: prometheus_client builds the label tuple and takes a lock
        at each call (about 10 µs a decision, twice)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def native_fallback(self, kind: str) -> None:
        self.native_fallbacks.labels(kind).inc()

    def policies_loaded(self, engine: Engine, in_force: str | None) -> None:
        current = {(v.name, v.digest): 2 if v.name == in_force else 1 for v in engine.policies}
        for gone in self._shown - current.keys():  # a replaced version reads 0
            self.policy.labels(*gone).set(0)
        for labels, value in current.items():
            self.policy.labels(*labels).set(value)
        self._shown = set(current)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

"""The engine's front door: check a request, pick its version, evaluate it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from celpy import celtypes

from engine.errors import RequestError
from engine.evaluator import NATIVE, NATIVE_WITH_REFERENCE, RUNTIMES, Activation, evaluate, run_path
from engine.loader import load_policies
from engine.messages import DEFAULT_LANGUAGE
from engine.model import Decision, PolicyVersion
from engine.request import (
    MAX_CONTAINERS,
    CelConverter,
    NativeConverter,
    RequestChecker,
    default_checker,
    timestamp_problems,
)
from engine.versions import PolicySet, parse_timestamp


def new_decision_id() -> str:
    """32 hex digits, unique: 64 random bits drawn per process (again in a forked child) and a
    64-bit count (uuid4 costs a system call per id: about a tenth of a whole decision)."""
    return "%s%016x" % (_ID_PREFIX[0], next(_ID_COUNT[0]))  # noqa: UP031 (cheaper than the f-string's format)


def _new_id_source() -> None:
    _ID_PREFIX[:] = [os.urandom(8).hex()]
    _ID_COUNT[:] = [itertools.count()]


def new_decision_ids(count: int) -> list[str]:
    """`count` ids as new_decision_id makes them, at once (a batch's)."""
    prefix, numbers = _ID_PREFIX[0], _ID_COUNT[0]
    return [f"{prefix}{next(numbers):016x}" for _ in range(count)]


CHOSEN_KEPT = 4096  # the (`at`, `policy_version`) pairs whose time and version a line_decider keeps
_NO_AT = object()  # (the key of a request without `at`, which `now` stands in for)
_ID_PREFIX: list[str] = []
_ID_COUNT: list[Iterator[int]] = []
_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)


class Engine:
    """Decides requests against one loaded, immutable policy set."""

    def __init__(self, policies: PolicySet, runtime: str = NATIVE, max_list_items: int | None = None,
                 generated: bool = True) -> None:
        if runtime == NATIVE_WITH_REFERENCE:  # a recorded decision that cel-python helped: replayed natively
            runtime = NATIVE
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}")
        self.policies = policies
        self.runtime = runtime
        # The generated paths decide (engine/codegen.py); False: the evaluator's closures, rule by
        # rule (what the differential tests and bench compare them with).
        self.generated = generated and runtime == NATIVE
        self.check = default_checker() if max_list_items is None else RequestChecker(max_list_items)
        self._to_cel = CelConverter()
        self._to_native = NativeConverter()

    @classmethod
    def from_folder(cls, folder: Path | str) -> Engine:
        return cls(load_policies(folder))

    def decide(self, raw: Any, *, now: datetime, decision_id: str | None = None,
               explain: bool = False, language: str = DEFAULT_LANGUAGE) -> Decision:
        """Decide one request; RequestError if it cannot be decided.

        `now` stands in for a missing `at`: the engine never reads a clock itself.
        """
        request, usable = self.check.checked(raw)
        return self.decide_checked(request, usable, now=now, decision_id=decision_id, explain=explain,
                                   language=language)

    def decide_bytes(self, data: bytes | str, *, now: datetime, decision_id: str | None = None,
                     explain: bool = False, language: str = DEFAULT_LANGUAGE,
                     chosen: dict[tuple[Any, Any], tuple[datetime, PolicyVersion]] | None = None) -> Decision:
        """Decide one request from its JSON text: read strictly and checked in one pass where the
        reader vouches for it (RequestChecker.read), with the same answers and errors as
        decide(parse_json(data)). `chosen`: as decide_checked's (kept over a stream of requests
        decided with one `now`, as `decide --jsonl` does)."""
        request, usable = self.check.read(data)
        return self.decide_checked(request, usable, now=now, decision_id=decision_id, explain=explain,
                                   language=language, chosen=chosen)

    def line_decider(self, *, now: datetime, explain: bool = False,
                     language: str = DEFAULT_LANGUAGE) -> Callable[[bytes], Decision]:
        """decide_bytes(data, now=now, ...) for each request of a stream (`decide --jsonl`'s lines),
        the same answers and errors: the settings bound once, and the time and version of each
        (`at`, `policy_version`) chosen once and kept (up to CHOSEN_KEPT pairs). A request the
        reader vouches for, whose pair was seen, goes straight to its generated path."""
        vouch, generated = self.check.vouch, self.generated and not explain
        reader = self.check.reader or vouch  # (vouch bounds the values of the longest lines first)
        chosen: dict[tuple[Any, Any], tuple[datetime, PolicyVersion]] = {}
        found_for = chosen.get

        def decide(data: bytes) -> Decision:
            request = reader(data) if len(data) <= MAX_CONTAINERS else vouch(data)  # vouch's own test
            if request is None:  # read the long way, with its words for every problem
                return self.decide_bytes(data, now=now, explain=explain, language=language)
            found = found_for((request.get("at", _NO_AT), request.get("policy_version")))
            if found is not None and generated:
                version = found[1]
                path = version.path(request["action"], request.get("role"))
                if path is not None:
                    decision = run_path(path, version.name, request, found[0], new_decision_id(), language)
                    if decision is not None:
                        return decision
                    return self._evaluated(request, version, found[0], None, explain, language)
            elif found is None and len(chosen) >= CHOSEN_KEPT:
                chosen.clear()
            return self.decide_checked(request, True, now=now, explain=explain, language=language, chosen=chosen)

        return decide

    def decide_checked(self, request: dict[str, Any], usable: bool, *, now: datetime, decision_id: str | None = None,
                       explain: bool = False, language: str = DEFAULT_LANGUAGE,
                       chosen: dict[tuple[Any, Any], tuple[datetime, PolicyVersion]] | None = None) -> Decision:
        """Decide a request as RequestChecker.checked or .read gave it (with its `usable`).
        `chosen`: the time and version already chosen for each (`at`, `policy_version`) of the
        requests decided with the same `now` (a batch's), filled as they come."""
        try:
            if chosen is None:
                at, version = self._chosen(request, now)
            else:
                key = (request.get("at", _NO_AT), request.get("policy_version"))
                found = chosen.get(key)
                if found is None:
                    found = chosen[key] = self._chosen(request, now)
                at, version = found
            if usable and not explain and self.generated:  # its generated path (engine/codegen.py)
                path = version.path(request["action"], request.get("role"))
                if path is not None:
                    decision = run_path(path, version.name, request, at, decision_id or new_decision_id(), language)
                    if decision is not None:
                        return decision
        except ValueError:  # a timestamp the schema let through but Python cannot hold
            raise self._unusable(request) from None
        except RequestError as exc:  # past the schema check: the whole set judged it (no version taken)
            exc.policy_digest = self.policies.digest
            raise
        return self._evaluated(request, version, at, decision_id, explain, language)

    def _evaluated(self, request: dict[str, Any], version: PolicyVersion, at: datetime, decision_id: str | None,
                   explain: bool, language: str) -> Decision:
        """A request decided by the evaluator (explain, no generated path, or the path gave it back)."""
        try:
            activation = self.activation(request, version, at)
        except ValueError:
            raise self._unusable(request) from None
        except RequestError as exc:
            exc.policy_digest = self.policies.digest
            raise
        try:
            return evaluate(version, request, activation, at=at,
                            decision_id=decision_id or new_decision_id(), explain=explain, language=language)
        except RequestError as exc:  # e.g. missing_field: the version that judged it is known
            exc.policy_digest = version.digest
            raise

    def _unusable(self, request: dict[str, Any]) -> RequestError:
        error = RequestError("invalid_request", "the request has timestamps that cannot be used",
                             timestamp_problems(request))
        error.policy_digest = self.policies.digest
        return error

    def _chosen(self, request: dict[str, Any], now: datetime) -> tuple[datetime, PolicyVersion]:
        """The request's time (`now` without `at`) and the version that judges it."""
        at = parse_timestamp(request["at"]) if "at" in request else now
        return at, self.policies.select(at, request.get("policy_version"))

    def activation(self, request: dict[str, Any], version: PolicyVersion, at: datetime) -> Activation:
        """The variables for one request: its fields, `at` and the version's `params`."""
        native = self._to_native(request)
        native["at"] = at
        native["params"] = version.native_parameters

        def cel() -> dict[str, Any]:
            values = self._to_cel(request)
            values["at"] = celtypes.TimestampType(at)
            values["params"] = version.cel_parameters
            return values

        return Activation(native, cel, self.runtime)

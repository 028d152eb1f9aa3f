"""The engine's front door: check a request, pick its version, evaluate it."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from celpy import celtypes

from engine.evaluator import evaluate
from engine.loader import load_policies
from engine.model import Decision, PolicyVersion
from engine.request import CelConverter, check_request
from engine.versions import PolicySet, parse_timestamp


def new_decision_id() -> str:
    return uuid.uuid4().hex


class Engine:
    """Decides requests against one loaded, immutable policy set."""

    def __init__(self, policies: PolicySet) -> None:
        self.policies = policies
        self._convert = CelConverter()

    @classmethod
    def from_folder(cls, folder: Path | str) -> Engine:
        return cls(load_policies(folder))

    def decide(self, raw: Any, *, now: datetime, decision_id: str | None = None,
               explain: bool = False) -> Decision:
        """Decide one request; RequestError if it cannot be decided.

        `now` stands in for a missing `at`: the engine never reads a clock itself.
        """
        request = check_request(raw)
        at = parse_timestamp(request["at"]) if "at" in request else now
        version = self.policies.select(at, request.get("policy_version"))
        return evaluate(version, request, self.activation(request, version, at), at=at,
                        decision_id=decision_id or new_decision_id(), explain=explain)

    def activation(self, request: dict[str, Any], version: PolicyVersion, at: datetime) -> dict[str, Any]:
        """The CEL variables for one request: its fields, `at` and the version's `params`."""
        activation = self._convert(request)
        activation["at"] = celtypes.TimestampType(at)
        activation["params"] = version.cel_parameters
        return activation

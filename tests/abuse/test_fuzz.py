"""Fuzzing that reaches decisions (issue 8, item 15): requests the contract accepts, from the
corpus generator, then changed by hypothesis one field at a time (nulls, extremes, wrong types,
NUL, huge strings), through the whole HTTP layer. Every answer is a decision or a clean
refusal, never a 5xx; the test counts both, so a run that only ever refuses fails."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.generator import generate_requests

from ..conftest import make_app
from . import paths

CORPUS = list(generate_requests(200, seed=8, broken=0.2))
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["", "\u0000", "x" * 600, "2025-06-30T23:59:60Z", "9999-12-31T23:59:59-01:00", [], {}]))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    request = copy.deepcopy(draw(st.sampled_from(CORPUS)))
    kind = draw(st.sampled_from(["as generated", "set", "drop", "null"]))
    where = draw(st.sampled_from(paths(request, items=3))) if kind != "as generated" else ()
    if where:
        parent: Any = request
        for step in where[:-1]:
            parent = parent[step]
        if kind == "set":
            parent[where[-1]] = draw(ODD_VALUES)
        elif kind == "drop" and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = None
    return request, kind


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> FlaskClient:
    tmp = tmp_path_factory.mktemp("fuzz")
    return make_app(tmp, f"sqlite:///{Path(tmp) / 'log.db'}").test_client()


TALLY: Counter[str] = Counter()


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated())
def test_fuzzed_requests_are_decided_or_refused_never_failed(fuzz_client: FlaskClient,
                                                             case: tuple[dict[str, Any], str]) -> None:
    request, kind = case
    response = fuzz_client.post("/v1/decisions", data=orjson.dumps(request), content_type="application/json")
    assert response.status_code in (200, 400), (response.status_code, response.data[:500], request)
    body = response.json
    if response.status_code == 200:
        assert body["decision"] in ("allow", "deny") and body["policy"]["digest"].startswith("sha256:")
        TALLY["decided"] += 1
    else:
        assert body["error"]["code"] and body["decision_id"]
        TALLY["refused"] += 1
    TALLY[f"{kind}:{response.status_code}"] += 1


def test_the_fuzzing_reached_decisions_and_refusals(fuzz_client: FlaskClient) -> None:
    """The fuzz above (run here if it has not run yet) must have decided many and refused many."""
    if not TALLY:
        test_fuzzed_requests_are_decided_or_refused_never_failed(fuzz_client)
    print(f"\nfuzz tally: {dict(TALLY)}")
    assert TALLY["decided"] >= 60 and TALLY["refused"] >= 30, TALLY

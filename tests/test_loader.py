"""The loader is a gate: every broken policy set under tests/data/loader fails with exactly its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.errors import PolicyLoadError, Problem
from engine.loader import load_policies
from engine.versions import PolicySet

from .conftest import POLICIES, WriteFiles

CASES = sorted((Path(__file__).parent / "data" / "loader").glob("*.yaml"))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_broken_policy_sets_report_every_error_with_its_place(case: Path, write_policies: WriteFiles) -> None:
    spec = yaml.safe_load(case.read_text())
    root = write_policies(spec["files"])
    if spec["errors"]:
        with pytest.raises(PolicyLoadError) as caught:
            load_policies(root)
        _match(caught.value.problems, spec["errors"])
    else:  # a set that loads: only warnings
        _match(list(load_policies(root).warnings), spec.get("warnings", []))


def _match(problems: list[Problem], expected: list[str]) -> None:
    got = [f"{p.location.file}:{p.location.line}:{p.location.column}: {p.message}" for p in problems]
    assert len(got) == len(expected), "\n".join(got)
    for line, want in zip(got, expected, strict=True):
        assert line.startswith(want), f"{line!r} does not start with {want!r}"


def test_errors_come_sorted_by_file_line_and_column(write_policies: WriteFiles) -> None:
    spec = yaml.safe_load((Path(__file__).parent / "data" / "loader" / "unknown_field.yaml").read_text())
    with pytest.raises(PolicyLoadError) as caught:
        load_policies(write_policies(spec["files"]))
    places = [(p.location.file, p.location.line, p.location.column) for p in caught.value.problems]
    assert places == sorted(places)
    assert "5 problems in the policy files" in str(caught.value)


def test_the_bundled_policies_load(policies: PolicySet) -> None:
    assert policies.names() == ["v1", "v2"]
    v1, v2 = policies.get("v1"), policies.get("v2")
    assert v1 is not None and v2 is not None
    assert len(v1.rules) == len(v2.rules) == 40
    # v2 writes only the two rules it changes; the rest are v1's, in v1's order.
    assert [r.id for r in v1.rules] == [r.id for r in v2.rules]
    changed = [r.id for r in v2.rules if r.defined_in == "v2"]
    assert changed == ["personal.kyc", "personal.min-followers"]
    assert v1.digest != v2.digest and v1.digest.startswith("sha256:")
    assert v2.parameters["min_age"] == 18


def test_the_digest_covers_inherited_files(write_policies: WriteFiles, tmp_path: Path) -> None:
    files = {name: path.read_text() for name, path in
             ((p.relative_to(POLICIES).as_posix(), p) for p in POLICIES.glob("v*/*.yaml"))}
    first = load_policies(write_policies(files))
    files["v1/login.yaml"] += "\n# a comment changes the content, so the digest\n"
    second = load_policies(write_policies(files))
    for name in ("v1", "v2"):
        a, b = first.get(name), second.get(name)
        assert a is not None and b is not None and a.digest != b.digest


def test_rules_point_at_their_file_and_line(policies: PolicySet) -> None:
    v2 = policies.get("v2")
    assert v2 is not None
    kyc, age = v2.rule("personal.kyc"), v2.rule("personal.min-age")
    assert kyc is not None and age is not None
    assert kyc.where.startswith("v2/bind.yaml:")
    assert age.where.startswith("v1/bind.yaml:")
    line = int(age.where.split(":")[1])
    assert "personal.min-age" in (POLICIES / "v1" / "bind.yaml").read_text().splitlines()[line - 1]


def test_an_empty_or_missing_folder_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="does not exist"):
        load_policies(tmp_path / "nowhere")
    with pytest.raises(PolicyLoadError, match="no version folder"):
        load_policies(tmp_path)

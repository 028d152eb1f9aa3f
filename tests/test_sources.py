"""Policy sources: a folder, the log's archive by digest and bytes in memory load the same set; the engine
stands without the web layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.decisionlog import open_store
from engine.errors import PolicyLoadError
from engine.loader import load_policies
from engine.sources import ArchiveSource, FolderSource, MemorySource, UnknownDigestError
from engine.versions import PolicySet

from .conftest import POLICIES, ROOT


def _files() -> dict[str, bytes]:
    return {p.relative_to(POLICIES).as_posix(): p.read_bytes() for p in POLICIES.glob("v*/*.yaml")}


def test_a_set_in_memory_loads_as_its_folder_does(policies: PolicySet) -> None:
    again = load_policies(MemorySource(_files()))
    assert {v.name: v.digest for v in again} == {v.name: v.digest for v in policies}
    v2 = again.get("v2")
    assert v2 is not None and v2.rule("personal.kyc") is not None
    assert v2.rule("personal.kyc").where.startswith("v2/bind.yaml:")  # type: ignore[union-attr]


def test_a_folder_source_names_only_policy_files(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "version.yaml").write_text("version: v1\n")
    (tmp_path / "v1" / "notes.txt").write_text("not policy\n")
    (tmp_path / "v1" / "deep").mkdir()
    (tmp_path / "v1" / "deep" / "x.yaml").write_text("a: 1\n")
    assert FolderSource(tmp_path).names() == ["v1/version.yaml"]


def test_memory_ignores_names_that_are_not_one_folder_deep() -> None:
    files = {**_files(), "../evil.yaml": b"x: 1\n", "v1/deep/x.yaml": b"x: 1\n", "top.yaml": b"x: 1\n"}
    assert sorted(MemorySource(files).names()) == sorted(_files())


def test_broken_bytes_in_memory_are_reported_with_their_name() -> None:
    files = {**_files(), "v1/bind.yaml": b"rules: [\n"}
    with pytest.raises(PolicyLoadError, match=r"v1/bind\.yaml"):
        load_policies(MemorySource(files))


def test_the_archive_serves_a_version_by_its_digest(policies: PolicySet, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "decisions.db"))
    v2 = policies.get("v2")
    assert v2 is not None
    store.save_policy(v2.digest, v2.name, dict(v2.sources))
    source = ArchiveSource(store, v2.digest)
    assert source.version == "v2"
    rebuilt = load_policies(source).get("v2")
    assert rebuilt is not None and rebuilt.digest == v2.digest
    with pytest.raises(UnknownDigestError, match="sha256:nope"):
        ArchiveSource(store, "sha256:nope")


def test_the_engine_never_imports_the_web_layer() -> None:
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                          if n == "api" or n.startswith(("api.", "flask", "werkzeug", "gunicorn"))]
    assert offenders == []

"""`check` loads without the generated decision paths (load_policies(generate=False)): the same
versions, rules, needs, digests and warnings, and the same decisions (by the closures)."""

from __future__ import annotations

from pathlib import Path

from engine.loader import load_policies

ROOT = Path(__file__).resolve().parent.parent


def test_without_generated_paths_the_set_is_the_same() -> None:
    full, bare = load_policies(ROOT / "policies"), load_policies(ROOT / "policies", generate=False)
    assert [v.name for v in bare] == [v.name for v in full]
    assert bare.warnings == full.warnings
    for mine, theirs in zip(bare, full, strict=True):
        assert mine.digest == theirs.digest
        assert [r.id for r in mine.rules] == [r.id for r in theirs.rules]
        contexts = list(theirs._paths)
        assert contexts and all(theirs.path(*c) is not None and mine.path(*c) is None for c in contexts)
        for context in contexts:
            mine_plan, their_plan = mine.needs_plan(*context), theirs.needs_plan(*context)
            assert mine_plan is not None and their_plan is not None
            assert mine_plan.everything_paths == their_plan.everything_paths
            assert [r.id for r in mine.rules_for(*context)] == [r.id for r in theirs.rules_for(*context)]

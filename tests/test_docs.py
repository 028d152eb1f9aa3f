"""docs/contract.md and docs/rules.md say what the schema and the bundled policies hold, no more, no less."""

from __future__ import annotations

import re
from pathlib import Path

from engine.loader import load_policies
from engine.model import EACH
from engine.schemas import SchemaWalker, load_schema

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CELL = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def tables(text: str) -> list[tuple[str, str, list[str]]]:
    """Each table as (the heading above it, its first header cell, the code names of its first column)."""
    found: list[tuple[str, str, list[str]]] = []
    heading, header, names = "", None, []
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            if header is None:
                header = line.strip("|").split("|")[0].strip()
            elif (match := CELL.match(line)) is not None:
                names.append(match.group(1))
        elif header is not None:
            found.append((heading, header, names))
            header, names = None, []
    return found


def schema_fields() -> set[str]:
    """Every request field path of request.schema.json: 'shop.channel_accounts[].bound_at'."""
    walker = SchemaWalker(load_schema("request"))
    out: set[str] = set()

    def walk(schema: dict[str, object], prefix: str) -> None:
        for name in walker.fields(schema):
            path = f"{prefix}.{name}" if prefix else name
            out.add(path)
            child = walker.child(schema, name)
            if child is None:
                continue
            items = walker.child(child, EACH)
            if items is not None and walker.fields(items):
                walk(items, path + EACH)
            elif walker.fields(child):
                walk(child, path)

    walk(walker.root, "")
    return out


def documented_fields() -> set[str]:
    out: set[str] = set()
    text = (DOCS / "contract.md").read_text(encoding="utf-8")
    request = text.split("\n## Request", 1)[1].split("\n## ", 1)[0]
    for heading, header, names in tables(request):
        assert header == "field", heading
        prefix = "" if heading == "Top level" else heading.strip("`")
        out.update(f"{prefix}.{name}" if prefix else name for name in names)
    return out


def test_every_request_field_of_the_schema_is_in_the_contract_and_no_other() -> None:
    schema, documented = schema_fields(), documented_fields()
    assert len(schema) > 40
    assert sorted(schema - documented) == [], "fields of the schema missing from docs/contract.md"
    assert sorted(documented - schema) == [], "fields in docs/contract.md that the schema lacks"


def catalogue(kind: str) -> list[str]:
    text = (DOCS / "rules.md").read_text(encoding="utf-8")
    return [name for _, header, names in tables(text) if header == kind for name in names]


def test_every_bundled_rule_and_output_is_in_the_catalogue_and_no_other() -> None:
    versions = list(load_policies(ROOT / "policies"))
    rules = {rule.id for version in versions for rule in version.rules}
    outputs = {output.name for version in versions for output in version.outputs}
    ids, names = catalogue("id"), catalogue("output")
    assert len(ids) == len(set(ids)), "a rule id is listed twice in docs/rules.md"
    assert sorted(rules - set(ids)) == [], "rules of the policies missing from docs/rules.md"
    assert sorted(set(ids) - rules) == [], "ids in docs/rules.md that no bundled policy has"
    assert set(names) == outputs


def test_the_repository_points_to_its_own_docs_only() -> None:
    gone = re.compile(r"CONTRACT\.md|RULES\.md|\.\./shared|/work/shared")
    places = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in ("engine", "api", "tests", "policies", "docs", "bench", "examples"):
        places += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".json", ".html", ".js"}
                   and "vendor" not in p.parts and p.name != "test_docs.py"]
    assert [str(p.relative_to(ROOT)) for p in places if gone.search(p.read_text(encoding="utf-8"))] == []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/contract.md" in readme and "docs/rules.md" in readme

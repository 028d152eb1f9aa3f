"""`bindpolicy fmt`, the editor schemas (modelines, .vscode) and `bindpolicy test --watch`."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from ruamel.yaml import YAML

from engine.cli import main
from engine.formatter import MODELINE_PATTERN, FormatError, _orders, _reorder_block, find_files, format_text
from engine.loader import load_policies
from engine.schemas import load_schema
from engine.versions import PolicySet

from .conftest import POLICIES

ROOT = POLICIES.parent
SCHEMAS = ROOT / "engine" / "schemas"


def semantics(policies: PolicySet) -> list[Any]:
    """What a policy set means, whatever its layout: every version's parameters, rules and outputs."""
    return [(v.name, v.extends, v.effective_from, dict(v.parameters),
             [(r.id, r.actions, r.roles, r.effect, r.applies_when and r.applies_when.text, r.fires_when.text,
               dict(r.messages.templates), r.source, r.defined_in, r.location.file) for r in v.rules],
             [(o.name, o.actions, o.roles, o.applies_when and o.applies_when.text, o.value.text, o.source)
              for o in v.outputs]) for v in policies]


def comments(text: str) -> Counter[str]:
    return Counter(line.strip() for line in text.splitlines()
                   if line.lstrip().startswith("#") and "yaml-language-server" not in line)


def scramble(text: str, kind: str) -> str:
    """The same data laid out otherwise: the keys of every mapping with a schema order reversed
    (each with its comments), four-space indents, and the modeline first."""
    messy = YAML()
    messy.preserve_quotes = True
    messy.width = 4096
    data = messy.load(text)
    lines = text.splitlines()
    for node, _ in sorted(_orders(data, kind), key=lambda item: item[0].lc.line, reverse=True):
        if not node.fa.flow_style():
            lines = _reorder_block(lines, node, list(reversed(node))) or lines
    messy.indent(mapping=4, sequence=6, offset=4)
    out = io.StringIO()
    messy.dump(messy.load("\n".join(lines) + "\n"), out)
    modelines = [line for line in text.splitlines() if MODELINE_PATTERN.match(line)]
    body = [line for line in out.getvalue().splitlines() if not MODELINE_PATTERN.match(line)]
    return "".join(line + "\n" for line in [*modelines, *body])


def fmt(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["fmt", *args])
    return code, out.getvalue()


@pytest.mark.slow
def test_a_scrambled_copy_comes_back_canonical_with_the_same_meaning_and_comments(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy, ignore=shutil.ignore_patterns("tests"))
    (copy / "tests").mkdir()
    shutil.copy(POLICIES / "tests" / "versions_test.yaml", copy / "tests")
    kinds = dict(find_files([copy])[0])
    originals = {p: p.read_text(encoding="utf-8") for p in kinds}
    for path, text in originals.items():
        path.write_text(scramble(text, kinds[path]), encoding="utf-8")
        assert path.read_text(encoding="utf-8") != text
    assert semantics(load_policies(copy)) == semantics(load_policies(POLICIES))  # scrambled, same meaning

    assert fmt(str(copy)) == (0, "".join(f"formatted: {p}\n" for p in originals)
                              + f"{len(originals)} files, {len(originals)} changed\n")
    assert semantics(load_policies(copy)) == semantics(load_policies(POLICIES))
    for path, text in originals.items():
        formatted = path.read_text(encoding="utf-8")
        assert yaml.safe_load(formatted) == yaml.safe_load(text)
        assert comments(formatted) == comments(text), path
        assert formatted == text, path  # the bundled files are formatted: back byte for byte


def test_the_layout_moves_a_key_with_its_comments_and_leaves_values_as_written(tmp_path: Path) -> None:
    folder = tmp_path / "v9"
    folder.mkdir()
    (folder / "version.yaml").write_text("version: v9\n")
    given = (
        "# a rule file\n"
        "rules:\n"
        "- source: s   # where\n"
        "  # the expression, quoted: it starts with !\n"
        "  fires_when: \"!account.ecommerce_revoked\"\n"
        "  id: r.one\n"
        "  message: {zh: 中文, en: text}\n"
        "  actions: [bind, unbind]\n"
        "  effect: deny\n"
        "  applies_when: >-\n"
        "    account.type == \"personal\"\n"
        "      && account.age > 3\n"
        "\n\n\n"
        "outputs:   \n"
        "  - {source: a source long enough to pass column 120 once the mapping is written on one line, "
        "value: at, actions: [bind], name: o}\n"
    )
    want = (
        "# a rule file\n"
        "rules:\n"
        "  - id: r.one\n"
        "    actions: [bind, unbind]\n"
        "    applies_when: >-\n"
        "      account.type == \"personal\"\n"
        "        && account.age > 3\n"
        "    effect: deny\n"
        "    # the expression, quoted: it starts with !\n"
        "    fires_when: \"!account.ecommerce_revoked\"\n"
        "    message: {en: text, zh: 中文}\n"
        "    source: s # where\n"
        "\n"
        "outputs:\n"
        "  - name: o\n"
        "    actions: [bind]\n"
        "    value: at\n"
        "    source: a source long enough to pass column 120 once the mapping is written on one line\n"
        "\n"
        "# yaml-language-server: $schema=../../../engine/schemas/policy.schema.json\n"
    )
    path = folder / "rules.yaml"
    relative = os.path.relpath(SCHEMAS / "policy.schema.json", folder)
    want = want.replace("../../../engine/schemas/policy.schema.json", Path(relative).as_posix())
    assert format_text(given, "policy", "rules.yaml", path) == want
    path.write_text(given)
    assert fmt("--check", str(path)) == (1, f"not formatted: {path}\n1 file, 1 would change "
                                            "(run `bindpolicy fmt` to format them)\n")
    assert path.read_text() == given
    assert fmt(str(path)) == (0, f"formatted: {path}\n1 file, 1 changed\n")
    assert path.read_text() == want
    assert fmt("--check", str(path)) == (0, "1 file, 0 would change\n")  # idempotent


def test_fmt_refuses_what_it_cannot_format_and_writes_nothing(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "version.yaml").write_text("version: v1\n")
    broken = folder / "rules.yaml"
    broken.write_text("rules:\n  - id: [\n")
    assert main(["fmt", str(broken)]) == 2
    assert broken.read_text() == "rules:\n  - id: [\n"
    assert f"{broken}: not valid YAML, left as it is" in capsys.readouterr().err
    with pytest.raises(FormatError, match="not valid YAML"):
        format_text(broken.read_text(), "policy", "v1/rules.yaml", broken)


def test_fmt_names_files_that_are_not_policies_or_suites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "notes.yaml"
    other.write_text("a: 1\n")
    assert main(["fmt", str(other), str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{other}: not a policy file" in err and "missing.yaml: no such file or folder" in err


# --- the schemas editors read --------------------------------------------------------------------


def registry() -> Registry:
    """Every bundled schema, by its file name (as the modelines reach them) and by its $id."""
    found: Registry = Registry()
    for path in SCHEMAS.glob("*.schema.json"):
        resource = Resource.from_contents(json.loads(path.read_text(encoding="utf-8")))
        found = found.with_resource(path.name, resource)
        if resource.id():
            found = found.with_resource(resource.id(), resource)
    return found


def modeline_schema(path: Path) -> Any:
    """The validator of the schema a file's modeline names, of the draft that schema declares."""
    lines = MODELINE_PATTERN.findall(path.read_text(encoding="utf-8"))
    assert len(lines) == 1, f"{path}: one yaml-language-server modeline"
    target = (path.parent / lines[0]).resolve()
    assert target.parent == SCHEMAS.resolve() and target.is_file(), target
    schema = json.loads(target.read_text(encoding="utf-8"))
    return validator_for(schema)(schema, registry=registry())


# Draft-07's keywords (json-schema.org/draft-07/schema), and where they hold subschemas.
DRAFT7 = frozenset({
    "$schema", "$id", "$ref", "$comment", "definitions", "title", "description", "default", "examples", "readOnly",
    "writeOnly", "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "items", "additionalItems", "maxItems", "minItems", "uniqueItems",
    "contains", "maxProperties", "minProperties", "required", "properties", "patternProperties",
    "additionalProperties", "dependencies", "propertyNames", "if", "then", "else", "allOf", "anyOf", "oneOf", "not",
    "format", "contentMediaType", "contentEncoding"})
SUBSCHEMA_MAPS = {"properties", "patternProperties", "definitions", "dependencies", "$defs"}
SUBSCHEMA = {"items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
             "propertyNames"}


def keywords_used(schema: Any, where: str = "#") -> Iterator[tuple[str, str, Any]]:
    """(where, keyword, the schema object) for every keyword of every subschema."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        yield where, key, schema
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, inner in value.items():
                yield from keywords_used(inner, f"{where}/{key}/{name}")
        elif key in ("allOf", "anyOf", "oneOf", "items") and isinstance(value, list):
            for index, inner in enumerate(value):
                yield from keywords_used(inner, f"{where}/{key}/{index}")
        elif key in SUBSCHEMA and isinstance(value, dict):
            yield from keywords_used(value, f"{where}/{key}")


def test_the_modeline_schemas_are_draft_07_as_yaml_language_server_implements() -> None:
    """yaml-language-server validates with draft-07: the schemas editors read declare it, pass its
    meta-schema, and use none of the later keywords (`$defs` is only where definitions are kept:
    `#/$defs/x` is a JSON pointer, which draft-07 follows) nor a `$ref` beside other validation
    keywords (draft-07 ignores a `$ref`'s siblings)."""
    named = {Path(MODELINE_PATTERN.findall(p.read_text(encoding="utf-8"))[0]).name for p in BUNDLED}
    assert named == {"policy.schema.json", "suite.schema.json", "fixtures.schema.json"}
    for name in named:
        schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#", name
        assert validator_for(schema) is Draft7Validator
        Draft7Validator.check_schema(schema)
        later = {(where, key) for where, key, _ in keywords_used(schema) if key not in DRAFT7 | {"$defs"}}
        assert not later, (name, later)
        beside_ref = {where for where, key, node in keywords_used(schema)
                      if key == "$ref" and set(node) & (DRAFT7 - {"$ref", "$comment", "title", "description"})}
        assert not beside_ref, (name, beside_ref)


BUNDLED = [p for p, _ in find_files([POLICIES])[0]]


def test_every_bundled_file_names_a_schema_that_accepts_it_and_the_editor_settings_agree() -> None:
    settings = json.loads((ROOT / ".vscode" / "settings.json").read_text(encoding="utf-8"))["yaml.schemas"]
    assert len(BUNDLED) >= 19
    for path in BUNDLED:
        check = modeline_schema(path)
        assert [e.message for e in check.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8")))] == []
        schema = Path(MODELINE_PATTERN.findall(path.read_text(encoding="utf-8"))[0]).name
        globs = settings[f"./engine/schemas/{schema}"]
        assert any(path.relative_to(ROOT).match(glob) for glob in globs), (path, globs)


@pytest.mark.parametrize(("name", "key", "typo"), [
    ("v1/bind.yaml", "fires_when", "fires_wen"),
    ("v1/version.yaml", "effective_from", "efective_from"),
    ("tests/unbind_test.yaml", "expect", "expcet"),
])
def test_the_modeline_schema_refuses_a_misspelt_key(name: str, key: str, typo: str) -> None:
    path = POLICIES / name
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    holder = data["rules"][0] if "rules" in data else data["cases"][0] if "cases" in data else data
    holder[typo] = holder.pop(key)
    errors = [e.message for e in modeline_schema(path).iter_errors(data)]
    assert any(f"'{typo}' was unexpected" in e for e in errors), errors


def test_the_fixtures_schema_takes_a_base_as_a_suite_does() -> None:
    check = Draft7Validator(load_schema("fixtures"), registry=registry())
    assert list(check.iter_errors({"bases": {"us": {"request": {"action": "bind"}}}})) == []
    assert [e.message for e in check.iter_errors({"bases": {"us": {"requets": {}}}})]


# --- test --watch --------------------------------------------------------------------------------


def test_watch_reruns_the_suites_when_a_file_changes(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy, ignore=shutil.ignore_patterns("tests"))
    (copy / "tests").mkdir()
    suite = copy / "tests" / "versions_test.yaml"
    shutil.copy(POLICIES / "tests" / "versions_test.yaml", suite)
    shutil.copy(POLICIES / "tests" / "fixtures.yaml", copy / "tests" / "fixtures.yaml")  # its shared bases
    out = io.StringIO()
    done = threading.Event()

    def run() -> None:
        with redirect_stdout(out):
            main(["test", str(copy), "--suite", str(suite), "--watch", "--watch-interval", "0.05",
                  "--watch-runs", "2"])
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while "-- watching" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = suite.read_text(encoding="utf-8")
    suite.write_text(text.replace("decision: allow", "decision: deny", 1), encoding="utf-8")
    bump = time.time()
    while not done.wait(0.1) and time.monotonic() < deadline:  # a coarse clock may hide one write: bump
        bump += 1
        os.utime(suite, (bump, bump))
    worker.join(1)
    assert done.is_set(), out.getvalue()
    first, second = out.getvalue().split("-- watching")[:2]
    assert " 0 failed" in first and "\nOK" in first, first
    assert "1 failed" in second

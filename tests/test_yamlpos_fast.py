"""The C composer (libyaml) reads policy files on the success path; PyYAML's Python reader is the
reference and explains every error. Both must give the same data, the same marks (line, column,
style) and the same duplicate-key problems; anything the fast path cannot vouch for goes to the
Python reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.yamlpos import _parse_fast, parse_yaml, parse_yaml_python

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY_FILES = sorted(p for p in ROOT.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")
                          and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))

CLEAN = {
    "unicode": ("rules:\n- id: a\n  message:\n    zh: 联盟达人最低粉丝要求{params.x}粉。\n"
                "    en: 'é ü 😀 x'\n  k: \"日本\"\n"),
    "blocks": "a: |\n  line one\n  line two\nb: >-\n  folded\n  text\nc: |+\n  kept\n\nd: plain\n",
    "after wide characters": "x: 😀😀\ny: {k: 日本, v: [1, 2, \"三\"]}\nz: [a, b]\n",
    "styles": "a: 'single'\nb: \"double \\u00e9\"\nc: ~\nd: null\ne: 2024-01-01\nf: 2024-01-01T00:00:00Z\n"
              "g: 1.5\nh: 0x1F\ni: yes\nj: -.inf\n",
    "crlf": "a: 1\r\nb:\r\n  - x\r\n  - y\r\n",
    "bom": "\ufeffa: 1\nb: 2\n",
    "duplicate keys": "a: 1\nb: 2\na: 3\nc:\n  d: 1\n  d: 2\n",
    "anchor without alias": "a: &x 1\nb: 2\n",
    "flow and comments": "# head\na: [1, {b: c}]  # tail\n? complex\n: value\n",
    "numbers as keys": "1: a\n2.5: b\ntrue: c\n",
    "multiline plain": "a: this is\n  one value\n  over lines\nb: x\n",
}
BROKEN = {
    "alias": "a: &x [1, 2]\nb: *x\n",
    "nested aliases": "a: &a [1]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    "tab": "a:\n\tb: 1\n",
    "unclosed quote": "a: \"open\nb: 1\n",
    "unclosed bracket": "a: [1, 2\nb: 1\n",
    "bang": "a: !x == y\n",
    "indent": "a:\n  b: 1\n c: 2\n",
    "two documents": "a: 1\n---\nb: 2\n",
    "empty": "",
    "comment only": "# nothing\n",
}


def _same(text: str, name: str) -> None:
    fast = _parse_fast(text, name)
    reference, problems = parse_yaml_python(text, name)
    assert fast is not None, "the fast path refused a clean document"
    doc, fast_problems = fast
    assert reference is not None
    assert doc.data == reference.data
    assert doc.marks == reference.marks
    assert fast_problems == problems


@pytest.mark.parametrize("path", REPOSITORY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_files_read_alike(path: Path) -> None:
    _same(path.read_text(encoding="utf-8"), path.name)


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_documents_read_alike(name: str) -> None:
    _same(CLEAN[name], "f.yaml")


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_errors_come_from_the_python_reader(name: str) -> None:
    assert _parse_fast(BROKEN[name], "f.yaml") is None
    assert parse_yaml(BROKEN[name], "f.yaml") == parse_yaml_python(BROKEN[name], "f.yaml")
    doc, problems = parse_yaml(BROKEN[name], "f.yaml")
    assert doc is None and problems, name  # every one of them is refused, with its position


def test_repository_has_policy_files() -> None:
    assert len(REPOSITORY_FILES) > 20

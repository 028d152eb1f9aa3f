"""YAML documents that remember where every value stands (file, line, column)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import Location, Problem

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    """Start of a YAML node: 1-based line and column, and the scalar style ('' plain)."""

    line: int
    column: int
    style: str = ""


@dataclass
class YamlDocument:
    """One parsed YAML file: its data, and the position of every node by its key path."""

    name: str  # path relative to the policy root, as shown to authors
    text: str
    data: Any
    marks: dict[Key, Mark] = field(default_factory=dict)

    def location(self, key: Key = (), pointer: str = "") -> Location:
        """The position of the node at `key`, or of its nearest ancestor that exists."""
        for end in range(len(key), -1, -1):
            mark = self.marks.get(key[:end])
            if mark is not None:
                return Location(self.name, mark.line, mark.column, pointer)
        return Location(self.name, 1, 1, pointer)

    def expression_location(self, key: Key, line: int, column: int) -> Location:
        """Map a (line, column) inside the scalar at `key` to a position in the file."""
        mark = self.marks.get(key)
        if mark is None:
            return self.location(key)
        if mark.style in ("|", ">"):
            return self._block_location(key, mark, line, column)
        if line <= 1:
            quote = 1 if mark.style in ("'", '"') else 0
            return Location(self.name, mark.line, mark.column + quote + column - 1)
        return Location(self.name, mark.line + line - 1, column)


    def _block_location(self, key: Key, mark: Mark, line: int, column: int) -> Location:
        """Inside a literal or folded block: count characters, since folding keeps lengths."""
        value: Any = self.data
        for part in key:
            value = value[part]
        text_lines = str(value).split("\n")
        offset = sum(len(t) + 1 for t in text_lines[: line - 1]) + column - 1
        file_lines = self.text.splitlines()[mark.line :]
        indent = next((len(r) - len(r.lstrip(" ")) for r in file_lines if r.strip()), 0)
        for number, raw in enumerate(file_lines, start=mark.line + 1):
            content = raw[indent:] if raw.strip() else ""
            if offset <= len(content):
                return Location(self.name, number, indent + offset + 1)
            offset -= len(content) + 1
        return Location(self.name, mark.line, mark.column)


def _walk(node: yaml.Node, key: Key, marks: dict[Key, Mark], problems: list[Problem], name: str,
          constructor: yaml.constructor.SafeConstructor, seen: set[int] | None = None) -> Any:
    if seen is not None:  # the C composer shares the node of an alias: met twice, it was one
        if id(node) in seen:
            raise _Shared
        seen.add(id(node))
    start = node.start_mark
    marks[key] = Mark(start.line + 1, start.column + 1, getattr(node, "style", None) or "")
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            k = constructor.construct_object(key_node, deep=True)
            if not isinstance(k, str | int | bool | float) or isinstance(k, bool):
                k = str(k)
            if k in out:
                km = key_node.start_mark
                problems.append(Problem(Location(name, km.line + 1, km.column + 1),
                                        "yaml_duplicate_key", f"the key '{k}' appears twice in one mapping"))
            out[k] = _walk(value_node, (*key, k), marks, problems, name, constructor, seen)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*key, i), marks, problems, name, constructor, seen)
                for i, item in enumerate(node.value)]
    if node.tag == "tag:yaml.org,2002:timestamp":
        return node.value  # keep dates as written: the schemas check them as RFC 3339 strings
    return constructor.construct_object(node, deep=True)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` repeats a node, and nested repeats ("a
    billion laughs") grow exponentially; a policy file never needs one."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise AliasRefused(None, None, f"the alias *{event.anchor} is not allowed: policy files write "
                               "every value out (aliases can make a file expand without bound)", event.start_mark)
        node: yaml.Node | None = super().compose_node(parent, index)
        return node


class AliasRefused(yaml.composer.ComposerError):
    pass


class _Shared(Exception):
    """A node met twice while walking the C composer's tree: the file has an alias."""


_FAST_LOADER: type[yaml.CSafeLoader] | None = getattr(yaml, "CSafeLoader", None)


def _parse_fast(text: str, name: str) -> tuple[YamlDocument, list[Problem]] | None:
    """The same document and marks through libyaml's composer (many times faster than PyYAML's own);
    None for anything but a clean document without aliases: the Python reader then says what is wrong
    in its plain words (tests/test_yamlpos_fast.py holds both readers to the same answers)."""
    if _FAST_LOADER is None:
        return None
    loader = _FAST_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems: list[Problem] = []
        marks: dict[Key, Mark] = {}
        data = _walk(node, (), marks, problems, name, loader, set())
    except (yaml.YAMLError, _Shared):
        return None
    finally:
        loader.dispose()
    return YamlDocument(name, text, data, marks), problems


def parse_yaml(text: str, name: str) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse one YAML document; syntax errors come back as problems with their position."""
    fast = _parse_fast(text, name)
    if fast is not None:
        return fast
    return parse_yaml_python(text, name)


def parse_yaml_python(text: str, name: str) -> tuple[YamlDocument | None, list[Problem]]:
    """parse_yaml with PyYAML's Python reader only: the reference, and the one that explains errors."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, [Problem(Location(name, 1, 1), "yaml_empty", "the file is empty")]
        problems: list[Problem] = []
        marks: dict[Key, Mark] = {}
        data = _walk(node, (), marks, problems, name, loader)
    except AliasRefused as exc:
        mark = exc.problem_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        hint = _quote_hint(text, line)
        if hint is not None:
            column = hint[0]
        return None, [Problem(Location(name, line, column), "yaml_alias", hint[1] if hint else str(exc.problem))]
    except yaml.MarkedYAMLError as exc:
        line, column, message = plain_words(exc, text)
        return None, [Problem(Location(name, line, column), "yaml_syntax", message)]
    except yaml.YAMLError as exc:
        return None, [Problem(Location(name, 1, 1), "yaml_syntax", f"YAML error: {exc}")]
    finally:
        loader.dispose()
    return YamlDocument(name, text, data, marks), problems


def read_yaml(path: Path, name: str) -> tuple[YamlDocument | None, list[Problem]]:
    """Read and parse a YAML file; an unreadable file is a problem, not an exception."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(Location(name), "file_unreadable", f"cannot read the file: {exc}")]
    return parse_yaml(text, name)


# --- YAML errors in plain words --------------------------------------------------------------

# A value that YAML reads as a tag (!), an alias (*) or an anchor (&) when it is meant as text.
_INDICATOR_VALUE = re.compile(r"^(?P<lead>\s*(?:- )?(?:[^\s#:][^:#]*:\s+)?)(?P<value>[!&*]\S.*?)\s*$")
_INDICATOR = {"!": "a tag", "*": "an alias", "&": "an anchor"}


def _quote_hint(text: str, line: int) -> tuple[int, str] | None:
    """For a line whose value starts with !, * or &: its column, and that it must be quoted, and how."""
    rows = text.splitlines()
    if not 1 <= line <= len(rows):
        return None
    match = _INDICATOR_VALUE.match(rows[line - 1])
    if match is None:
        return None
    value = match.group("value")
    quoted = f'"{value}"' if '"' not in value else (f"'{value}'" if "'" not in value else f">-\n  {value}")
    what = "an expression" if value[0] == "!" else "a value"
    lead = match.group("lead").strip()
    return match.start("value") + 1, (f"{what} that starts with `{value[0]}` must be quoted, or YAML reads it "
                                      f"as {_INDICATOR[value[0]]}: write {lead + ' ' if lead else ''}{quoted}")


def _indent(row: str) -> int:
    return len(row) - len(row.lstrip(" "))


def plain_words(exc: yaml.MarkedYAMLError, text: str) -> tuple[int, int, str]:
    """(line, column, message) for a YAML syntax error, in plain words where the cause is a common
    one: a tab, a value starting with !, * or &, a line indented off, an unclosed quote or bracket."""
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem, context = exc.problem or "", exc.context or ""
    start = exc.context_mark
    rows = text.splitlines()
    if "'\\t'" in problem or "\t" in problem:
        return line, column, "a tab character: YAML indents with spaces only; replace the tab with spaces"
    hint = _quote_hint(text, line)
    if hint is not None and ("tag" in problem or "block scalar" in context or "alias" in problem):
        return line, hint[0], hint[1]
    if "quoted scalar" in context and start is not None:
        return (start.line + 1, start.column + 1,
                f"the quote opened here (line {start.line + 1}, column {start.column + 1}) is never closed: "
                "end the value with the same quote")
    for kind, opening, closing in (("flow sequence", "[", "]"), ("flow mapping", "{", "}")):
        if kind in context and start is not None:
            return (start.line + 1, start.column + 1,
                    f"the `{opening}` opened here (line {start.line + 1}, column {start.column + 1}) is not "
                    f"closed before line {line}: close it with `{closing}`")
    if ("expected <block end>" in problem or "did not find expected key" in problem
            or "did not find expected '-'" in problem) and 1 <= line <= len(rows):
        above = next((r for r in reversed(rows[:line - 1]) if r.strip() and not r.lstrip().startswith("#")), "")
        level = _indent(above) + (2 if above.lstrip().startswith("- ") else 0)
        return (line, _indent(rows[line - 1]) + 1,
                f"line {line} is indented {_indent(rows[line - 1])} spaces, which lines up with no key above it "
                f"(the line before is at {level}): indent it as the keys it belongs with")
    if "mapping values are not allowed" in problem:
        return line, column, ("a value holds ': ' (a colon and a space), which YAML reads as the start of a "
                              "new key: quote the whole value")
    what = " ".join(p for p in (context, problem) if p) or "invalid YAML"
    return line, column, f"YAML syntax error: {what}"

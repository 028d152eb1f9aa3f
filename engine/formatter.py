"""`bindpolicy fmt`: one canonical layout for policy and suite files, comments kept, meaning unchanged.

The layout: two-space indentation, list dashes two spaces in from their key; keys in the order
of the file's JSON Schema (`properties`, engine/schemas/); `null` written as `null`; a flow
list or mapping that would pass column 120 written as a block; no trailing spaces, no runs of
blank lines; and, as the last line, the yaml-language-server modeline naming the file's schema
(last, so that adding it moves no rule's file:line). Quoting, block scalars (`>-`), flow style
and comments are the author's and stay as written.

Round-tripping goes through ruamel.yaml, which keeps comments. Keys are reordered on the text
itself, a key's comment lines moving with it. Before anything is written, the result is read back
with the loader's own parser and must hold exactly the same data as the original; otherwise the
file is left as it is and the problem reported.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from engine.schemas import Schema, SchemaWalker, load_schema
from engine.yamlpos import parse_yaml

WIDTH = 120
MODELINE = "# yaml-language-server: $schema="
MODELINE_PATTERN = re.compile(r"^# yaml-language-server: \$schema=(\S+)\s*$", re.MULTILINE)
SCHEMAS = Path(__file__).resolve().parent / "schemas"
VERSION_FILE = "version.yaml"
SUITE_FOLDER = "tests"
FIXTURES = "fixtures.yaml"
_ROUNDS = 1000  # one change per round; a file has far fewer maps out of order


class FormatError(Exception):
    """A file that cannot be formatted (it does not parse, or formatting would change its data)."""


@dataclass(frozen=True)
class Outcome:
    path: Path
    changed: bool


def kind_of(path: Path) -> str | None:
    """'policy', 'suite' or 'fixtures' for a file of a policy folder; None for any other file."""
    if path.suffix not in (".yaml", ".yml"):
        return None
    if (path.parent / VERSION_FILE).is_file():
        return "policy"
    if path.parent.name == SUITE_FOLDER:
        return "fixtures" if path.name == FIXTURES else "suite"
    return None


def schema_file(kind: str) -> Path:
    return SCHEMAS / f"{kind}.schema.json"


def modeline(path: Path, kind: str) -> str:
    """The modeline for a file: its schema by a path relative to the file, as editors resolve it."""
    relative = os.path.relpath(schema_file(kind), path.resolve().parent)
    return MODELINE + Path(relative).as_posix()


def find_files(paths: list[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """The policy and suite files under the given files and folders, and the paths that are neither."""
    found: list[tuple[Path, str]] = []
    refused: list[str] = []
    for given in paths:
        if given.is_dir():
            for path in sorted([*given.rglob("*.yaml"), *given.rglob("*.yml")]):
                kind = kind_of(path)
                if kind is not None and ".venv" not in path.parts:
                    found.append((path, kind))
        elif given.is_file():
            kind = kind_of(given)
            if kind is None:
                refused.append(f"{given}: not a policy file (beside a {VERSION_FILE}) or a suite "
                               f"(in a {SUITE_FOLDER}/ folder of the policies)")
            else:
                found.append((given, kind))
        else:
            refused.append(f"{given}: no such file or folder")
    return found, refused


# --- the layout ------------------------------------------------------------------------------


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never fold a scalar: a message or an expression stays on the lines it has
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _load(yaml: YAML, text: str, name: str) -> Any:
    try:
        return yaml.load(text)
    except YAMLError as exc:
        raise FormatError(f"{name}: not valid YAML, left as it is (`bindpolicy check` says where)") from exc


def _dump(yaml: YAML, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _long_flows(node: Any, lines: list[str]) -> Iterator[CommentedMap | CommentedSeq]:
    """The outermost flow collections (`[a, b]`, `{a: 1}`) on a line longer than WIDTH."""
    if not isinstance(node, CommentedMap | CommentedSeq):
        return
    if node.fa.flow_style() and len(lines[node.lc.line]) > WIDTH:
        yield node
        return
    for child in node.values() if isinstance(node, CommentedMap) else node:
        yield from _long_flows(child, lines)


def _orders(data: Any, kind: str) -> list[tuple[CommentedMap, list[str]]]:
    """Every mapping whose schema names its keys, with that order (the schema's `properties`)."""
    root = load_schema("suite" if kind != "policy" else "policy")
    walker = SchemaWalker(root)
    if kind == "policy":
        top: Schema = root["$defs"]["versionFile" if isinstance(data, dict) and "version" in data else "ruleFile"]
    elif kind == "fixtures":
        top = {"type": "object", "properties": {"bases": root["properties"]["bases"]}}
    else:
        top = root
    found: list[tuple[CommentedMap, list[str]]] = []

    def walk(node: Any, schema: Schema) -> None:
        alternatives = walker.alternatives(schema)
        if isinstance(node, CommentedMap):
            properties: dict[str, Schema] = {}
            extra: Schema | None = None
            for alt in alternatives:
                properties.update(alt.get("properties", {}))
                if isinstance(alt.get("additionalProperties"), dict):
                    extra = alt["additionalProperties"]
            if properties:
                found.append((node, list(properties)))
            for key, value in node.items():
                child = properties.get(key, extra)
                if child is not None:
                    walk(value, walker.resolve(child))
        elif isinstance(node, CommentedSeq):
            for alt in alternatives:
                if "items" in alt:
                    for value in node:
                        walk(value, walker.resolve(alt["items"]))
                    break

    walk(data, top)
    return found


def _canonical(keys: list[str], order: list[str]) -> list[str]:
    rank = {key: index for index, key in enumerate(order)}
    return sorted(keys, key=lambda key: (rank.get(key, len(order)), keys.index(key)))


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _reorder_block(lines: list[str], node: CommentedMap, keys: list[str]) -> list[str] | None:
    """The lines with this block mapping's keys in the given order, each key's comments with it;
    None where the mapping is not laid out as this can handle (then it stays as it is)."""
    old = list(node.keys())
    rows = [node.lc.key(key)[0] for key in old]
    column = node.lc.key(old[0])[1]
    if any(node.lc.key(key)[1] != column for key in old) or rows != sorted(rows):
        return None
    first = lines[rows[0]]
    dashed = column >= 2 and first[:column] == " " * (column - 2) + "- "
    if first[:column].strip() and not dashed:
        return None
    end = rows[-1] + 1  # the last key's value runs while lines are blank, comments or indented deeper
    while end < len(lines) and (not lines[end].strip() or _is_comment(lines[end])
                                or len(lines[end]) - len(lines[end].lstrip()) > column):
        end += 1
    while end > rows[-1] + 1 and (not lines[end - 1].strip() or _is_comment(lines[end - 1])):
        end -= 1
    starts = []
    for index, row in enumerate(rows):
        start = row
        while index and start - 1 > rows[index - 1] and _is_comment(lines[start - 1]):
            start -= 1
        starts.append(start)
    chunks: dict[str, list[str]] = {}
    blanks = 0
    for index, key in enumerate(old):
        chunk = lines[starts[index]:starts[index + 1] if index + 1 < len(old) else end]
        while len(chunk) > 1 and not chunk[-1].strip():  # blank lines gather at the end: the count holds
            chunk.pop()
            blanks += 1
        chunks[key] = chunk
    if dashed:
        chunks[old[0]][0] = " " * column + first[column:]
    body = [line for key in keys for line in chunks[key]] + [""] * blanks
    if dashed:
        at = next(i for i, line in enumerate(body) if not _is_comment(line))
        body[at] = " " * (column - 2) + "- " + body[at][column:]
    return lines[:starts[0]] + body + lines[end:]


def _layout(yaml: YAML, text: str, kind: str, name: str) -> str:
    """Round by round: dump, read back (so positions match the text), unfold what is too long,
    reorder flow mappings in the data, then block mappings on the text; done when nothing changes.
    Block mappings are reordered from the end of the file up: reordering one moves lines only
    within its own span, so the positions of those above it still hold."""
    data = _load(yaml, text, name)
    for _ in range(_ROUNDS):
        dumped = _dump(yaml, data)
        if dumped != text:  # positions must be those of the text: read back what was written
            text = dumped
            data = _load(yaml, text, name)
        long = list(_long_flows(data, text.splitlines()))
        for node in long:
            node.fa.set_block_style()
        if long:
            continue
        flows, blocks = False, []
        for node, order in _orders(data, kind):
            keys = list(node.keys())
            wanted = _canonical(keys, order)
            if keys == wanted:
                continue
            if node.fa.flow_style():  # a flow mapping holds no comments: reorder the data itself
                items = [(key, node.pop(key)) for key in wanted]
                for key, value in items:
                    node[key] = value
                flows = True
            else:
                blocks.append((node, wanted))
        if flows:
            continue
        lines = text.splitlines()
        changed = False
        for node, wanted in sorted(blocks, key=lambda item: item[0].lc.line, reverse=True):
            reordered = _reorder_block(lines, node, wanted)
            if reordered is not None:
                lines, changed = reordered, True
        if not changed:
            return _indent_comments(text, data, kind)
        data = _load(yaml, "\n".join(lines) + "\n", name)
    raise FormatError(f"{name}: the layout did not settle")


def _indent_comments(text: str, data: Any, kind: str) -> str:
    """Comment lines right above a key take that key's indentation (a list item's: its dash's)."""
    lines = text.splitlines()
    rows = {node.lc.key(key)[0] for node, _ in _orders(data, kind) if not node.fa.flow_style() for key in node}
    for row in sorted(rows):
        indent = " " * (len(lines[row]) - len(lines[row].lstrip()))
        above = row - 1
        while above >= 0 and _is_comment(lines[above]):
            lines[above] = indent + lines[above].lstrip()
            above -= 1
    return "\n".join(lines) + "\n"


def _modeline(text: str, path: Path, kind: str) -> str:
    """The file's own modeline if it names this kind's schema (a URL, or a copy of the schema
    elsewhere), else one that reaches the bundled schema from the file."""
    for match in MODELINE_PATTERN.finditer(text):
        found = match.group(1)
        if found.endswith(f"/{kind}.schema.json") or found == f"{kind}.schema.json":
            return MODELINE + found
    return modeline(path, kind)


def _tidy(text: str, line: str) -> str:
    """No trailing spaces, no runs of blank lines, no blank lines at either end; the modeline last."""
    out: list[str] = []
    for row in text.splitlines():
        if row.startswith("# yaml-language-server:"):
            continue
        row = row.rstrip()
        if row or (out and out[-1]):
            out.append(row)
    while out and not out[-1]:
        out.pop()
    return "\n".join([*out, "", line]) + "\n"


def format_text(text: str, kind: str, name: str, path: Path) -> str:
    """The file's text in the canonical layout; FormatError if it does not parse, or if the layout
    would change what the file says (then nothing is written)."""
    before, problems = parse_yaml(text, name)
    if before is None or any(p.code.startswith("yaml") for p in problems):
        raise FormatError(f"{name}: not valid YAML, left as it is (`bindpolicy check` says where)")
    out = _tidy(_layout(_yaml(), text, kind, name), _modeline(text, path, kind))
    after = before if out == text else parse_yaml(out, name)[0]
    if after is None or after.data != before.data:
        raise FormatError(f"{name}: formatting would change what the file says, so it is left as it is "
                          "(a bug of bindpolicy fmt: please report it with the file)")
    return out


def format_file(path: Path, kind: str, check: bool) -> Outcome:
    """Format one file in place (or, with check, only say whether it would change)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the file: {exc}") from exc
    formatted = format_text(text, kind, str(path), path)
    changed = formatted != text
    if changed and not check:
        path.write_text(formatted, encoding="utf-8")
    return Outcome(path, changed)


def first_difference(before: str, after: str) -> int:
    """The first line (1-based) where two texts differ."""
    for number, (a, b) in enumerate(zip(before.splitlines(), after.splitlines(), strict=False), start=1):
        if a != b:
            return number
    return min(len(before.splitlines()), len(after.splitlines())) + 1


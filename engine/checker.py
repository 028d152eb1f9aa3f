"""JSON Schema checks of policy files, suites and requests, as plain-worded problems with paths."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
import jsonschema_rs
from jsonschema import FormatChecker
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from engine.schemas import load_schema

Path = tuple[str | int, ...]


@cache
def validator(schema_name: str, definition: str | None = None) -> Validator:
    """A validator for a bundled schema, or for one of its $defs, of the draft the schema declares
    (policy and suite files: draft-07, which editors' yaml-language-server implements)."""
    root = load_schema(schema_name)
    if definition:  # the definition alone, without the root's own dispatch (if/then/else, for editors)
        schema = {**{k: v for k, v in root.items() if k not in ("if", "then", "else")}, "$ref": f"#/$defs/{definition}"}
    else:
        schema = root
    draft = validator_for(root)
    draft.check_schema(root)
    checker: Validator = draft(schema, format_checker=FormatChecker())
    return checker


@cache
def _quick_validator(schema_name: str, definition: str) -> Any:
    """jsonschema-rs over the same definition, where it can vouch for Python's jsonschema; else None.

    It is many times faster, but the two differ on formats (jsonschema-rs takes a leap second in a
    date-time, Python's checker does not), and on `$` in patterns (Python's also takes a trailing
    newline, so there jsonschema-rs is the stricter: safe). A definition that reaches a `format` gets none."""
    root = load_schema(schema_name)
    seen: set[str] = set()
    todo = [definition]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        text = json.dumps(root["$defs"][name])
        if '"format"' in text:
            return None
        todo.extend(re.findall(r'"#/\$defs/([^"]+)"', text))
    schema = {**{k: v for k, v in root.items() if k not in ("if", "then", "else")}, "$ref": f"#/$defs/{definition}"}
    return jsonschema_rs.validator_for(schema)


def quickly_valid(schema_name: str, definition: str, instance: Any) -> bool:
    """True if `instance` surely has no schema problem (then schema_problems would find none);
    False means only: ask schema_problems."""
    quick = _quick_validator(schema_name, definition)
    if quick is None:
        return False
    try:
        return bool(quick.is_valid(instance))
    except (ValueError, TypeError):  # keys that are not strings, values JSON does not have
        return False


def schema_problems(check: Validator, instance: Any) -> list[tuple[Path, str]]:
    """Every way `instance` breaks the schema, as (path to the offending value, plain message)."""
    found: list[tuple[Path, str]] = []
    for error in check.iter_errors(instance):
        found.extend(_explain(error))
    return sorted(set(found), key=lambda item: ([str(p) for p in item[0]], item[1]))


def first_problems(check: Validator, instance: Any, limit: int) -> list[tuple[Path, str]]:
    """Like schema_problems, but stops once `limit` are found: the validator is lazy, so a request
    with 100,000 problems costs no more than one with `limit`."""
    found: set[tuple[Path, str]] = set()
    for error in check.iter_errors(instance):
        found.update(_explain(error))
        if len(found) >= limit:
            break
    return sorted(found, key=lambda item: ([str(p) for p in item[0]], item[1]))


def _explain(error: jsonschema.ValidationError) -> Iterator[tuple[Path, str]]:
    if error.validator in ("oneOf", "anyOf") and error.context:
        # Report the branch that came closest rather than "is not valid under any of".
        best = jsonschema.exceptions.best_match(error.context)
        yield from _explain(best)
        return
    path: Path = tuple(error.absolute_path)
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "required":
        for name in expected:
            if isinstance(value, dict) and name not in value:
                yield (*path, name), f"'{name}' is required here but missing"
    elif kind == "additionalProperties" and isinstance(value, dict):
        allowed = list(error.schema.get("properties", {}))
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                yield (*path, name), f"'{name}' is not a known field{hint}"
    elif kind == "enum":
        options = ", ".join(repr(v) for v in expected)
        yield path, f"{value!r} is not one of {options}"
    elif kind == "const":
        yield path, f"{value!r} must be {expected!r}"
    elif kind == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        yield path, f"expected {_article(wanted)}, found {_json_type(value)}"
    elif kind == "format":
        yield path, f"{value!r} is not a valid {expected} (RFC 3339, e.g. 2025-06-01T12:00:00Z)"
    elif kind == "pattern" and ("\x00" in expected or "\\u0000" in expected):
        yield path, "must not contain the NUL character (\\u0000)"
    elif kind == "pattern":
        yield path, f"{value!r} does not match the pattern {expected}"
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        yield path, f"{value!r} is out of range ({kind} {expected})"
    elif kind == "maxItems":
        yield path, f"has {len(value)} items, more than the {expected} allowed"
    elif kind == "maxLength":
        yield path, f"is {len(value)} characters long, more than the {expected} allowed"
    else:
        yield path, error.message


def _article(name: str) -> str:
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__

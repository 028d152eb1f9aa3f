"""The JSON Schemas shipped with the engine, and a walker that finds a field's schema."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from engine.model import EACH

Schema = dict[str, Any]


@cache
def load_schema(name: str) -> Schema:
    """One of the bundled schemas: 'request', 'policy' or 'suite'."""
    text = resources.files("engine").joinpath(f"schemas/{name}.schema.json").read_text("utf-8")
    schema: Schema = json.loads(text)
    return schema


class SchemaWalker:
    """Finds the schema of a field path within one root schema (local $refs, oneOf/anyOf)."""

    def __init__(self, root: Schema) -> None:
        self.root = root

    def resolve(self, schema: Schema) -> Schema:
        while "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith("#/"):
                raise ValueError(f"only local $refs are supported, not {ref}")
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target[part]
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def alternatives(self, schema: Schema) -> list[Schema]:
        """The schema itself, or each branch of a oneOf/anyOf, with null branches dropped."""
        schema = self.resolve(schema)
        branches = schema.get("oneOf") or schema.get("anyOf")
        if not branches:
            return [schema]
        out: list[Schema] = []
        for branch in branches:
            out.extend(b for b in self.alternatives(branch) if b.get("type") != "null")
        return out

    def child(self, schema: Schema, segment: str) -> Schema | None:
        """The schema of `segment` (a property, or EACH for list items), None if it has none."""
        for alt in self.alternatives(schema):
            if segment == EACH:
                if "items" in alt:
                    return self.resolve(alt["items"])
            elif segment in alt.get("properties", {}):
                return self.resolve(alt["properties"][segment])
        return None

    def fields(self, schema: Schema) -> list[str]:
        return [name for alt in self.alternatives(schema) for name in alt.get("properties", {})]

    def types(self, schema: Schema) -> set[str]:
        """The JSON types a schema admits ('timestamp' for a date-time string)."""
        found: set[str] = set()
        for alt in self.alternatives(schema):
            if alt.get("format") == "date-time":
                found.add("timestamp")
            kind = alt.get("type")
            if isinstance(kind, list):
                found.update(kind)
            elif isinstance(kind, str):
                found.add(kind)
            elif "enum" in alt or "const" in alt:
                values = alt.get("enum", [alt.get("const")])
                found.update(_json_type(v) for v in values)
            elif "properties" in alt:
                found.add("object")
        return found


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return "string" if isinstance(value, str) else "object"

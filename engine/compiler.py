"""Compiles CEL expressions once, at load, and checks every field they read against the request schema."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import celpy
from celpy.celparser import CELParseError
from lark import Token, Tree

from engine import celparse
from engine.errors import Location, ParameterFault, Problem
from engine.model import OPTIONAL, Expression, FieldPath
from engine.native import Unsupported, compile_native
from engine.needs import Read, Scope, walk
from engine.schemas import Schema, SchemaWalker
from engine.typecheck import TypeEnvironment, TypeProblem, check_types
from engine.yamlpos import Key, YamlDocument

# Identifiers that CEL itself defines (type names usable in expressions).
BUILTIN_NAMES = frozenset({"int", "uint", "double", "bool", "string", "bytes", "list", "map",
                           "null_type", "type", "dyn"})
PARAMS = "params"
# Variables the engine always binds (a request without `at` is judged at the caller's now).
ALWAYS_BOUND = frozenset({"at"})
# The policy fields that are conditions: they must give a bool.
CONDITIONS = frozenset({"applies_when", "fires_when"})
Context = tuple[str, str | None]


@dataclass(frozen=True)
class _Parsed:
    tree: Any
    program: Any
    native: Any
    reads: tuple[tuple[Read, Scope], ...]
    null_inequalities: tuple[tuple[Token, Read], ...]
    unsupported: str | None = None  # why the native runtime cannot take it
    identifiers: frozenset[str] = frozenset()  # every name the tree reads


# A check run on a parsed expression: (parsed, text, parameters, is a condition) -> problems.
Stage = Callable[[_Parsed, str, Mapping[str, Any], bool], list[TypeProblem]]


_ENVIRONMENT: list[Any] = []


def _environment() -> Any:
    """The one cel-python environment (its parser is a process-wide singleton anyway)."""
    if not _ENVIRONMENT:
        _ENVIRONMENT.append(celpy.Environment(runner_class=celpy.InterpretedRunner))
    return _ENVIRONMENT[0]


def plain_names(tree: Any) -> frozenset[str]:
    """Make every node's rule name a plain str, and return the identifiers the tree reads.

    lark names each node with a Token (a str subclass whose == is written in Python): every
    `node.data == "..."` of the walkers after the parser (needs, types, native, codegen, cel-python's
    own evaluator) paid for it, millions of times in a large load. A plain str compares alike."""
    names: set[str] = set()
    stack = [tree] if isinstance(tree, Tree) else []
    while stack:
        node = stack.pop()
        data = node.data = str(node.data)
        if data == "ident" and node.children:
            names.add(str(node.children[0]))
        stack.extend(child for child in node.children if isinstance(child, Tree))
    return frozenset(names)


def parse_program(text: str) -> tuple[Any, Any, Any, str | None, frozenset[str]]:
    """The parse tree, cel-python's program, the native closure, why there is none (or None), and
    the identifiers the tree reads."""
    env = _environment()
    parsed = celparse.parse_named(text)  # the same tree as lark's, by hand; None: lark parses (and explains errors)
    if parsed is None:
        tree = env.compile(text)
        identifiers = plain_names(tree)
    else:
        tree, identifiers = parsed
    program = env.program(tree)
    try:
        return tree, program, compile_native(tree), None, identifiers
    except Unsupported as exc:
        return tree, program, None, str(exc), identifiers


def compile_expression(text: str, location: Location | None = None) -> Expression:
    """One expression on its own, over any variables (no request schema): `eval`, conformance.

    Parse errors raise celpy's CELParseError, with line and column.
    """
    tree, program, native, _, identifiers = parse_program(text)
    return Expression(text=text, program=program, location=location or Location("<expression>", 1, 1),
                      needs=(), tests=(), native=native, tree=tree, identifiers=identifiers)


class CelCompiler:
    """Parses and programs CEL text (cached by text), and checks its field reads per version."""

    def __init__(self, request_schema: Schema) -> None:
        self.env = _environment()
        self.walker = SchemaWalker(request_schema)
        self.request_schema = request_schema
        self.variables = frozenset(request_schema["properties"])
        self._cache: dict[str, _Parsed | CELParseError | Exception] = {}
        self._types: dict[tuple[str, bool, int], list[TypeProblem]] = {}
        # The checks after parsing and field resolution, in order, each a named seam.
        self.stages: tuple[tuple[str, Stage], ...] = (("check_types", self._check_types),)
        self.timings: dict[str, float] = {}  # seconds spent in each stage, for bench/bench_check.py

    def _check_types(self, parsed: _Parsed, text: str, parameters: Mapping[str, Any],
                     condition: bool) -> list[TypeProblem]:
        """Types from the schema and the parameters (engine/typecheck.py); cached per version's parameters."""
        cache_key = (text, condition, id(parameters))
        found = self._types.get(cache_key)
        if found is None:
            env = TypeEnvironment(self.walker, self.request_schema, parameters)
            found = self._types[cache_key] = check_types(parsed.tree, env, condition)
        return found

    def _parse(self, text: str) -> _Parsed | CELParseError | Exception:
        cached = self._cache.get(text)
        if cached is None:
            try:
                tree, program, native, unsupported, identifiers = parse_program(text)
                found = walk(tree)
                cached = _Parsed(tree, program, native, tuple(found.reads), tuple(found.null_inequalities),
                                 unsupported, identifiers)
            except CELParseError as exc:
                cached = exc
            except Exception as exc:  # lark or celpy internals: still a problem of the text
                cached = exc
            self._cache[text] = cached
        return cached

    def compile(self, text: str, doc: YamlDocument, key: Key, parameters: Mapping[str, Any],
                contexts: Iterable[Context] = ()) -> tuple[Expression | None, list[Problem]]:
        """Compile one expression of a policy file; problems point into that file.

        `contexts` are the (action, role) pairs the expression can be evaluated in: for each,
        the fields it needs are worked out with `action` and `role` known, so that a branch
        like `action == "login" || shop.id == ...` does not need `shop` for a login.
        """
        parsed = self._parse(text)
        if isinstance(parsed, CELParseError):
            line, column = parsed.line or 1, parsed.column or 1
            if not str(getattr(parsed.__context__, "token", "x")):  # at the end: point past the text
                lines = text.rstrip().splitlines() or [""]
                line, column = len(lines), len(lines[-1]) + 1
            where = doc.expression_location(key, line, column)
            return None, [Problem(where, "cel_syntax", f"CEL syntax error: {_syntax_message(parsed)}")]
        if isinstance(parsed, Exception):
            return None, [Problem(doc.location(key), "cel_syntax", f"CEL cannot compile this: {parsed}")]
        problems: list[Problem] = []
        if parsed.unsupported is not None:
            # Outside the native runtime, only cel-python could evaluate it, with its departures
            # from the specification: refused, rather than judged by other semantics.
            problems.append(Problem(doc.location(key), "cel_unsupported", (
                f"bindpolicy's CEL does not take this: {parsed.unsupported} (uint and bytes values, "
                "protobuf messages and extension libraries are outside it; no request carries them)")))
        for token, read in parsed.null_inequalities:
            path = self._path(read, {})
            schema = self._schema_of(path) if path else None
            if schema is not None and self.walker.types(schema) & {"object", "array"}:
                where = doc.expression_location(key, token.line or 1, token.column or 1)
                problems.append(Problem(where, "cel_python_bug", (
                    f"cel-python 0.5 raises on `{'.'.join(read.names)} != null` when it holds an "
                    f"{'object' if 'object' in self.walker.types(schema) else 'array'}; "
                    "write `!(... == null)`, the same test")))
        needs: list[FieldPath] = []
        tests: list[FieldPath] = []
        for read, scope in parsed.reads:
            path = self._check(read, scope, parameters, doc, key, problems)
            if path is None:
                continue
            if read.tested_only:
                tests.append(path)
                if len(path) > 1:
                    needs.append(path[:-1])
            elif path[0] not in ALWAYS_BOUND:
                needs.append(path)
        if problems:
            return None, problems
        for name, stage in self.stages:
            started = time.perf_counter()
            found = stage(parsed, text, parameters, key[-1] in CONDITIONS)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
            problems.extend(Problem(doc.expression_location(key, p.line, p.column), p.code, p.message, p.severity,
                                    ParameterFault(p.parameter, p.fault, p.use) if p.parameter else None)
                            for p in found)
        if any(not p.is_warning for p in problems):
            return None, problems
        by_context: dict[Context, tuple[FieldPath, ...]] = {}
        # The action and role change what is needed only where the expression reads them: the
        # others need the same fields in every context (one walk, the one already made).
        reads_facts = bool(parsed.identifiers & {"action", "role"})
        for context in contexts:
            if not reads_facts and by_context:
                by_context[context] = next(iter(by_context.values()))
                continue
            reads = (walk(parsed.tree, {"action": context[0], "role": context[1]}).reads if reads_facts
                     else list(parsed.reads))
            paths = [self._path(read, scope, marked=True) for read, scope in reads]
            by_context[context] = tuple(dict.fromkeys(
                need for path, (read, _) in zip(paths, reads, strict=True) if path is not None
                for need in ([path[:-1]] if read.tested_only else [path])
                if need and need[0] not in ALWAYS_BOUND))
        expr = Expression(text=text, program=parsed.program, location=doc.location(key),
                          needs=tuple(dict.fromkeys(needs)), tests=tuple(dict.fromkeys(tests)),
                          needs_by_context=MappingProxyType(by_context), native=parsed.native, tree=parsed.tree,
                          identifiers=parsed.identifiers)
        return expr, problems  # warnings only

    def field_problem(self, path: FieldPath) -> str | None:
        """Why `path` (a.b.c) is not a field of the request, with a did-you-mean; None if it is."""
        if path[0] not in self.variables:
            return f"'{path[0]}' is not a request field or 'params'{_hint(path[0], [*self.variables, PARAMS])}"
        schema: Schema | None = self.request_schema
        for depth, segment in enumerate(path):
            assert schema is not None
            child = self.walker.child(schema, segment)
            if child is None:
                shown = ".".join(path[:depth]) or "the request"
                return f"'{segment}' is not a field of {shown}{_hint(segment, self.walker.fields(schema))}"
            schema = child
        return None

    def _schema_of(self, path: FieldPath) -> Schema | None:
        schema: Schema | None = self.request_schema
        for segment in path:
            schema = self.walker.child(schema, segment) if schema is not None else None
        return schema

    def _path(self, read: Read, scope: Mapping[str, FieldPath | None],
              marked: bool = False) -> FieldPath | None:
        """The request path of a checked read (None for params, loops over literals...).

        `marked` puts OPTIONAL after a has()-guarded prefix: absent there, nothing is needed.
        """
        names: tuple[str, ...] = read.names
        if marked and read.guarded:
            names = (*names[:read.guarded], OPTIONAL, *names[read.guarded:])
        if names[0] in scope:
            base = scope[names[0]]
            return None if base is None else (*base, *names[1:])
        return names if names[0] in self.variables else None

    def _check(self, read: Read, scope: Mapping[str, FieldPath | None], parameters: Mapping[str, Any],
               doc: YamlDocument, key: Key, problems: list[Problem]) -> FieldPath | None:
        """The full request path of a read, or None; a field the schema lacks is a problem."""
        names = read.names
        root = names[0]

        def here(token: Token) -> Location:
            return doc.expression_location(key, token.line or 1, token.column or 1)

        if root in scope:
            base = scope[root]
            if base is None:
                return None  # a loop over something that is not a request field
            path: FieldPath = (*base, *names[1:])
            start = len(base)
        elif root == PARAMS:
            if len(names) > 1 and names[1] not in parameters:
                hint = _hint(names[1], list(parameters))
                problems.append(Problem(here(read.tokens[1]), "unknown_parameter",
                                        f"'{names[1]}' is not a parameter of this version{hint}"))
            return None
        elif root in self.variables:
            path, start = names, 1
        elif root in BUILTIN_NAMES:
            return None
        else:
            hint = _hint(root, [*self.variables, PARAMS])
            problems.append(Problem(here(read.tokens[0]), "unknown_name",
                                    f"'{root}' is not a request field or 'params'{hint}"))
            return None
        schema: Schema | None = self.request_schema
        for depth, segment in enumerate(path):
            assert schema is not None
            child = self.walker.child(schema, segment)
            if child is None:
                shown = ".".join(path[:depth]).replace(".[]", "[]") or "the request"
                token = read.tokens[max(0, depth - start + 1)] if depth >= start else read.tokens[0]
                fields = self.walker.fields(schema)
                if fields:
                    message = f"'{segment}' is not a field of {shown}{_hint(segment, fields)}"
                else:
                    kinds = "/".join(sorted(self.walker.types(schema))) or "a value"
                    message = f"{shown} is {kinds} and has no field '{segment}'"
                problems.append(Problem(here(token), "unknown_field", message))
                return None
            schema = child
        return path


_SYMBOLS = {"COLON": "':'", "RPAR": "')'", "RSQB": "']'", "RBRACE": "'}'", "COMMA": "','",
            "IDENT": "a name", "__ANON_0": "'?'"}


def _syntax_message(exc: CELParseError) -> str:
    """Plain words for lark's parse failure behind a CELParseError."""
    cause = exc.__context__
    token = getattr(cause, "token", None)
    if token is not None:
        if not str(token):
            return "the expression ends too early (an operand or a closing bracket is missing)"
        expected = sorted(_SYMBOLS.get(e, "") for e in getattr(cause, "expected", ()) or ())
        wanted = [e for e in expected if e]
        tail = f"; expected {' or '.join(wanted)}" if wanted and len(wanted) <= 3 else ""
        return f"unexpected '{token}'{tail}"
    char = getattr(cause, "char", None)
    if char is not None:
        what = "an unterminated string" if char in "\"'" else f"the character '{char}'"
        return f"cannot read {what} here"
    return "the expression cannot be parsed"


def _hint(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""

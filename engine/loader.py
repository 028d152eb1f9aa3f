"""Loading is a gate: finds the version folders, checks, resolves inheritance, compiles; all or nothing."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from celpy.adapter import json_to_cel

from engine.celtime import is_duration
from engine.checker import quickly_valid, schema_problems, validator
from engine.codegen import GenerationMemo, generate_path
from engine.compiler import CelCompiler
from engine.errors import Location, ParameterFault, PolicyLoadError, Problem
from engine.evaluator import path_helpers
from engine.gcpause import collector_paused
from engine.messages import CHINESE, ENGLISH, PARAMS_ROOT, Message, build_message, format_problem
from engine.model import Expression, NeedsPlan, Output, PolicyVersion, Rule
from engine.needs import PresenceChecks, needs_plan
from engine.schemas import load_schema
from engine.sources import FolderSource, PolicySource
from engine.typecheck import parse_timestamp_checked
from engine.versions import PolicySet, parse_timestamp
from engine.yamlpos import Key, YamlDocument, parse_yaml

VERSION_FILE = "version.yaml"


@dataclass
class _Entry:
    """A rule or output as written, before compiling: its data and where it stands."""

    data: dict[str, Any]
    doc: YamlDocument
    key: Key
    version: str

    @property
    def location(self) -> Location:
        return self.doc.location(self.key)


@dataclass
class _RawVersion:
    name: str
    meta: dict[str, Any]
    meta_doc: YamlDocument
    docs: list[YamlDocument] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)


def load_policies(root: Path | str | PolicySource, *, generate: bool = True) -> PolicySet:
    """Load every version under `root` (a folder, or any policy source); raise PolicyLoadError
    listing every problem found.

    `generate=False` leaves out the generated decision paths (engine/codegen.py): `check` finds
    every problem without them (the generator reports none: what it cannot write inline it hands
    to the expression's closure), and they are half of a large load. A set loaded so decides
    with the native closures."""
    # Loading builds millions of small objects (parse trees, marks) and frees few: the cyclic
    # collector's passes over them cost about a fifth of a large load and find nothing to free.
    with collector_paused(long_lived=True):
        return _load(root, generate)


def _load(root: Path | str | PolicySource, generate: bool) -> PolicySet:
    source = FolderSource(root) if isinstance(root, Path | str) else root
    problems: list[Problem] = []
    warnings: list[Problem] = []
    raws = _read_versions(source, problems)
    if problems:
        raise PolicyLoadError(problems)
    order = _inheritance_order(raws, problems)
    compiler = CelCompiler(load_schema("request"))
    faults = _ParameterFaults(raws)
    built: dict[str, PolicyVersion] = {}
    entries: dict[str, tuple[list[_Entry], list[_Entry], dict[str, Any], dict[str, bytes]]] = {}
    for name in order:
        raw = raws[name]
        parent = entries.get(raw.meta.get("extends", ""))
        rules, outputs, params, files = _resolve(raw, parent, problems)
        entries[name] = (rules, outputs, params, files)
        version = _build(raw, rules, outputs, params, files, compiler, problems, warnings, faults, generate)
        if version is not None:
            built[name] = version
    problems.extend(faults.problems())
    _check_dates(raws, problems)
    if problems:
        raise PolicyLoadError(problems)
    return PolicySet(built, warnings=sorted(set(warnings)))


def _read_versions(source: PolicySource, problems: list[Problem]) -> dict[str, _RawVersion]:
    if not source.exists():
        problems.append(Problem(Location(str(source)), "no_policies", "the policy folder does not exist"))
        return {}
    raws: dict[str, _RawVersion] = {}
    names = source.names()
    folders = sorted({name.split("/")[0] for name in names if name.endswith("/" + VERSION_FILE)})
    if not folders:
        problems.append(Problem(Location(str(source)), "no_policies",
                                f"no version folder (a folder with a {VERSION_FILE}) was found"))
    for folder in folders:
        docs: list[YamlDocument] = []
        files: dict[str, bytes] = {}
        mine = [n for n in names if n.split("/")[0] == folder]
        for name in [*sorted(n for n in mine if n.endswith(".yaml")), *sorted(n for n in mine if n.endswith(".yml"))]:
            try:  # read once: the digest and the rules come from the same bytes
                files[name] = source.read(name)
                doc, found = parse_yaml(files[name].decode("utf-8"), name)
            except (OSError, UnicodeDecodeError) as exc:
                doc, found = None, [Problem(Location(name), "file_unreadable", f"cannot read the file: {exc}")]
            problems.extend(found)
            if doc is None:
                continue
            definition = "versionFile" if name.endswith("/" + VERSION_FILE) else "ruleFile"
            if not isinstance(doc.data, dict):
                problems.append(Problem(doc.location(), "schema",
                                        "the file must be a mapping of keys to values"))
                continue
            if not quickly_valid("policy", definition, doc.data):  # jsonschema-rs vouches for most files
                for path_, message in schema_problems(validator("policy", definition), doc.data):
                    problems.append(Problem(doc.location(path_), "schema", message))
            docs.append(doc)
        meta_doc = next((d for d in docs if d.name.endswith("/" + VERSION_FILE)), None)
        if meta_doc is None or not isinstance(meta_doc.data.get("version"), str):
            continue
        version = meta_doc.data["version"]
        if version in raws:
            problems.append(Problem(meta_doc.location(("version",)), "duplicate_version",
                                    f"version '{version}' is also defined in {raws[version].meta_doc.name}"))
            continue
        raws[version] = _RawVersion(version, meta_doc.data, meta_doc,
                                    [d for d in docs if d is not meta_doc], files)
    return raws


def _inheritance_order(raws: dict[str, _RawVersion], problems: list[Problem]) -> list[str]:
    """Versions with their parents first; unknown parents and cycles are problems."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> bool:
        if state.get(name) == "done":
            return True
        raw = raws[name]
        parent = raw.meta.get("extends")
        if parent is not None:
            where = raw.meta_doc.location(("extends",))
            if parent not in raws:
                problems.append(Problem(where, "unknown_parent", f"extends '{parent}', which does not exist"))
                return False
            if parent in chain:
                cycle = " -> ".join((*chain, name, parent))
                problems.append(Problem(where, "inheritance_cycle", f"versions extend each other: {cycle}"))
                return False
            if not visit(parent, (*chain, name)):
                return False
        state[name] = "done"
        order.append(name)
        return True

    for name in sorted(raws):
        visit(name, ())
    return order


def _resolve(raw: _RawVersion,
             parent: tuple[list[_Entry], list[_Entry], dict[str, Any], dict[str, bytes]] | None,
             problems: list[Problem]) -> tuple[list[_Entry], list[_Entry], dict[str, Any], dict[str, bytes]]:
    """The version's own entries laid over its parent's: overrides keep the parent's place."""
    rules = list(parent[0]) if parent else []
    outputs = list(parent[1]) if parent else []
    params = {**(parent[2] if parent else {}), **raw.meta.get("parameters", {})}
    files = {**(parent[3] if parent else {}), **raw.files}
    meta = raw.meta_doc
    for kind, entries, key_name in (("rules", rules, "id"), ("outputs", outputs, "name")):
        inherited = {e.data[key_name] for e in entries}
        remove_key = f"remove_{kind}"
        for index, name in enumerate(raw.meta.get(remove_key, [])):
            if name not in inherited:
                problems.append(Problem(meta.location((remove_key, index)), "unknown_rule",
                                        f"cannot remove '{name}': the parent version has no such {kind[:-1]}"))
        entries[:] = [e for e in entries if e.data[key_name] not in raw.meta.get(remove_key, [])]
        own: dict[str, _Entry] = {}
        # Where each inherited entry stands (the first of a name, as a scan would find it); the
        # version's own entries are appended after, and a name met twice among them is refused first.
        places: dict[str, int] = {}
        for place, inherited_entry in enumerate(entries):
            places.setdefault(inherited_entry.data[key_name], place)
        for doc in raw.docs:
            for index, data in enumerate(doc.data.get(kind, [])):
                entry = _Entry(data, doc, (kind, index), raw.name)
                name = data[key_name]
                if name in own:
                    problems.append(Problem(doc.location((kind, index, key_name)), "duplicate_id",
                                            f"'{name}' is defined twice in this version "
                                            f"(also at {own[name].location.file}:{own[name].location.line})"))
                    continue
                own[name] = entry
                position = places.get(name)
                overrides = bool(data.get("override"))
                if position is not None and overrides:
                    entries[position] = entry
                elif position is not None:
                    problems.append(Problem(doc.location((kind, index, key_name)), "duplicate_id",
                                            f"'{name}' is inherited from '{raw.meta.get('extends')}'; "
                                            "say 'override: true' to replace it"))
                elif overrides:
                    problems.append(Problem(doc.location((kind, index, "override")), "nothing_to_override",
                                            f"'{name}' overrides nothing: the parent has no {kind[:-1]} '{name}'"))
                else:
                    entries.append(entry)
    if parent is not None:
        _check_parameters(raw, parent[2], rules + outputs, problems)
    return rules, outputs, params, files


_PARAM_READ = re.compile(r"\bparams\.([A-Za-z_][A-Za-z0-9_]*)")


def parameter_type(value: Any) -> str:
    """A parameter's type as written: int, double, bool, duration, timestamp, string or list."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        if is_duration(value):
            return "duration"
        if parse_timestamp_checked(value) is None:
            return "timestamp"
    return "string"


def _check_parameters(raw: _RawVersion, inherited: Mapping[str, Any], entries: list[_Entry],
                      problems: list[Problem]) -> None:
    """A child keeps each parameter's type, and adds only parameters that something reads."""
    read: set[str] = set()
    for entry in entries:
        for name in ("applies_when", "fires_when", "value", "message"):
            value = entry.data.get(name)
            texts = value.values() if isinstance(value, dict) else [value] if isinstance(value, str) else []
            for text in texts:
                read.update(_PARAM_READ.findall(str(text)))
    for name, value in raw.meta.get("parameters", {}).items():
        where = raw.meta_doc.location(("parameters", name))
        if name in inherited:
            before, after = parameter_type(inherited[name]), parameter_type(value)
            if before != after:
                article = "an" if before[0] in "aeiou" else "a"
                problems.append(Problem(where, "parameter_type", (
                    f"'{name}' is {article} {before} in '{raw.meta.get('extends')}' ({inherited[name]!r}); a "
                    f"version may change its value, not its type: write {article} {before}")))
        elif name not in read:
            problems.append(Problem(where, "unused_parameter", (
                f"'{name}' is new in this version and no expression or message reads it"
                f"{_hint(name, list(inherited))}")))


class _ParameterFaults:
    """Parameter values that do not fit where they are read: one problem per value and fault, at
    the value's own line in version.yaml (the version that sets it, or the ancestor it comes
    from), naming every place that reads it; not one problem per place that reads it."""

    def __init__(self, raws: Mapping[str, _RawVersion]) -> None:
        self.raws = raws
        # (where the value is written, parameter, fault) -> how it is read -> where
        self.found: dict[tuple[Location, str, str], dict[str, list[Location]]] = {}
        self.noted = 0

    def note(self, version: str, problem: Problem) -> None:
        fault = problem.parameter
        assert fault is not None
        key = (self._home(version, fault.name), fault.name, fault.fault)
        self.noted += 1
        places = self.found.setdefault(key, {}).setdefault(fault.use, [])
        if problem.location not in places:
            places.append(problem.location)

    def _home(self, version: str, name: str) -> Location:
        raw = self.raws[version]
        while name not in raw.meta.get("parameters", {}) and raw.meta.get("extends") in self.raws:
            raw = self.raws[raw.meta["extends"]]
        return raw.meta_doc.location(("parameters", name))

    def problems(self) -> list[Problem]:
        out = []
        for (where, name, fault), uses in sorted(self.found.items(), key=lambda item: item[0]):
            read = "; ".join(f"{use} at {_places(places)}" for use, places in uses.items())
            out.append(Problem(where, "parameter_value", f"parameter {name}: {fault} ({read})"))
        return out


def _places(places: list[Location]) -> str:
    shown = [str(p) for p in sorted(places)]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def _build(raw: _RawVersion, rules: list[_Entry], outputs: list[_Entry], params: dict[str, Any],
           files: dict[str, bytes], compiler: CelCompiler, problems: list[Problem],
           warnings: list[Problem], faults: _ParameterFaults, generate: bool = True) -> PolicyVersion | None:
    """Compile a resolved version; None if any expression failed (the problems say why)."""
    before, faults_before = len(problems), faults.noted
    # Inherited rules bring their problems again: each is reported once, asked of a set (a list's
    # `in` made a large version's warnings quadratic: 4,000 untranslated messages, 8 million ==).
    reported = {id(problems): set(problems), id(warnings): set(warnings)}

    def report(into: list[Problem], problem: Problem) -> None:
        seen = reported[id(into)]
        if problem not in seen:
            seen.add(problem)
            into.append(problem)

    def expression(entry: _Entry, field_name: str) -> Expression | None:
        text = entry.data.get(field_name)
        if text is None:
            return None
        roles = entry.data.get("roles", [None, "official", "channel"])
        contexts = [(action, role) for action in entry.data["actions"] for role in roles]
        expr, found = compiler.compile(text, entry.doc, (*entry.key, field_name), params, contexts)
        for problem in found:  # inherited ones: reported once
            if problem.parameter is not None:
                faults.note(raw.name, problem)
                continue
            report(warnings if problem.is_warning else problems, problem)
        return expr

    built_rules: list[Rule] = []
    for entry in rules:
        d = entry.data
        applies, fires = expression(entry, "applies_when"), expression(entry, "fires_when")
        messages = _message(entry, params, compiler, report, problems, warnings, lambda p: faults.note(raw.name, p))
        if fires is None:
            continue
        built_rules.append(Rule(
            id=d["id"], actions=tuple(d["actions"]), roles=tuple(d["roles"]) if "roles" in d else None,
            effect=d["effect"], applies_when=applies, fires_when=fires, message=messages.template(ENGLISH),
            source=d["source"], location=entry.location, defined_in=entry.version, messages=messages))
    built_outputs: list[Output] = []
    for entry in outputs:
        d = entry.data
        applies, value = expression(entry, "applies_when"), expression(entry, "value")
        if value is None:
            continue
        built_outputs.append(Output(
            name=d["name"], actions=tuple(d["actions"]), roles=tuple(d["roles"]) if "roles" in d else None,
            applies_when=applies, value=value, source=d["source"], location=entry.location,
            defined_in=entry.version))
    if len(problems) > before or faults.noted > faults_before or len(built_rules) < len(rules) \
            or len(built_outputs) < len(outputs):
        return None
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    by_action: dict[tuple[str, str | None], tuple[Rule, ...]] = {}
    out_by_action: dict[tuple[str, str | None], tuple[Output, ...]] = {}
    presence: dict[tuple[str, str | None], NeedsPlan] = {}
    checks = PresenceChecks()  # the paths share their checks
    for action in {a for r in built_rules for a in r.actions} | {a for o in built_outputs for a in o.actions}:
        for role in (None, "official", "channel"):
            context = (action, role)
            by_action[context] = tuple(r for r in built_rules if r.applies_to(action, role))
            out_by_action[context] = tuple(o for o in built_outputs if o.applies_to(action, role))
            presence[context] = needs_plan(context, [(r.applies_when, r.fires_when) for r in by_action[context]]
                                            + [(o.applies_when, o.value) for o in out_by_action[context]],
                                            checks)
    version_digest = f"sha256:{digest.hexdigest()}"
    helpers = path_helpers(raw.name, params)
    memo = GenerationMemo()  # the paths of one version share its parameters: what they fold is shared
    paths = {context: generate_path(raw.name, version_digest, context[0], context[1], by_action[context],
                                    out_by_action[context], presence[context], compiler.request_schema, params, helpers,
                                    memo)
             for context in by_action} if generate else {}
    return PolicyVersion(
        name=raw.name, effective_from=parse_timestamp(raw.meta["effective_from"]),
        description=raw.meta["description"], extends=raw.meta.get("extends"),
        parameters=MappingProxyType(dict(params)), rules=tuple(built_rules),
        outputs=tuple(built_outputs), files=tuple(sorted(files)), digest=version_digest,
        sources=MappingProxyType({name: files[name].decode("utf-8", "replace") for name in sorted(files)}),
        cel_parameters=json_to_cel(params), native_parameters=dict(params),
        _rules_by_action=MappingProxyType(by_action), _outputs_by_action=MappingProxyType(out_by_action),
        _presence=MappingProxyType(presence), _paths=MappingProxyType(paths))


def _message(entry: _Entry, params: Mapping[str, Any], compiler: CelCompiler,
             report: Callable[[list[Problem], Problem], None], problems: list[Problem], warnings: list[Problem],
             fault: Callable[[Problem], None]) -> Message:
    """The rule's message in each language; every placeholder must name a parameter or a field.
    `report(into, problem)` adds a problem to `problems` or `warnings` unless it is there already."""
    written = entry.data["message"]
    messages, errors = build_message(written)
    key = (*entry.key, "message")

    def where(language: str, offset: int) -> Location:
        text = messages.templates[language]
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        at = key if isinstance(written, str) else (*key, language)
        return entry.doc.expression_location(at, line, column)

    found = [Problem(where(e.language, e.offset), "message_placeholder", e.message) for e in errors]
    for language, placeholder in messages.placeholders():
        path = placeholder.path
        problem: str | None
        if path[0] == PARAMS_ROOT:
            if len(path) != 2 or path[1] not in params:
                name = path[1] if len(path) > 1 else ""
                problem = f"'{name}' is not a parameter of this version{_hint(name, list(params))}"
            else:
                value = params[path[1]]
                problem = format_problem(value, placeholder.format)
                if problem is not None and isinstance(value, str):  # a duration CEL refuses: the value's fault
                    fault(Problem(where(language, placeholder.offset), "message_placeholder",
                                  f"in the message {{{placeholder.text}}}: {problem}",
                                  parameter=ParameterFault(path[1], problem, f"shown as :{placeholder.format}")))
                    continue
        else:
            problem = compiler.field_problem(path)
            if problem is None and placeholder.format:
                problem = f"':{placeholder.format}' shows a duration parameter; a request field cannot use it"
        if problem is not None:
            found.append(Problem(where(language, placeholder.offset), "message_placeholder",
                                 f"in the message {{{placeholder.text}}}: {problem}"))
    for each in found:
        report(problems, each)
    if CHINESE not in messages.templates:
        warning = Problem(entry.doc.location(key), "message_untranslated",
                          f"{entry.data['id']} has its message in English only: write it as "
                          "`message: {en: ..., zh: ...}` so that Chinese callers read it too")
        report(warnings, warning)
    return messages


def _hint(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_dates(raws: Mapping[str, _RawVersion], problems: list[Problem]) -> None:
    seen: dict[datetime, str] = {}
    for name in sorted(raws):
        raw = raws[name]
        when = parse_timestamp(raw.meta["effective_from"])
        if when in seen:
            problems.append(Problem(raw.meta_doc.location(("effective_from",)), "duplicate_date",
                                    f"'{name}' takes effect at the same moment as '{seen[when]}'"))
        seen[when] = name

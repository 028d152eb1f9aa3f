"""Semantic diff of two policy versions: what a rule means, not how its file is laid out.

A rule is matched by id. Its expressions are compared by their CEL parse trees, so that
re-wrapping, re-indenting or moving a rule (to another line, file or place in the order) is
no change; a change to what it reads, when it applies or what it says is.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import celpy

from engine.model import EACH, OPTIONAL, Expression, FieldPath, Output, PolicyVersion, Rule
from engine.versions import format_timestamp

_ENV: Any = None


def _tree(expr: Expression | None) -> Any:
    global _ENV
    if expr is None:
        return None
    if _ENV is None:
        _ENV = celpy.Environment(runner_class=celpy.InterpretedRunner)
    return _ENV.compile(expr.text)  # lark trees compare by structure and token text, not position


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class EntryChange:
    """A rule or output in both versions, with what differs."""

    id: str
    old_source: str
    new_source: str
    changes: tuple[FieldChange, ...]
    old_body: dict[str, Any] = field(default_factory=dict, compare=False)  # the whole entry, before
    new_body: dict[str, Any] = field(default_factory=dict, compare=False)  # and after


@dataclass(frozen=True)
class Entry:
    id: str
    source: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class NewNeed:
    """A request field one version needs and the other did not: requests without it become 400s."""

    field: str  # dotted; `[]` for every item of a list
    contexts: tuple[str, ...]  # "bind/official", "unbind"...: the requests that now need it
    readers: tuple[str, ...]  # the rules (and outputs) that read it there

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "requests": list(self.contexts), "read_by": list(self.readers)}

    def describe(self) -> str:
        return f"{self.field}  (in {', '.join(self.contexts)} requests; read by {', '.join(self.readers)})"


@dataclass(frozen=True)
class ParameterReach:
    """A changed parameter and every rule or output whose behaviour (or message) it reaches."""

    name: str
    rules: tuple[str, ...]  # "personal.min-age (v1/bind.yaml:80)"; "... message" where only the message reads it

    def to_dict(self) -> dict[str, Any]:
        return {"parameter": self.name, "reaches": list(self.rules)}


@dataclass
class VersionDiff:
    old: str
    new: str
    old_digest: str
    new_digest: str
    metadata: list[FieldChange] = field(default_factory=list)
    parameters: list[FieldChange] = field(default_factory=list)  # old None: added; new None: removed
    rules_added: list[Entry] = field(default_factory=list)
    rules_removed: list[Entry] = field(default_factory=list)
    rules_changed: list[EntryChange] = field(default_factory=list)
    outputs_added: list[Entry] = field(default_factory=list)
    outputs_removed: list[Entry] = field(default_factory=list)
    outputs_changed: list[EntryChange] = field(default_factory=list)
    new_needs: list[NewNeed] = field(default_factory=list)  # fields `new` needs that `old` did not
    parameter_reach: list[ParameterReach] = field(default_factory=list)
    proof: Any = None  # engine.prover.diff.DiffProof: what can change, for every request

    @property
    def empty(self) -> bool:
        return not (self.metadata or self.parameters or self.rules_added or self.rules_removed
                    or self.rules_changed or self.outputs_added or self.outputs_removed or self.outputs_changed)

    def to_dict(self) -> dict[str, Any]:
        def entry(e: Entry) -> dict[str, Any]:
            return {"id": e.id, "source": e.source, **e.summary}

        def change(c: EntryChange) -> dict[str, Any]:
            return {"id": c.id, "old_source": c.old_source, "new_source": c.new_source,
                    "changes": [{"field": f.field, "old": f.old, "new": f.new} for f in c.changes]}

        return {
            "old": {"version": self.old, "digest": self.old_digest},
            "new": {"version": self.new, "digest": self.new_digest},
            "metadata": [{"field": f.field, "old": f.old, "new": f.new} for f in self.metadata],
            "parameters": [{"name": f.field, "old": f.old, "new": f.new} for f in self.parameters],
            "rules": {"added": [entry(e) for e in self.rules_added], "removed": [entry(e) for e in self.rules_removed],
                      "changed": [change(c) for c in self.rules_changed]},
            "outputs": {"added": [entry(e) for e in self.outputs_added],
                        "removed": [entry(e) for e in self.outputs_removed],
                        "changed": [change(c) for c in self.outputs_changed]},
            "newly_needed_fields": [n.to_dict() for n in self.new_needs],
            "parameter_reach": [r.to_dict() for r in self.parameter_reach],
            **({"what_can_change": self.proof.to_dict()} if self.proof is not None else {}),
        }


def _rule_fields(rule: Rule) -> dict[str, Any]:
    return {"actions": list(rule.actions), "roles": list(rule.roles) if rule.roles else None, "effect": rule.effect,
            "applies_when": rule.applies_when.text if rule.applies_when else None,
            "fires_when": rule.fires_when.text, "message": rule.message,
            "message_zh": rule.messages.template("zh") if rule.messages else rule.message,
            "source_section": rule.source}


def _output_fields(output: Output) -> dict[str, Any]:
    return {"actions": list(output.actions), "roles": list(output.roles) if output.roles else None,
            "applies_when": output.applies_when.text if output.applies_when else None,
            "value": output.value.text, "source_section": output.source}


def key(entry: Rule | Output) -> str:
    return entry.id if isinstance(entry, Rule) else entry.name


def _where(entry: Rule | Output) -> str:
    return f"{entry.location.file}:{entry.location.line}"


def _compare(old: Rule | Output, new: Rule | Output) -> list[FieldChange]:
    changes: list[FieldChange] = []
    old_fields = _rule_fields(old) if isinstance(old, Rule) else _output_fields(old)
    new_fields = _rule_fields(new) if isinstance(new, Rule) else _output_fields(new)
    for name, old_value in old_fields.items():
        new_value = new_fields[name]
        if name in ("applies_when", "fires_when", "value"):
            old_expr, new_expr = getattr(old, name), getattr(new, name)
            if _tree(old_expr) != _tree(new_expr):
                changes.append(FieldChange(name, old_value, new_value))
        elif name in ("actions", "roles"):
            if sorted(old_value or []) != sorted(new_value or []) or (old_value is None) != (new_value is None):
                changes.append(FieldChange(name, old_value, new_value))
        elif old_value != new_value:
            changes.append(FieldChange(name, old_value, new_value))
    return changes


def diff_versions(old: PolicyVersion, new: PolicyVersion) -> VersionDiff:
    """What changed from `old` to `new`, in meaning."""
    diff = VersionDiff(old.name, new.name, old.digest, new.digest)
    if old.effective_from != new.effective_from:
        diff.metadata.append(FieldChange("effective_from", format_timestamp(old.effective_from),
                                         format_timestamp(new.effective_from)))
    if " ".join(old.description.split()) != " ".join(new.description.split()):
        diff.metadata.append(FieldChange("description", old.description, new.description))
    for name in sorted(set(old.parameters) | set(new.parameters)):
        before, after = old.parameters.get(name), new.parameters.get(name)
        if before != after or (name in old.parameters) != (name in new.parameters):
            diff.parameters.append(FieldChange(name, before, after))
    for kind, olds, news in (("rules", old.rules, new.rules), ("outputs", old.outputs, new.outputs)):
        old_by: dict[str, Rule | Output]
        new_by: dict[str, Rule | Output]
        old_by, new_by = {key(e): e for e in olds}, {key(e): e for e in news}
        added = [Entry(key(e), _where(e), _summary(e)) for e in news if key(e) not in old_by]
        removed = [Entry(key(e), _where(e), _summary(e)) for e in olds if key(e) not in new_by]
        changed = [EntryChange(key(e), _where(old_by[key(e)]), _where(e), tuple(found),
                               _summary(old_by[key(e)]), _summary(e))
                   for e in news if key(e) in old_by and (found := _compare(old_by[key(e)], e))]
        if kind == "rules":
            diff.rules_added, diff.rules_removed, diff.rules_changed = added, removed, changed
        else:
            diff.outputs_added, diff.outputs_removed, diff.outputs_changed = added, removed, changed
    diff.new_needs = new_needs(old, new)
    diff.parameter_reach = parameter_reach(new, [c.field for c in diff.parameters if c.new is not None])
    return diff


# --- the request fields a version needs ---------------------------------------------------------

Context = tuple[str, str | None]
_ROLES: tuple[str | None, ...] = (None, "official", "channel")  # as the loader indexes rules


def needed_fields(version: PolicyVersion) -> dict[FieldPath, dict[Context, list[str]]]:
    """Every request field a rule or output of `version` needs (reads outside has()), per
    (action, role), with who reads it: a request of that action and role that lacks it is a 400
    once the reader applies. Built on each expression's `needs_for(action, role)`."""
    found: dict[FieldPath, dict[Context, list[str]]] = {}
    entries: list[tuple[str, tuple[str, ...], tuple[str, ...] | None, tuple[Expression | None, ...]]] = [
        (r.id, r.actions, r.roles, (r.applies_when, r.fires_when)) for r in version.rules]
    entries += [(f"output {o.name}", o.actions, o.roles, (o.applies_when, o.value)) for o in version.outputs]
    for owner, actions, roles, expressions in entries:
        for action in actions:
            for role in roles or _ROLES:
                for expr in expressions:
                    for path in expr.needs_for(action, role) if expr is not None else ():
                        if path[-1] == OPTIONAL:  # has() guards it whole: absent is fine
                            continue
                        readers = found.setdefault(path, {}).setdefault((action, role), [])
                        if owner not in readers:
                            readers.append(owner)
    return found


def new_needs(old: PolicyVersion, new: PolicyVersion) -> list[NewNeed]:
    """The fields `new` needs, per action and role, that `old` did not (nor anything inside them)."""
    before, after = needed_fields(old), needed_fields(new)
    out: list[NewNeed] = []
    for path in sorted(after):
        contexts = [c for c in after[path] if not _already_needed(path, c, before)]
        if contexts:
            readers = dict.fromkeys(r for c in contexts for r in after[path][c])
            out.append(NewNeed(show_path(path), _show_contexts(contexts), tuple(readers)))
    return out


def _already_needed(path: FieldPath, context: Context, before: dict[FieldPath, dict[Context, list[str]]]) -> bool:
    """Whether `before` already needed `path` here: it, or a field inside it, with no has() guard on the way."""
    size = len(path)
    return any(context in contexts and old[:size] == path and old[size:size + 1] != (OPTIONAL,)
               for old, contexts in before.items())


def show_path(path: FieldPath) -> str:
    """("shop", "channel_accounts", "[]", "bound_at") as shop.channel_accounts[].bound_at; a has()-guarded
    prefix is said: account.upgrade.state (if account.upgrade is present)."""
    text, guard = "", ""
    for part in path:
        if part == OPTIONAL:
            guard = text
        elif part == EACH:
            text += "[]"
        else:
            text += ("." if text else "") + part
    return f"{text} (if {guard} is present)" if guard else text


def _show_contexts(contexts: Iterable[Context]) -> tuple[str, ...]:
    """bind with every role as `bind`; else `bind/official`; actions without roles by name."""
    roles: dict[str, set[str | None]] = {}
    for action, role in contexts:
        roles.setdefault(action, set()).add(role)
    out: list[str] = []
    for action in sorted(roles):
        named = sorted(r for r in roles[action] if r is not None)
        if not named or set(named) == {"official", "channel"}:
            out.append(action)
        else:
            out.extend(f"{action}/{role}" for role in named)
    return tuple(out)


# --- what a changed parameter reaches -----------------------------------------------------------

_PARAM_READ = re.compile(r"\bparams\.([A-Za-z_][A-Za-z0-9_]*)")


def parameter_reach(version: PolicyVersion, names: Iterable[str]) -> list[ParameterReach]:
    """For each parameter, the rules and outputs of `version` that read it: in a condition (their
    behaviour) or only in a message (what they say)."""
    out: list[ParameterReach] = []
    for name in names:
        reached: list[str] = []
        entries: list[Rule | Output] = [*version.rules, *version.outputs]
        for entry in entries:
            texts = [e.text for e in (entry.applies_when, entry.fires_when if isinstance(entry, Rule) else entry.value)
                     if e is not None]
            in_logic = any(name in _PARAM_READ.findall(text) for text in texts)
            in_message = isinstance(entry, Rule) and entry.messages is not None and any(
                p.path[:2] == ("params", name) for _, p in entry.messages.placeholders())
            if in_logic or in_message:
                label = entry.id if isinstance(entry, Rule) else f"output {entry.name}"
                reached.append(f"{label} ({_where(entry)})" + ("" if in_logic else ": its message only"))
        out.append(ParameterReach(name, tuple(reached)))
    return out


def _summary(entry: Rule | Output) -> dict[str, Any]:
    return _rule_fields(entry) if isinstance(entry, Rule) else _output_fields(entry)


# --- rendering ----------------------------------------------------------------------------------


def _value(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value, ensure_ascii=False) if not isinstance(value, str) \
        else value


def render_text(diff: VersionDiff) -> str:
    lines = [f"{diff.old} -> {diff.new}"]
    if diff.empty:
        return lines[0] + ": no change in meaning\n"
    for change in diff.metadata:
        lines.append(f"  {change.field}: {_value(change.old)} -> {_value(change.new)}")
    if diff.parameters:
        lines.append("parameters:")
        for change in diff.parameters:
            if change.old is None:
                lines.append(f"  + {change.field} = {_value(change.new)}")
            elif change.new is None:
                lines.append(f"  - {change.field} (was {_value(change.old)})")
            else:
                lines.append(f"  ~ {change.field}: {_value(change.old)} -> {_value(change.new)}")
    for kind, added, removed, changed in (("rules", diff.rules_added, diff.rules_removed, diff.rules_changed),
                                          ("outputs", diff.outputs_added, diff.outputs_removed,
                                           diff.outputs_changed)):
        if not (added or removed or changed):
            continue
        lines.append(f"{kind}:")
        for e in added:
            lines.append(f"  + {e.id}  ({e.source})")
            lines.extend(f"      {line}" for line in _body(e.summary))
        for e in removed:
            lines.append(f"  - {e.id}  (was {e.source})")
            lines.extend(f"      {line}" for line in _body(e.summary))
        for c in changed:
            lines.append(f"  ~ {c.id}  ({c.old_source} -> {c.new_source})")
            for f in c.changes:
                lines.append(f"      {f.field}:")
                lines.append(f"        - {_value(f.old)}")
                lines.append(f"        + {_value(f.new)}")
            lines.append(f"      before ({c.old_source}):")
            lines.extend(f"        {line}" for line in _body(c.old_body))
            lines.append(f"      after ({c.new_source}):")
            lines.extend(f"        {line}" for line in _body(c.new_body))
    if diff.parameter_reach:
        lines.append("what the changed parameters reach:")
        for reach in diff.parameter_reach:
            lines.append(f"  params.{reach.name}:" + ("" if reach.rules else " nothing reads it"))
            lines.extend(f"    {rule}" for rule in reach.rules)
    if diff.new_needs:
        lines.append(f"request fields {diff.new} needs that {diff.old} did not (requests without them "
                     "are now refused, 400 missing_field):")
        lines.extend(f"  ! {need.describe()}" for need in diff.new_needs)
    return "\n".join(lines) + "\n"


def _body(summary: dict[str, Any]) -> list[str]:
    """A rule or output whole, one `field: value` a line, as an author would read it."""
    return [f"{name}: {_value(value)}" for name, value in summary.items() if value is not None]


def render_markdown(diff: VersionDiff) -> str:
    lines = [f"# Policy diff: {diff.old} → {diff.new}", "",
             f"- `{diff.old}`: `{diff.old_digest}`", f"- `{diff.new}`: `{diff.new_digest}`", ""]
    if diff.empty:
        return "\n".join([*lines, "No change in meaning.", ""])
    if diff.metadata or diff.parameters:
        lines += ["## Version and parameters", "", "| what | before | after |", "|---|---|---|"]
        lines += [f"| {c.field} | {_md(c.old)} | {_md(c.new)} |" for c in diff.metadata]
        lines += [f"| `params.{c.field}` | {_md(c.old)} | {_md(c.new)} |" for c in diff.parameters]
        lines.append("")
    for kind, added, removed, changed in (("Rules", diff.rules_added, diff.rules_removed, diff.rules_changed),
                                          ("Outputs", diff.outputs_added, diff.outputs_removed,
                                           diff.outputs_changed)):
        if not (added or removed or changed):
            continue
        lines += [f"## {kind}", ""]
        for e in added:
            lines += [f"- **added** `{e.id}` ({e.source})", "", *_md_body(e.summary), ""]
        for e in removed:
            lines += [f"- **removed** `{e.id}` (was {e.source})", "", *_md_body(e.summary), ""]
        for c in changed:
            lines += [f"- **changed** `{c.id}` ({c.old_source} → {c.new_source})", "",
                      "  | field | before | after |", "  |---|---|---|"]
            lines += [f"  | {f.field} | {_md(f.old)} | {_md(f.new)} |" for f in c.changes]
            lines += ["", f"  Before ({c.old_source}):", "", *_md_body(c.old_body),
                      "", f"  After ({c.new_source}):", "", *_md_body(c.new_body), ""]
        lines.append("")
    if diff.parameter_reach:
        lines += ["## What the changed parameters reach", ""]
        for reach in diff.parameter_reach:
            lines.append(f"- `params.{reach.name}`: " + ("; ".join(reach.rules) or "nothing reads it"))
        lines.append("")
    if diff.new_needs:
        lines += [f"## Request fields {diff.new} newly needs", "",
                  f"Requests without them are refused (400 `missing_field`) under {diff.new}, not under "
                  f"{diff.old}: a change of the contract for callers.", "",
                  "| field | requests | read by |", "|---|---|---|"]
        lines += [f"| `{n.field}` | {', '.join(n.contexts)} | {', '.join(f'`{r}`' for r in n.readers)} |"
                  for n in diff.new_needs]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _md_body(summary: dict[str, Any]) -> list[str]:
    body = [f"  {line}" for line in _body(summary)]
    return ["  ```", *body, "  ```"]


def _md(value: Any) -> str:
    text = _value(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if value is not None else "—"


def render_html(diff: VersionDiff) -> str:
    """One self-contained page (inline style, no scripts, nothing fetched)."""
    e = html.escape

    def cell(value: Any) -> str:
        return "<td class=none>—</td>" if value is None else f"<td><code>{e(_value(value))}</code></td>"

    parts = [f"<h1>Policy diff: {e(diff.old)} → {e(diff.new)}</h1>",
             f"<p class=digest>{e(diff.old)}: <code>{e(diff.old_digest)}</code><br>"
             f"{e(diff.new)}: <code>{e(diff.new_digest)}</code></p>"]
    if diff.empty:
        parts.append("<p><strong>No change in meaning.</strong></p>")
    if diff.metadata or diff.parameters:
        meta_rows = [f"<tr><th>{e(c.field)}</th>{cell(c.old)}{cell(c.new)}</tr>" for c in diff.metadata]
        meta_rows += [f"<tr><th>params.{e(c.field)}</th>{cell(c.old)}{cell(c.new)}</tr>" for c in diff.parameters]
        parts.append("<h2>Version and parameters</h2><table><tr><th></th><th>before</th><th>after</th></tr>"
                     + "".join(meta_rows) + "</table>")
    for kind, added, removed, changed in (("Rules", diff.rules_added, diff.rules_removed, diff.rules_changed),
                                          ("Outputs", diff.outputs_added, diff.outputs_removed,
                                           diff.outputs_changed)):
        if not (added or removed or changed):
            continue
        parts.append(f"<h2>{kind}</h2>")
        for item in added:
            parts.append(f"<div class='entry added'><h3>added <code>{e(item.id)}</code></h3>"
                         f"<p class=where>{e(item.source)}</p></div>")
        for item in removed:
            parts.append(f"<div class='entry removed'><h3>removed <code>{e(item.id)}</code></h3>"
                         f"<p class=where>was {e(item.source)}</p></div>")
        for c in changed:
            rows = "".join(f"<tr><th>{e(f.field)}</th>{cell(f.old)}{cell(f.new)}</tr>" for f in c.changes)
            parts.append(f"<div class='entry changed'><h3>changed <code>{e(c.id)}</code></h3>"
                         f"<p class=where>{e(c.old_source)} → {e(c.new_source)}</p>"
                         f"<table><tr><th></th><th>before</th><th>after</th></tr>{rows}</table></div>")
    if diff.parameter_reach:
        items = "".join(f"<li><code>params.{e(r.name)}</code>: {e('; '.join(r.rules) or 'nothing reads it')}</li>"
                        for r in diff.parameter_reach)
        parts.append(f"<h2>What the changed parameters reach</h2><ul>{items}</ul>")
    if diff.new_needs:
        rows = "".join(f"<tr><td><code>{e(n.field)}</code></td><td>{e(', '.join(n.contexts))}</td>"
                       f"<td>{e(', '.join(n.readers))}</td></tr>" for n in diff.new_needs)
        parts.append(f"<h2>Request fields {e(diff.new)} newly needs</h2><p>Requests without them are refused "
                     f"(400 <code>missing_field</code>).</p><table><tr><th>field</th><th>requests</th>"
                     f"<th>read by</th></tr>{rows}</table>")
    style = ("body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}"
             "code{font:13px ui-monospace,monospace;white-space:pre-wrap}table{border-collapse:collapse;width:100%}"
             "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
             "td:nth-child(2){background:#fff0f0}td:nth-child(3){background:#f0fff0}.where{color:#666;margin:0}"
             ".entry{border-left:4px solid #999;padding-left:1em;margin:1em 0}.added{border-color:#2a2}"
             ".removed{border-color:#c22}.changed{border-color:#d90}.digest{color:#555}.none{color:#999}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(diff.old)} → {e(diff.new)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def render(diff: VersionDiff, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(diff.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "markdown":
        return _with_proof(render_markdown(diff), diff, fmt)
    if fmt == "html":
        return _with_proof(render_html(diff), diff, fmt)
    return _with_proof(render_text(diff), diff, fmt)


def _with_proof(text: str, diff: VersionDiff, fmt: str) -> str:
    """The semantic diff followed by what the change can do to decisions (engine/prover/diff.py)."""
    if diff.proof is None:
        return text
    from engine.prover.diff import html_section, markdown_lines, text_lines

    if fmt == "html":
        return text.replace("</body>", html_section(diff.proof) + "</body>", 1)
    lines = markdown_lines(diff.proof) if fmt == "markdown" else text_lines(diff.proof)
    return text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"

"""Rule messages in English and Simplified Chinese, with `{params.x}` and `{account.y}` filled in.

A message is written once per language in the policy file:

    message:
      en: A personal account needs at least {params.min_followers} followers.
      zh: 个人账号需至少拥有{params.min_followers}粉丝。

Placeholders are checked at load (a parameter of the version, a field of the request schema,
a known format) and rendered only when the rule fires, so that a changed parameter changes
the message with it. The decision log keeps the rule ids and the request, so either language
can be rendered again later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from engine.celtime import DurationError, parse_duration

ENGLISH, CHINESE = "en", "zh"
PARAMS_ROOT = "params"
LANGUAGES = (ENGLISH, CHINESE)
DEFAULT_LANGUAGE = ENGLISH
LANGUAGE_NAMES = {ENGLISH: "English", CHINESE: "Simplified Chinese"}

# `{path}` or `{path:format}`; `{{` and `}}` are literal braces.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# How a value may be shown: durations in whole hours or days (parameters are CEL durations).
FORMATS: dict[str, Callable[[Any], str]] = {}
ABSENT = {ENGLISH: "(absent)", CHINESE: "（缺失）"}


@dataclass(frozen=True)
class Placeholder:
    """One `{path:format}` of a message: what it reads and how it shows it."""

    path: tuple[str, ...]
    format: str
    offset: int  # where it starts in the template (for positions in the file)

    @property
    def text(self) -> str:
        return ".".join(self.path) + (f":{self.format}" if self.format else "")


Piece = str | Placeholder


@dataclass(frozen=True)
class TemplateError:
    """A placeholder that cannot be read: where in the template, and why."""

    language: str
    offset: int
    message: str


@dataclass(frozen=True)
class Message:
    """A rule's message in each language, as written and as pieces ready to render."""

    templates: Mapping[str, str]
    pieces: Mapping[str, tuple[Piece, ...]]

    def template(self, language: str) -> str:
        return self.templates.get(language) or self.templates[ENGLISH]

    def placeholders(self) -> list[tuple[str, Placeholder]]:
        return [(lang, p) for lang, pieces in self.pieces.items() for p in pieces if isinstance(p, Placeholder)]

    def render(self, language: str, params: Mapping[str, Any], request: Mapping[str, Any]) -> str:
        """The message in `language` (English where it has none), its placeholders filled in."""
        pieces = self.pieces.get(language) or self.pieces[ENGLISH]
        if len(pieces) == 1 and isinstance(pieces[0], str):
            return pieces[0]
        shown = language if language in self.pieces else ENGLISH
        out: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            found, value = _lookup(params, request, piece.path)
            out.append(format_value(value, piece.format, shown) if found else ABSENT[shown])
        return "".join(out)


def parse_template(text: str, language: str) -> tuple[tuple[Piece, ...], list[TemplateError]]:
    """A template as literal text and placeholders; malformed braces are errors."""
    pieces: list[Piece] = []
    errors: list[TemplateError] = []
    literal: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        literal.append(text[position:match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if match.group(1) is None:
            errors.append(TemplateError(language, match.start(), (
                f"a lone '{token}' in the message: write '{token}{token}' for the brace itself, "
                "or '{params.name}' to show a parameter")))
            continue
        inner = match.group(1).strip()
        path_text, _, form = inner.partition(":")
        if not _PATH.fullmatch(path_text):
            errors.append(TemplateError(language, match.start(), (
                f"'{{{inner}}}' is not a placeholder: write a parameter or request field, "
                "such as '{params.min_followers}' or '{account.followers}'")))
            continue
        if form and form not in FORMATS:
            errors.append(TemplateError(language, match.start(), (
                f"'{form}' is not a format; known: {', '.join(sorted(FORMATS))}")))
            continue
        if "".join(literal):
            pieces.append("".join(literal))
        literal = []
        pieces.append(Placeholder(tuple(path_text.split(".")), form, match.start()))
    literal.append(text[position:])
    if "".join(literal):
        pieces.append("".join(literal))
    return tuple(pieces) or ("",), errors


def build_message(value: str | Mapping[str, str]) -> tuple[Message, list[TemplateError]]:
    """A Message from the policy file's `message` (one string: English only)."""
    templates = {ENGLISH: value} if isinstance(value, str) else {k: v for k, v in value.items() if k in LANGUAGES}
    pieces: dict[str, tuple[Piece, ...]] = {}
    errors: list[TemplateError] = []
    for language, text in templates.items():
        pieces[language], found = parse_template(text, language)
        errors.extend(found)
    return Message(MappingProxyType(templates), MappingProxyType(pieces)), errors


def _lookup(params: Mapping[str, Any], request: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    value: Any = params if path[0] == PARAMS_ROOT else request
    for name in path[1:] if path[0] == PARAMS_ROOT else path:
        if not isinstance(value, Mapping) or name not in value:
            return False, None
        value = value[name]
    return True, value


def format_value(value: Any, form: str, language: str) -> str:
    """A value as a message shows it: 1,000 in English, 1000 in Chinese; lists joined."""
    if form:
        return FORMATS[form](value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}" if language == ENGLISH else str(value)
    if isinstance(value, float):
        return f"{value:,g}" if language == ENGLISH else f"{value:g}"
    if isinstance(value, list | tuple):
        return ("、" if language == CHINESE else ", ").join(format_value(v, "", language) for v in value)
    if value is None:
        return "null"
    return str(value)


def _in_units(seconds: float) -> Callable[[Any], str]:
    def show(value: Any) -> str:
        amount = parse_duration(str(value)).total_seconds() / seconds
        return f"{amount:g}"
    return show


FORMATS.update(hours=_in_units(3600), days=_in_units(86400))


def format_problem(value: Any, form: str) -> str | None:
    """Why `value` cannot be shown with `form` (checked at load), or None."""
    if form in ("hours", "days"):
        if not isinstance(value, str):
            return f"':{form}' shows a duration, and this value is not one"
        try:
            parse_duration(value)
        except DurationError as exc:
            return str(exc)
    return None


def negotiate(header: str | None) -> str:
    """The language of an Accept-Language header: zh, zh-CN, zh-Hans... give Chinese, else English.

    Quality values are honoured (`en;q=0.5, zh` is Chinese); anything we do not speak is skipped.
    """
    best, best_q = DEFAULT_LANGUAGE, -1.0
    for index, part in enumerate((header or "").split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            name, _, number = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    quality = float(number)
                except ValueError:
                    quality = 0.0
        primary = tag.split("-")[0]
        language = CHINESE if primary == "zh" else ENGLISH if primary == "en" else None
        if language is None or quality <= 0:
            continue
        # The earlier of two equal qualities wins: the header lists preferences in order.
        if quality > best_q or (quality == best_q and index == 0):
            best, best_q = language, quality
    return best

"""Policy versions: which one is in force at a moment, or which one a request pins."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime

from engine.errors import Detail, Problem, RequestError
from engine.model import PolicyVersion
from engine.sources import set_digest


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware datetime in UTC (a trailing Z is UTC).

    ValueError for anything Python cannot hold: a leap second (23:59:60), year 0, or a moment
    that falls outside years 1 to 9999 once in UTC.
    """
    try:
        when = datetime.fromisoformat(text)  # Python 3.11 reads RFC 3339 with Z itself
    except ValueError:  # a lower-case t or z, which RFC 3339 allows
        when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    if when.tzinfo is UTC:
        return when
    try:
        return when.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from exc


def format_timestamp(when: datetime) -> str:
    """RFC 3339 in UTC with a Z, microseconds only where there are some."""
    when = when.astimezone(UTC)
    spec = "microseconds" if when.microsecond else "seconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


class PolicySet:
    """Every loaded version, by name, ordered by the date it takes effect."""

    def __init__(self, versions: Mapping[str, PolicyVersion], warnings: Sequence[Problem] = ()) -> None:
        self._versions = dict(sorted(versions.items(), key=lambda kv: kv[1].effective_from))
        # What `check` reports without refusing the set (constant conditions, untranslated messages...).
        self.warnings: tuple[Problem, ...] = tuple(warnings)
        self._digest: str | None = None

    @property
    def sources(self) -> dict[str, str]:
        """Every file of every version, by name."""
        return {name: text for version in self for name, text in version.sources.items()}

    @property
    def digest(self) -> str:
        """Of the whole set (engine.sources.set_digest): what judged a request no version took."""
        if self._digest is None:
            self._digest = set_digest(self.sources)
        return self._digest

    def __iter__(self) -> Iterator[PolicyVersion]:
        return iter(self._versions.values())

    def __len__(self) -> int:
        return len(self._versions)

    def names(self) -> list[str]:
        return list(self._versions)

    def get(self, name: str) -> PolicyVersion | None:
        return self._versions.get(name)

    def in_force(self, at: datetime) -> PolicyVersion | None:
        """The version with the latest effective date not after `at`."""
        found = None
        for version in self._versions.values():
            if version.effective_from <= at:
                found = version
        return found

    def select(self, at: datetime, pinned: str | None) -> PolicyVersion:
        """The version that judges a request: the pinned one, else the one in force at `at`."""
        if pinned is not None:
            version = self.get(pinned)
            if version is None:
                known = ", ".join(self._versions)
                raise RequestError("unknown_version", f"no policy version '{pinned}'",
                                   [Detail("/policy_version", f"'{pinned}' is not a version; known: {known}")])
            return version
        version = self.in_force(at)
        if version is None:
            first = next(iter(self._versions.values()))
            raise RequestError("no_version_in_force", "no policy version is in force at that time",
                               [Detail("/at", f"{format_timestamp(at)} is before the first version "
                                              f"('{first.name}', from {format_timestamp(first.effective_from)})")])
        return version

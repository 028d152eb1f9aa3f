"""One error family: every problem has a code, a plain message and a location."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Location:
    """Where a problem is: a file with line and column (1-based), and/or a JSON pointer."""

    file: str = ""
    line: int = 0
    column: int = 0
    pointer: str = ""

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}" + (f":{self.column}" if self.column else "")
        if self.pointer:
            where += f" ({self.pointer})" if where else self.pointer
        return where


@dataclass(frozen=True)
class ParameterFault:
    """A parameter's value that does not fit where an expression or a message reads it: the loader
    reports it once, at the value's own line in version.yaml, naming every place that reads it."""

    name: str
    fault: str  # what is wrong with the value and what to write instead (the same at every read)
    use: str  # how it is read where the problem was found ("compared with account.age by '<'")


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a policy file, a suite or a request."""

    location: Location
    code: str
    message: str
    severity: str = "error"  # or "warning": reported by `check`, never refuses the set
    parameter: ParameterFault | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        where = str(self.location)
        return f"{where}: {self.message} [{self.code}]" if where else f"{self.message} [{self.code}]"

    @property
    def is_warning(self) -> bool:
        return self.severity == "warning"

    def to_dict(self) -> dict[str, object]:
        loc = self.location
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.is_warning:
            out["severity"] = self.severity
        if loc.file:
            out.update(file=loc.file, line=loc.line, column=loc.column)
        if loc.pointer:
            out["path"] = loc.pointer
        return out


class BindPolicyError(Exception):
    """Base of every error bindpolicy raises on purpose."""

    code = "error"


@dataclass
class PolicyLoadError(BindPolicyError):
    """A policy set that failed its checks; carries every problem found, sorted."""

    problems: list[Problem] = field(default_factory=list)
    code = "policy_invalid"

    def __post_init__(self) -> None:
        self.problems = sorted(self.problems)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the policy files"
        return head + "".join(f"\n  {p}" for p in self.problems)


@dataclass(frozen=True)
class Detail:
    """One offending field of a request: a JSON pointer and what is wrong with it."""

    path: str
    problem: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "problem": self.problem}


class RequestError(BindPolicyError):
    """A request that cannot be decided; nothing was decided."""

    def __init__(self, code: str, message: str, details: Iterable[Detail] = ()) -> None:
        self.code = code
        self.message = message
        self.details = sorted(set(details), key=lambda d: (d.path, d.problem))
        # The policy content that judged it, once past the schema check (a version's, or the whole
        # set's when no version could be picked): logged, so that the rejection replays too.
        self.policy_digest: str | None = None
        super().__init__(message)

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "details": [d.to_dict() for d in self.details],
            }
        }


class InputError(Exception):
    """A path that cannot be read as requests (names it)."""

"""The README's "What `check` says" section, made from real runs on a small policy folder with one
mistake each: `python -m tests.authors_readme --write` rewrites the section; tests/test_authoring.py
fails when the README and the real output part."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- checker-examples: made by tests/authors_readme.py -->", "<!-- /checker-examples -->"

FILES = {
    "v1/version.yaml": """\
        version: v1
        effective_from: "2024-01-01T00:00:00Z"
        description: the example policies
        parameters:
          min_age: 18
          min_followers: 1000
          unbind_cooldown: 24h
        """,
    "v1/rules.yaml": """\
        rules:
          - id: personal.min-age
            actions: [bind]
            applies_when: account.type == "personal"
            effect: deny
            fires_when: account.age < params.min_age
            message:
              en: The holder of a personal account must be at least {params.min_age} years old.
              zh: 个人账号必须年满{params.min_age}岁。
            source: section 2 table
          - id: personal.min-followers
            actions: [bind]
            effect: deny
            fires_when: account.followers < params.min_followers
            message: {en: "At least {params.min_followers} followers.", zh: "至少{params.min_followers}粉丝。"}
            source: opening paragraph
          - id: unbind.cooldown
            actions: [unbind]
            effect: deny
            fires_when: at - shop.official_account.bound_at < duration(params.unbind_cooldown)
            message:
              en: Wait {params.unbind_cooldown:hours} hours after binding before unbinding.
              zh: 绑定后需等待{params.unbind_cooldown:hours}小时才能解绑。
            source: Q9
        """,
    "v2/version.yaml": """\
        version: v2
        extends: v1
        effective_from: "2025-06-01T00:00:00Z"
        description: a child that raises the follower minimum
        parameters:
          min_followers: 1500
        """,
    "tests/fixtures.yaml": """\
        bases:
          adult:
            request:
              action: bind
              role: official
              at: "2025-01-01T00:00:00Z"
              shop: {id: s}
              account: {id: a, type: personal, age: 30, followers: 5000}
        """,
    "tests/bind_test.yaml": """\
        suite: bind
        cases:
          - name: an adult is bound
            from: adult
            expect: {decision: allow}
          - name: a minor is refused
            from: adult
            set: {account.age: 17}
            expect: {rule: personal.min-age, message: {zh: 个人账号必须年满18岁。}}
          - name: too few followers
            from: adult
            set: {account.followers: 10}
            expect: {rule: personal.min-followers}
          - name: an unbind right after the bind
            from: adult
            set: {action: unbind, shop.official_account: {account_id: a, account_type: personal,
                  bound_at: "2024-12-31T12:00:00Z"}}
            expect: {rule: unbind.cooldown}
          - name: an unbind a day later
            from: adult
            set: {action: unbind, shop.official_account: {account_id: a, account_type: personal,
                  bound_at: "2024-12-31T00:00:00Z"}}
            expect: {decision: allow}
          - name: enough followers under v2
            from: adult
            set: {at: "2025-07-01T00:00:00Z", account.followers: 1500}
            expect: {decision: allow, policy_version: v2}
        """,
}

# (title, file, text replaced, by, what to write instead, command)
EXAMPLES: list[tuple[str, str, str, str, str, str]] = [
    ("Types that cannot meet", "v1/rules.yaml", "account.age < params.min_age", 'account.age > "6"',
     "`account.age > 6`: a number compares with a number.", "check"),
    ("Numbers are not converted", "v1/rules.yaml", "account.age < params.min_age", "account.age > 17.5",
     "`account.age > 17` (`int` fields take ints; `number` fields take doubles: `0.0`, not `0`).", "check"),
    ("An unknown function", "v1/rules.yaml", "account.age < params.min_age", "len(account.name) > 30",
     "`size(account.name) > 30`: the message names CEL's function (and did-you-mean over the rest).", "check"),
    ("A condition that is not true or false", "v1/rules.yaml", "account.age < params.min_age", "account.age",
     "a comparison: `account.age < params.min_age`.", "check"),
    ("A value the enum does not have", "v1/rules.yaml", 'account.type == "personal"', 'account.type == "persnal"',
     '`account.type == "personal"`: otherwise the rule silently never applies.', "check"),
    ("A duration CEL refuses", "v1/rules.yaml", "duration(params.unbind_cooldown)", 'duration("1d")',
     '`duration("24h")`: CEL\'s units are h, m, s, ms, us and ns.', "check"),
    ("A condition the schema makes constant (a warning: the policies load)", "v1/rules.yaml",
     "account.age < params.min_age", "account.age >= 0", "a comparison with a value the field can take.", "check"),
    ("A parameter that is no duration", "v1/version.yaml", "unbind_cooldown: 24h", "unbind_cooldown: 24 hours",
     "`unbind_cooldown: 24h`: reported once, at the value's own line, naming every place that reads it.", "check"),
    ("A parameter whose type does not fit its use", "v1/version.yaml", "min_age: 18", 'min_age: "18"',
     "`min_age: 18`: the value is what is wrong, so the problem is at its line, with where it is compared "
     "(a comparison is reported at its operator).", "check"),
    ("A misspelt parameter in a child version", "v2/version.yaml", "min_followers: 1500", "min_folowers: 1500",
     "the inherited name, `min_followers: 1500`: a new name nothing reads is refused.", "check"),
    ("A parameter that changes its type", "v2/version.yaml", "min_followers: 1500", 'min_followers: "1500"',
     "`min_followers: 1500`: a child may change a value, not its type.", "check"),
    ("A message placeholder", "v1/rules.yaml", "at least {params.min_age} years", "at least {params.min_agee} years",
     "`{params.min_age}`: placeholders are checked like expressions.", "check"),
    ("The test model: a version no case is judged under, a case named twice", "tests/bind_test.yaml",
     """  - name: enough followers under v2
    from: adult
    set: {at: "2025-07-01T00:00:00Z", account.followers: 1500}""", """  - name: an adult is bound
    from: adult
    set: {account.followers: 1500}""",
     "a case judged under v2 (an `at` from 2025-06-01 on, or `policy_version: v2`), each case with its own name.",
     "test"),
    ("The test model: an expectation that asserts nothing", "tests/bind_test.yaml",
     "expect: {rule: personal.min-followers}", "expect: {}",
     "what the decision must be: `expect: {decision: deny, rule: personal.min-followers}`.", "test"),
]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def run(command: str, files: dict[str, str]) -> tuple[int, str]:
    """`bindpolicy COMMAND policies` in a scratch folder: its exit code and what it printed."""
    from engine.cli import main

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        _write(Path(scratch) / "policies", files)
        out = io.StringIO()
        try:
            os.chdir(scratch)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = main([command, "policies"])
        finally:
            os.chdir(here)
    return code, out.getvalue()


def example_files(name: str, old: str, new: str) -> dict[str, str]:
    files = dict(FILES)
    text = textwrap.dedent(files[name])
    assert text.count(old) == 1, (name, old)
    files[name] = text.replace(old, new)
    return files


def section() -> str:
    code, out = run("check", FILES)
    assert code == 0, out
    code, out = run("test", FILES)
    assert code == 0, out
    lines = [START, ""]
    for title, name, old, new, fix, command in EXAMPLES:
        code, out = run(command, example_files(name, old, new))
        if "\n" in new:
            lines += [f"**{title}.** In `{name}`, the last case:", "", "```yaml", new, "```", ""]
        else:
            lines += [f"**{title}.** In `{name}`: `{new}`", ""]
        lines += ["```", f"$ bindpolicy {command} policies    # exit {code}", *out.rstrip().splitlines(), "```", "",
                  f"Write instead: {fix}", ""]
    lines.append(END)
    return "\n".join(lines)


def current() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index(START):text.index(END) + len(END)]


def main() -> None:
    made = section()
    if "--write" in sys.argv:
        README.write_text(README.read_text(encoding="utf-8").replace(current(), made), encoding="utf-8")
    else:
        print(made)


if __name__ == "__main__":
    main()

"""Google's CEL conformance data (cel-spec `tests/simple/testdata`) run through the engine's own evaluation path.

The textproto files are read with protobuf's text format parser, over the cel-spec .proto
definitions (vendored beside the data) compiled at first use with grpcio-tools' protoc.
Each test is either skipped, with the reason, or evaluated exactly as a decision evaluates
a rule (`engine.evaluator.run`: the native runtime, with cel-python behind it where the
native runtime defers) and its result compared with the expected one.

`python -m tests.celspec` prints the table per file; `--write-baseline` records the names of
the passing tests (tests/data/cel-spec/passing.txt), which the suite holds the engine to.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from engine.compiler import compile_expression
from engine.evaluator import Activation, EvaluationFailure, run
from engine.native import CelType, to_cel, to_native

DATA = Path(__file__).resolve().parent / "data" / "cel-spec"
BASELINE = DATA / "passing.txt"

# Whole files the engine does not offer, and why.
FILE_SKIPS = {
    "bindings_ext": "extension cel.bind(): bindpolicy offers no extension libraries",
    "block_ext": "extension cel.@block (an optimiser's internal form): not offered",
    "encoders_ext": "extension base64 encoders: bytes are not part of a request",
    "math_ext": "extension math.*: not offered",
    "network_ext": "extension ip()/cidr(): not offered",
    "string_ext": "extension strings library (lowerAscii, split...): not offered",
    "optionals": "optional types (a.?b, optional.of): not offered",
    "proto2": "protobuf messages: a request is JSON",
    "proto3": "protobuf messages: a request is JSON",
    "proto2_ext": "protobuf extensions: a request is JSON",
    "enums": "protobuf enums: a request is JSON",
    "wrappers": "protobuf wrapper messages: a request is JSON",
    "unknowns": "unknown sets (partial evaluation): a decision has the whole request",
    "type_deduction": "type-checker deductions: bindpolicy has no static type checker",
}

_MESSAGE_TEXT = re.compile(r"TestAllTypes|NestedTestAllTypes|google\.protobuf\.|cel\.expr\.|\.Enum\b|GlobalEnum"
                           r"|TestRequired|NestedEnum|Msg\b")
_UINT_TEXT = re.compile(r"(?<![\w.])(?:0x[0-9a-fA-F]+|\d+)[uU]\b|\buint\b")
_BYTES_TEXT = re.compile(r"(?<![\w])[bB][rR]?['\"]|\b[rR][bB]['\"]|\bbytes\b")


@dataclass(frozen=True)
class Case:
    file: str
    section: str
    name: str
    expr: str
    test: Any  # the SimpleTest message

    @property
    def id(self) -> str:
        return f"{self.file}/{self.section}/{self.name}"


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: str  # "passed", "failed" or "skipped"
    reason: str = ""
    runtime: str = ""  # what evaluated it: native, or native+cel-python where the native runtime deferred


@cache
def _message_class() -> Any:
    """SimpleTestFile, from the vendored .proto files compiled into a descriptor set."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    proto_root = DATA / "proto"
    include = resources.files("grpc_tools") / "_proto"
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cel.pb"
        status = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", "--include_imports",
                              f"--descriptor_set_out={out}", *sources])
        if status != 0:
            raise RuntimeError(f"protoc could not compile the cel-spec protos (status {status})")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    descriptor = pool.FindMessageTypeByName("cel.expr.conformance.test.SimpleTestFile")
    return message_factory.GetMessageClass(descriptor), pool


def load_cases() -> Iterator[Case]:
    from google.protobuf import text_format

    cls, pool = _message_class()
    for path in sorted((DATA / "testdata").glob("*.textproto")):
        message = cls()
        with warnings.catch_warnings():  # protobuf decodes the data's `\?` escapes with a warning
            warnings.simplefilter("ignore", DeprecationWarning)
            text_format.Parse(path.read_text(encoding="utf-8"), message, descriptor_pool=pool)
        for section in message.section:
            for test in section.test:
                yield Case(path.stem, section.name, test.name, test.expr, test)


# --- expected values ------------------------------------------------------------------------


class NotReachable(Exception):
    """A value no request, parameter or policy literal of bindpolicy can hold (the reason)."""


def value_of(value: Any) -> Any:
    """A cel.expr.Value as the engine's native value; NotReachable for uint, bytes, messages."""
    kind = value.WhichOneof("kind")
    if kind == "null_value":
        return None
    if kind == "bool_value":
        return value.bool_value
    if kind == "int64_value":
        return value.int64_value
    if kind == "double_value":
        return value.double_value
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [value_of(v) for v in value.list_value.values]
    if kind == "map_value":
        return {value_of(e.key): value_of(e.value) for e in value.map_value.entries}
    if kind == "type_value":
        return CelType(value.type_value)
    if kind == "uint64_value":
        raise NotReachable("uint values: no JSON request or YAML parameter carries an unsigned integer")
    if kind == "bytes_value":
        raise NotReachable("bytes values: no JSON request or YAML parameter carries bytes")
    if kind == "object_value":
        url = value.object_value.type_url
        if url.endswith("google.protobuf.Timestamp"):
            from google.protobuf import timestamp_pb2
            stamp = timestamp_pb2.Timestamp()
            value.object_value.Unpack(stamp)
            return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=stamp.seconds,
                                                                microseconds=stamp.nanos // 1000)
        if url.endswith("google.protobuf.Duration"):
            from google.protobuf import duration_pb2
            span = duration_pb2.Duration()
            value.object_value.Unpack(span)
            return timedelta(seconds=span.seconds, microseconds=span.nanos // 1000)
        raise NotReachable("protobuf messages: a request is JSON")
    raise NotReachable(f"{kind} values: protobuf enums and the like are not part of a request")


def same(actual: Any, expected: Any) -> bool:
    """CEL value equality for checking results: types must match; NaN matches NaN."""
    if type(actual) is not type(expected):
        return False
    if type(actual) is float:
        return (math.isnan(actual) and math.isnan(expected)) or actual == expected
    if type(actual) is list:
        return len(actual) == len(expected) and all(same(a, e) for a, e in zip(actual, expected, strict=True))
    if type(actual) is dict:
        if len(actual) != len(expected):
            return False
        for key, value in expected.items():
            match = [k for k in actual if same(k, key)]
            if len(match) != 1 or not same(actual[match[0]], value):
                return False
        return True
    return bool(actual == expected)


# --- running --------------------------------------------------------------------------------


def skip_reason(case: Case) -> str | None:
    test = case.test
    if case.file in FILE_SKIPS:
        return FILE_SKIPS[case.file]
    if test.check_only:
        return "type-checker only: bindpolicy has no static type checker"
    if test.disable_macros:
        return "macros disabled: bindpolicy always expands macros"
    if test.container or _MESSAGE_TEXT.search(case.expr):
        return "protobuf messages: a request is JSON"
    matcher = test.WhichOneof("result_matcher")
    if matcher in ("unknown", "any_unknowns"):
        return "unknown sets (partial evaluation): a decision has the whole request"
    if matcher == "typed_result":
        return "type-checker deductions: bindpolicy has no static type checker"
    if any("." in name for name in test.bindings):
        return "dotted variable names (a.b.c as one variable): a request's variables are plain names"
    if "`" in _code(case.expr):
        return "backquoted field names: cel-python's parser, which bindpolicy uses, does not take them"
    if re.search(r"\.\d{7,9}Z|\d+ns'", case.expr):
        return "nanoseconds: bindpolicy holds timestamps and durations to the microsecond (known gap)"
    if _BYTES_TEXT.search(_code(case.expr)):
        return "bytes: no JSON request or YAML parameter carries bytes"
    if _UINT_TEXT.search(_code(case.expr)):
        return "uint: no JSON request or YAML parameter carries an unsigned integer"
    try:
        for binding in test.bindings.values():
            value_of(binding.value)
        if matcher == "value":
            value_of(test.value)
    except NotReachable as exc:
        return str(exc)
    return None


def _code(expr: str) -> str:
    """The expression with its string literals blanked, so that words inside them don't count."""
    return re.sub(r"'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", "''", expr, flags=re.S)


def run_case(case: Case) -> Outcome:
    reason = skip_reason(case)
    if reason is not None:
        return Outcome(case, "skipped", reason)
    test = case.test
    bindings = {name: value_of(b.value) for name, b in test.bindings.items()}
    try:
        expr = compile_expression(case.expr)
    except Exception as exc:
        return Outcome(case, "failed", f"does not compile: {exc}")
    activation = Activation(bindings, lambda: {k: to_cel(v) for k, v in bindings.items()})
    matcher = test.WhichOneof("result_matcher")
    try:
        result = to_native(run(expr, activation))
    except EvaluationFailure as exc:
        if matcher in ("eval_error", "any_eval_errors"):
            return Outcome(case, "passed", runtime=activation.runtime)
        return Outcome(case, "failed", f"error: {exc}", activation.runtime)
    except Exception as exc:  # a crash of the engine is a failure of the test, not of the run
        return Outcome(case, "failed", f"crash: {type(exc).__name__}: {exc}", activation.runtime)
    if matcher in ("eval_error", "any_eval_errors"):
        return Outcome(case, "failed", f"expected an error, got {result!r}", activation.runtime)
    expected = value_of(test.value) if matcher == "value" else True
    if same(result, expected):
        return Outcome(case, "passed", runtime=activation.runtime)
    return Outcome(case, "failed", f"expected {expected!r}, got {result!r}", activation.runtime)


def run_all() -> list[Outcome]:
    return [run_case(case) for case in load_cases()]


def table(outcomes: list[Outcome]) -> str:
    """Per file: total, skipped, passed, failed; then the totals."""
    files: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        row = files.setdefault(outcome.case.file, {"total": 0, "skipped": 0, "passed": 0, "failed": 0})
        row["total"] += 1
        row[outcome.status] += 1
    lines = [f"| {'file':<16} | total | skipped | passed | failed |",
             f"|{'-' * 18}|------:|--------:|-------:|-------:|"]
    total = {"total": 0, "skipped": 0, "passed": 0, "failed": 0}
    for name, row in files.items():
        lines.append(f"| {name:<16} | {row['total']:>5} | {row['skipped']:>7} | {row['passed']:>6} "
                     f"| {row['failed']:>6} |")
        for key in total:
            total[key] += row[key]
    lines.append(f"| {'all':<16} | {total['total']:>5} | {total['skipped']:>7} | {total['passed']:>6} "
                 f"| {total['failed']:>6} |")
    helped = sum(1 for o in outcomes if o.status != "skipped" and o.runtime != "native")
    lines.append(f"\n{total['total'] - total['skipped']} evaluated, {helped} of them with cel-python's help "
                 "(the native runtime deferred)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    outcomes = run_all()
    print(table(outcomes))
    if "--failures" in argv:
        for outcome in outcomes:
            if outcome.status == "failed":
                print(f"FAIL {outcome.case.id}: {outcome.case.expr!r}: {outcome.reason}")
    if "--skips" in argv:
        reasons: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.status == "skipped":
                reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"{count:>5}  {reason}")
    if "--write-baseline" in argv:
        names = sorted(o.case.id for o in outcomes if o.status == "passed")
        BASELINE.write_text("\n".join(names) + "\n", encoding="utf-8")
        print(f"wrote {len(names)} passing tests to {BASELINE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

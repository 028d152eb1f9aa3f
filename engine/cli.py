"""The `bindpolicy` command: check, test and decide from the shell (a thin layer over the engine)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from engine.decider import Engine
from engine.errors import Detail, PolicyLoadError, RequestError
from engine.loader import load_policies
from engine.tester import describe, run_suites

EXIT_ALLOW, EXIT_DENY, EXIT_BAD_INPUT, EXIT_BAD_POLICY = 0, 1, 2, 3
DEFAULT_POLICIES = "policies"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    code: int = handler(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bindpolicy",
        description="Policy-as-data decisions for binding TikTok accounts to a TikTok Shop.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check", help="load the policies and report every problem (exit 1 on any)",
        description="Load every policy version: schema, inheritance, CEL compilation and field "
                    "checks. Prints every problem with file:line:column; exit 0 if none, 1 if any.")
    check.add_argument("policies", nargs="?", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    check.set_defaults(handler=_check)

    test = commands.add_parser(
        "test", help="run the YAML policy test suites, with a rule coverage report",
        description="Run the suites in <policies>/tests (or the files given). Exit 1 if a case "
                    "fails, a suite is malformed, or a rule has no case in which it fires.")
    test.add_argument("policies", nargs="?", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    test.add_argument("--suite", action="append", type=Path, default=None, metavar="FILE",
                      help="run only this suite file (repeatable)")
    test.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    test.set_defaults(handler=_test)

    decide = commands.add_parser(
        "decide", help="decide a request (JSON) or a file of requests (JSON Lines)",
        description="Decide one request read from FILE (or - for standard input) and print the "
                    "response as JSON. Exit 0 allow, 1 deny, 2 bad input (the error is printed "
                    "as JSON), 3 policies that do not load. With a .jsonl file or --jsonl, every "
                    "line is decided and answered on its own line; a bad line gets its error and "
                    "the rest go on; the exit code is then the worst of all lines.")
    decide.add_argument("request", help="request file, or - for standard input")
    decide.add_argument("--policies", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    decide.add_argument("--explain", action="store_true",
                        help="list every rule evaluated, its outcome and the values it read")
    decide.add_argument("--policy-version", metavar="VERSION",
                        help="judge by this version (overrides the request's policy_version)")
    decide.add_argument("--jsonl", action="store_true", help="the input is JSON Lines")
    decide.add_argument("--now", metavar="RFC3339",
                        help="the time for requests without `at` (default: the clock)")
    decide.set_defaults(handler=_decide)

    serve = commands.add_parser(
        "serve", help="run the decision service (gunicorn)",
        description="Start the HTTP service with gunicorn on the given policies. Every option can also "
                    "come from its environment variable (shown in brackets).")
    env = os.environ.get
    serve.add_argument("--policies", default=env("BINDPOLICY_POLICIES", DEFAULT_POLICIES),
                       help="policy folder [BINDPOLICY_POLICIES] (default: policies)")
    serve.add_argument("--data", default=env("BINDPOLICY_DATA", "data"),
                       help="folder for the SQLite log and metrics [BINDPOLICY_DATA] (default: data)")
    serve.add_argument("--database-url", default=env("BINDPOLICY_DATABASE_URL", ""),
                       help="sqlite:///path or postgresql://... [BINDPOLICY_DATABASE_URL] "
                            "(default: SQLite in the data folder)")
    serve.add_argument("--host", default=env("BINDPOLICY_HOST", "127.0.0.1"), help="[BINDPOLICY_HOST]")
    serve.add_argument("--port", type=int, default=int(env("BINDPOLICY_PORT", "8080")), help="[BINDPOLICY_PORT]")
    serve.add_argument("--workers", type=int, default=int(env("BINDPOLICY_WORKERS", "2")),
                       help="worker processes [BINDPOLICY_WORKERS] (default: 2)")
    serve.add_argument("--threads", type=int, default=int(env("BINDPOLICY_THREADS", "8")),
                       help="threads per worker [BINDPOLICY_THREADS] (default: 8)")
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    """Check the policies, then become gunicorn (exec: signals reach it directly)."""
    engine = _load(args.policies)
    if engine is None:
        return 1
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "BINDPOLICY_POLICIES": str(args.policies), "BINDPOLICY_DATA": str(data),
        "BINDPOLICY_DATABASE_URL": args.database_url, "BINDPOLICY_BIND": f"{args.host}:{args.port}",
        "BINDPOLICY_WORKERS": str(args.workers), "BINDPOLICY_THREADS": str(args.threads),
        "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics")})
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    os.execv(gunicorn, [gunicorn, "--config", "python:api.gunicorn_conf", "api.wsgi:app"])
    return 0  # not reached


def _load(folder: str) -> Engine | None:
    try:
        return Engine(load_policies(folder))
    except PolicyLoadError as exc:
        print(exc, file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    try:
        policies = load_policies(args.policies)
    except PolicyLoadError as exc:
        print(exc)
        return 1
    for version in policies:
        print(f"ok {version.name}: {len(version.rules)} rules, {len(version.outputs)} outputs, "
              f"in force from {version.effective_from.isoformat()}, {version.digest}")
    return 0


def _test(args: argparse.Namespace) -> int:
    engine = _load(args.policies)
    if engine is None:
        return 1
    report = run_suites(engine, Path(args.policies), args.suite)
    print(describe(report, args.verbose))
    return 0 if report.ok else 1


def _decide(args: argparse.Namespace) -> int:
    engine = _load(args.policies)
    if engine is None:
        return EXIT_BAD_POLICY
    try:
        now = _parse_now(args.now)
    except ValueError as exc:
        print(f"--now: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    jsonl = args.jsonl or args.request.endswith(".jsonl")
    try:
        stream: IO[str] = sys.stdin if args.request == "-" else open(args.request, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"cannot read {args.request}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with stream:
        if jsonl:
            worst = EXIT_ALLOW
            for line_number, text in _lines(stream):
                code, answer = _answer(engine, text, args, now, line_number)
                print(json.dumps(answer, ensure_ascii=False), flush=False)
                worst = max(worst, code)
            sys.stdout.flush()
            return worst
        code, answer = _answer(engine, stream.read(), args, now, None)
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return code


def _lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield number, line


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    from engine.versions import parse_timestamp

    return parse_timestamp(text)


def _answer(engine: Engine, text: str, args: argparse.Namespace, now: datetime,
            line: int | None) -> tuple[int, dict[str, Any]]:
    """(exit code, response or error body) for one request's text."""
    try:
        try:
            request = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError("invalid_json", "the request is not valid JSON",
                               [Detail("", f"line {exc.lineno} column {exc.colno}: {exc.msg}")]) from exc
        if args.policy_version and isinstance(request, dict):
            request["policy_version"] = args.policy_version
        decision = engine.decide(request, now=now, explain=args.explain)
    except RequestError as exc:
        body = exc.to_dict()
        if line is not None:
            body["line"] = line
        return EXIT_BAD_INPUT, body
    return (EXIT_ALLOW if decision.allowed else EXIT_DENY), decision.to_dict()


if __name__ == "__main__":
    sys.exit(main())

"""The `bindpolicy` command: check, test and decide from the shell (a thin layer over the engine)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

import orjson

from engine.decider import Engine
from engine.errors import PolicyLoadError, RequestError
from engine.gcpause import collector_paused
from engine.lines import NamedLines, line_blocks, named_blocks
from engine.loader import load_policies
from engine.messages import DEFAULT_LANGUAGE, LANGUAGES
from engine.model import Decision
from engine.request import parse_json
from engine.sources import LAST_GOOD
from engine.tester import describe, report_json, report_junit, run_suites

EXIT_ALLOW, EXIT_DENY, EXIT_BAD_INPUT, EXIT_BAD_POLICY = 0, 1, 2, 3
EXIT_EVAL_ERROR, EXIT_EVAL_CHECK = 1, 2  # `eval`: an evaluation error; a parse or check error
DEFAULT_POLICIES = "policies"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        code: int = handler(args)
    except PolicyLoadError as exc:  # every command says the same of policies that do not load
        return _unloadable(exc, args)
    return code


def _unloadable(exc: PolicyLoadError, args: argparse.Namespace, folder: str | None = None) -> int:
    """Policies that do not load: every problem (file:line:column), exit 3, whatever the command."""
    folder = folder or getattr(args, "policies", None)
    print(f"the policies{f' in {folder}' if folder else ''} do not load: {exc}",
          file=sys.stdout if getattr(args, "handler", None) is _check else sys.stderr)
    return EXIT_BAD_POLICY


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bindpolicy",
        description="Policy-as-data decisions for binding TikTok accounts to a TikTok Shop.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check", help="load the policies and report every problem (exit 3 on any)",
        description="Load every policy version: schema, inheritance, CEL compilation, types and field "
                    "checks. Prints every problem with file:line:column, and the request fields a version "
                    "needs that its parent did not; exit 0 if none, 3 if the policies do not load (as every "
                    "command), 1 if --prove finds a dead or shadowed rule.")
    check.add_argument("policies", nargs="?", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    check.add_argument("--prove", action="store_true",
                       help="also prove every rule can fire and decide (fail on dead or shadowed rules)")
    check.set_defaults(handler=_check)

    test = commands.add_parser(
        "test", help="run the YAML policy test suites, with a rule coverage report",
        description="Run the suites in <policies>/tests (or the files given). Exit 1 if a case "
                    "fails, a suite is malformed, or a rule has no case in which it fires.")
    test.add_argument("policies", nargs="?", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    test.add_argument("--suite", action="append", type=Path, default=None, metavar="FILE",
                      help="run only this suite file (repeatable)")
    test.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    test.add_argument("--format", choices=("text", "json", "junit"), default="text",
                      help="text (default), json, or junit (JUnit XML, for CI)")
    test.add_argument("--watch", action="store_true",
                      help="run again whenever a file under the policy folder (or a --suite file) changes")
    test.add_argument("--watch-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    test.add_argument("--watch-runs", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N
    test.set_defaults(handler=_test)

    fmt = commands.add_parser(
        "fmt", help="put policy and suite files in the canonical layout, comments kept",
        description="Rewrite policy files (beside a version.yaml) and suites (in tests/) in one layout: "
                    "two-space indentation, keys in schema order, long flow lists as blocks, the "
                    "yaml-language-server modeline last. Comments and meaning are kept (the result is "
                    "read back and must hold the same data). With --check nothing is written: exit 1 "
                    "if a file would change. Exit 2 for a file that is not YAML or not a policy file.")
    fmt.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                     help="files or folders (default: policies)")
    fmt.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is not formatted")
    fmt.set_defaults(handler=_fmt)

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
    decide.add_argument("--lang", choices=LANGUAGES, default=DEFAULT_LANGUAGE,
                        help="the language of the messages: en (English, the default) or zh (Simplified Chinese)")
    decide.set_defaults(handler=_decide)

    serve = commands.add_parser(
        "serve", help="run the decision service (uvicorn)",
        description="Start the HTTP service (uvicorn with httptools, reading each request whole before a Python thread "
                    "takes it) on the given policies. Every option can also come from its environment "
                    "variable (shown in brackets).")
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
    serve.add_argument("--header-timeout", type=float, default=float(env("BINDPOLICY_HEADER_TIMEOUT", "10")),
                       help="seconds a client has to send its request line and headers "
                            "[BINDPOLICY_HEADER_TIMEOUT] (default: 10)")
    serve.add_argument("--max-header-bytes", type=int,
                       default=int(env("BINDPOLICY_MAX_HEADER_BYTES", str(32 * 1024))),
                       help="largest request line and headers, in bytes; past it a 431 "
                            "[BINDPOLICY_MAX_HEADER_BYTES] (default: 32768)")
    serve.add_argument("--body-timeout", type=float, default=float(env("BINDPOLICY_BODY_TIMEOUT", "10")),
                       help="seconds a client has to send its body, once the headers are in "
                            "[BINDPOLICY_BODY_TIMEOUT] (default: 10)")
    serve.add_argument("--loop", choices=("uvloop", "asyncio"), default=env("BINDPOLICY_LOOP", "uvloop"),
                       help="the workers' event loop [BINDPOLICY_LOOP] (default: uvloop, the faster by "
                            "bench/bench_service.py)")
    serve.add_argument("--log-writer", choices=LOG_WRITERS, default=env("BINDPOLICY_LOG_WRITER", "inline"),
                       help="who commits the decision log: inline (each worker its own records, in group "
                            "commits), process (one writer process for every worker's records; slower in "
                            "bench/bench_service.py's A/B on both logs, see the README) "
                            "[BINDPOLICY_LOG_WRITER] (default: inline)")
    serve.set_defaults(handler=_serve)

    diff = commands.add_parser(
        "diff", help="what changed in meaning between two policy versions",
        description="Rules added, removed and changed (expression, parameters, actions, message...) with "
                    "their file:line in both versions; moving or reformatting a rule is no change. "
                    "Exit 0 if the versions mean the same, 1 if they differ.")
    diff.add_argument("old", help="version, e.g. v1")
    diff.add_argument("new", help="version, e.g. v2")
    diff.add_argument("--policies", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    diff.add_argument("--new-policies", metavar="DIR",
                      help="take the new version from another policy folder (e.g. a branch being reviewed)")
    diff.add_argument("--format", choices=("text", "json", "markdown", "html"), default="text")
    diff.add_argument("-o", "--output", metavar="FILE", help="write the report here (default: standard output)")
    diff.set_defaults(handler=_diff)

    impact = commands.add_parser(
        "impact", help="which decisions a change of version would flip",
        description="Decide every request under both versions and count the decisions that flip "
                    "(allow→deny, deny→allow, same decision but another rule), grouped by the rule "
                    "responsible, with examples (where each was read, the deciding rule under each version and "
                    "the fields it read). A request rejected under either version (bad input) is no decision: "
                    "it is counted apart, by reason. Exit 3 if the policies do not load (as every command), 2 on bad "
                    "input. Streams its input and uses every core; --engine ray spreads "
                    "it over a Ray cluster with the same report. Inputs: JSON Lines or Parquet files, folders "
                    "of them, or a log export (its decided records, each judged at its logged time), as local "
                    "paths or object-store URLs (s3://, gs://, hdfs://).")
    impact.add_argument("old")
    impact.add_argument("new")
    source = impact.add_mutually_exclusive_group(required=True)
    source.add_argument("--requests", metavar="PATH", nargs="+",
                        help="JSON Lines (- for stdin) or Parquet files, folders, log exports, or URLs")
    source.add_argument("--from-log", action="store_true", help="the requests of the decision log")
    impact.add_argument("--since", help="with --from-log: logged at or after (RFC 3339)")
    impact.add_argument("--until", help="with --from-log: logged before (RFC 3339)")
    impact.add_argument("--policies", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    impact.add_argument("--new-policies", metavar="DIR",
                        help="take the new version from another policy folder (e.g. a branch being reviewed)")
    _log_options(impact)
    impact.add_argument("--workers", type=int, default=None,
                        help="processes, or Ray actors (default: one per core of the machine or cluster)")
    impact.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local processes (default) or Ray Data (pip install 'bindpolicy[ray]')")
    impact.add_argument("--address", metavar="ADDR", default=os.environ.get("RAY_ADDRESS"),
                        help="with --engine ray: the cluster (auto, ray://head:10001) [RAY_ADDRESS] "
                             "(default: a local Ray)")
    impact.add_argument("--format", choices=("text", "json", "markdown", "html"), default="text")
    impact.add_argument("-o", "--output", metavar="FILE")
    impact.add_argument("--quiet", action="store_true", help="no progress on standard error")
    impact.set_defaults(handler=_impact)

    replay = commands.add_parser(
        "replay", help="decide logged requests again with the exact policy content that judged them",
        description="One decision (by id), or every logged decision of [--since, --until) (the whole log "
                    "without either), from the database or a log export, locally or on Ray. Exit 0 if "
                    "every decision is reproduced exactly, 1 if one differs (the differences are printed), "
                    "2 if one cannot be replayed (unknown id, content not kept) and none differs.")
    replay.add_argument("decision_id", nargs="?", help="one decision; without it, the whole window")
    replay.add_argument("--since", help="logged at or after (RFC 3339)")
    replay.add_argument("--until", help="logged before (RFC 3339)")
    replay.add_argument("--from-export", metavar="DIR", help="replay a log export instead of the database")
    replay.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local (default) or Ray Data: the workers read the export's files, or ranges "
                        "of records straight from the log's database (which every node must reach)")
    replay.add_argument("--address", metavar="ADDR", default=os.environ.get("RAY_ADDRESS"),
                        help="with --engine ray: the cluster [RAY_ADDRESS] (default: a local Ray)")
    replay.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per CPU)")
    replay.add_argument("--format", choices=("text", "json"), default="text")
    replay.add_argument("-o", "--output", metavar="FILE")
    _log_options(replay)
    replay.set_defaults(handler=_replay)

    log = commands.add_parser("log", help="the decision log: verify its chain, list and export records, prove one")
    log_commands = log.add_subparsers(title="log commands", metavar="COMMAND")
    verify = log_commands.add_parser(
        "verify", help="check the chain (hashes or MACs) of the whole log and every signed checkpoint",
        description="Walk every record's MAC (or hash, for logs written without a key) and its link to the "
                    "one before, and compare the log with every signed checkpoint (Merkle root and head). "
                    "Read-only. Exit 0 if all holds, 1 naming the first record altered, removed, inserted or "
                    "unreadable, or the checkpoint that no longer matches (the end cut off), 2 if the log or a "
                    "checkpoint could not be read or checked. With --export, check an export folder on its own (no "
                    "database needed).")
    _log_options(verify)
    _evidence_options(verify)
    verify.add_argument("--export", metavar="DIR", help="verify this log export instead of the database")
    verify.set_defaults(handler=_log_verify)
    export = log_commands.add_parser(
        "export", help="write the log to day partitions (Parquet or JSON Lines) with its chain fields",
        description="Stream the log (or the window [--since, --until), taken as one unbroken piece of the chain) "
                    "into DIR/day=YYYY-MM-DD/part-N.parquet (or .jsonl), every column included (request and "
                    "response as the hashed JSON text, prev_hash, hash), with the policy contents the records "
                    "name (policies.jsonl) and a manifest.json. `log verify --export DIR` checks it on its own.")
    _log_options(export)
    export.add_argument("--since", help="from the first record logged at or after (RFC 3339)")
    export.add_argument("--until", help="up to the first record logged at or after (RFC 3339)")
    export.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    export.add_argument("-o", "--output", metavar="DIR", required=True, help="a new (or empty) folder")
    export.set_defaults(handler=_log_export)
    listing = log_commands.add_parser(
        "list", help="records, filtered, as a table, JSON Lines or CSV",
        description="List decision log records in log order, filtered by time range, action, decision, "
                    "rule, shop or account. Read-only. Exit 1 if a record could not be read (it is named), "
                    "2 if the log could not be read.")
    _log_options(listing)
    for name, what in (("since", "logged at or after (RFC 3339)"), ("until", "logged before (RFC 3339)"),
                       ("action", "action"), ("decision", "allow or deny"), ("rule", "rule id that decided"),
                       ("shop", "shop id"), ("account", "account id"), ("outcome", "decided or rejected")):
        listing.add_argument(f"--{name}", help=what)
    listing.add_argument("--limit", type=int, default=None)
    listing.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    listing.add_argument("-o", "--output", metavar="FILE")
    listing.set_defaults(handler=_log_list)
    prove = log_commands.add_parser(
        "prove", help="an inclusion proof of one decision against a signed checkpoint (RFC 6962)",
        description="Print (JSON) the decision's record, its Merkle audit path and the newest signed "
                    "checkpoint that covers it: `bindpolicy log verify-proof` checks it with the public key "
                    "alone, without the log. Exit 1 if the log no longer matches the checkpoint, 2 if there "
                    "is no such decision or no checkpoint covers it yet.")
    prove.add_argument("decision_id")
    _log_options(prove)
    _evidence_options(prove)
    prove.add_argument("-o", "--output", metavar="FILE")
    prove.set_defaults(handler=_log_prove)
    show = log_commands.add_parser(
        "show", help="one logged decision, its messages in the language asked",
        description="Print (JSON) the logged record of DECISION_ID; with --lang, its response with every "
                    "message in that language, rendered from what the log keeps (the rule ids, the request "
                    "and the policy content by digest) and checked to reproduce the logged decision. "
                    "Read-only. Exit 0, 1 if the record is broken or cannot be rendered, 2 if there is no "
                    "such decision or the log could not be read.")
    show.add_argument("decision_id")
    _log_options(show)
    show.add_argument("--lang", choices=LANGUAGES, default=None,
                      help="render the messages in en (English) or zh (Simplified Chinese)")
    show.set_defaults(handler=_log_show)
    check_proof = log_commands.add_parser(
        "verify-proof", help="check an inclusion proof with the checkpoints' public key",
        description="Exit 0 if the record is in the tree the checkpoint signs, 1 if not (altered record, "
                    "path or checkpoint), 2 if the file cannot be read or no public key is given.")
    check_proof.add_argument("proof", help="a file written by `bindpolicy log prove` (- for stdin)")
    check_proof.add_argument("--public-key", action="append", metavar="PEM", default=None,
                             help="checkpoint public key (repeatable) [BINDPOLICY_CHECKPOINT_PUBLIC_KEYS]")
    check_proof.set_defaults(handler=_log_verify_proof)
    keygen = log_commands.add_parser(
        "keygen", help="new MAC and checkpoint signing keys in a folder (never overwrites one)",
        description="Write log-mac.key (HMAC, hex), checkpoint.key (Ed25519, PEM) and checkpoint.pub into "
                    "DIR, mode 0600, keeping any that exist. Keep them apart from the log's database.")
    keygen.add_argument("--out", default="keys", metavar="DIR", help="folder (default: keys)")
    keygen.set_defaults(handler=_log_keygen)

    evaluate = commands.add_parser(
        "eval", help="print the value and CEL type of one expression against one request",
        description="Evaluate EXPR as a rule would be (the same checks of the fields it reads, the "
                    "same runtime) against the request in FILE (optional when EXPR reads no request "
                    "field), with the parameters of the version in force at its `at` or of "
                    "--policy-version. Exit 0 with the value, 1 on an evaluation error, 2 on a parse "
                    "or check error (or a bad request file), 3 if the policies do not load.")
    evaluate.add_argument("expr", metavar="EXPR", help="a CEL expression, e.g. 'account.age >= params.min_age'")
    evaluate.add_argument("--request", metavar="FILE", default=None, help="the request, JSON (- for stdin)")
    evaluate.add_argument("--policy-version", default=None, metavar="V", help="the version whose params to use")
    evaluate.add_argument("--format", choices=("text", "json"), default="text",
                          help='text: `value (type)`; json: {"value": ..., "type": ...} or {"error": ...}')
    evaluate.add_argument("--policies", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    evaluate.add_argument("--now", default=None, metavar="RFC3339", help="the time a request without `at` is at")
    evaluate.set_defaults(handler=_eval)

    generate = commands.add_parser(
        "generate", help="write realistic requests (JSON Lines), deterministic for a seed",
        description="Requests over every action and role with values on both sides of every threshold.")
    generate.add_argument("--count", type=int, default=1000)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--broken", type=float, default=0.0,
                          help="share of requests with a field removed (default 0)")
    generate.add_argument("-o", "--output", metavar="FILE")
    generate.set_defaults(handler=_generate)

    compile_ = commands.add_parser(
        "compile", help="show the Python that decides one (version, action, role)",
        description="Every decision path is written out at load as one Python function (engine/codegen.py): "
                    "the presence checks of the fields its rules need, the reads of only the fields they "
                    "read, every rule in policy order, the outputs and the decision. --show prints it. "
                    "Exit 0, 2 for an unknown version, action or role, 3 if the policies do not load.")
    compile_.add_argument("--show", nargs="+", metavar="VERSION ACTION [ROLE]", required=True,
                          help="the version, the action and (for bind and unbind) the role")
    compile_.add_argument("--policies", default=DEFAULT_POLICIES, help="policy folder (default: policies)")
    compile_.add_argument("--joint", metavar="OLD", help="print instead the one function `impact OLD VERSION` "
                          "judges the path with where the two versions write it differently: both verdicts, "
                          "the rules they write alike judged once")
    compile_.set_defaults(handler=_compile)

    from engine.prover.commands import add_parsers as add_prove_parsers

    add_prove_parsers(commands, DEFAULT_POLICIES)
    return parser


def _log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=os.environ.get("BINDPOLICY_DATABASE_URL", ""),
                        help="sqlite:///path or postgresql://... [BINDPOLICY_DATABASE_URL]")
    parser.add_argument("--data", default=os.environ.get("BINDPOLICY_DATA"),
                        help="the service's data folder, for its SQLite log [BINDPOLICY_DATA] (default: data)")
    parser.add_argument("--mac-key-file", default=os.environ.get("BINDPOLICY_LOG_MAC_KEY_FILE", ""),
                        help="the log's MAC keys, to check the records' MACs [BINDPOLICY_LOG_MAC_KEY_FILE]")


def _evidence_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-dir", default=os.environ.get("BINDPOLICY_CHECKPOINT_DIR", ""),
                        help="signed checkpoints [BINDPOLICY_CHECKPOINT_DIR] (default: DATA/checkpoints)")
    parser.add_argument("--public-key", action="append", metavar="PEM", default=None,
                        help="checkpoint public key (repeatable) [BINDPOLICY_CHECKPOINT_PUBLIC_KEYS, comma-"
                             "separated; default: the public half of BINDPOLICY_CHECKPOINT_KEY_FILE]")


class _Unreadable(Exception):
    """What an audit command could not read: exit 2, saying what."""


def _store(args: argparse.Namespace) -> Any:
    """The log, opened read-only: the audit commands create nothing and change nothing."""
    from engine.decisionlog import LogError, open_store
    from engine.logkeys import KeyFileError, read_mac_keys

    url = args.database_url or str(_data(args) / "decisions.db")
    try:
        keys = read_mac_keys(args.mac_key_file) if getattr(args, "mac_key_file", "") else None
        return open_store(url, read_only=True, keys=keys)
    except (LogError, KeyFileError, ValueError) as exc:
        raise _Unreadable(str(exc) if args.database_url or Path(url).exists()
                          else f"no decision log at {url} (use --data or --database-url)") from exc


def _public_keys(args: argparse.Namespace) -> dict[str, Any]:
    from engine.logkeys import read_public_keys

    files = args.public_key or [f for f in os.environ.get("BINDPOLICY_CHECKPOINT_PUBLIC_KEYS", "").split(",")
                                if f.strip()] or [os.environ.get("BINDPOLICY_CHECKPOINT_KEY_FILE", "")]
    files = [f.strip() for f in files if f and f.strip()]
    return read_public_keys(files) if files else {}


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint_dir) if args.checkpoint_dir else _data(args) / "checkpoints"


def _data(args: argparse.Namespace) -> Path:
    """The audit commands' data folder (--data, else BINDPOLICY_DATA, else ./data)."""
    return Path(args.data or "data")


def _guessed_folder(args: argparse.Namespace) -> bool:
    """Whether the checkpoint folder is only the default's guess: a log given by --database-url,
    and neither --checkpoint-dir nor --data (nor their variables) saying where its checkpoints are."""
    return bool(args.database_url) and not args.checkpoint_dir and args.data is None


def _audit_handler(handler: Any) -> Any:
    """Audit commands are total: what cannot be read is exit 2 with one line, never a traceback."""
    def run(args: argparse.Namespace) -> int:
        from engine.decisionlog import LogError
        from engine.logkeys import KeyFileError

        try:
            code: int = handler(args)
        except (_Unreadable, LogError, KeyFileError, OSError) as exc:
            print(f"cannot read: {exc}", file=sys.stderr)
            return 2
        return code
    return run


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _diff(args: argparse.Namespace) -> int:
    from engine.differ import diff_versions, render

    old_set = load_policies(args.policies)
    try:
        new_set = load_policies(args.new_policies) if args.new_policies else old_set
    except PolicyLoadError as exc:
        return _unloadable(exc, args, args.new_policies)
    old, new = old_set.get(args.old), new_set.get(args.new)
    for name, found, where in ((args.old, old, args.policies), (args.new, new, args.new_policies or args.policies)):
        if found is None:
            print(f"no version '{name}' in {where}", file=sys.stderr)
            return EXIT_BAD_INPUT
    assert old is not None and new is not None
    result = diff_versions(old, new)
    from engine.prover.diff import cached_proof

    result.proof = cached_proof(old_set, old, new, new_policies=new_set)
    _write(render(result, args.format), args.output)
    return 0 if result.empty else 1


@_audit_handler
def _impact(args: argparse.Namespace) -> int:
    from engine.impact import render, run_impact
    from engine.inputs import InputError, request_blocks, resolve

    if args.requests and args.requests != ["-"]:
        try:
            resolve(args.requests)  # every path checked before any work
        except InputError as exc:
            print(f"cannot read the requests: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    policies = load_policies(args.policies)  # policies that do not load: main() says so, as for every command
    try:
        new_policies = load_policies(args.new_policies) if args.new_policies else None
    except PolicyLoadError as exc:
        return _unloadable(exc, args, args.new_policies)
    for name, found, where in ((args.old, policies, args.policies),
                               (args.new, new_policies or policies, args.new_policies or args.policies)):
        if found.get(name) is None:
            print(f"no version '{name}' in {where}", file=sys.stderr)
            return EXIT_BAD_INPUT
    new_label = f"{args.new} of {args.new_policies}" if args.new_policies else None
    if args.engine == "ray":
        from engine.rayengine import RayUnavailableError, run_impact_ray

        if args.from_log or args.requests == ["-"]:
            print("--engine ray reads files (export the log first: bindpolicy log export)", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            nodes: dict[str, int] = {}
            report = run_impact_ray(policies, args.old, args.new, args.requests, new_policies=new_policies,
                                    new_label=new_label, address=args.address, workers=args.workers, nodes=nodes)
            _said_nodes(nodes)
        except RayUnavailableError as exc:
            print(exc, file=sys.stderr)
            return EXIT_BAD_INPUT
        except InputError as exc:
            print(f"cannot read the requests: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        _write(render(report, args.format), args.output)
        return 0
    lines: Iterator[tuple[str, str] | NamedLines]
    if args.from_log:
        lines = _logged_requests(_store(args), args.since, args.until)
    elif args.requests == ["-"]:  # read as bytes, as a file is: `stdin:N`
        lines = named_blocks("stdin", _stdin_bytes())
    else:
        lines = request_blocks(args.requests)  # each JSON Lines file as bytes, its lines `FILE:N`
    try:
        report = run_impact(policies, args.old, args.new, lines, new_policies=new_policies, new_label=new_label,
                            workers=args.workers, progress=None if args.quiet else sys.stderr)
    except InputError as exc:
        print(f"cannot read the requests: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _write(render(report, args.format), args.output)
    return 0


def _logged_requests(store: Any, since: str | None, until: str | None) -> Iterator[tuple[str, str]]:
    """The decided requests of the log, each with where it was read and judged at its logged time."""
    from engine.decisionlog import LogRecord
    from engine.inputs import judged_request

    for item in store.scan(since=since, until=until, outcome="decided"):
        if isinstance(item, LogRecord) and isinstance(item.request_text, str):  # `log verify` names the others
            yield f"log record {item.seq} ({item.decision_id})", judged_request(item.request_text, item.response_text)


@_audit_handler
def _replay(args: argparse.Namespace) -> int:
    from engine.decisionlog import BrokenRecordError
    from engine.replay import BROKEN, CANNOT, REPRODUCED, replay

    if args.decision_id is None:
        return _replay_window(args)
    try:
        result = replay(_store(args), args.decision_id)
    except BrokenRecordError as exc:
        print(json.dumps({"status": BROKEN, "decision_id": args.decision_id, "message": str(exc)}, indent=2))
        return 1
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
    return 0 if result.status == REPRODUCED else 2 if result.status == CANNOT else 1


def _replay_window(args: argparse.Namespace) -> int:
    """Every record of the window, each first checked by the chain walk of `log verify`."""
    from engine.decisionlog import GENESIS, ChainVerifier, log_time
    from engine.logexport import ExportArchive, ExportError, ExportManifest, read_records, window_items
    from engine.rayengine import RayUnavailableError
    from engine.replay import ReplaySummary, replay_records

    try:
        since = args.since and log_time(args.since)
        until = args.until and log_time(args.until)
    except ValueError as exc:
        print(f"--since/--until: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    keys = _mac_keys(args)
    summary: ReplaySummary
    try:
        if args.from_export:
            manifest = ExportManifest.read(Path(args.from_export))
            if args.engine == "ray":
                summary = _replay_ray(args, keys, since, until)
            else:
                verifier = ChainVerifier(keys, seq=(manifest.first_seq or 1) - 1, prev_hash=(
                    GENESIS if manifest.whole else manifest.first_prev_hash or ""))
                summary = replay_records(ExportArchive(args.from_export), read_records(args.from_export),
                                         verifier, since=since, until=until)
        elif args.engine == "ray":
            from engine.rayengine import run_replay_log_ray

            store = _store(args)
            nodes: dict[str, int] = {}
            summary = run_replay_log_ray(store, _database_url(args), since=since, until=until, address=args.address,
                                         workers=args.workers, nodes=nodes, progress=sys.stderr)
            _said_nodes(nodes)
        else:
            store = _store(args)
            summary = replay_records(store, window_items(store, since, until),
                                     ChainVerifier(store.keys, from_first_seen=since is not None))
    except ExportError as exc:
        print(f"cannot read the export: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RayUnavailableError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    text = json.dumps(summary.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n" \
        if args.format == "json" else summary.describe()
    _write(text, args.output)
    return summary.exit_code


def _replay_ray(args: argparse.Namespace, keys: Any, since: str | None, until: str | None) -> Any:
    """The export's chain checked here first (the walk of `log verify`), then replayed on Ray."""
    from engine.decisionlog import Breach
    from engine.logexport import verify_export
    from engine.rayengine import run_replay_ray
    from engine.replay import ReplaySummary

    check = verify_export(args.from_export, keys)
    if check.breach is not None or check.problems:
        summary = ReplaySummary()
        summary.breach = check.breach or Breach(0, None, "; ".join(check.problems))
        return summary
    nodes: dict[str, int] = {}
    summary = run_replay_ray(args.from_export, since=since, until=until, address=args.address, workers=args.workers,
                             nodes=nodes)
    _said_nodes(nodes)
    return summary


def _database_url(args: argparse.Namespace) -> str:
    """The log's URL as a Ray worker elsewhere opens it (a SQLite file by its absolute path)."""
    return args.database_url or "sqlite:///" + str((_data(args) / "decisions.db").resolve())


def _said_nodes(nodes: dict[str, int]) -> None:
    """Which Ray nodes did the work (stderr: the report on stdout stays the local engine's)."""
    shown = ", ".join(f"{node[:8]}: {count}" for node, count in sorted(nodes.items()))
    print(f"on Ray: {len(nodes)} node(s) did the work (batches per node: {shown})", file=sys.stderr)


def _mac_keys(args: argparse.Namespace) -> Any:
    from engine.logkeys import read_mac_keys

    return read_mac_keys(args.mac_key_file) if getattr(args, "mac_key_file", "") else None


@_audit_handler
def _log_verify(args: argparse.Namespace) -> int:
    from engine.logcheck import verify_log

    if args.export:
        return _verify_export(args)
    report = verify_log(_store(args), _checkpoint_dir(args), _public_keys(args), guessed=_guessed_folder(args))
    sys.stdout.write(report.describe())
    return report.exit_code


def _verify_export(args: argparse.Namespace) -> int:
    """The walk of `log verify` over an export's records (MACs checked with --mac-key-file; the
    checkpoints of --checkpoint-dir compared when the export starts at the log's first record)."""
    from engine.logexport import ExportError, verify_export

    try:
        report = verify_export(args.export, _mac_keys(args), args.checkpoint_dir or None, _public_keys(args))
    except ExportError as exc:
        print(f"cannot verify: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(f"export {args.export}: " + report.describe())
    return report.exit_code


@_audit_handler
def _log_export(args: argparse.Namespace) -> int:
    from engine.logexport import ExportError, export_log

    try:
        for name in ("since", "until"):
            if getattr(args, name) is not None:
                _parse_now(getattr(args, name))
    except ValueError as exc:
        print(f"--since/--until: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        manifest = export_log(_store(args), args.output, since=args.since, until=args.until,
                              file_format=args.format)
    except ExportError as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(manifest.describe(args.output))
    return 0


@_audit_handler
def _log_prove(args: argparse.Namespace) -> int:
    from engine.decisionlog import BrokenRecordError
    from engine.logcheck import ProofError, prove

    try:
        proof = prove(_store(args), args.decision_id, _checkpoint_dir(args), _public_keys(args))
    except ProofError as exc:
        print(f"cannot prove: {exc}", file=sys.stderr)
        return exc.code
    except BrokenRecordError as exc:
        print(f"BROKEN: {exc}", file=sys.stderr)
        return 1
    _write(json.dumps(proof, indent=1, ensure_ascii=False) + "\n", args.output)
    return 0


@_audit_handler
def _log_show(args: argparse.Namespace) -> int:
    from engine.decisionlog import BrokenRecordError
    from engine.replay import render_record

    store = _store(args)
    try:
        record = store.get(args.decision_id)
    except BrokenRecordError as exc:
        print(f"BROKEN: {exc}", file=sys.stderr)
        return 1
    if record is None:
        print(f"no decision '{args.decision_id}' in the log", file=sys.stderr)
        return 2
    if args.lang is None:
        print(json.dumps(record.to_dict(), indent=2, ensure_ascii=False, default=str))
        return 0
    rendered, why = render_record(store, record, args.lang)
    if rendered is None:
        print(f"cannot render {args.decision_id} in {args.lang}: {why}", file=sys.stderr)
        return 1
    print(json.dumps({**record.to_dict(), "rendered": {"language": args.lang, "response": rendered}},
                     indent=2, ensure_ascii=False, default=str))
    return 0


@_audit_handler
def _log_verify_proof(args: argparse.Namespace) -> int:
    from engine.logcheck import ProofError, verify_proof

    try:
        text = sys.stdin.read() if args.proof == "-" else Path(args.proof).read_text(encoding="utf-8")
        proof = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Unreadable(f"{args.proof}: not JSON ({exc})") from exc
    try:
        decision_id = verify_proof(proof, _public_keys(args))
    except ProofError as exc:
        print(f"{'BROKEN' if exc.code == 1 else 'cannot check'}: {exc}")
        return exc.code
    origin = proof["checkpoint"].get("origin")
    print(f"ok: decision {decision_id} is record {proof['leaf_index'] + 1} of the {proof['tree_size']} records "
          + (f"of log {origin} " if origin else "")
          + f"signed at {proof['checkpoint']['written_at']} (key {proof['checkpoint']['key_id']})")
    return 0


def _log_keygen(args: argparse.Namespace) -> int:
    from engine.logkeys import generate_keys

    written = generate_keys(args.out)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"kept the keys already in {args.out}")
    return 0


@_audit_handler
def _log_list(args: argparse.Namespace) -> int:
    import csv

    from engine.decisionlog import COLUMNS, BrokenRecord

    store = _store(args)
    records = store.scan(limit=args.limit, since=args.since, until=args.until, action=args.action,
                         decision=args.decision, rule_id=args.rule, shop_id=args.shop, account_id=args.account,
                         outcome=args.outcome)
    broken: list[BrokenRecord] = []
    with _lines_out(args.output, newline="") as out:
        writer = csv.writer(out) if args.format == "csv" else None
        if writer is not None:
            writer.writerow(COLUMNS)
        for record in records:
            if isinstance(record, BrokenRecord):
                broken.append(record)
                continue
            if args.format == "jsonl":  # the stored JSON text as is: no re-encoding, however deep
                meta = {c: getattr(record, c) for c in COLUMNS if c not in ("request", "response")}
                line = json.dumps(meta, ensure_ascii=False)[:-1]
                out.write(f'{line}, "request": {record.request_text}, "response": {record.response_text}}}\n')
            elif writer is not None:
                writer.writerow([record.request_text if c == "request" else record.response_text
                                 if c == "response" else getattr(record, c) for c in COLUMNS])
            else:
                out.write(f"{record.seq:>7} {record.logged_at} {record.outcome:<8} {record.action or '-':<18} "
                          f"{record.decision or '-':<5} {record.rule_id or '-':<36} {record.decision_id}\n")
    for item in broken:
        print(f"BROKEN: record {item.seq} ({item.decision_id}) cannot be read: {item.problem}", file=sys.stderr)
    return 1 if broken else 0


def _generate(args: argparse.Namespace) -> int:
    from engine.generator import generate_requests

    with _lines_out(args.output) as out:
        for request in generate_requests(args.count, args.seed, broken=args.broken):
            out.write(json.dumps(request, ensure_ascii=False) + "\n")
    return 0


@contextlib.contextmanager
def _lines_out(path: str | None, newline: str | None = None) -> Iterator[IO[str]]:
    """Where a command writes its many lines: the file at `path` (UTF-8), else standard output in
    blocks of OUT_BLOCK bytes, flushed at the end; line by line where a terminal reads it.
    Under PYTHONUNBUFFERED (as many containers set it) sys.stdout writes every line with a system
    call of its own, and wakes the reader of a pipe for each."""
    if path:
        with open(path, "w", encoding="utf-8", newline=newline) as out:
            yield out
        return
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, io.UnsupportedOperation):  # a text stream put in its place, as tests do
        descriptor = -1
    if descriptor < 0 or sys.stdout.isatty():
        yield sys.stdout
        return
    sys.stdout.flush()
    with open(descriptor, "w", buffering=OUT_BLOCK, encoding=sys.stdout.encoding, errors=sys.stdout.errors,
              newline=newline, closefd=False) as out:  # closing it flushes it; the descriptor stays open
        yield out


OUT_BLOCK = 64 * 1024
LOG_WRITERS = ("inline", "process")


def _serve(args: argparse.Namespace) -> int:
    """Check the policies, then become the supervisor of uvicorn workers (exec: signals reach it directly).

    api/server.py's protocol (httptools on the event loop: a cap and a deadline on each request's
    head and body, its own errors in JSON) reads each request whole, then hands it straight to
    the pool of api/front.py that runs the Flask app: no Python thread waits on a slow client.
    """
    data = Path(args.data)
    try:
        _load(args.policies)
    except PolicyLoadError as exc:
        if not (data / LAST_GOOD).exists():
            return _unloadable(exc, args)
        print(exc, file=sys.stderr)
        print(f"serving the last good policy set kept in the log ({data / LAST_GOOD})", file=sys.stderr)
    if not _say_how_the_log_is_kept(data):
        return 1
    if args.log_writer not in LOG_WRITERS:  # (from the environment: argparse checks only the flag)
        print(f"BINDPOLICY_LOG_WRITER must be one of {', '.join(LOG_WRITERS)}, not {args.log_writer!r}",
              file=sys.stderr)
        return 2
    data.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "BINDPOLICY_POLICIES": str(args.policies), "BINDPOLICY_DATA": str(data),
        "BINDPOLICY_DATABASE_URL": args.database_url, "BINDPOLICY_THREADS": str(args.threads),
        "BINDPOLICY_BIND": f"{args.host}:{args.port}",  # what the app knows of where it listens (SCRATCH=auto)
        "BINDPOLICY_BODY_TIMEOUT": str(args.body_timeout), "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics")})
    shutil.rmtree(data / "metrics", ignore_errors=True)  # metrics of earlier runs would be summed in
    (data / "metrics").mkdir()
    os.environ.update({"BINDPOLICY_HEADER_TIMEOUT": str(args.header_timeout),
                       "BINDPOLICY_MAX_HEADER_BYTES": str(args.max_header_bytes)})
    # uvicorn's workers, each on its own SO_REUSEPORT socket, so that the kernel spreads the
    # connections evenly (api/supervisor.py; with one shared socket one worker took most of them)
    os.execv(sys.executable, [sys.executable, "-m", "api.supervisor", "--host", args.host, "--port", str(args.port),
                              "--workers", str(args.workers), "--loop", args.loop, "--log-writer", args.log_writer,
                              "--database-url", args.database_url or str(data / "decisions.db")])
    return 0  # not reached


def _say_how_the_log_is_kept(data: Path) -> bool:
    """Read the log's keys once before the workers do (a bad key file stops here, said once),
    and say which keys protect the log."""
    from engine.logkeys import KeyFileError, public_key_id, read_mac_keys, read_signing_key

    mac, signing = os.environ.get("BINDPOLICY_LOG_MAC_KEY_FILE"), os.environ.get("BINDPOLICY_CHECKPOINT_KEY_FILE")
    try:
        keys = read_mac_keys(mac) if mac else None
        signer = read_signing_key(signing) if signing else None
    except KeyFileError as exc:
        print(exc, file=sys.stderr)
        return False
    folder = os.environ.get("BINDPOLICY_CHECKPOINT_DIR") or str(data / "checkpoints")
    print("decision log: " + (f"chained with HMAC-SHA256, key {keys.current.id} ({mac})" if keys else
                              "NOT keyed (plain SHA-256; set BINDPOLICY_LOG_MAC_KEY_FILE)") + "; " +
          (f"checkpoints signed by Ed25519 key {public_key_id(signer.public_key())} into {folder}" if signer else
           "no signed checkpoints (set BINDPOLICY_CHECKPOINT_KEY_FILE)"), file=sys.stderr, flush=True)
    return True


def _load(folder: str) -> Engine:
    """The engine over the policies in `folder`; a PolicyLoadError reaches main(), which says it."""
    return Engine(load_policies(folder))


def _check(args: argparse.Namespace) -> int:
    from engine.differ import new_needs

    # No generated paths unless it proves (the prover decides): the generator finds no problem.
    policies = load_policies(args.policies, generate=bool(args.prove))
    for version in policies:
        print(f"ok {version.name}: {len(version.rules)} rules, {len(version.outputs)} outputs, "
              f"in force from {version.effective_from.isoformat()}, {version.digest}")
    for version in policies:  # a contract change for callers: say it where the author looks first
        parent = policies.get(version.extends) if version.extends else None
        needs = new_needs(parent, version) if parent is not None else []
        if parent is not None and needs:
            print(f"{version.name} needs {len(needs)} request field{'s' if len(needs) != 1 else ''} that "
                  f"{parent.name} did not (requests without them are refused, 400 missing_field):")
            print("\n".join(f"  {need.describe()}" for need in needs))
    if policies.warnings:
        count = len(policies.warnings)
        print(f"{count} warning{'s' if count != 1 else ''} (the policies load; worth a look)")
        print("\n".join(f"  {w}" for w in policies.warnings))
    if args.prove:
        from engine.prover.commands import check_rules

        return check_rules(policies)
    return 0


def _test(args: argparse.Namespace) -> int:
    if args.watch:
        return _test_watch(args)
    return _test_once(args)


def _test_once(args: argparse.Namespace) -> int:
    engine = _load(args.policies)
    report = run_suites(engine, Path(args.policies), args.suite)
    if args.format == "json":
        print(json.dumps(report_json(report), indent=2, ensure_ascii=False))
    elif args.format == "junit":
        print(report_junit(report), end="")
    else:
        print(describe(report, args.verbose))
    return 0 if report.ok else 1


def _test_watch(args: argparse.Namespace) -> int:
    """Load and run the suites again whenever a policy or suite file changes; Ctrl-C stops."""
    from engine.watch import watch

    roots = [Path(args.policies), *(args.suite or [])]

    def run() -> None:
        _test_once(args)
        print(f"-- watching {', '.join(map(str, roots))} for changes (Ctrl-C to stop)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        watch(roots, run, interval=args.watch_interval, runs=args.watch_runs)
    return 0


def _fmt(args: argparse.Namespace) -> int:
    from engine.formatter import FormatError, find_files, format_file

    files, refused = find_files(args.paths or [Path(DEFAULT_POLICIES)])
    for problem in refused:
        print(problem, file=sys.stderr)
    changed, failed = 0, bool(refused)
    for path, kind in files:
        try:
            outcome = format_file(path, kind, check=args.check)
        except FormatError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        if outcome.changed:
            changed += 1
            print(f"{'not formatted' if args.check else 'formatted'}: {path}")
    verb = "would change" if args.check else "changed"
    print(f"{len(files)} file{'s' if len(files) != 1 else ''}, {changed} {verb}"
          + (" (run `bindpolicy fmt` to format them)" if args.check and changed else ""))
    if failed:
        return EXIT_BAD_INPUT
    return 1 if args.check and changed else 0




def _compile(args: argparse.Namespace) -> int:
    if len(args.show) not in (2, 3):
        print("--show takes VERSION ACTION [ROLE]", file=sys.stderr)
        return EXIT_BAD_INPUT
    engine = _load(args.policies)
    if engine is None:
        return EXIT_BAD_POLICY
    name, action, role = args.show[0], args.show[1], (args.show[2] if len(args.show) == 3 else None)
    version = engine.policies.get(name)
    if version is None:
        print(f"no policy version '{name}'; known: {', '.join(v.name for v in engine.policies)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    path = version.path(action, role)
    if path is None:
        known = sorted({f"{a} {r}" if r else a for a, r in version._paths})
        print(f"{name} has no decision path for action {action!r}, role {role!r}; known: {', '.join(known)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.joint is None:
        print(path.source, end="")
        return 0
    return _show_joint(engine, args.joint, name, path)


def _show_joint(engine: Engine, old_name: str, name: str, path: Any) -> int:
    """`compile --show VERSION ACTION [ROLE] --joint OLD`: the function impact judges the path with."""
    from engine.codegen import joint_verdict
    from engine.impact import QuickJudge

    old = engine.policies.get(old_name)
    if old is None:
        print(f"no policy version '{old_name}'; known: {', '.join(v.name for v in engine.policies)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    other = old.path(path.action, path.role)
    judge = QuickJudge.of((engine, old_name), (engine, name), datetime.now(UTC))
    found = judge.paths_of(path.action, path.role) if judge is not None and other is not None else ()
    where = f"action {path.action!r}, role {path.role!r}"
    if found and found[1] is None:
        print(f"# {old_name} and {name} write the same path for {where}: impact judges it once, with its verdict")
        return 0
    joint = joint_verdict(other.inputs, path.inputs) if found and other.inputs and path.inputs else None
    if joint is None:
        print(f"# no joint verdict of {old_name} and {name} for {where}: impact judges each version's verdict")
        return 0
    print(joint.source, end="")
    return 0


def _decide(args: argparse.Namespace) -> int:
    engine = _load(args.policies)
    try:
        now = _parse_now(args.now)
    except ValueError as exc:
        print(f"--now: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    jsonl = args.jsonl or args.request.endswith(".jsonl")
    try:  # bytes, as parse_json reads them: no decoding to str and encoding back per line
        stream: IO[bytes] = _stdin_bytes() if args.request == "-" else open(args.request, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"cannot read {args.request}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with stream:
        if jsonl:
            return _decide_lines(engine, stream, args, now)
        code, answer = _answer(engine, stream.read(), args, now, None)
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return code


def _stdin_bytes() -> IO[bytes]:
    """Standard input as bytes (a text stream put in its place, as tests do, read whole)."""
    found: IO[bytes] | None = getattr(sys.stdin, "buffer", None)
    return found if found is not None else io.BytesIO(sys.stdin.read().encode("utf-8", "surrogatepass"))


def _decide_lines(engine: Engine, stream: IO[bytes], args: argparse.Namespace, now: datetime) -> int:
    """One answer line per request line, in order, written as orjson's bytes (UTF-8 as it is);
    flushed per line where a terminal reads them, else written in blocks."""
    gc.freeze()  # the loaded policies stay to the end: no collection walks them again
    with collector_paused():  # a line's objects go with it: young ones collected every 10,000 lines
        return _answer_lines(engine, stream, args, now)


ANSWERS_PER_WRITE = 64  # about 40 KB of answers per write where no terminal reads them


def _answer_lines(engine: Engine, stream: IO[bytes], args: argparse.Namespace, now: datetime) -> int:
    """The answers gathered and written ANSWERS_PER_WRITE at a time, and when the input read so
    far is answered, whatever buffering stdout has: under PYTHONUNBUFFERED (as many containers
    set it) sys.stdout.buffer is the bare file, and one write per line cost a system call and a
    wake-up of the reader of a pipe each (about a tenth of a line's CPU time). Each line goes
    straight to the engine (_line_decider), the time and version of each `at` chosen once."""
    worst = EXIT_ALLOW
    sys.stdout.flush()
    out: IO[bytes] | None = getattr(sys.stdout, "buffer", None)  # None: a text stream put in its place
    each_line = sys.stdout.isatty()
    gathered: list[bytes] = []
    answer = gathered.append
    decide = _line_decider(engine, args, now)
    for block in line_blocks(stream):
        for line_number, text in block:
            if line_number % 10_000 == 0:
                gc.collect(1)
            try:
                decision = decide(text)
            except Exception as exc:  # a request error, or a bug of ours: said in its answer (_refused)
                code, body = _refused(exc, line_number)
                line = orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)
            else:
                code = EXIT_ALLOW if decision.decision == "allow" else EXIT_DENY
                line = decision.to_json_line()
            if out is None:
                sys.stdout.write(line.decode())
            else:
                answer(line)
                if each_line or len(gathered) == ANSWERS_PER_WRITE:
                    out.write(b"".join(gathered))
                    out.flush()
                    gathered.clear()
            if code > worst:
                worst = code
        if out is not None and gathered:  # every line read is answered before more input is awaited
            out.write(b"".join(gathered))
            out.flush()
            gathered.clear()
    (out or sys.stdout).flush()
    return worst


def _line_decider(engine: Engine, args: argparse.Namespace, now: datetime) -> Callable[[bytes], Decision]:
    """What decides one line's text (as _decided does, the errors raised): the engine's
    line_decider, with the run's settings bound and the time and version of each `at` kept."""
    if args.policy_version:
        return partial(_pinned, engine, args, now)
    return engine.line_decider(now=now, explain=args.explain, language=args.lang)


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    from engine.versions import parse_timestamp

    return parse_timestamp(text)


def _answer(engine: Engine, text: str | bytes, args: argparse.Namespace, now: datetime,
            line: int | None) -> tuple[int, dict[str, Any]]:
    """(exit code, response or error body) for one request's text."""
    code, answer = _decided(engine, text, args, now, line)
    return code, answer.to_dict() if isinstance(answer, Decision) else answer


def _decided(engine: Engine, text: str | bytes, args: argparse.Namespace, now: datetime,
             line: int | None) -> tuple[int, Decision | dict[str, Any]]:
    """(exit code, decision or error body) for one request's text."""
    try:
        if args.policy_version:
            decision = _pinned(engine, args, now, text)
        else:  # read and checked in one pass where the reader vouches for it (engine/reader.py)
            decision = engine.decide_bytes(text, now=now, explain=args.explain, language=args.lang)
    except Exception as exc:  # a request error, or a bug of ours: said in the answer (_refused)
        return _refused(exc, line)
    return (EXIT_ALLOW if decision.allowed else EXIT_DENY), decision


def _pinned(engine: Engine, args: argparse.Namespace, now: datetime, text: str | bytes) -> Decision:
    """One request decided by the version --policy-version names, whatever the request says."""
    request = parse_json(text)
    if isinstance(request, dict):
        request["policy_version"] = args.policy_version
    return engine.decide(request, now=now, explain=args.explain, language=args.lang)


def _refused(exc: Exception, line: int | None) -> tuple[int, dict[str, Any]]:
    """(exit code, error body) of a request that was not decided: its RequestError's body, or an
    internal error (a bug of ours: said as such, never taken for a deny, the rest go on)."""
    if isinstance(exc, RequestError):
        body = exc.to_dict()
    else:
        body = {"error": {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "details": []}}
    if line is not None:
        body["line"] = line
    return EXIT_BAD_INPUT, body


def _eval(args: argparse.Namespace) -> int:
    """One expression against one request: its value and CEL type, through the decision path."""
    from celpy.celparser import CELParseError

    from engine.compiler import CelCompiler
    from engine.evaluator import EvaluationFailure, run, to_json
    from engine.native import to_native, type_name
    from engine.schemas import load_schema
    from engine.versions import parse_timestamp
    from engine.yamlpos import Mark, YamlDocument

    def answer(body: dict[str, Any], code: int) -> int:
        if args.format == "json":
            print(json.dumps(body, ensure_ascii=False))
        elif "error" in body:
            print(f"{body['error']['code']}: {body['error']['message']}", file=sys.stderr)
        else:
            print(f"{json.dumps(body['value'], ensure_ascii=False)} ({body['type']})")
        return code

    engine = _load(args.policies)
    request: dict[str, Any] = {}
    if args.request is not None:
        try:
            with sys.stdin if args.request == "-" else open(args.request, encoding="utf-8") as stream:
                raw = parse_json(stream.read())
            request = engine.check(raw)
        except OSError as exc:
            return answer({"error": {"code": "bad_request_file", "message": f"cannot read {args.request}: "
                                                                            f"{exc.strerror}"}}, EXIT_BAD_INPUT)
        except RequestError as exc:
            return answer(exc.to_dict(), EXIT_BAD_INPUT)
    try:
        now = _parse_now(args.now)
        at = parse_timestamp(request["at"]) if "at" in request else now
        version = engine.policies.select(at, args.policy_version or request.get("policy_version"))
    except ValueError as exc:
        return answer({"error": {"code": "invalid_request", "message": str(exc)}}, EXIT_BAD_INPUT)
    except RequestError as exc:
        return answer(exc.to_dict(), EXIT_BAD_INPUT)
    # The expression is checked as a policy's would be: syntax, then every field it reads.
    doc = YamlDocument("<expression>", args.expr, {"expr": args.expr}, {("expr",): Mark(1, 1)})
    try:
        expr, problems = CelCompiler(load_schema("request")).compile(args.expr, doc, ("expr",), version.parameters)
    except CELParseError as exc:  # compile() reports these as problems; kept as a guard
        return answer({"error": {"code": "cel_syntax", "message": str(exc)}}, EXIT_EVAL_CHECK)
    errors = [p for p in problems if not p.is_warning]
    for warning in (p for p in problems if p.is_warning):
        print(f"warning: {warning.location.line}:{warning.location.column}: {warning.message}", file=sys.stderr)
    if expr is None or errors:
        first = errors[0] if errors else None
        message = "; ".join(f"{p.location.line}:{p.location.column}: {p.message}" for p in errors)
        return answer({"error": {"code": first.code if first else "cel_syntax", "message": message}},
                      EXIT_EVAL_CHECK)
    activation = engine.activation(request, version, at)
    try:
        value = to_native(run(expr, activation))
    except EvaluationFailure as exc:
        return answer({"error": {"code": "evaluation_error", "message": str(exc)}}, EXIT_EVAL_ERROR)
    return answer({"value": to_json(value), "type": type_name(value)}, EXIT_ALLOW)


if __name__ == "__main__":
    sys.exit(main())

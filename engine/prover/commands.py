"""The `prove` commands and `check --prove`: argument parsing and printing only; the proofs are elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from engine.loader import load_policies
from engine.versions import PolicySet

if TYPE_CHECKING:  # the prover (z3, the CEL grammar) is imported by the commands that prove, not by
    from engine.prover.rules import RulesReport  # every command whose parser lists them

EXIT_BUG = 4  # 3 is every command's "the policies do not load"


def add_parsers(commands: Any, default_policies: str) -> None:
    prove = commands.add_parser(
        "prove", help="proofs over every request the contract accepts (dead rules, what a version can change)",
        description="SMT proofs (z3) over every request that request.schema.json accepts, lists up to a bound.")
    sub = prove.add_subparsers(title="prove commands", metavar="COMMAND")
    rules = sub.add_parser(
        "rules", help="can each rule fire, decide, pass; witnesses; dead and shadowed rules",
        description="For every rule and (action, role): can it fire, decide (be the first denying rule), "
                    "pass; a witness request for each yes, checked by the engine with both runtimes. "
                    "Exit 1 on a dead or shadowed rule, 3 on a witness the engine does not confirm.")
    rules.add_argument("versions", nargs="*", metavar="VERSION", help="versions (default: all)")
    rules.add_argument("--policies", default=default_policies, help="policy folder (default: policies)")
    rules.add_argument("--format", choices=("text", "json"), default="text")
    rules.add_argument("--list-bound", type=int, default=None, help="items per list (default: above every "
                       "count threshold of the policies)")
    rules.set_defaults(handler=_prove_rules)
    diff = sub.add_parser(
        "diff", help="can decisions flip between two versions, exactly when, and only within a condition?",
        description="allow->deny and deny->allow: possible (with a witness), impossible or unknown; the exact "
                    "condition under which decisions differ, as CEL. With --within CEL: exit 0 if every "
                    "difference lies inside it, 1 with a counterexample, 2 unknown (4: a witness the engine "
                    "does not confirm; 3: the policies do not load).")
    diff.add_argument("old")
    diff.add_argument("new")
    diff.add_argument("--policies", default=default_policies, help="policy folder (default: policies)")
    diff.add_argument("--within", metavar="CEL", help="a condition every difference must satisfy")
    diff.add_argument("--format", choices=("text", "json", "markdown", "html"), default="text")
    diff.add_argument("--list-bound", type=int, default=None)
    diff.set_defaults(handler=_prove_diff)


def _load(folder: str) -> PolicySet:
    """The policy set; a PolicyLoadError reaches the CLI's main(), which says it as every command does."""
    return load_policies(folder)


def _prove_rules(args: argparse.Namespace) -> int:
    from engine.prover.rules import prove_rules

    policies = _load(args.policies)
    names = args.versions or policies.names()
    missing = [n for n in names if policies.get(n) is None]
    if missing:
        print(f"no version {', '.join(missing)} in {args.policies}", file=sys.stderr)
        return 2
    reports = [prove_rules(policies, policies.get(n), args.list_bound) for n in names]  # type: ignore[arg-type]
    if args.format == "json":
        data: Any = reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports]
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print("\n".join(line for r in reports for line in describe_rules(r)))
    if any(r.bugs for r in reports):
        return EXIT_BUG
    return 1 if any(r.findings() for r in reports) else 0


def describe_rules(report: RulesReport) -> list[str]:
    lines = [f"{report.version}: {len(report.rules)} (rule, action, role) proved over every request the contract "
             f"accepts, lists up to {report.bound} items, in {report.seconds:.1f} s"]
    for a in report.rules:
        where = f"{a.action}/{a.role}" if a.role else a.action
        shadow = f"  shadowed by {', '.join(a.shadowed_by)}" if a.shadowed_by else ""
        lines.append(f"  {a.id:<36} {where:<20} fires {a.fires.answer:<10} decides {a.decides.answer:<10} "
                     f"passes {a.passes.answer:<10}{shadow}")
        for name, claim in (("fires", a.fires), ("decides", a.decides), ("passes", a.passes)):
            if claim.reason:
                lines.append(f"      {name} unknown: {claim.reason}")
    findings = report.findings()
    for kind, rule_id, where in findings:
        lines.append(f"  FINDING {where}: {rule_id} is {kind}")
    lines += [f"  BUG: {b}" for b in report.bugs]
    if not findings and not report.bugs:
        lines.append("  every rule can fire and decide")
    return lines


def witnessed(report: RulesReport) -> int:
    from engine.prover.rules import POSSIBLE

    return sum(1 for a in report.rules for c in (a.fires, a.decides, a.passes) if c.answer == POSSIBLE)


def _prove_diff(args: argparse.Namespace) -> int:
    from engine.prover.cel import Uncovered
    from engine.prover.diff import prove_diff, render

    policies = _load(args.policies)
    old, new = policies.get(args.old), policies.get(args.new)
    if old is None or new is None:
        print(f"no version '{args.old if old is None else args.new}' in {args.policies}", file=sys.stderr)
        return 2
    try:
        proof = prove_diff(policies, old, new, within=args.within, bound=args.list_bound)
    except Uncovered as exc:
        print(f"--within: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a CEL syntax error in --within
        if args.within is None:
            raise
        print(f"--within: cannot read {args.within!r}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(proof, args.format))
    return proof.exit_code


def check_rules(policies: PolicySet) -> int:
    """`check --prove`: 1 if a rule is dead or shadowed, 4 on a bug."""
    from engine.prover.rules import prove_rules

    code = 0
    for version in policies:
        report = prove_rules(policies, version)
        findings = report.findings()
        for kind, rule_id, where in findings:
            print(f"  {where}: {rule_id} is {kind} [prove]")
        for bug in report.bugs:
            print(f"  BUG: {bug}")
        print(f"proved {version.name}: {len(report.rules)} (rule, action, role), {witnessed(report)} witnesses "
              f"checked by the engine, {len(findings)} dead or shadowed, in {report.seconds:.1f} s")
        code = max(code, EXIT_BUG if report.bugs else 1 if findings else 0)
    return code

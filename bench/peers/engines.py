"""The engines of the peer benchmark, each as one function: request dict in, fired rule ids out.

Everything a decision needs per request is inside that function (building the peer's input
from the request dict, evaluating, reading the fired ids back); everything that can be done
once (parsing, compiling, building a bundle or a decision graph) is done when it is made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.peers.floor_official import PARAMETERS, official_bind_violations
from engine.decider import Engine

HERE = Path(__file__).resolve().parent
NOW = datetime(2025, 7, 1, tzinfo=UTC)
ALL_RULES = 14

Decide = Callable[[dict[str, Any]], Iterable[str]]


@dataclass
class Peer:
    name: str
    expressed: str  # what the "rules expressed" column says
    decide: Decide
    version: str = ""


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def bindpolicy(engine: Engine) -> Peer:
    def decide(request: dict[str, Any]) -> list[str]:
        return [v.id for v in engine.decide(request, now=NOW).violations]
    return Peer("bindpolicy (generated path)", f"{ALL_RULES}/{ALL_RULES} (CEL)", decide,
                f"bindpolicy {_version('bindpolicy')}")


def bindpolicy_closures(engine: Engine) -> Peer:
    closures = Engine(engine.policies, generated=False)

    def decide(request: dict[str, Any]) -> list[str]:
        return [v.id for v in closures.decide(request, now=NOW).violations]
    return Peer("bindpolicy, native closures rule by rule (before)", f"{ALL_RULES}/{ALL_RULES} (CEL)", decide, "")


def bindpolicy_cel_python(engine: Engine) -> Peer:
    reference = Engine(engine.policies, runtime="cel-python")

    def decide(request: dict[str, Any]) -> list[str]:
        return [v.id for v in reference.decide(request, now=NOW).violations]
    return Peer("bindpolicy, runtime cel-python (reference)", f"{ALL_RULES}/{ALL_RULES} (CEL)", decide,
                f"cel-python {_version('cel-python')}")


def floor() -> Peer:
    return Peer("plain Python over the dict (floor)", f"{ALL_RULES}/{ALL_RULES}", official_bind_violations)


def regopy(parameters: dict[str, Any]) -> Peer:
    """rego-cpp: the module and data compiled once into a bundle; per decision, input + entrypoint query."""
    from regopy import Interpreter  # type: ignore[import-untyped]

    builder = Interpreter()
    builder.add_data({"params": parameters})
    builder.add_module("bind.rego", (HERE / "bind.rego").read_text(encoding="utf-8"))
    bundle = builder.build(None, ["bind/deny"])
    runner = Interpreter()

    def decide(request: dict[str, Any]) -> list[str]:
        # No rule of an official bind reads a timestamp, so rego-cpp's `Z` bug in
        # time.parse_rfc3339_ns cannot bite: the request goes in as it is.
        runner.set_input(request)
        output = runner.query_bundle_entrypoint(bundle, "bind/deny")
        if not output.ok():
            raise RuntimeError(f"rego error: {output}")
        if not output.results:  # undefined: no rule fired
            return []
        fired: list[str] = output.results[0].expressions[0]
        return fired
    return Peer("regopy (OPA Rego, rego-cpp)", f"{ALL_RULES}/{ALL_RULES}", decide, f"regopy {_version('regopy')}")


def zen_engine() -> Peer:
    """GoRules ZEN: the JDM graph made once into a decision (create_decision); per decision,
    ZenDecision.evaluate on the request dict.

    In zen-engine 2.1.3 this call starts a new async runtime each time (two threads spawned
    and joined per evaluation, seen with strace): about 100 µs of fixed cost and
    millisecond tails on a 2-core machine. See zen_engine_loader for the way that avoids it.
    """
    import zen

    decision = zen.ZenEngine().create_decision((HERE / "bind.jdm.json").read_text(encoding="utf-8"))

    def decide(request: dict[str, Any]) -> list[str]:
        return [row["id"] for row in decision.evaluate(request)["result"]]
    return Peer("zen-engine, ZenDecision.evaluate", f"{ALL_RULES}/{ALL_RULES}", decide,
                f"zen-engine {_version('zen-engine')}")


def zen_engine_loader() -> Peer:
    """GoRules ZEN, the same JDM graph served by an engine with a static loader; per decision,
    ZenEngine.evaluate("bind", request), which reuses the engine's runtime and its loaded graph."""
    import zen

    graph = json.loads((HERE / "bind.jdm.json").read_text(encoding="utf-8"))
    engine = zen.ZenEngine({"loader": {"type": "static", "content": {"bind": graph}}})
    engine.evaluate("bind", {"action": "bind"})  # load it now, not in the first decision

    def decide(request: dict[str, Any]) -> list[str]:
        return [row["id"] for row in engine.evaluate("bind", request)["result"]]
    return Peer("zen-engine, ZenEngine.evaluate (static loader)", f"{ALL_RULES}/{ALL_RULES}", decide)


def _ref(kind: str, eid: str) -> dict[str, Any]:
    return {"__entity": {"type": kind, "id": eid}}


def cedar_input(request: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Cedar request, entities) for a bind: null fields become absent attributes, ids of shops
    and accounts entity references; context.help carries the two values Cedar cannot compute."""
    shop, account = request["shop"], request["account"]
    shop_id, account_id = shop["id"], account["id"]
    kyc = account.get("kyc")
    account_attrs: dict[str, Any] = {
        key: account[key] for key in ("type", "name", "age", "location", "followers", "ecommerce_revoked",
                                      "linked_to_revoked", "policy_compliant") if key in account}
    if kyc is not None:
        account_attrs["kyc"] = {"verified": kyc["verified"]}
    created_by = account.get("created_by_shop")
    if created_by is not None:
        account_attrs["created_by_shop"] = _ref("Shop", created_by)
    upgrade = account.get("upgrade")
    if upgrade is not None:
        record: dict[str, Any] = {"state": upgrade["state"]}
        if upgrade.get("shop_id") is not None:
            record["shop"] = _ref("Shop", upgrade["shop_id"])
        account_attrs["upgrade"] = record
    shop_attrs: dict[str, Any] = {
        "name": shop.get("name"), "market": shop.get("market"),
        "channel_accounts": [_ref("Account", c["account_id"]) for c in shop.get("channel_accounts", ())]}
    official = shop.get("official_account")
    if official is not None:
        shop_attrs["official_account"] = {"account": _ref("Account", official["account_id"]),
                                          "account_type": official["account_type"]}
    help_values = {  # "with help": computed here because Cedar has no string length and no counting
        "name_length": len(account.get("name") or ""),
        "binds_to_this_shop": sum(1 for h in account.get("bind_history", ()) if h["shop_id"] == shop_id),
    }
    cedar_request = {"principal": {"type": "Account", "id": account_id},
                     "action": {"type": "Action", "id": request["action"]},
                     "resource": {"type": "Shop", "id": shop_id},
                     "context": {"role": request.get("role"), "help": help_values}}
    entities = [{"uid": {"type": "Account", "id": account_id}, "attrs": account_attrs, "parents": []},
                {"uid": {"type": "Shop", "id": shop_id}, "attrs": shop_attrs, "parents": []}]
    return cedar_request, entities


def cedarpy() -> Peer:
    """AWS Cedar: the policy set parsed once (and validated against bind.cedarschema once)."""
    import cedarpy as cedar

    text = (HERE / "bind.cedar").read_text(encoding="utf-8")
    validation = cedar.validate_policies(text, (HERE / "bind.cedarschema").read_text(encoding="utf-8"))
    if not validation.validation_passed:
        raise SystemExit(f"bind.cedar does not validate: {validation.errors}")
    policies = cedar.PolicySet.from_str(text)

    def decide(request: dict[str, Any]) -> Iterable[str]:
        cedar_request, entities = cedar_input(request)
        result = cedar.is_authorized(cedar_request, policies, entities)
        diagnostics = result.diagnostics
        if diagnostics.errors:  # Cedar skips a policy that errors: fail loudly instead
            raise RuntimeError(f"cedar errors: {diagnostics.errors}")
        return diagnostics.id_annotations_by_reason.values()
    return Peer("cedarpy (AWS Cedar)", f"12/{ALL_RULES} native + 2 with help", decide,
                f"cedarpy {_version('cedarpy')}")


def all_peers(engine: Engine) -> list[Peer]:
    """bindpolicy first (the reference of the check and of the ratios), then the peers."""
    v2 = engine.policies.get("v2")
    if v2 is None:
        raise SystemExit("bindpolicy has no policy v2")
    parameters = {name: v2.native_parameters[name] for name in PARAMETERS}
    if parameters != PARAMETERS:
        raise SystemExit(f"policy v2's parameters changed ({parameters} != {PARAMETERS}): the floor, the "
                         "JDM graph and the Cedar policies write them in and must be updated")
    return [bindpolicy(engine), floor(), regopy(parameters), zen_engine(), zen_engine_loader(), cedarpy(),
            bindpolicy_closures(engine), bindpolicy_cel_python(engine)]


def as_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1)

"""The floor for an official bind: policy v2's rules as plain Python over the request dict.

The same reading as policies/v1/bind.yaml and policies/v2/bind.yaml, rule by rule, in policy
order, for `action: bind, role: official` only (bench/floor.py covers both roles). The
thresholds are v2's parameters (policies/v1/version.yaml); run.py checks that they still are.
"""

from __future__ import annotations

from typing import Any

MIN_AGE = 18
NAME_LENGTH_LIMIT = 30
ORG_BIND_LIMIT = 2
MIN_FOLLOWERS = 1000

PARAMETERS = {"min_age": MIN_AGE, "name_length_limit": NAME_LENGTH_LIMIT, "org_bind_limit": ORG_BIND_LIMIT,
              "min_followers": MIN_FOLLOWERS}


def official_bind_violations(req: dict[str, Any]) -> list[str]:
    """The ids of the v2 rules that deny binding `req["account"]` as the shop's official account."""
    if req["action"] != "bind" or req["role"] != "official":
        raise ValueError("only official binds are covered")
    shop, account = req["shop"], req["account"]
    kind = account["type"]
    official = shop["official_account"]
    out: list[str] = []
    if official is not None:
        out.append("official.single")
    if kind == "organization":
        created_by = account["created_by_shop"]
        if created_by is None or created_by != shop["id"]:
            out.append("official.org.created-by-shop")
        if account["name"] != shop["name"]:
            out.append("official.org.name-matches-shop")
        if len(account["name"]) >= NAME_LENGTH_LIMIT:  # code points, as CEL's size()
            out.append("official.org.name-length")
        shop_id = shop["id"]
        if sum(1 for h in account["bind_history"] if h["shop_id"] == shop_id) >= ORG_BIND_LIMIT:
            out.append("org.rebind-limit")
    account_id = account["id"]
    if (official is not None and official["account_id"] == account_id) or any(
            c["account_id"] == account_id for c in shop["channel_accounts"]):
        out.append("bind.already-bound")
    if kind == "personal":
        if account["age"] < MIN_AGE:
            out.append("personal.min-age")
        if account["location"] != shop["market"]:
            out.append("personal.location")
        if account["ecommerce_revoked"]:
            out.append("personal.no-revocation")
        if account["linked_to_revoked"]:
            out.append("personal.no-revoked-association")
        if not account["policy_compliant"]:
            out.append("personal.policy-compliance")
        if shop["market"] != "US":  # v2: US shops are exempt from the next two
            if not account["kyc"]["verified"]:
                out.append("personal.kyc")
            if account["followers"] < MIN_FOLLOWERS:
                out.append("personal.min-followers")
    upgrade = account.get("upgrade")  # absent: never started an upgrade
    if upgrade is not None and upgrade["state"] == "trial" and (
            upgrade.get("shop_id") is None or upgrade["shop_id"] != shop["id"]):
        out.append("upgrade.trial-no-ecommerce")
    return out

"""The floor: the bind rules of policy v2 as plain Python over the request dict, no CEL at all."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def bind_violations(req: dict[str, Any]) -> list[str]:
    """The ids of the v2 rules that deny a bind, in policy order (same reading as the YAML)."""
    shop, account, role = req["shop"], req["account"], req["role"]
    personal, org = account["type"] == "personal", account["type"] == "organization"
    official = shop["official_account"]
    out: list[str] = []
    if role == "official":
        if official is not None:
            out.append("official.single")
        if org:
            if account["created_by_shop"] is None or account["created_by_shop"] != shop["id"]:
                out.append("official.org.created-by-shop")
            if account["name"] != shop["name"]:
                out.append("official.org.name-matches-shop")
            if len(account["name"]) >= 30:
                out.append("official.org.name-length")
    if org and sum(1 for h in account["bind_history"] if h["shop_id"] == shop["id"]) >= 2:
        out.append("org.rebind-limit")
    if role == "channel":
        if len(shop["channel_accounts"]) >= 4:
            out.append("channel.max-four")
        inv = req.get("invitation")
        if inv is None or inv["shop_id"] != shop["id"] or inv["status"] != "accepted":
            out.append("channel.invited")
    if (official is not None and official["account_id"] == account["id"]) or any(
            c["account_id"] == account["id"] for c in shop["channel_accounts"]):
        out.append("bind.already-bound")
    if personal:
        if account["age"] < 18:
            out.append("personal.min-age")
        if account["location"] != shop["market"]:
            out.append("personal.location")
        if account["ecommerce_revoked"]:
            out.append("personal.no-revocation")
        if account["linked_to_revoked"]:
            out.append("personal.no-revoked-association")
        if not account["policy_compliant"]:
            out.append("personal.policy-compliance")
        if shop["market"] != "US":
            if not account["kyc"]["verified"]:
                out.append("personal.kyc")
            if account["followers"] < 1000:
                out.append("personal.min-followers")
    upgrade = account.get("upgrade")
    if upgrade is not None and upgrade["state"] == "trial" and upgrade["shop_id"] != shop["id"]:
        out.append("upgrade.trial-no-ecommerce")
    return out


def bind_outputs(req: dict[str, Any]) -> dict[str, str]:
    at = _ts(req["at"])
    account = req["account"]
    scope = ("any_affiliate_products" if req["role"] == "channel" and account["affiliate_enabled"]
             else "bound_shop_only")
    out = {"promotion_scope": scope,
           "unbind_not_before": (at + timedelta(hours=24)).isoformat().replace("+00:00", "Z")}
    upgrade = account.get("upgrade")
    if account["type"] == "organization" or (upgrade is not None and upgrade["state"] == "trial"):
        out["login_method"] = "otp"
    return out

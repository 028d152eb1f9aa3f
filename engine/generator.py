"""Realistic decision requests over every action and role, with values on both sides of every threshold.

Deterministic for a seed: the same (count, seed) gives the same requests, byte for byte, so a
corpus can be regenerated instead of stored. Used by `bindpolicy generate`, the differential
tests and the benchmarks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from engine.versions import format_timestamp

ACTIONS = ("bind", "bind", "bind", "unbind", "unbind", "create_org_account", "upgrade_start",
           "upgrade_confirm", "upgrade_cancel", "enable_affiliate", "login")
MARKETS = ("US", "US", "GB", "ID", "MY")
# Moments on both sides of v2's start (2025-06-01) and well inside each version.
MOMENTS = ("2024-03-15T10:00:00Z", "2025-01-10T08:30:00Z", "2025-05-31T23:59:59Z",
           "2025-06-01T00:00:00Z", "2025-09-20T16:45:00Z", "2026-02-02T02:02:02Z")


def _ts(moment: datetime) -> str:
    return format_timestamp(moment)


class RequestGenerator:
    """Builds one request at a time from a seeded random source."""

    def __init__(self, seed: int, *, broken: float = 0.0) -> None:
        self.random = random.Random(seed)
        self.broken = broken  # share of requests with a field removed (to exercise 400s)

    def pick(self, *options: Any) -> Any:
        return self.random.choice(options)

    def chance(self, p: float) -> bool:
        return self.random.random() < p

    def request(self, index: int) -> dict[str, Any]:
        """Most requests are sound with one or two values moved to an edge; the rest are drawn wild."""
        wild = self.draw(index)
        if not self.chance(0.65) or (self.broken and self.chance(self.broken)):
            if self.broken and self.chance(self.broken):
                self.remove_something(wild)
            return wild
        request = self.draw(index, seed_of=wild)
        sound(request)
        for _ in range(self.pick(0, 1, 1, 1, 2)):
            path = self.pick(*EDGES)
            source: Any = wild
            target: Any = request
            *parents, last = path.split(".")
            for part in parents:
                source, target = source.get(part) if isinstance(source, dict) else None, target.get(part)
                if not isinstance(target, dict):
                    break
            else:
                if isinstance(source, dict) and last in source and last in target:
                    target[last] = source[last]
        return request

    def draw(self, index: int, seed_of: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request with every value drawn at random (`seed_of`: the same action, role, time)."""
        r = self.random
        action = seed_of["action"] if seed_of else self.pick(*ACTIONS)
        at_text = seed_of["at"] if seed_of else self.pick(*MOMENTS)
        at = datetime.fromisoformat(at_text.replace("Z", "+00:00"))
        market = self.pick(*MARKETS)
        shop_id = f"shop-{r.randrange(1, 50)}"
        account_id = f"acct-{index}"
        request: dict[str, Any] = {"action": action, "at": at_text}
        if self.chance(0.05):
            request["policy_version"] = self.pick("v1", "v2")
        if action in ("bind", "unbind"):
            request["role"] = seed_of["role"] if seed_of else self.pick("official", "channel")
        if action != "enable_affiliate" and action != "login":
            request["shop"] = self.shop(shop_id, market, at, account_id, action, request.get("role"))
        if action != "create_org_account":
            request["account"] = self.account(account_id, shop_id, market, at, action)
        if action == "create_org_account":
            request["region"] = market if self.chance(0.8) else self.pick(*MARKETS)
        if action == "enable_affiliate":
            request["market"] = market
        if action == "login":
            request["login"] = {"method": self.pick("otp", "password", "phone", "email", "qr"),
                                "target": self.pick("app", "live_manager")}
        if action == "bind" and request.get("role") == "channel":
            request["invitation"] = self.pick(
                None, {"shop_id": shop_id, "status": "accepted"}, {"shop_id": shop_id, "status": "accepted"},
                {"shop_id": shop_id, "status": "pending"}, {"shop_id": "shop-other", "status": "accepted"},
                {"shop_id": shop_id, "status": "declined"})
        return request

    def name(self, length: int) -> str:
        letters = "abcdefghijklmnopqrstuvwxyz"
        return "".join(self.random.choice(letters) for _ in range(length))

    def around(self, at: datetime, base: timedelta) -> str:
        """A moment just inside, at, or just outside `base` before `at`."""
        offset = self.pick(timedelta(0), timedelta(minutes=-1), timedelta(minutes=1), timedelta(days=-3),
                           timedelta(days=30))
        return _ts(at - base - offset)

    def shop(self, shop_id: str, market: str, at: datetime, account_id: str, action: str,
             role: str | None) -> dict[str, Any]:
        r = self.random
        name = self.name(self.pick(5, 12, 29, 30, 31))
        shop: dict[str, Any] = {"id": shop_id, "name": name, "market": market,
                                "status": self.pick("normal", "normal", "normal", "exception")}
        official = None
        if self.chance(0.5):
            bound_by_me = action in ("unbind", "upgrade_start") and role != "channel" and self.chance(0.7)
            official = {"account_id": account_id if bound_by_me else f"acct-o{r.randrange(100)}",
                        "account_type": self.pick("personal", "organization"),
                        "bound_at": self.around(at, timedelta(hours=24))}
        shop["official_account"] = official
        channels = [{"account_id": f"acct-c{r.randrange(1000)}", "bound_at": self.around(at, timedelta(days=10))}
                    for _ in range(self.pick(0, 1, 3, 4, 4, 5))]
        if action == "unbind" and role == "channel" and channels and self.chance(0.7):
            channels[0] = {"account_id": account_id, "bound_at": self.around(at, timedelta(hours=24))}
        if action == "bind" and self.chance(0.05):
            channels.append({"account_id": account_id, "bound_at": self.around(at, timedelta(days=2))})
        shop["channel_accounts"] = channels
        shop["official_unbinds"] = [self.around(at, timedelta(days=100 * i)) for i in range(self.pick(0, 2, 3, 4))]
        count = self.pick(0, 5, 9, 10, 11)
        window = timedelta(days=180)
        shop["channel_unbinds"] = [self.around(at, window * r.random()) for _ in range(count)] + \
            [self.around(at, window) for _ in range(self.pick(0, 1, 2))]
        return shop

    def account(self, account_id: str, shop_id: str, market: str, at: datetime, action: str) -> dict[str, Any]:
        kind = self.pick("personal", "personal", "personal", "organization")
        account: dict[str, Any] = {
            "id": account_id, "name": self.name(self.pick(6, 29, 30)), "type": kind,
            "age": self.pick(16, 17, 18, 19, 35), "location": market if self.chance(0.85) else self.pick(*MARKETS),
            "followers": self.pick(0, 999, 1000, 1001, 25000),
            "ecommerce_revoked": self.chance(0.1), "linked_to_revoked": self.chance(0.1),
            "policy_compliant": self.chance(0.9),
            "kyc": {"verified": self.chance(0.7),
                    "document_type": self.pick("passport", "green_card", "drivers_license", "national_id"),
                    "document_country": market if self.chance(0.8) else self.pick(*MARKETS)},
            "commission_agreement_signed": self.chance(0.8), "affiliate_enabled": self.chance(0.3),
            "created_by_shop": self.pick(None, shop_id, shop_id, "shop-other") if kind == "organization" else None,
            "bind_history": [{"shop_id": self.pick(shop_id, "shop-other"),
                              "bound_at": _ts(at - timedelta(days=400 - 50 * i)),
                              "unbound_at": _ts(at - timedelta(days=380 - 50 * i))}
                             for i in range(self.pick(0, 1, 2, 3))],
            "violation_points": self.pick(0, 11, 12, 13), "health_score": self.pick(100, 150, 151, 400),
            "recent_serious_violation": self.chance(0.1),
        }
        if kind == "organization" and self.chance(0.5):
            account["name"] = "renamed" if self.chance(0.2) else None
        state = self.pick("none", "none", "trial", "trial", "upgraded", "cancelled")
        if self.chance(0.8) or action in ("upgrade_confirm", "upgrade_cancel"):
            upgrade: dict[str, Any] = {"state": state, "unwithdrawn_earnings": self.pick(0, 0.0, 0.01, 250.5)}
            if state != "none" or self.chance(0.5):
                upgrade["shop_id"] = self.pick(shop_id, "shop-other")
                started = self.pick(timedelta(days=3), timedelta(days=15) - timedelta(minutes=1),
                                    timedelta(days=15), timedelta(days=16))
                upgrade["trial_started_at"] = _ts(at - started)
            account["upgrade"] = upgrade
        if account["name"] is None:
            del account["name"]
        return account

    def remove_something(self, request: dict[str, Any]) -> None:
        """Take one field away, somewhere, so that the request must be answered with an error."""
        holders = [request] + [request[k] for k in ("shop", "account") if isinstance(request.get(k), dict)]
        holder = self.random.choice(holders)
        keys = [k for k in holder if k not in ("action", "id")]
        if keys:
            del holder[self.random.choice(keys)]


# Values that the sound requests move, one or two at a time, to a drawn (often edge) value.
EDGES = ("account.age", "account.location", "account.followers", "account.followers", "account.kyc",
         "account.ecommerce_revoked",
         "account.linked_to_revoked", "account.policy_compliant", "account.kyc", "account.commission_agreement_signed",
         "account.created_by_shop", "account.bind_history", "account.violation_points", "account.health_score",
         "account.recent_serious_violation", "account.upgrade", "account.type", "shop.name", "shop.status",
         "shop.official_account", "shop.channel_accounts", "shop.official_unbinds", "shop.channel_unbinds",
         "invitation", "login", "region", "shop.market")


def sound(request: dict[str, Any]) -> None:
    """Set every value of a drawn request to one that passes the rules of its action."""
    action, role = request["action"], request.get("role")
    at = datetime.fromisoformat(request["at"].replace("Z", "+00:00"))
    shop, account = request.get("shop"), request.get("account")
    market = shop["market"] if shop else request.get("market", "US")
    if account is not None:
        account.update(age=35, location=market, followers=25000, ecommerce_revoked=False, linked_to_revoked=False,
                       policy_compliant=True, commission_agreement_signed=True, violation_points=2, health_score=400,
                       recent_serious_violation=False, bind_history=[],
                       kyc={"verified": True, "document_type": "passport", "document_country": market})
        if action in ("upgrade_start", "login", "enable_affiliate") or action == "bind":
            account["upgrade"] = {"state": "none", "unwithdrawn_earnings": 0}
        if action in ("upgrade_start",):
            account["type"] = "personal"
        if account["type"] == "organization" and shop is not None:
            account["created_by_shop"], account["name"] = shop["id"], shop["name"]
    if action in ("upgrade_confirm", "upgrade_cancel") and account is not None:
        account["type"] = "personal"
        account["upgrade"] = {"state": "trial", "shop_id": shop["id"] if shop else "shop-1",
                              "trial_started_at": _ts(at - timedelta(days=3)), "unwithdrawn_earnings": 0}
    if shop is not None:
        shop.update(status="normal", official_unbinds=[], channel_unbinds=[])
        shop["name"] = shop["name"][:20]
        if account is not None and account.get("type") == "organization":
            account["name"] = shop["name"]
        shop["channel_accounts"] = shop["channel_accounts"][:3]
        if action in ("bind", "create_org_account", "upgrade_start") and role != "channel":
            shop["official_account"] = None
        if action == "unbind" and account is not None:
            binding = {"account_id": account["id"], "bound_at": _ts(at - timedelta(days=10))}
            if role == "official":
                shop["official_account"] = {**binding, "account_type": account["type"]}
            else:
                shop["channel_accounts"] = [c for c in shop["channel_accounts"] if c["account_id"] != account["id"]]
                shop["channel_accounts"] = [*shop["channel_accounts"][:2], binding]
        elif account is not None:
            shop["channel_accounts"] = [c for c in shop["channel_accounts"] if c["account_id"] != account["id"]]
    if action == "bind" and role == "channel" and shop is not None:
        request["invitation"] = {"shop_id": shop["id"], "status": "accepted"}
    if action == "login":
        request["login"] = {"method": "otp", "target": request["login"]["target"]}
    if action == "create_org_account" and shop is not None:
        request["region"] = market


def generate_requests(count: int, seed: int = 0, *, broken: float = 0.0) -> Iterator[dict[str, Any]]:
    """`count` requests, the same for the same seed."""
    generator = RequestGenerator(seed, broken=broken)
    for index in range(count):
        yield generator.request(index)


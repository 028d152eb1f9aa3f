"""The corpus: seeded, deterministic requests to bind an account as a shop's official account.

Every request is complete for bindpolicy's schema and for every rule that can apply to an
official bind (a RequestError would mean a rule reads a field the request lacks), judged at
2025-07-01 (policy v2). Two kinds of request are mixed:

- "random": every dimension drawn from values on both sides of its threshold, so rules fire
  together in many combinations;
- "near-clean": a request that passes every rule, with 0 to 2 dimensions then moved onto
  (or just across) an edge, so that each rule is seen firing alone and allowed requests exist.

`coverage_problems` says which required edge a corpus misses (run.py refuses such a corpus).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

AT = "2025-07-01T12:00:00Z"
MARKETS = ("US", "US", "GB", "ID", "MY")
OTHER_SHOP = "shop-other"

# Names on both sides of the 30-character limit, in ASCII and in characters that take 3 or 4
# bytes in UTF-8 (a byte-counting `len` would disagree with CEL's `size`, which counts code points).
ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyz"
WIDE_CHARS = "茶叶小店旗舰官方账号好物"  # 3 bytes each in UTF-8
EMOJI = "🍵🛍✨🎁"  # 3 or 4 bytes each, astral ones 2 UTF-16 units


def _name(r: random.Random, length: int, alphabet: str) -> str:
    return "".join(r.choice(alphabet) for _ in range(length))


def _shop_name(r: random.Random) -> str:
    length = r.choice((5, 12, 29, 29, 30, 30, 31))
    alphabet = r.choice((ASCII_LETTERS, ASCII_LETTERS, WIDE_CHARS, WIDE_CHARS + ASCII_LETTERS, EMOJI + ASCII_LETTERS))
    return _name(r, length, alphabet)


def _timestamp(r: random.Random, year: int) -> str:
    """A moment in `year`, before the corpus's `at` (2025-07-01); no bind rule reads it."""
    month = r.randrange(1, 7 if year == 2025 else 13)
    return f"{year}-{month:02d}-{r.randrange(1, 28):02d}T{r.randrange(24):02d}:00:00Z"


class CorpusBuilder:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    # --- the passing side of every rule -------------------------------------------------

    def clean(self, index: int) -> dict[str, Any]:
        """A request that no rule denies: an unbound shop, an eligible account."""
        r = self.r
        market = r.choice(MARKETS)
        shop_id = f"shop-{r.randrange(1, 60)}"
        account_id = f"acct-{index}"
        kind = r.choice(("personal", "organization"))
        shop_name = _name(r, r.choice((5, 12, 29)), r.choice((ASCII_LETTERS, WIDE_CHARS)))
        shop = {
            "id": shop_id, "name": shop_name, "market": market, "status": "normal",
            "official_account": None,
            "channel_accounts": [{"account_id": f"acct-c{r.randrange(1000)}", "bound_at": _timestamp(r, 2025)}
                                 for _ in range(r.choice((0, 1, 3, 4)))],
            "official_unbinds": [_timestamp(r, 2024) for _ in range(r.choice((0, 1, 2)))],
            "channel_unbinds": [_timestamp(r, 2025) for _ in range(r.choice((0, 2, 5)))],
        }
        account: dict[str, Any] = {
            "id": account_id,
            "name": shop_name if kind == "organization" else _name(r, r.choice((6, 15, 40)), ASCII_LETTERS),
            "type": kind, "age": r.choice((18, 19, 35, 60)), "location": market,
            "followers": r.choice((1000, 1001, 25000)),
            "ecommerce_revoked": False, "linked_to_revoked": False, "policy_compliant": True,
            "kyc": {"verified": True, "document_type": r.choice(("passport", "drivers_license")),
                    "document_country": market},
            "commission_agreement_signed": r.random() < 0.8, "affiliate_enabled": r.random() < 0.3,
            "created_by_shop": shop_id if kind == "organization" else None,
            "bind_history": [{"shop_id": OTHER_SHOP, "bound_at": _timestamp(r, 2023),
                              "unbound_at": _timestamp(r, 2024)} for _ in range(r.choice((0, 1, 2)))],
            "violation_points": r.choice((0, 3)), "health_score": r.choice((300, 400)),
            "recent_serious_violation": False,
        }
        if kind == "organization" and r.random() < 0.6:
            account["bind_history"].append({"shop_id": shop_id, "bound_at": _timestamp(r, 2024),
                                            "unbound_at": _timestamp(r, 2024)})
        upgrade = r.choice(("absent", "none", "none-null", "upgraded", "trial-this"))
        self.set_upgrade(account, upgrade, shop_id)
        r.shuffle(account["bind_history"])
        return {"action": "bind", "role": "official", "at": AT, "shop": shop, "account": account}

    def set_upgrade(self, account: dict[str, Any], kind: str, shop_id: str) -> None:
        r = self.r
        account.pop("upgrade", None)
        if kind == "absent":
            return
        started = _timestamp(r, 2025)
        upgrades: dict[str, dict[str, Any]] = {
            "none": {"state": "none", "unwithdrawn_earnings": 0},
            "none-null": {"state": "none", "shop_id": None, "trial_started_at": None, "unwithdrawn_earnings": 0},
            "upgraded": {"state": "upgraded", "shop_id": shop_id, "trial_started_at": started,
                         "unwithdrawn_earnings": 0},
            "cancelled": {"state": "cancelled", "shop_id": OTHER_SHOP, "trial_started_at": started,
                          "unwithdrawn_earnings": 12.5},
            "trial-this": {"state": "trial", "shop_id": shop_id, "trial_started_at": started,
                           "unwithdrawn_earnings": r.choice((0, 250.5))},
            "trial-other": {"state": "trial", "shop_id": OTHER_SHOP, "trial_started_at": started,
                            "unwithdrawn_earnings": 0.01},
            "trial-null": {"state": "trial", "shop_id": None, "trial_started_at": started,
                           "unwithdrawn_earnings": 0},
        }
        account["upgrade"] = upgrades[kind]

    # --- moves onto an edge ---------------------------------------------------------------

    def perturbations(self) -> list[Callable[[dict[str, Any]], None]]:
        r = self.r

        def official_present(q: dict[str, Any]) -> None:
            q["shop"]["official_account"] = {"account_id": r.choice((f"acct-o{r.randrange(100)}", q["account"]["id"])),
                                             "account_type": r.choice(("personal", "organization")),
                                             "bound_at": _timestamp(r, 2024)}

        def already_channel(q: dict[str, Any]) -> None:
            channels = q["shop"]["channel_accounts"]
            channels.insert(r.randrange(len(channels) + 1),
                            {"account_id": q["account"]["id"], "bound_at": _timestamp(r, 2025)})

        def created_by(q: dict[str, Any]) -> None:
            q["account"]["created_by_shop"] = r.choice((None, OTHER_SHOP, q["shop"]["id"]))

        def name_differs(q: dict[str, Any]) -> None:
            shop_name = q["shop"]["name"]
            q["account"]["name"] = r.choice((shop_name + " ", shop_name.upper() + "x", "renamed", shop_name[:-1]))

        def name_length(q: dict[str, Any]) -> None:
            # The same long name on both sides, so that only the length rule is in play.
            name = _shop_name(r)
            q["shop"]["name"] = name
            if q["account"]["type"] == "organization" or r.random() < 0.5:
                q["account"]["name"] = name

        def rebind(q: dict[str, Any]) -> None:
            shop_id = q["shop"]["id"]
            history = [h for h in q["account"]["bind_history"] if h["shop_id"] != shop_id]
            history += [{"shop_id": shop_id, "bound_at": _timestamp(r, 2023),
                         "unbound_at": r.choice((None, _timestamp(r, 2024)))}
                        for _ in range(r.choice((1, 2, 2, 3)))]
            r.shuffle(history)
            q["account"]["bind_history"] = history

        def age(q: dict[str, Any]) -> None:
            q["account"]["age"] = r.choice((0, 16, 17, 17, 18))

        def location(q: dict[str, Any]) -> None:
            q["account"]["location"] = r.choice([m for m in ("US", "GB", "ID", "MY") if m != q["shop"]["market"]])

        def flag(name: str, value: bool) -> Callable[[dict[str, Any]], None]:
            def move(q: dict[str, Any]) -> None:
                q["account"][name] = value
            return move

        def kyc(q: dict[str, Any]) -> None:
            q["account"]["kyc"]["verified"] = False

        def followers(q: dict[str, Any]) -> None:
            q["account"]["followers"] = r.choice((0, 999, 999, 1000))

        def market(q: dict[str, Any]) -> None:  # into or out of the US exemption
            new = "US" if q["shop"]["market"] != "US" else r.choice(("GB", "ID", "MY"))
            q["shop"]["market"] = new
            if r.random() < 0.8:
                q["account"]["location"] = new
                q["account"]["kyc"]["document_country"] = new

        def upgrade(q: dict[str, Any]) -> None:
            self.set_upgrade(q["account"], r.choice(("trial-this", "trial-other", "trial-other", "trial-null",
                                                     "cancelled", "absent")), q["shop"]["id"])

        def switch_type(q: dict[str, Any]) -> None:
            account = q["account"]
            account["type"] = "organization" if account["type"] == "personal" else "personal"
            account["created_by_shop"] = q["shop"]["id"] if account["type"] == "organization" else None
            if account["type"] == "organization":
                account["name"] = q["shop"]["name"]

        return [official_present, already_channel, created_by, name_differs, name_length, rebind, age, location,
                flag("ecommerce_revoked", True), flag("linked_to_revoked", True), flag("policy_compliant", False),
                kyc, followers, market, upgrade, switch_type]

    def near_clean(self, index: int) -> dict[str, Any]:
        q = self.clean(index)
        moves = self.perturbations()
        for move in self.r.sample(moves, self.r.choice((0, 1, 1, 2))):
            move(q)
        return q

    def random(self, index: int) -> dict[str, Any]:
        q = self.clean(index)
        moves = self.perturbations()
        for move in moves:
            if self.r.random() < 0.3:
                move(q)
        return q


def build_corpus(count: int = 500, seed: int = 20250701) -> list[dict[str, Any]]:
    builder = CorpusBuilder(seed)
    return [builder.near_clean(i) if builder.r.random() < 0.5 else builder.random(i) for i in range(count)]


def _binds_here(q: dict[str, Any]) -> int:
    return sum(1 for h in q["account"]["bind_history"] if h["shop_id"] == q["shop"]["id"])


# Edges the brief asks for: (label, predicate); each must hold for at least one request.
EDGES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("personal account", lambda q: q["account"]["type"] == "personal"),
    ("organization account", lambda q: q["account"]["type"] == "organization"),
    ("personal, age 17", lambda q: q["account"]["type"] == "personal" and q["account"]["age"] == 17),
    ("personal, age 18", lambda q: q["account"]["type"] == "personal" and q["account"]["age"] == 18),
    ("personal non-US, followers 999",
     lambda q: q["account"]["type"] == "personal" and q["shop"]["market"] != "US"
     and q["account"]["followers"] == 999),
    ("personal non-US, followers 1000",
     lambda q: q["account"]["type"] == "personal" and q["shop"]["market"] != "US"
     and q["account"]["followers"] == 1000),
    ("personal US, followers 999", lambda q: q["account"]["type"] == "personal" and q["shop"]["market"] == "US"
     and q["account"]["followers"] == 999),
    ("personal US, kyc not verified", lambda q: q["account"]["type"] == "personal" and q["shop"]["market"] == "US"
     and not q["account"]["kyc"]["verified"]),
    ("personal non-US, kyc not verified", lambda q: q["account"]["type"] == "personal"
     and q["shop"]["market"] != "US" and not q["account"]["kyc"]["verified"]),
    ("organization, name of 29 chars", lambda q: q["account"]["type"] == "organization"
     and len(q["account"]["name"]) == 29),
    ("organization, name of 30 chars", lambda q: q["account"]["type"] == "organization"
     and len(q["account"]["name"]) == 30),
    ("organization, 29-char name of 3-byte chars (87 bytes)", lambda q: q["account"]["type"] == "organization"
     and len(q["account"]["name"]) == 29 and len(q["account"]["name"].encode()) >= 30),
    ("organization, name of 10..29 chars and >= 30 bytes", lambda q: q["account"]["type"] == "organization"
     and 10 <= len(q["account"]["name"]) < 30 and len(q["account"]["name"].encode()) >= 30),
    ("US shop", lambda q: q["shop"]["market"] == "US"),
    ("non-US shop", lambda q: q["shop"]["market"] != "US"),
    ("shop with an official account", lambda q: q["shop"]["official_account"] is not None),
    ("shop without an official account", lambda q: q["shop"]["official_account"] is None),
    ("account already the shop's official account", lambda q: q["shop"]["official_account"] is not None
     and q["shop"]["official_account"]["account_id"] == q["account"]["id"]),
    ("account already a channel account", lambda q: any(c["account_id"] == q["account"]["id"]
                                                         for c in q["shop"]["channel_accounts"])),
    ("organization, created_by_shop null", lambda q: q["account"]["type"] == "organization"
     and q["account"]["created_by_shop"] is None),
    ("organization, created by another shop", lambda q: q["account"]["type"] == "organization"
     and q["account"]["created_by_shop"] not in (None, q["shop"]["id"])),
    ("organization, 1 binding to this shop", lambda q: q["account"]["type"] == "organization" and _binds_here(q) == 1),
    ("organization, 2 bindings to this shop", lambda q: q["account"]["type"] == "organization"
     and _binds_here(q) == 2),
    ("organization, 2 bindings to other shops only", lambda q: q["account"]["type"] == "organization"
     and _binds_here(q) == 0 and len(q["account"]["bind_history"]) >= 2),
    ("personal, 2 bindings to this shop", lambda q: q["account"]["type"] == "personal" and _binds_here(q) >= 2),
    ("upgrade trial for this shop", lambda q: q["account"].get("upgrade", {}).get("state") == "trial"
     and q["account"]["upgrade"]["shop_id"] == q["shop"]["id"]),
    ("upgrade trial for another shop", lambda q: q["account"].get("upgrade", {}).get("state") == "trial"
     and q["account"]["upgrade"]["shop_id"] not in (None, q["shop"]["id"])),
    ("upgrade trial, shop_id null", lambda q: q["account"].get("upgrade", {}).get("state") == "trial"
     and q["account"]["upgrade"]["shop_id"] is None),
    ("no upgrade (field absent)", lambda q: "upgrade" not in q["account"]),
    ("upgrade state none, no shop_id field", lambda q: q["account"].get("upgrade", {}).get("state") == "none"
     and "shop_id" not in q["account"]["upgrade"]),
    ("upgrade upgraded or cancelled", lambda q: q["account"].get("upgrade", {}).get("state")
     in ("upgraded", "cancelled")),
]


def coverage_problems(corpus: list[dict[str, Any]], fired: list[set[str]], rule_ids: list[str]) -> list[str]:
    """Edges no request sits on, and rules never seen firing (or never seen passing)."""
    problems = [f"no request for edge: {label}" for label, test in EDGES if not any(test(q) for q in corpus)]
    for rule in rule_ids:
        if not any(rule in f for f in fired):
            problems.append(f"rule {rule} never fires")
        if all(rule in f for f in fired):
            problems.append(f"rule {rule} always fires")
    if not any(not f for f in fired):
        problems.append("no request is allowed")
    if not any(f == {rule} for f in fired for rule in rule_ids):
        problems.append("no request fires a single rule")
    return problems

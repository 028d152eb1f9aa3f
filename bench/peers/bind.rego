# Policy v2's rules for binding an account as a shop's OFFICIAL account, in Rego (OPA),
# for the peer benchmark (bench/peers/run.py), evaluated by rego-cpp through regopy.
#
# Same reading as policies/v1/bind.yaml and policies/v2/bind.yaml, rule by rule; the rule
# ids are bindpolicy's. `deny` is the set of ids that fire. The thresholds come from
# data.params, which run.py loads from policy v2's parameters (policies/v1/version.yaml).
#
# Differences in kind from CEL, none of which changes a result on a complete request:
# - a missing field makes a Rego body undefined (the rule does not fire); in bindpolicy it
#   is a RequestError before evaluation. The corpus only holds complete requests.
# - `||` is written as several bodies of the same rule (Rego's OR).
# - no timestamps are read by these rules, so rego-cpp's rejection of the `Z` suffix in
#   time.parse_rfc3339_ns does not matter here: the request goes in unchanged.
package bind

import rego.v1

params := data.params

shop := input.shop

account := input.account

official_bind if {
	input.action == "bind"
	input.role == "official"
}

bind if input.action == "bind"

personal if account.type == "personal"

organization if account.type == "organization"

deny contains "official.single" if {
	official_bind
	shop.official_account != null
}

# account.created_by_shop == null || account.created_by_shop != shop.id
# (null != shop.id holds in Rego too, so one body covers both sides of the ||)
deny contains "official.org.created-by-shop" if {
	official_bind
	organization
	account.created_by_shop != shop.id
}

deny contains "official.org.name-matches-shop" if {
	official_bind
	organization
	account.name != shop.name
}

# count() of a string counts code points, as CEL's size() does.
deny contains "official.org.name-length" if {
	official_bind
	organization
	count(account.name) >= params.name_length_limit
}

deny contains "org.rebind-limit" if {
	bind
	organization
	here := [h | some h in account.bind_history; h.shop_id == shop.id]
	count(here) >= params.org_bind_limit
}

deny contains "bind.already-bound" if {
	bind
	shop.official_account != null
	shop.official_account.account_id == account.id
}

deny contains "bind.already-bound" if {
	bind
	some c in shop.channel_accounts
	c.account_id == account.id
}

deny contains "personal.min-age" if {
	bind
	personal
	account.age < params.min_age
}

deny contains "personal.location" if {
	bind
	personal
	account.location != shop.market
}

deny contains "personal.no-revocation" if {
	bind
	personal
	account.ecommerce_revoked == true
}

deny contains "personal.no-revoked-association" if {
	bind
	personal
	account.linked_to_revoked == true
}

deny contains "personal.policy-compliance" if {
	bind
	personal
	account.policy_compliant == false
}

# v2: US shops are exempt from personal ID verification ...
deny contains "personal.kyc" if {
	bind
	personal
	shop.market != "US"
	account.kyc.verified == false
}

# ... and from the follower minimum.
deny contains "personal.min-followers" if {
	bind
	personal
	shop.market != "US"
	account.followers < params.min_followers
}

# has(account.upgrade) && account.upgrade.state == "trial"
#   && (action == "enable_affiliate" || !has(account.upgrade.shop_id) || account.upgrade.shop_id != shop.id)
# An absent upgrade leaves account.upgrade.state undefined: the rule does not fire, as the has() guard.
deny contains "upgrade.trial-no-ecommerce" if {
	account.upgrade.state == "trial"
	input.action == "enable_affiliate"
}

deny contains "upgrade.trial-no-ecommerce" if {
	bind
	account.upgrade.state == "trial"
	not "shop_id" in object.keys(account.upgrade)
}

deny contains "upgrade.trial-no-ecommerce" if {
	bind
	account.upgrade.state == "trial"
	account.upgrade.shop_id != shop.id
}

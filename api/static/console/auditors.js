// The auditors' views: the decision log, one decision and its replay, the chain, comparing versions.

import { ApiError, api, badge, clear, errorBox, field, h, jsonBlock, loading, select, setToken, table, token } from "./dom.js";
import { t } from "./i18n.js";
import { renderDiff, renderImpact } from "./report.js";

const ACTIONS = ["bind", "unbind", "create_org_account", "upgrade_start", "upgrade_confirm", "upgrade_cancel",
  "enable_affiliate", "login"];
const FILTERS = ["since", "until", "action", "decision", "rule_id", "shop_id", "account_id", "outcome", "limit"];

// The token is asked for once and kept for this tab (sessionStorage); a refusal asks again.
function tokenForm(onSaved, refused = false) {
  const input = h("input", { type: "password", id: "token", autocomplete: "off" });
  const save = h("button", { type: "submit", class: "primary" }, t("token.save"));
  const form = h("form", { class: "token-form", id: "token-form" },
    h("p", {}, t("token.needed")),
    refused ? h("p", { class: "error", role: "alert" }, t("token.refused")) : null,
    field(t("token.label"), input), save);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    onSaved();
  });
  return form;
}

// The view on screen, drawn again through the router (which marks it as loading meanwhile).
const redraw = () => window.dispatchEvent(new HashChangeEvent("hashchange"));

// Run an auditor's view; without a token, or with one refused, show the token form instead.
async function guarded(main, title, build) {
  const retry = redraw;
  if (!token()) {
    clear(main, h("h1", {}, title), tokenForm(retry));
    return;
  }
  try {
    await build();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setToken("");
      clear(main, h("h1", {}, title), tokenForm(retry, true));
    } else {
      throw error;
    }
  }
}

function forgetButton() {
  const button = h("button", { type: "button", class: "quiet" }, t("token.forget"));
  button.addEventListener("click", () => { setToken(""); redraw(); });
  return h("p", { class: "muted token-state" }, t("token.set"), " ", button);
}

// --- the log, filtered and paged -------------------------------------------------------------------

export function logView(main, query) {
  const params = new URLSearchParams(query || "");
  return guarded(main, t("log.title"), async () => {
    clear(main, h("h1", {}, t("log.title")), loading());
    const search = new URLSearchParams();
    for (const name of [...FILTERS, "after"]) if (params.get(name)) search.set(name, params.get(name));
    if (!search.get("limit")) search.set("limit", "20");
    const page = await api(`/v1/decisions?${search}`);
    const any = [["", t("log.any")]];
    const controls = {
      since: h("input", { type: "text", placeholder: "2025-06-01T00:00:00Z" }),
      until: h("input", { type: "text", placeholder: "2025-07-01T00:00:00Z" }),
      action: select([...any, ...ACTIONS.map((a) => [a, a])], ""),
      decision: select([...any, ["allow", t("decision.allow")], ["deny", t("decision.deny")]], ""),
      rule_id: h("input", { type: "text" }),
      shop_id: h("input", { type: "text" }),
      account_id: h("input", { type: "text" }),
      outcome: select([...any, ["decided", "decided"], ["rejected", "rejected"], ["failed", "failed"]], ""),
      limit: select([["20", "20"], ["50", "50"], ["100", "100"]], "20"),
    };
    const labels = { since: "log.since", until: "log.until", action: "log.action", decision: "log.decision",
      rule_id: "log.rule", shop_id: "log.shop", account_id: "log.account", outcome: "log.outcome", limit: "log.limit" };
    for (const [name, control] of Object.entries(controls)) {
      control.id = `filter-${name}`;
      control.value = params.get(name) || (name === "limit" ? "20" : "");
    }
    const form = h("form", { class: "filters", id: "log-filters" },
      h("fieldset", {}, h("legend", {}, t("log.filters")),
        Object.entries(controls).map(([name, control]) => field(t(labels[name]), control)),
        h("button", { type: "submit", class: "primary" }, t("log.search"))));
    const link = (after) => {
      const next = new URLSearchParams();
      for (const name of FILTERS) if (controls[name].value) next.set(name, controls[name].value);
      if (after) next.set("after", after);
      return `#/log?${next}`;
    };
    form.addEventListener("submit", (event) => { event.preventDefault(); location.hash = link(""); });
    const rows = page.records.map((r) => h("tr", {},
      h("td", { class: "num" }, String(r.seq)), h("td", {}, r.logged_at),
      h("td", {}, h("a", { href: `#/decision/${r.decision_id}` }, h("code", {}, r.decision_id))),
      h("td", {}, r.action || "—"), h("td", {}, r.decision ? badge(r.decision) : r.outcome),
      h("td", {}, r.rule_id ? h("code", {}, r.rule_id) : "—")));
    clear(main, h("h1", {}, t("log.title")), forgetButton(), form,
      rows.length ? table(null, [t("log.seq"), t("log.at"), t("log.id"), t("log.action"), t("log.decision"), t("col.id")],
        rows, { id: "log-table" }) : h("p", { class: "muted" }, t("log.empty")),
      h("nav", { class: "pager", "aria-label": t("log.title") },
        params.get("after") ? h("a", { href: link("") }, t("log.first")) : null,
        page.next !== null ? h("a", { href: link(String(page.next)), id: "next-page" }, t("log.next")) : null));
  });
}

// --- one decision, and its replay ---------------------------------------------------------------------

export function decisionView(main, id) {
  return guarded(main, t("decision.title"), async () => {
    clear(main, h("h1", {}, t("decision.title")), loading());
    const { record } = await api(`/v1/decisions/${encodeURIComponent(id)}`);
    const response = record.response || {};
    const outcome = h("div", { id: "replay-result", "aria-live": "polite" });
    const replay = h("button", { type: "button", id: "replay", class: "primary" }, t("decision.replay"));
    replay.addEventListener("click", async () => {
      clear(outcome, loading());
      try {
        const answer = await api(`/v1/decisions/${encodeURIComponent(id)}/replay`, { method: "POST", body: {} });
        const kind = answer.status === "reproduced" ? "ok" : "bad";
        const words = answer.status === "reproduced" ? t("replay.reproduced")
          : answer.status === "different" ? t("replay.different", { m: answer.message })
            : t("replay.cannot", { m: answer.message });
        clear(outcome, h("p", { class: `replay ${kind}` }, words),
          answer.differences.length ? table(null, [t("replay.path"), t("replay.logged"), t("replay.replayed")],
            answer.differences.map((d) => h("tr", {}, h("td", {}, h("code", {}, d.path)),
              h("td", {}, h("code", {}, JSON.stringify(d.logged))), h("td", {}, h("code", {}, JSON.stringify(d.replayed))))))
            : null);
      } catch (error) {
        clear(outcome, errorBox(error));
      }
    });
    clear(main, h("h1", {}, t("decision.title"), " ", record.decision ? badge(record.decision) : record.outcome),
      h("dl", { class: "facts" },
        h("dt", {}, t("log.id")), h("dd", {}, h("code", {}, record.decision_id)),
        h("dt", {}, t("log.at")), h("dd", {}, record.logged_at),
        h("dt", {}, t("result.rule")), h("dd", {}, record.rule_id ? h("code", {}, record.rule_id) : "—"),
        h("dt", {}, t("decision.version")), h("dd", {}, record.policy_version || "—"),
        h("dt", {}, t("decision.digest")), h("dd", {}, h("code", { class: "digest" }, record.policy_digest || "—")),
        h("dt", {}, t("decision.runtime")), h("dd", {}, record.runtime || "—"),
        h("dt", {}, t("decision.status")), h("dd", {}, String(record.status)),
        h("dt", {}, t("decision.duration")), h("dd", {}, `${record.duration_us} µs`)),
      h("h2", {}, t("decision.chain")),
      h("dl", { class: "facts" },
        h("dt", {}, t("log.seq")), h("dd", {}, String(record.seq)),
        h("dt", {}, t("decision.prev")), h("dd", {}, h("code", { class: "digest" }, record.prev_hash)),
        h("dt", {}, t("decision.hash")), h("dd", {}, h("code", { class: "digest" }, record.hash))),
      h("p", {}, replay), outcome,
      h("div", { class: "columns" },
        h("div", { class: "column" }, h("h2", {}, t("decision.request")), jsonBlock(record.request, t("decision.request"))),
        h("div", { class: "column" }, h("h2", {}, t("decision.response")), jsonBlock(response, t("decision.response")))));
  });
}

// --- the chain ---------------------------------------------------------------------------------------

export function chainView(main, query) {
  const params = new URLSearchParams(query || "");
  return guarded(main, t("chain.title"), async () => {
    clear(main, h("h1", {}, t("chain.title")), loading());
    const recent = params.get("recent") || "1000";
    const chain = await api(`/v1/log/chain?recent=${encodeURIComponent(recent)}`);
    const input = h("input", { type: "number", min: "1", max: "100000", value: recent, id: "chain-recent" });
    const form = h("form", { class: "inline" }, field(t("chain.recent"), input),
      h("button", { type: "submit", class: "primary" }, t("chain.verify")));
    form.addEventListener("submit", (event) => { event.preventDefault(); location.hash = `#/chain?recent=${input.value}`; });
    const verdict = chain.checked.records === 0 ? h("p", { class: "muted" }, t("chain.empty"))
      : chain.intact ? h("p", { class: "ok", id: "chain-verdict" }, t("chain.intact",
        { a: chain.checked.from_seq, b: chain.checked.to_seq, n: chain.checked.records }))
        : h("p", { class: "bad", id: "chain-verdict", role: "alert" }, t("chain.broken", chain.breach ? {
          s: chain.breach.seq, p: chain.breach.problem } : {}));
    clear(main, h("h1", {}, t("chain.title")), forgetButton(), form, verdict,
      chain.at_start ? h("p", { class: "bad" }, t("chain.at_start", { s: chain.at_start.seq, p: chain.at_start.problem })) : null,
      h("h2", {}, t("chain.head")),
      h("dl", { class: "facts" }, h("dt", {}, t("log.seq")), h("dd", {}, String(chain.head.seq)),
        h("dt", {}, t("decision.hash")), h("dd", {}, h("code", { class: "digest", id: "chain-head" }, chain.head.hash))),
      h("p", { class: "muted" }, t("chain.note")));
  });
}

// --- two versions: diff and impact -----------------------------------------------------------------

export async function compareView(main, target) {
  clear(main, h("h1", {}, t("compare.title")), loading());
  const list = await api("/v1/policies");
  const names = list.versions.map((v) => v.version);
  let [old, neu] = (target || "").split("/");
  const at = names.indexOf(list.in_force);
  neu = names.includes(neu) ? neu : list.in_force || names.at(-1);
  old = names.includes(old) ? old : names[Math.max(0, (at > 0 ? at : names.length) - 1)];
  const oldPick = select(names.map((n) => [n, n]), old, { id: "compare-old" });
  const newPick = select(names.map((n) => [n, n]), neu, { id: "compare-new" });
  const form = h("form", { class: "inline" }, field(t("compare.old"), oldPick), field(t("compare.new"), newPick),
    h("button", { type: "submit", class: "primary" }, t("compare.go")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/compare/${oldPick.value}/${newPick.value}`;
  });
  const out = h("div", {}, loading());
  clear(main, h("h1", {}, t("compare.title")), form, out);
  try {
    const [diff, impact] = await Promise.all([
      api(`/v1/policies/${encodeURIComponent(old)}/diff/${encodeURIComponent(neu)}`),
      api(`/v1/policies/${encodeURIComponent(old)}/impact/${encodeURIComponent(neu)}`)]);
    clear(out, renderDiff(diff), renderImpact(impact));
  } catch (error) {
    clear(out, errorBox(error));
  }
}

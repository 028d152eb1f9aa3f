// Diffs, impact reports and decisions as the views show them (shared by authors and auditors).

import { h, jsonBlock, sourceLink, table, badge } from "./dom.js";
import { pickMessage, t } from "./i18n.js";

const text = (value) => (value === null || value === undefined ? "—"
  : typeof value === "string" ? value : JSON.stringify(value));

// One version's semantic diff. `oldLink`/`newLink` turn a file:line into a link.
export function renderDiff(diff, { oldLink = sourceLink, newLink = sourceLink, oldLabel = "", newLabel = "" } = {}) {
  const parts = [];
  const changes = (rows) => table(null, [t("col.field"), t("col.before"), t("col.after")],
    rows.map((c) => h("tr", {}, h("td", {}, c.field ?? c.name), h("td", {}, h("code", {}, text(c.old))),
      h("td", {}, h("code", {}, text(c.new))))), { class: "changes" });
  if (diff.metadata.length) parts.push(h("h4", {}, t("diff.meta")), changes(diff.metadata));
  if (diff.parameters.length) parts.push(h("h4", {}, t("diff.params")), changes(diff.parameters));
  for (const kind of ["rules", "outputs"]) {
    const { added, removed, changed } = diff[kind];
    if (!added.length && !removed.length && !changed.length) continue;
    const items = [
      ...added.map((e) => h("li", { class: "added" }, h("span", { class: "tag added" }, t("diff.added")), " ",
        h("code", {}, e.id), " ", newLink(e.source))),
      ...removed.map((e) => h("li", { class: "removed" }, h("span", { class: "tag removed" }, t("diff.removed")), " ",
        h("code", {}, e.id), " ", oldLink(e.source))),
      ...changed.map((c) => h("li", { class: "changed" }, h("span", { class: "tag changed" }, t("diff.changed")), " ",
        h("code", {}, c.id), " ", oldLink(c.old_source), " → ", newLink(c.new_source), changes(c.changes))),
    ];
    parts.push(h("h4", {}, t(`diff.${kind}`)), h("ul", { class: "diff" }, items));
  }
  if (!parts.length) parts.push(h("p", { class: "muted" }, t("diff.none")));
  const proof = diff.what_can_change;
  if (proof) {  // proved over every request the contract accepts (the prover), not only the corpus
    parts.push(h("h4", {}, t("diff.proof")),
      h("dl", { class: "facts proof" },
        h("dt", {}, "allow→deny"), h("dd", {}, String(proof.allow_to_deny)),
        h("dt", {}, "deny→allow"), h("dd", {}, String(proof.deny_to_allow)),
        proof.condition ? [h("dt", {}, t("diff.proof.condition")),
          h("dd", {}, h("pre", { class: "json" }, text(proof.condition)))] : null,
        proof.unknown_because ? [h("dt", {}, t("diff.proof.unknown")), h("dd", {}, text(proof.unknown_because))] : null),
      proof.witnesses && Object.keys(proof.witnesses).length
        ? h("details", {}, h("summary", {}, t("diff.proof.witnesses")), jsonBlock(proof.witnesses)) : null);
  }
  return h("section", { class: "diff-version" },
    h("h3", {}, t("diff.version", { o: `${diff.old.version}${oldLabel}`, n: `${diff.new.version}${newLabel}` })), parts);
}

export function renderImpact(impact) {
  const flips = Object.entries(impact.flips);
  return h("section", { class: "impact" },
    h("h3", {}, t("impact.title")),
    h("p", {}, t("impact.summary", { t: impact.requests, d: impact.decided, s: impact.unchanged, r: impact.rejected })),
    h("p", {}, `${t("impact.flips")}: `, flips.map(([k, v], i) => [i ? ", " : "", `${k}: ${v}`])),
    impact.groups.length
      ? table(null, [t("col.change"), t("col.id"), t("col.count")], impact.groups.map((g) => h("tr", {},
        h("td", {}, g.kind), h("td", {}, h("code", {}, g.rule)), h("td", { class: "num" }, String(g.count)))))
      : h("p", { class: "muted" }, t("impact.noflip")),
    impact.groups.map((g) => h("details", {}, h("summary", {}, `${t("impact.examples")}: ${g.kind} ${g.rule}`),
      g.examples.map((x) => jsonBlock(x)))));
}

function finding(f) {
  return h("li", {}, h("code", {}, f.id), " — ", pickMessage(f), " ", sourceLink(f.source));
}

// A decision response: the outcome, its deciding rule, violations, warnings, outputs and the trace.
export function renderDecision(d, { link = sourceLink } = {}) {
  return h("section", { class: "decision", "aria-live": "polite" },
    h("h3", {}, t("result.title"), " ", badge(d.decision)),
    h("dl", { class: "facts" },
      h("dt", {}, t("result.rule")),
      h("dd", { class: "deciding-rule" }, d.rule ? [h("code", {}, d.rule.id), " — ", pickMessage(d.rule), " ",
        link(d.rule.source)] : t("result.allowed")),
      h("dt", {}, t("result.policy")),
      h("dd", {}, `${d.policy.version} · ${d.policy.runtime} · `, h("code", { class: "digest" }, d.policy.digest)),
      d.decision_id ? [h("dt", {}, t("result.id")), h("dd", {}, h("code", {}, d.decision_id))] : null),
    h("h4", {}, `${t("result.violations")} (${d.violations.length})`),
    d.violations.length ? h("ul", { class: "violations" }, d.violations.map(finding)) : h("p", { class: "muted" }, t("none")),
    h("h4", {}, `${t("result.warnings")} (${d.warnings.length})`),
    d.warnings.length ? h("ul", { class: "warnings" }, d.warnings.map(finding)) : h("p", { class: "muted" }, t("none")),
    Object.keys(d.outputs).length ? [h("h4", {}, t("result.outputs")),
      table(null, [t("col.name"), t("col.value")], Object.entries(d.outputs).map(([k, v]) =>
        h("tr", {}, h("td", {}, h("code", {}, k)), h("td", {}, h("code", {}, text(v))))))] : null,
    d.explain ? [h("h4", {}, t("result.explain")),
      table(null, [t("col.id"), t("col.effect"), t("col.outcome"), t("col.read"), t("col.where")],
        d.explain.map((r) => h("tr", { class: `outcome-${r.outcome}` },
          h("td", {}, h("code", {}, r.id)), h("td", {}, r.effect), h("td", {}, r.outcome, r.error ? `: ${r.error}` : ""),
          h("td", {}, Object.keys(r.values).length ? h("code", {}, Object.entries(r.values)
            .map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join(", ")) : "—"),
          h("td", {}, link(r.source)))), { class: "explain" })] : null);
}

// The authors' views: versions, trying a request, editing a scratch copy, a file's source.

import {
  EditorState, EditorView, keymap, lineNumbers, highlightActiveLine, highlightActiveLineGutter, drawSelection,
  defaultKeymap, history, historyKeymap, indentWithTab, syntaxHighlighting, defaultHighlightStyle, indentOnInput,
  yaml, linter, lintGutter, forceLinting,
} from "./vendor/editor.js";
import { api, clear, errorBox, field, h, jsonBlock, loading, select, sourceLink, table } from "./dom.js";
import { pickMessage, t } from "./i18n.js";
import { renderDecision, renderDiff, renderImpact } from "./report.js";

// --- what the page keeps between views (in memory only) -------------------------------------------

const state = {
  sources: null, // the files of the set in force, by path
  scratch: null, // the scratch copy: {path: text}
  editors: new Map(), // path -> EditorState (each file keeps its undo history)
  current: null, // the path in the editor
  problems: [], // the last check's problems
  scratchEnabled: null,
  request: null, // the request being tried (raw JSON text)
};

async function sources() {
  if (!state.sources) state.sources = (await api("/v1/sources")).files;
  return state.sources;
}

async function scratchEnabled() {
  if (state.scratchEnabled === null) state.scratchEnabled = (await api("/v1/scratch")).enabled;
  return state.scratchEnabled;
}

// --- versions ------------------------------------------------------------------------------------------

export async function versionsView(main, name) {
  clear(main, h("h1", {}, t("versions.title")), loading());
  const list = await api("/v1/policies");
  const chosen = name || list.in_force || list.versions[0]?.version;
  const picker = select(list.versions.map((v) => [v.version, `${v.version}${v.in_force ? ` (${t("versions.in_force")})` : ""}`]),
    chosen, { id: "version-pick" });
  picker.addEventListener("change", () => { location.hash = `#/versions/${picker.value}`; });
  const body = h("div", {}, loading());
  clear(main, h("h1", {}, t("versions.title")), field(t("versions.pick"), picker), body);
  const version = await api(`/v1/policies/${encodeURIComponent(chosen)}`);
  const parent = version.extends ? await api(`/v1/policies/${encodeURIComponent(version.extends)}`) : null;
  const parentIds = new Set((parent?.rules || []).map((r) => r.id));
  const parentOutputs = new Set((parent?.outputs || []).map((o) => o.name));
  const origin = (definedIn, id, ids) => definedIn !== version.version
    ? h("span", { class: "tag inherited" }, t("origin.inherited", { p: definedIn }))
    : ids.has(id) ? h("span", { class: "tag override" }, t("origin.override", { p: version.extends }))
      : h("span", { class: "tag own" }, t("origin.own", { v: version.version }));
  const conditions = (r) => h("div", { class: "conditions" },
    r.applies_when ? h("div", {}, h("span", { class: "muted" }, `${t("cond.applies")}: `), h("code", {}, r.applies_when))
      : h("div", { class: "muted" }, t("cond.always")),
    h("div", {}, h("span", { class: "muted" }, `${t(r.fires_when !== undefined ? "cond.fires" : "col.value")}: `),
      h("code", {}, r.fires_when ?? r.value)));
  clear(body,
    h("dl", { class: "facts" },
      h("dt", {}, t("versions.effective")), h("dd", {}, version.effective_from,
        version.in_force ? [" ", h("span", { class: "tag own" }, t("versions.in_force"))] : null),
      h("dt", {}, t("versions.extends")), h("dd", {}, version.extends || t("none")),
      h("dt", {}, t("versions.digest")), h("dd", {}, h("code", { class: "digest" }, version.digest)),
      h("dt", {}, t("versions.files")), h("dd", {}, version.files.map((f, i) => [i ? ", " : "", sourceLink(`${f}:1`)]))),
    h("p", {}, version.description),
    h("h2", {}, t("versions.parameters")),
    table(null, [t("col.name"), t("col.value")], Object.entries(version.parameters).map(([k, v]) =>
      h("tr", {}, h("td", {}, h("code", {}, k)), h("td", {}, h("code", {}, JSON.stringify(v)))))),
    h("h2", {}, `${t("versions.rules")} (${version.rules.length})`),
    table(null, [t("col.id"), t("col.effect"), t("col.actions"), t("col.conditions"), t("col.message"),
      t("col.where"), t("col.section"), t("col.origin")],
    version.rules.map((r) => h("tr", { id: `rule-${r.id}` },
      h("td", {}, h("code", {}, r.id)), h("td", {}, h("span", { class: `effect ${r.effect}` }, r.effect)),
      h("td", {}, r.actions.join(", "), r.roles ? h("div", { class: "muted" }, r.roles.join(", ")) : null),
      h("td", {}, conditions(r)), h("td", { class: "message" }, bothMessages(r)),
      h("td", {}, sourceLink(r.location)), h("td", { class: "section" }, r.source),
      h("td", {}, origin(r.defined_in, r.id, parentIds)))), { class: "rules" }),
    h("h2", {}, `${t("versions.outputs")} (${version.outputs.length})`),
    table(null, [t("col.name"), t("col.actions"), t("col.conditions"), t("col.section"), t("col.origin")],
      version.outputs.map((o) => h("tr", {},
        h("td", {}, h("code", {}, o.name)), h("td", {}, o.actions.join(", ")), h("td", {}, conditions(o)),
        h("td", { class: "section" }, o.source), h("td", {}, origin(o.defined_in, o.name, parentOutputs))))));
}

// A rule's message in the chosen language, and beneath it the other language's where there is one.
function bothMessages(rule) {
  const chosen = pickMessage(rule);
  const other = Object.entries(rule.messages || {}).find(([lang, text]) => text && text !== chosen);
  return [h("div", {}, chosen),
    other ? h("div", { class: "muted other-language", lang: other[0] === "zh" ? "zh-CN" : other[0] }, other[1]) : null];
}

// --- a form from the request schema ------------------------------------------------------------------

function resolve(schema, root) {
  while (schema && schema.$ref) schema = root.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
}

// Leaves: enums become selects, strings and numbers inputs, booleans a yes/no select; lists and
// either-or fields (null or an object) a small JSON box. Empty leaves are left out of the request.
function buildForm(schema, root, path, leaves) {
  const fields = [];
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const sub = resolve(raw, root);
    const at = [...path, name];
    const label = at.join(".");
    const required = (schema.required || []).includes(name);
    let control;
    let kind;
    if (sub.type === "object" && sub.properties) {
      fields.push(h("fieldset", { class: "group" }, h("legend", {}, name), buildForm(sub, root, at, leaves)));
      continue;
    } else if (sub.enum) {
      control = select([["", "—"], ...sub.enum.map((v) => [String(v), String(v)])], "");
      kind = "enum";
    } else if (sub.type === "boolean") {
      control = select([["", "—"], ["true", "true"], ["false", "false"]], "");
      kind = "boolean";
    } else if (sub.type === "integer" || sub.type === "number") {
      control = h("input", { type: "number", step: sub.type === "integer" ? "1" : "any", inputmode: "decimal" });
      kind = sub.type;
    } else if (sub.type === "string") {
      control = h("input", { type: "text", placeholder: sub.format === "date-time" ? "2025-07-01T00:00:00Z" : null,
        autocomplete: "off", spellcheck: "false" });
      kind = "string";
    } else {
      control = h("textarea", { rows: "2", spellcheck: "false", placeholder: "JSON" });
      kind = "json";
    }
    control.dataset.path = label;
    leaves.push({ path: at, kind, control });
    fields.push(field(`${label}${required ? " *" : ""}`, control));
  }
  return fields;
}

function collect(leaves) {
  const out = {};
  for (const { path, kind, control } of leaves) {
    const raw = control.value;
    if (raw === "") continue;
    let value = raw;
    if (kind === "boolean") value = raw === "true";
    else if (kind === "integer" || kind === "number") value = Number(raw);
    else if (kind === "json") {
      try { value = JSON.parse(raw); } catch { value = raw; }
    }
    let target = out;
    for (const part of path.slice(0, -1)) target = target[part] ??= {};
    target[path.at(-1)] = value;
  }
  return out;
}

function fill(leaves, request) {
  for (const { path, kind, control } of leaves) {
    let value = request;
    for (const part of path) value = value && typeof value === "object" ? value[part] : undefined;
    control.value = value === undefined ? "" : kind === "json" ? JSON.stringify(value) : String(value);
  }
}

// --- trying a request ----------------------------------------------------------------------------------

export async function tryView(main) {
  clear(main, h("h1", {}, t("try.title")), loading());
  const [openapi, examples, canScratch] = await Promise.all([api("/openapi.json"), api("/v1/examples"),
    scratchEnabled()]);
  const leaves = [];
  const form = h("div", { class: "request-form", id: "request-form" },
    h("p", { class: "muted" }, t("try.empty")),
    buildForm(resolve(openapi.components.schemas.DecisionRequest, openapi), openapi, [], leaves));
  const raw = h("textarea", { id: "request-json", rows: "22", spellcheck: "false", class: "code" });
  const result = h("div", { id: "result" });
  const exampleList = examples.examples;
  const picker = select([["", t("try.example.none")], ...exampleList.map((e, i) => [String(i), e.label])], "",
    { id: "example-pick" });
  const against = select([["force", t("try.against.force")],
    ...(canScratch && state.scratch ? [["scratch", t("try.against.scratch")]] : [])], "force", { id: "against" });
  const setRequest = (request) => {
    raw.value = JSON.stringify(request, null, 2);
    fill(leaves, request);
    state.request = raw.value;
  };
  picker.addEventListener("change", () => {
    if (picker.value !== "") setRequest(exampleList[Number(picker.value)].request);
  });
  form.addEventListener("input", () => { raw.value = JSON.stringify(collect(leaves), null, 2); state.request = raw.value; });
  form.addEventListener("change", () => { raw.value = JSON.stringify(collect(leaves), null, 2); state.request = raw.value; });
  raw.addEventListener("input", () => {
    state.request = raw.value;
    try { fill(leaves, JSON.parse(raw.value)); } catch { /* the form follows once the JSON parses */ }
  });
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const panels = { form, raw: h("div", {}, field(t("try.raw.label"), raw)) };
  for (const [key, label] of [["raw", t("try.raw")], ["form", t("try.form")]]) {
    const tab = h("button", { type: "button", role: "tab", id: `tab-${key}`, "aria-controls": `panel-${key}` }, label);
    tab.addEventListener("click", () => {
      for (const b of tabs.children) b.setAttribute("aria-selected", String(b === tab));
      for (const [k, p] of Object.entries(panels)) p.hidden = k !== key;
    });
    tabs.append(tab);
    panels[key].id = `panel-${key}`;
    panels[key].setAttribute("role", "tabpanel");
    panels[key].setAttribute("aria-labelledby", `tab-${key}`);
  }
  const decide = h("button", { type: "button", id: "decide", class: "primary" }, t("try.decide"));
  decide.addEventListener("click", async () => {
    let request;
    try {
      request = JSON.parse(raw.value);
    } catch (error) {
      clear(result, h("div", { class: "error", role: "alert" }, t("try.badjson", { e: error.message })));
      return;
    }
    clear(result, loading());
    try {
      const answer = against.value === "scratch"
        ? await api("/v1/scratch/decisions?explain=true", { method: "POST", body: { files: state.scratch, request } })
        : await api("/v1/decisions?explain=true", { method: "POST", body: request });
      clear(result, renderDecision(answer, against.value === "scratch"
        ? { link: (w) => sourceLink(w, "#/edit/") } : {}));
    } catch (error) {
      clear(result, errorBox(error));
    }
  });
  clear(main, h("h1", {}, t("try.title")),
    h("div", { class: "columns" },
      h("div", { class: "column" }, field(t("try.example"), picker), field(t("try.against"), against), tabs,
        panels.raw, panels.form, h("p", {}, decide)),
      h("div", { class: "column" }, result)));
  tabs.firstChild.click();
  if (state.request) {
    raw.value = state.request;
    try { fill(leaves, JSON.parse(raw.value)); } catch { /* kept as typed */ }
  } else if (exampleList.length) {  // a denied one first: it shows a deciding rule
    const first = Math.max(0, exampleList.findIndex((e) => e.label.endsWith(": deny")));
    picker.value = String(first);
    setRequest(exampleList[first].request);
  }
}

// --- editing a scratch copy -------------------------------------------------------------------------

// CodeMirror writes its styles into a <style> element, which the CSP refuses, unless it lives in
// a shadow root: there it uses constructed style sheets, which need no inline style.
function editorRoot(host) {
  const shadow = host.attachShadow({ mode: "open" });
  const parent = document.createElement("div");
  parent.className = "editor-root";
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "editor.css";
  shadow.append(link, parent);
  return { parent, root: shadow };
}

function positionOf(doc, line, column) {
  const at = doc.line(Math.min(Math.max(line || 1, 1), doc.lines));
  return Math.min(at.from + Math.max((column || 1) - 1, 0), at.to);
}

async function checkScratch() {
  const answer = await api("/v1/scratch/check", { method: "POST", body: { files: state.scratch } });
  state.problems = answer.problems;
  return answer;
}

export async function editView(main, target) {
  clear(main, h("h1", {}, t("edit.title")), loading());
  if (!(await scratchEnabled())) {
    clear(main, h("h1", {}, t("edit.title")), h("p", { class: "notice", role: "status" }, t("edit.off")));
    return;
  }
  const files = await sources();
  if (!state.scratch) state.scratch = { ...files };
  state.editors.clear(); // editor states hold this render's linter: never reuse them across renders
  const [wantedFile, wantedLine] = (target || "").split(/:(?=\d+$)/);
  if (wantedFile && state.scratch[wantedFile] !== undefined) state.current = wantedFile;
  state.current ??= Object.keys(state.scratch).find((f) => f.endsWith("/bind.yaml")) || Object.keys(state.scratch)[0];

  const status = h("p", { id: "scratch-status", role: "status", class: "muted" }, t("edit.status.checking"));
  const problemList = h("ul", { id: "problems", class: "problems" });
  const fileList = h("ul", { class: "files", id: "file-list" });
  const output = h("div", { id: "scratch-output" });
  const editorLabel = h("p", { id: "editor-label", class: "muted" });
  const host = h("div", { class: "editor", id: "editor" });

  const showProblems = (answer) => {
    status.textContent = answer.ok ? t("edit.status.ok", { n: answer.versions.length })
      : t("edit.status.bad", { n: answer.problems.length });
    status.className = answer.ok ? "ok" : "bad";
    clear(problemList, answer.problems.length ? [] : h("li", { class: "muted" }, t("none")), answer.problems.map((p) => h("li", {},
      h("a", { href: `#/edit/${p.file}:${p.line}`, class: "where" }, `${p.file}:${p.line}:${p.column}`), " ", p.message,
      " ", h("span", { class: "muted" }, `[${p.code}]`))));
    for (const item of fileList.children) {
      const name = item.dataset.file;
      const count = answer.problems.filter((p) => p.file === name).length;
      item.querySelector(".count").textContent = count ? String(count) : "";
    }
  };

  // The linter sends the whole copy (one file's change can break another's inheritance) and
  // marks this file's problems at their line and column.
  const scratchLinter = linter(async (view) => {
    state.scratch[state.current] = view.state.doc.toString();
    status.textContent = t("edit.status.checking");
    status.className = "muted";
    let answer;
    try {
      answer = await checkScratch();
    } catch (error) {
      clear(output, errorBox(error));
      return [];
    }
    showProblems(answer);
    const doc = view.state.doc;
    return answer.problems.filter((p) => p.file === state.current).map((p) => {
      const from = positionOf(doc, p.line, p.column);
      const rest = doc.sliceString(from, doc.lineAt(from).to);
      const word = /^[\w.]+/.exec(rest);
      return { from, to: Math.min(from + Math.max(word ? word[0].length : 1, 1), doc.length),
        severity: "error", message: `${p.message} [${p.code}]` };
    });
  }, { delay: 400 });

  const makeState = (name) => EditorState.create({
    doc: state.scratch[name],
    extensions: [lineNumbers(), highlightActiveLineGutter(), highlightActiveLine(), drawSelection(), history(),
      indentOnInput(), syntaxHighlighting(defaultHighlightStyle), yaml(), lintGutter(), scratchLinter,
      keymap.of([...defaultKeymap, ...historyKeymap, indentWithTab]),
      EditorView.contentAttributes.of({ "aria-label": t("edit.editor", { f: name }), tabindex: "0" }),
      EditorView.updateListener.of((update) => {
        if (update.docChanged) state.scratch[state.current] = update.state.doc.toString();
      })],
  });
  const view = new EditorView({ ...editorRoot(host), state: makeState(state.current) });
  const open = (name, line) => {
    if (name !== state.current) {
      state.editors.set(state.current, view.state);
      state.current = name;
      view.setState(state.editors.get(name) || makeState(name));
      forceLinting(view);
    }
    editorLabel.textContent = name;
    for (const item of fileList.children) item.classList.toggle("current", item.dataset.file === name);
    if (line) {
      const pos = positionOf(view.state.doc, Number(line), 1);
      view.dispatch({ selection: { anchor: pos }, effects: EditorView.scrollIntoView(pos, { y: "center" }) });
      view.focus();
    }
  };
  for (const name of Object.keys(state.scratch).sort()) {
    const button = h("button", { type: "button", class: "file" }, name);
    button.addEventListener("click", () => open(name));
    fileList.append(h("li", { "data-file": name }, button, " ", h("span", { class: "count" })));
  }
  const reset = h("button", { type: "button", id: "reset" }, t("edit.reset"));
  reset.addEventListener("click", () => {
    state.scratch = { ...files };
    state.editors.clear();
    view.setState(makeState(state.current));
    clear(output);
    forceLinting(view);
  });
  const runSuites = h("button", { type: "button", id: "run-suites" }, t("edit.suites"));
  runSuites.addEventListener("click", async () => {
    clear(output, loading());
    try {
      const report = await api("/v1/scratch/tests", { method: "POST", body: { files: state.scratch } });
      clear(output, renderSuites(report));
      output.scrollIntoView({ block: "start" });
    } catch (error) {
      clear(output, errorBox(error));
    }
  });
  const diff = h("button", { type: "button", id: "run-diff" }, t("edit.diff"));
  diff.addEventListener("click", async () => {
    clear(output, loading());
    try {
      const answer = await api("/v1/scratch/diff", { method: "POST", body: { files: state.scratch } });
      const links = { oldLink: (w) => sourceLink(w), newLink: (w) => sourceLink(w, "#/edit/"),
        oldLabel: ` (${t("versions.in_force")})`, newLabel: ` (${t("edit.scratch")})` };
      clear(output, h("h2", {}, t("diff.title")),
        answer.added.length ? h("p", {}, t("diff.versions_added", { v: answer.added.join(", ") })) : null,
        answer.removed.length ? h("p", {}, t("diff.versions_removed", { v: answer.removed.join(", ") })) : null,
        Object.values(answer.versions).map((d) => renderDiff(d, links)), renderImpact(answer.impact));
      output.scrollIntoView({ block: "start" });
    } catch (error) {
      clear(output, errorBox(error));
    }
  });
  clear(main, h("h1", {}, t("edit.title")), h("p", { class: "muted" }, t("edit.note")),
    h("div", { class: "toolbar" }, reset, runSuites, diff),
    h("div", { class: "workbench" },
      h("nav", { class: "file-nav", "aria-label": t("edit.files") }, h("h2", {}, t("edit.files")), fileList),
      h("div", { class: "editor-pane" }, editorLabel, host, status,
        h("h2", {}, t("edit.problems")), problemList)),
    output);
  open(state.current, wantedLine);
  forceLinting(view);
  liveEditor = { open, host };
}

let liveEditor = null;

// A link to another line while the editor is on screen moves the editor instead of rebuilding it.
export function editNavigate(target) {
  if (!liveEditor || !liveEditor.host.isConnected) return false;
  const [file, line] = (target || "").split(/:(?=\d+$)/);
  if (state.scratch?.[file] === undefined) return false;
  liveEditor.open(file, line);
  return true;
}

function renderSuites(report) {
  const failing = report.results.filter((r) => !r.passed);
  return h("section", { class: "suites" },
    h("h2", {}, t("suites.title")),
    h("p", { class: report.ok ? "ok" : "bad", id: "suite-summary" }, t("suites.summary", { p: report.passed, f: report.failed })),
    report.problems.length ? h("ul", { class: "problems" }, report.problems.map((p) =>
      h("li", {}, h("a", { href: `#/edit/${p.file}:${p.line}`, class: "where" }, `${p.file}:${p.line}`), " ", p.message))) : null,
    failing.length ? [h("h3", {}, t("suites.failures")), h("ul", { class: "failures" }, failing.map((r) =>
      h("li", {}, h("a", { href: `#/edit/${r.where}`, class: "where" }, r.where), " ", `${r.suite}: ${r.name}`,
        h("pre", { class: "json" }, r.failures.join("\n")))))] : h("p", {}, t("suites.allpass")),
    report.never_fired.length ? [h("h3", {}, t("suites.never_fired")), h("ul", {}, report.never_fired.map((r) =>
      h("li", {}, h("code", {}, r.id), " ", sourceLink(r.source, "#/edit/"))))] : null);
}

// --- a file of the set in force, at a line -------------------------------------------------------------

export async function sourceView(main, target) {
  clear(main, h("h1", {}, t("source.title")), loading());
  const [file, line] = (target || "").split(/:(?=\d+$)/);
  const files = await sources();
  if (files[file] === undefined) {
    clear(main, h("h1", {}, t("source.title")), h("p", { class: "error", role: "alert" }, t("source.missing", { f: file })));
    return;
  }
  const host = h("div", { class: "editor readonly", id: "source" });
  clear(main, h("h1", {}, `${t("source.title")}: `, h("code", {}, file)), host);
  const view = new EditorView({
    ...editorRoot(host),
    state: EditorState.create({
      doc: files[file],
      extensions: [lineNumbers(), highlightActiveLine(), highlightActiveLineGutter(), syntaxHighlighting(defaultHighlightStyle),
        yaml(), EditorState.readOnly.of(true),
        EditorView.contentAttributes.of({ "aria-label": `${t("source.title")}: ${file}`, tabindex: "0" })],
    }),
  });
  const pos = positionOf(view.state.doc, Number(line || 1), 1);
  view.dispatch({ selection: { anchor: pos }, effects: EditorView.scrollIntoView(pos, { y: "center" }) });
  view.focus();
}

export { jsonBlock };

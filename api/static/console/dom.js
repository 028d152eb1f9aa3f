// Small helpers shared by the views: building elements (never from HTML strings), calling the
// API, and the pieces every view shows (errors, JSON, links to a rule's source).

import { acceptLanguage, t } from "./i18n.js";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// --- the API ---------------------------------------------------------------------------------------

const TOKEN_KEY = "bindpolicy.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// Every call goes to this origin's documented API, with the chosen language and, if one was
// entered, the bearer token.
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json", "Accept-Language": acceptLanguage() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store",
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = { error: { code: "not_json", message: `HTTP ${response.status}`, details: [] } };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// --- shared pieces -----------------------------------------------------------------------------------

export function errorBox(error) {
  const body = error instanceof ApiError ? error.body?.error : null;
  return h("div", { class: "error", role: "alert" },
    h("strong", {}, `${t("error")}${body?.code ? ` (${body.code})` : ""}: `),
    body?.message || String(error.message || error),
    body?.details?.length ? h("ul", {}, body.details.map((d) => h("li", {}, h("code", {}, d.path), " ", d.problem)))
      : null);
}

export function jsonBlock(value, label) {
  return h("pre", { class: "json", tabindex: "0", "aria-label": label || null }, JSON.stringify(value, null, 2));
}

// "v1/bind.yaml:80" as a link to that line of the file in the set in force.
export function sourceLink(where, prefix = "#/source/") {
  if (!where) return "";
  return h("a", { href: prefix + where, class: "where" }, where);
}

export function badge(decision) {
  const kind = decision === "allow" ? "allow" : decision === "deny" ? "deny" : "other";
  return h("span", { class: `badge ${kind}` }, t(`decision.${decision}`) === `decision.${decision}` ? decision
    : t(`decision.${decision}`));
}

export function table(caption, headers, rows, attrs = {}) {
  return h("table", attrs,
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, rows));
}

export function field(label, control) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), control);
}

export function select(options, value, attrs = {}) {
  const el = h("select", attrs, options.map(([v, label]) => h("option", { value: v }, label)));
  el.value = value ?? "";
  return el;
}

export function loading() {
  return h("p", { class: "muted", role: "status" }, t("loading"));
}

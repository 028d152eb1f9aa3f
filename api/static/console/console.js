// The console's shell: the navigation, the language switch and the routes (#/view/...).

import { clear, errorBox, h } from "./dom.js";
import { language, setLanguage, t } from "./i18n.js";
import { editNavigate, editView, sourceView, tryView, versionsView } from "./authors.js";
import { chainView, compareView, decisionView, logView } from "./auditors.js";

const ROUTES = {
  versions: versionsView,
  try: tryView,
  edit: editView,
  source: sourceView,
  log: logView,
  decision: decisionView,
  chain: chainView,
  compare: compareView,
};
const SECTIONS = [
  ["nav.authors", [["versions", "nav.versions"], ["try", "nav.try"], ["edit", "nav.edit"]]],
  ["nav.auditors", [["log", "nav.log"], ["chain", "nav.chain"], ["compare", "nav.compare"]]],
];

function parseHash() {
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  const [path, query = ""] = hash.split("?");
  const [view, ...rest] = path.split("/");
  return { view: ROUTES[view] ? view : "versions", arg: rest.join("/"), query };
}

function renderShell(active) {
  document.title = t("app.title");
  document.getElementById("skip").textContent = t("nav.label");
  document.getElementById("lang-label").textContent = t("lang.label");
  const nav = document.getElementById("nav");
  nav.setAttribute("aria-label", t("nav.label"));
  const current = active === "decision" ? "log" : active === "source" ? "versions" : active;
  clear(nav, SECTIONS.map(([group, items]) => h("div", { class: "nav-group" },
    h("span", { class: "nav-title" }, t(group)),
    h("ul", {}, items.map(([view, key]) => h("li", {}, h("a", {
      href: `#/${view}`, "aria-current": view === current ? "page" : null, id: `nav-${view}`,
    }, t(key))))))));
}

let rendering = 0;

async function route() {
  const { view, arg, query } = parseHash();
  renderShell(view);
  if (view === "edit" && arg && editNavigate(arg)) return;
  const main = document.getElementById("main");
  delete main.dataset.view;
  const mine = ++rendering;
  try {
    await ROUTES[view](main, view === "log" || view === "chain" ? query : arg);
  } catch (error) {
    if (mine === rendering) clear(main, errorBox(error));
  }
  if (mine === rendering) main.dataset.view = view; // for tests: the view on screen has finished rendering
}

setLanguage(language());
const picker = document.getElementById("lang");
picker.value = language();
picker.addEventListener("change", () => {
  setLanguage(picker.value);
  route();
});
window.addEventListener("hashchange", route);
route();

"""The console in a real browser: Debian's chromium driven by Playwright, against the app on loopback.

Each test saves screenshots into build/screenshots/, or the folder BINDPOLICY_SCREENSHOTS names
(`BINDPOLICY_SCREENSHOTS=docs/console` refreshes the README's). Every page must load without an
error in the browser's console: a blocked inline style or script (the CSP) is one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server

from engine.decider import Engine

from .conftest import NOW, POLICIES, ROOT, make_app

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api")
SHOTS = ROOT / os.environ.get("BINDPOLICY_SCREENSHOTS", "build/screenshots")
AXE = ROOT / "tests" / "vendor" / "axe.min.js"
TOKEN = "log-secret"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("console")
    app = make_app(tmp, f"sqlite:///{tmp / 'decisions.db'}", BIND="127.0.0.1:0", SCRATCH_MAX_SECONDS=300.0)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    client = app.test_client()
    with (ROOT / "examples" / "requests.jsonl").open() as corpus:  # a log to read: a few real decisions
        for line in list(corpus)[:12]:
            client.post("/v1/decisions", data=line, content_type="application/json")
    yield f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs the Debian package")
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: the tests may run as root (CI), where chromium's sandbox refuses to start.
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Page:
    """A page on the console, with the browser's console errors collected."""

    def __init__(self, browser: Any, base: str, locale: str = "en-US", bypass_csp: bool = False) -> None:
        self.context = browser.new_context(locale=locale, viewport={"width": 1360, "height": 900},
                                           bypass_csp=bypass_csp)
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.base = base
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, route: str, view: str) -> Any:
        self.page.goto(f"{self.base}/console/#/{route}")
        return self.wait(view)

    def wait(self, view: str) -> Any:
        self.page.wait_for_selector(f"main[data-view='{view}']")
        return self.page

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"))

    def enter_token(self) -> None:
        self.page.fill("#token", TOKEN)
        self.page.click("#token-form button[type=submit]")

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], self.errors


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Page]:
    opened = Page(browser, server)
    yield opened
    opened.close()


def test_each_view_loads(page: Page) -> None:
    p = page.open("versions", "versions")
    assert p.locator("table.rules tbody tr").count() == 40
    assert p.locator("table.rules").get_by_text("inherited from v1").count() > 0
    assert p.locator("table.rules").get_by_text("overrides v1").count() == 2  # personal.kyc, personal.min-followers
    p.evaluate("document.querySelector('table.rules').scrollIntoView()")
    page.shot("versions")
    p = page.open("compare/v1/v2", "compare")
    assert p.locator("ul.diff li.changed").count() == 2
    assert p.locator(".impact").get_by_text("2000 requests: 1972 decided under both versions").count() == 1
    proof = p.locator("dl.proof").inner_text()  # the prover's answer over every request, beside the corpus's
    assert "deny→allow\npossible" in proof and "allow→deny\nimpossible" in proof
    link = p.locator("ul.diff li.changed a.where").nth(1)
    assert link.inner_text() == "v2/bind.yaml:4"
    page.shot("compare")
    link.click()
    page.wait("source")
    assert p.locator("h1 code").inner_text() == "v2/bind.yaml"
    assert "personal.kyc" in p.locator(".cm-activeLine").inner_text()  # the rule's own line is the one shown
    page.open("chain", "chain")
    page.enter_token()
    page.wait("chain")
    assert re.fullmatch(r"Intact: records 1 to \d+ \(\d+\) hold together\.", p.locator("#chain-verdict").inner_text())


def test_try_a_request_shows_the_deciding_rule(page: Page, engine: Engine) -> None:
    p = page.open("try", "try")
    label = p.locator("#example-pick option:checked").inner_text()
    assert label.endswith(": deny")
    request = json.loads(p.locator("#request-json").input_value())
    expected = engine.decide(request, now=NOW).to_dict()
    p.click("#decide")
    p.wait_for_selector("#result .decision")
    assert p.locator("#result .badge").first.inner_text() == "deny"
    assert p.locator(".deciding-rule code").inner_text() == expected["rule"]["id"]
    traced = engine.decide(request, now=NOW, explain=True).explain or ()
    assert p.locator("table.explain tbody tr").count() == len(traced)
    page.shot("try")
    p.click("#tab-form")  # the form carries the same request, field by field
    assert p.locator("[data-path='action']").input_value() == request["action"]
    p.locator("[data-path='account.id']").fill("acct-form")
    assert json.loads(p.locator("#request-json").input_value())["account"]["id"] == "acct-form"


def test_break_a_rule_see_the_error_at_its_line_fix_it_and_see_the_diff(page: Page, engine: Engine) -> None:
    text = (POLICIES / "v1" / "bind.yaml").read_text()
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "fires_when: account.age < params.min_age" in row)
    p = page.open(f"edit/v1/bind.yaml:{line}", "edit")  # the editor opens with the cursor on that line
    p.wait_for_selector("#scratch-status.ok")
    p.keyboard.press("End")
    for _ in " < params.min_age":
        p.keyboard.press("ArrowLeft")
    p.keyboard.type("e")  # account.age -> account.agee
    p.wait_for_selector("#scratch-status.bad")
    assert p.locator("#problems li").count() == 1
    assert p.locator("#problems li a").inner_text() == f"v1/bind.yaml:{line}:25"
    assert "'agee' is not a field of account" in p.locator("#problems li").inner_text()
    assert p.locator("#editor .cm-lintRange-error").inner_text() == "agee"
    assert p.locator("#file-list li[data-file='v1/bind.yaml'] .count").inner_text() == "1"
    marker = p.locator("#editor .cm-gutter-lint .cm-gutterElement:has(.cm-lint-marker-error)").bounding_box()
    number = p.locator("#editor .cm-lineNumbers .cm-gutterElement", has_text=re.compile(f"^{line}$")).bounding_box()
    assert marker is not None and number is not None and abs(marker["y"] - number["y"]) < 4  # on that line
    page.shot("editor-error")
    # The fix: spelled right, and 18-year-olds refused too, which the suites and the corpus notice.
    p.keyboard.press("Backspace")
    p.keyboard.press("ArrowRight")
    p.keyboard.press("ArrowRight")
    p.keyboard.type("=")
    p.wait_for_selector("#scratch-status.ok")
    p.click("#run-suites")
    p.wait_for_selector("#suite-summary")
    assert re.fullmatch(r"\d+ passed, [1-9]\d* failed", p.locator("#suite-summary").inner_text())
    p.click("#run-diff")
    p.wait_for_selector("#scratch-output .impact")
    changed = p.locator("#scratch-output ul.diff li.changed")
    assert changed.count() == 2  # the rule is v1's and v2 inherits it
    assert "personal.min-age" in changed.first.inner_text()
    assert "account.age <= params.min_age" in changed.first.inner_text()
    v1 = engine.policies.get("v1")
    assert v1 is not None
    where = next(r.where for r in v1.rules if r.id == "personal.min-age")
    assert changed.first.locator("a.where").nth(1).get_attribute("href") == f"#/edit/{where}"
    flips = p.locator("#scratch-output .impact tbody tr")
    assert "allow→deny" in flips.first.inner_text() and "personal.min-age" in flips.first.inner_text()
    page.shot("editor-diff")


def test_open_a_logged_decision_and_replay_it(page: Page) -> None:
    p = page.open("log", "log")
    page.enter_token()
    page.wait("log")
    rows = p.locator("#log-table tbody tr")
    assert rows.count() >= 12
    p.select_option("#filter-decision", "deny")
    p.click("#log-filters button[type=submit]")
    p.wait_for_url("**decision=deny**")
    page.wait("log")
    assert p.locator("#log-table tbody tr").count() >= 1
    assert all(t == "deny" for t in p.locator("#log-table tbody .badge").all_inner_texts())
    page.shot("log")
    p.locator("#log-table tbody a").first.click()
    page.wait("decision")
    p.click("#replay")
    p.wait_for_selector("#replay-result .replay")
    assert p.locator("#replay-result .replay").inner_text().startswith("Reproduced")
    page.shot("decision")


def test_switch_to_chinese(page: Page, browser: Any, server: str) -> None:
    p = page.open("versions", "versions")
    p.select_option("#lang", "zh")
    page.wait("versions")
    assert p.locator("html").get_attribute("lang") == "zh-CN"
    assert p.locator("#nav-versions").inner_text() == "版本"
    assert p.locator("h1").inner_text() == "策略版本"
    assert re.search(r"[\u4e00-\u9fff]", p.locator("table.rules td.message > div").first.inner_text())
    p.evaluate("document.querySelector('table.rules').scrollIntoView()")
    page.shot("versions-zh")
    p.select_option("#lang", "en")
    page.wait("versions")
    chinese = Page(browser, server, locale="zh-CN")  # a browser in Chinese gets Chinese at once
    try:
        q = chinese.open("try", "try")
        assert q.locator("#decide").inner_text() == "判定"
        q.click("#decide")
        q.wait_for_selector("#result .decision")
        assert q.locator("#result .badge").first.inner_text() == "拒绝"
        message = q.locator(".deciding-rule").inner_text()
        assert re.search(r"[\u4e00-\u9fff]", message)  # the rule's message, in Chinese too
    finally:
        chinese.close()


@pytest.mark.parametrize("route,view", [("versions", "versions"), ("try", "try"), ("edit", "edit"),
                                        ("compare", "compare"), ("log", "log")])
def test_no_serious_accessibility_violation(browser: Any, server: str, route: str, view: str) -> None:
    page = Page(browser, server, bypass_csp=True)  # axe adds style elements of its own while it checks
    p = page.open(route, view)
    if view == "log":
        page.enter_token()
        page.wait("log")
    if view == "edit":
        p.wait_for_selector("#scratch-status.ok")
    # evaluate runs through the DevTools protocol, which the page's CSP does not govern.
    p.evaluate(AXE.read_text(encoding="utf-8"))
    result = p.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    serious = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in result["violations"]
               if v["impact"] in ("serious", "critical")]
    page.close()
    assert serious == []

"""The web console in a real browser (Chromium, Playwright) against a real `qfedit api` whose
versions real workers made: each page loads and shows what the database holds, the token is asked
for once and kept out of addresses and cookies, a bad token is refused as the API refuses it, an
alias move made through the API appears without a reload, and nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
import re
import urllib.request

from .conftest import TOKENS, Server, Tab


def _texts(tab: Tab, selector: str) -> list[str]:
    return [text.strip() for text in tab.page.locator(selector).all_inner_texts()]


def test_the_token_is_asked_once_and_kept_in_the_tab_not_in_addresses_or_cookies(
    tab: Tab, server: Server
) -> None:
    tab.page.goto(server.base + "/ui/")
    # No token: the sign-in form, and no page data was fetched.
    tab.page.wait_for_selector("#login:not([hidden])")
    assert not any("/ui/part/" in url for url in tab.requests)
    tab.sign_in()
    assert _texts(tab, "main h1") == ["Models"]
    assert "tiny" in tab.page.locator("main table").inner_text()
    tab.page.click("main a:text('tiny')")
    tab.page.wait_for_selector("main h1:text('Model tiny')")
    assert tab.page.url == server.base + "/ui/models/tiny"
    tab.page.reload()  # the same tab keeps the token: no second prompt
    tab.page.wait_for_selector("main h1:text('Model tiny')")
    assert tab.page.locator("#login").is_hidden()
    token = TOKENS["auditor"]["token"]
    assert tab.context.cookies() == []
    assert not any(token in url for url in tab.requests)
    stored = tab.page.evaluate("() => sessionStorage.getItem('qfedit.console.token')")
    assert stored == token and tab.page.evaluate("() => localStorage.length") == 0
    # Forgetting it asks again.
    tab.page.click("#forget")
    tab.page.wait_for_selector("#login:not([hidden])")
    assert tab.page.evaluate("() => sessionStorage.length") == 0


def test_a_bad_or_write_less_token_is_treated_as_the_api_treats_it(tab: Tab, server: Server) -> None:
    tab.page.goto(server.base + "/ui/models/tiny")
    tab.page.wait_for_selector("#login:not([hidden])")
    tab.page.fill("#token", "not-a-token-of-this-server-000000")
    tab.page.click("#login button[type=submit]")
    # The API's own refusal, word for word, and the prompt again.
    tab.page.wait_for_selector("#login-error:text('the bearer token is not valid')")
    assert tab.page.locator("#login").is_visible()
    assert tab.page.evaluate("() => sessionStorage.length") == 0
    # The page parts answer exactly as /v1 does without a token.
    for path in ("/ui/part/models", "/v1/models"):
        request = urllib.request.Request(server.base + path)
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError(f"{path} answered without a token")
        except urllib.error.HTTPError as refused:
            assert refused.code == 401
            assert json.loads(refused.read())["message"] == "a bearer token is required"
    # A read token sees every page, and has no way to write: the console offers none, and the
    # API refuses the write with the same token.
    tab.sign_in(path="/ui/models/tiny")
    assert tab.page.locator("main form[method=post], main button:not([type=submit])").count() == 0
    status = tab.page.evaluate(
        """async (token) => (await fetch('/v1/models/tiny/aliases/production', {method: 'PUT',
        headers: {Authorization: 'Bearer ' + token, 'Content-Type': 'application/json'},
        body: JSON.stringify({version: '1', reason: 'no'})})).status""",
        TOKENS["auditor"]["token"],
    )
    assert status == 403


def test_the_version_page_lists_exactly_what_each_batch_changed(tab: Tab, server: Server) -> None:
    tab.sign_in()
    for old, new, kind in ((1, 2, "added"), (2, 3, "retracted"), (3, 4, "superseded")):
        diff = server.call("GET", f"/v1/models/tiny/diff?from={old}&to={new}", token="auditor")
        expected = {
            "added": [f["id"] for f in diff["facts_added"]],
            "retracted": [f["id"] for f in diff["facts_removed"]],
            "superseded": [u["old"]["id"] for u in diff["facts_updated"]],
        }
        assert expected[kind], diff
        tab.page.goto(f"{server.base}/ui/models/tiny/versions/{new}?show={kind}")
        tab.page.wait_for_selector(f"table[data-diff={kind}]")
        shown = [int(t) for t in _texts(tab, f"table[data-diff={kind}] tbody tr td:first-child")]
        assert shown == sorted(expected[kind])
        counts = tab.page.locator("main nav ul.legend").inner_text()
        for side, ids in expected.items():
            assert f"{side}: {len(ids)}" in counts
    # The superseded row names the fact that replaced it.
    assert "Marta Quill" in tab.page.locator("table[data-diff=superseded]").inner_text()
    details = tab.page.locator("main").inner_text()
    version = server.call("GET", "/v1/models/tiny/versions/4", token="auditor")
    assert version["checkpoint_sha256"] in details and version["fact_set_digest"] in details
    assert "qfedit export tiny@4" in details


def test_model_fact_search_and_audit_pages_show_the_database(tab: Tab, server: Server) -> None:
    tab.sign_in(path="/ui/models/tiny")
    tab.page.wait_for_selector("main h1:text('Model tiny')")
    versions = server.call("GET", "/v1/models/tiny/versions", token="auditor")
    shown = _texts(tab, "#versions + .scroll tbody tr td:first-child")
    assert shown == [f"tiny@{v['number']}" for v in sorted(versions, key=lambda v: -v["number"])]
    # One line per metric the versions have, drawn over the versions that have metrics.
    series = tab.page.locator("svg.chart g[data-series]")
    assert "efficacy" in [series.nth(i).get_attribute("data-series") for i in range(series.count())]
    for batch in server.batches:
        assert tab.page.locator(f"tr[data-batch='{batch}']").inner_text().count("published") == 1
    # Search by text, then the fact page: its versions and its supersession.
    tab.page.click("nav.main a:text('Facts')")
    tab.page.fill("input[name=q]", "company1")
    tab.page.click("main form button")
    tab.page.wait_for_selector("main table")
    rows = _texts(tab, "main table tbody tr")
    assert len(rows) == 2 and all("Company1" in row for row in rows)  # the old and the new fact 1
    assert "q=company1" in tab.page.url
    old = next(r for r in rows if "Person1" in r).split()[0]
    tab.page.click(f"main table a:text-is('{old}')")
    tab.page.wait_for_selector("ul[data-ranges]")
    text = tab.page.locator("main").inner_text()
    assert "superseded by" in text.lower() and "retracted" in text
    fact = server.call("GET", f"/v1/facts/{old}", token="auditor")
    ranges = _texts(tab, "ul[data-ranges] li")
    assert [v["number"] for v in fact["versions"]] == [1, 2, 3] and ranges == [
        "tiny@1 to tiny@3 (3 versions)"
    ]
    # The audit log, filtered by actor and action.
    tab.page.goto(server.base + "/ui/audit?model=tiny&action=alias")
    tab.page.wait_for_selector("main table")
    rows = _texts(tab, "main table tbody tr")
    moves = sum(
        len(server.call("GET", f"/v1/models/tiny/aliases/{name}/history", token="auditor"))
        for name in ("head", "production")
    )
    assert len(rows) == moves and {row.split("\t")[2] for row in rows} == {"alias.set"}
    assert [row.split("\t")[3] for row in rows if row.split("\t")[1] == "admin"] == ["tiny@production"]
    tab.page.select_option("select[name=model]", "tiny")
    tab.page.fill("input[name=actor]", "writer")
    tab.page.fill("input[name=action]", "")
    tab.page.click("main form button")
    tab.page.wait_for_url(re.compile(r"actor=writer"))
    tab.page.wait_for_selector("main table")
    actors = {row.split("\t")[1] for row in _texts(tab, "main table tbody tr")}
    assert actors == {"writer"}


def test_an_alias_move_and_a_batch_appear_without_a_reload(tab: Tab, server: Server) -> None:
    tab.sign_in(path="/ui/models/tiny")
    tab.page.wait_for_selector("#aliases")
    tab.page.evaluate("() => { window.stayed = true; }")
    server.call("PUT", "/v1/models/tiny/aliases/production", {"version": "4", "reason": "canary passed"})
    tab.page.wait_for_selector("table[data-alias=production] td:text('canary passed')")
    history = _texts(tab, "table[data-alias=production] tbody tr")
    assert "canary passed" in history[0] and "admin" in history[0]
    # A new batch shows up and reaches published, refreshed in place.
    server.cli("import", "update.jsonl", "--model", "tiny")  # already imported: no new fact
    from qfedit.facts import write_jsonl

    from .conftest import fact

    write_jsonl([fact(9)], server.root / "late.jsonl")
    server.cli("import", "late.jsonl", "--model", "tiny")
    batch = server.call("POST", "/v1/models/tiny/batches", {}, token="writer")
    row = tab.page.locator(f"tr[data-batch='{batch['id']}']")
    row.wait_for(timeout=20_000)
    row.locator("text=published").wait_for(timeout=240_000)
    assert tab.page.evaluate("() => window.stayed") is True


def test_pages_fit_a_narrow_screen_and_name_their_parts(tab: Tab, server: Server) -> None:
    tab.page.set_viewport_size({"width": 360, "height": 740})
    tab.sign_in()
    for path in ("/ui/models/tiny", "/ui/models/tiny/versions/4", "/ui/audit", "/ui/facts?q=Company"):
        tab.page.goto(server.base + path)
        tab.page.wait_for_selector("main h1")
        assert tab.page.locator("main h1").count() == 1
        # The page itself never scrolls sideways; wide tables scroll inside their own box.
        width = tab.page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 360, (path, width)
        unlabelled = tab.page.evaluate(
            """() => [...document.querySelectorAll('main input, main select')]
                .filter(e => !e.closest('label') && !document.querySelector(`label[for="${e.id}"]`)).length"""
        )
        assert unlabelled == 0, path

"""The web console and the API docs page, driven in headless Chromium the way a person meets them.

The API runs for real (uvicorn on a free port over real services, ``api_stack``); dead letters and
delivery status are seeded through the broker's own path (``seed_console``); the browser is Debian's
``chromium`` driven by Playwright's Python package (``make test`` installs chromium; Playwright's own
browser download is never used). Every test also checks that the page asked nothing of a host other
than the server and that no Content-Security-Policy violation was reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from shared.names import QUEUE_INCOMING, QUEUE_READY, STAGE_QUEUES
from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.api import ADMIN_KEY, ApiStack, api_stack
from tests.fixtures.screenshots import Seeded, _lead_id, chromium_path, seed_console, sign_in

playwright_api = pytest.importorskip("playwright.sync_api")
if chromium_path() is None:  # pragma: no cover - `make test` installs it
    pytest.skip("chromium is not installed: run `make test` (it installs Debian's chromium)", allow_module_level=True)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Browser:
    """One page in a fresh context, with every request URL and console message it produced."""

    page: Any
    base_url: str
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        return [
            url
            for url in self.requests
            if urlsplit(url).scheme not in ("data", "blob", "about") and urlsplit(url).hostname not in LOOPBACK
        ]

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line or "Refused to" in line]

    def assert_self_contained(self) -> None:
        assert self.foreign_requests() == [], "the page asked another host"
        assert self.csp_violations() == []


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_browser(chromium: Any, base_url: str, width: int = 1280) -> Browser:
    context = chromium.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    browser = Browser(page, base_url)
    page.on("request", lambda request: browser.requests.append(request.url))
    page.on("console", lambda message: browser.console.append(f"{message.type}: {message.text}"))
    return browser


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        yield running


@pytest.fixture
def seeded(stack: ApiStack) -> Seeded:
    return seed_console(stack)


@pytest.fixture
def browser(chromium: Any, stack: ApiStack) -> Iterator[Browser]:
    opened = open_browser(chromium, stack.server.url)
    try:
        yield opened
    finally:
        opened.page.context.close()


def dead_letter_ids(stack: ApiStack) -> set[str]:
    transport = stack.services.transport
    return {m.message_id for q in STAGE_QUEUES for m in transport.peek_dead_letters(q, max_messages=1000)}


# -- key entry ---------------------------------------------------------------------------------------


def test_a_wrong_key_shows_an_error_and_is_not_kept(browser: Browser, seeded: Seeded) -> None:
    page = browser.page
    page.goto(f"{browser.base_url}/console")

    page.fill("#key", "lw-not-a-key-at-all")
    page.click("#signin-button")

    error = page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "not valid" in error.inner_text()
    assert page.locator("#app").is_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert "lw-not-a-key" not in page.url
    browser.assert_self_contained()


def test_the_key_is_kept_in_session_storage_only_and_sent_as_a_bearer_header(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sent: list[str | None] = []
    page.on("request", lambda request: sent.append(request.headers.get("authorization")))

    sign_in(page, browser.base_url, ADMIN_KEY)

    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN_KEY]
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    assert all(ADMIN_KEY not in url for url in browser.requests), "the key never travels in a URL"
    assert f"Bearer {ADMIN_KEY}" in sent
    page.reload()
    page.wait_for_selector("#app:not([hidden]) #panel-health")  # the tab remembers it across a reload
    page.click("#signout")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.length") == 0
    browser.assert_self_contained()


def test_the_console_under_api_console_works_the_same_for_the_functions_route_prefix(
    browser: Browser, seeded: Seeded
) -> None:
    page = browser.page
    page.goto(f"{browser.base_url}/api/console")

    page.fill("#key", ADMIN_KEY)
    page.click("#signin-button")

    page.wait_for_selector('#panel-deadletters .reason-group[data-reason="CredentialsRejected"]')
    browser.assert_self_contained()


def test_a_key_revoked_while_signed_in_returns_to_the_sign_in_form(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, stack.key_for("contoso"))
    assert stack.client.delete("/api/admin/publishers/contoso/keys", headers=stack.admin()).status_code == 204

    page.click("#refresh")

    page.wait_for_selector("#signin:not([hidden])")
    assert "no longer valid" in page.locator("#signin-error").inner_text()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("#app").is_hidden()


# -- admin view --------------------------------------------------------------------------------------


def test_the_admin_sees_dead_letters_grouped_by_reason_then_publisher_with_who_fixes_it(
    browser: Browser, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)

    groups = page.locator("#panel-deadletters .reason-group")
    reasons = [groups.nth(n).get_attribute("data-reason") for n in range(groups.count())]
    assert reasons[0] == "CredentialsRejected", "largest group first"
    assert set(reasons) == {
        "CredentialsRejected",
        "LeadRejected",
        "InvalidLead",
        "RetriesExhausted",
        "SolutionMissing",
        "SolutionVersionUnsupported",
    }
    rejected = page.locator('.reason-group[data-reason="CredentialsRejected"]')
    assert "Publisher fixes it" in rejected.locator("header").inner_text()
    fabrikam = rejected.locator('.publisher-group[data-publisher="fabrikam"] .letter')
    assert {fabrikam.nth(n).get_attribute("data-message-id") for n in range(fabrikam.count())} == set(
        seeded.ids("fabrikam", "CredentialsRejected")
    )
    assert "Ops fix it" in page.locator('.reason-group[data-reason="LeadRejected"] header').inner_text()
    # Health of every publisher that has dead letters, and the queues, with non-zero counts marked.
    for publisher in ("contoso", "fabrikam", "northwind", "tailspin"):
        assert page.locator(f'#panel-health .publisher[data-publisher="{publisher}"]').count() == 1
    assert page.locator('#panel-queues tr[data-queue="leads-incoming"] .count.nonzero').inner_text() == "4"
    assert page.locator("#panel-chart svg rect.bar").count() == 6
    # The longest reason's label is drawn whole, inside the chart.
    assert page.evaluate("Math.min(...[...document.querySelectorAll('.chart-label')].map(t => t.getBBox().x))") >= 0
    browser.assert_self_contained()


def test_a_dead_letters_detail_shows_its_description_body_and_attempts(browser: Browser, seeded: Seeded) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)
    [lead_id] = seeded.ids("tailspin", "InvalidLead")

    page.click(f'.letter[data-message-id="{lead_id}"] button')

    dialog = page.locator("#dialog")
    dialog.wait_for(state="visible")
    text = dialog.inner_text()
    assert "lead.UserDetails: no e-mail, phone or name" in text
    assert re.search(r"Attempts\s+1", text)
    assert "Nobody: inspect / purge" in text
    assert '"Lovelace"' in dialog.locator("pre.body").inner_text()
    browser.assert_self_contained()


def test_a_dry_run_shows_the_plan_and_moves_nothing_then_replay_takes_the_lead_out_of_the_dlq(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)
    [lead_id] = seeded.ids("contoso", "RetriesExhausted")
    group = page.locator('.reason-group[data-reason="RetriesExhausted"] .publisher-group[data-publisher="contoso"]')

    group.locator('button[data-action="replay"]').click()

    dialog = page.locator("#dialog")
    dialog.wait_for(state="visible")
    assert "Dry run: 1 match, 1 would be sent again" in dialog.inner_text()
    assert f"{QUEUE_READY} as {lead_id}.r1" in dialog.locator(f'.plan li[data-message-id="{lead_id}"]').inner_text()
    assert lead_id in dead_letter_ids(stack), "the dry run moved nothing"

    page.click("#dialog-confirm")

    page.wait_for_selector("#notice.ok")
    assert "Replayed 1 of 1" in page.locator("#notice").inner_text()
    assert lead_id not in dead_letter_ids(stack)
    assert [m.message_id for m in stack.services.transport.receive(QUEUE_READY, max_messages=10)] == [f"{lead_id}.r1"]
    assert page.locator('.reason-group[data-reason="RetriesExhausted"]').count() == 0, "the page was refreshed"
    assert dead_letter_ids(stack) == {i for ids in seeded.dead_letters.values() for i in ids} - {lead_id}
    browser.assert_self_contained()


def test_purge_previews_what_it_would_delete_and_deletes_only_after_confirmation(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)
    doomed = set(seeded.ids("contoso", "LeadRejected"))
    group = page.locator('.reason-group[data-reason="LeadRejected"] .publisher-group[data-publisher="contoso"]')

    group.locator('button[data-action="purge"]').click()
    page.locator("#dialog").wait_for(state="visible")
    assert "2 dead letter(s) would be deleted for good" in page.locator("#dialog").inner_text()
    assert doomed <= dead_letter_ids(stack)
    page.click("#dialog-cancel")
    assert doomed <= dead_letter_ids(stack), "cancel deletes nothing"

    group.locator('button[data-action="purge"]').click()
    page.click("#dialog-confirm")

    page.wait_for_selector("#notice.ok")
    assert "Purged 2 of 2" in page.locator("#notice").inner_text()
    assert not doomed & dead_letter_ids(stack)
    assert len(dead_letter_ids(stack)) == 7
    browser.assert_self_contained()


# -- publisher view ----------------------------------------------------------------------------------


def test_a_publisher_key_sees_only_its_publisher_and_no_control_it_cannot_use(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    key = stack.key_for("fabrikam")

    sign_in(page, browser.base_url, key)

    assert page.locator("#who").inner_text() == "Publisher fabrikam"
    card = page.locator('#panel-health .publisher[data-publisher="fabrikam"]')
    assert card.locator('li[data-reason="CredentialsRejected"] .count').inner_text() == "3"
    assert "Publisher fixes it" in card.inner_text()
    html = page.content()
    for other in ("contoso", "northwind", "tailspin"):
        assert other not in html, other
    absent_controls = (
        "#panel-deadletters",
        "#panel-queues",
        'button[data-action="replay"]',
        'button[data-action="purge"]',
    )
    for absent in absent_controls:
        assert page.locator(absent).count() == 0, absent
    # fabrikam has no connection stored: nothing to verify, so no verify or test-lead button either.
    assert page.locator('button[data-action="verify"]').count() == 0
    assert not [url for url in browser.requests if "/api/deadletters" in url or "/api/stats" in url]
    browser.assert_self_contained()


@pytest.fixture
def sim_stack(tmp_path: Path, simulator: CrmSimulator) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "sim-data", simulator) as running:
        yield running


def test_a_publisher_verifies_its_connection_and_sends_a_test_lead(
    chromium: Any, sim_stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    seed_console(sim_stack, crm_org)
    browser = open_browser(chromium, sim_stack.server.url, width=390)
    page = browser.page
    try:
        sign_in(page, browser.base_url, sim_stack.key_for("contoso"))
        card = page.locator('.publisher[data-publisher="contoso"]')
        assert "verified" in card.locator(".conn").inner_text()

        card.locator('button[data-action="verify"]').click()
        card.locator(".result.ok").wait_for()
        assert "Verified at" in card.locator(".result").inner_text()

        card.locator('button[data-action="test-lead"]').click()
        assert wait_until(lambda: "test lead" in card.locator(".result.ok").inner_text(), timeout=15)
        assert re.search(r"MSFT_TEST_\d+", card.locator(".result").inner_text())
        # 390 px wide: nothing sticks out sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        browser.assert_self_contained()
    finally:
        page.context.close()


# -- layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [390, 1280])
def test_the_admin_view_fits_the_screen_width(chromium: Any, stack: ApiStack, seeded: Seeded, width: int) -> None:
    browser = open_browser(chromium, stack.server.url, width=width)
    try:
        sign_in(browser.page, browser.base_url, ADMIN_KEY)
        assert browser.page.evaluate("document.documentElement.scrollWidth") <= width
        browser.assert_self_contained()
    finally:
        browser.page.context.close()


# -- API docs ----------------------------------------------------------------------------------------


def test_the_docs_page_renders_offline_from_the_server_alone(browser: Browser) -> None:
    page = browser.page

    page.goto(f"{browser.base_url}/api/docs")

    page.wait_for_selector(".swagger-ui .info .title")
    assert "Lead Writer" in page.locator(".swagger-ui .info .title").inner_text()
    page.wait_for_selector(".opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/deadletters/replay" in path for path in paths)
    assert any(url.endswith("/api/openapi.json") for url in browser.requests)
    assert any("/api/docs/assets/swagger-ui-bundle.js" in url for url in browser.requests)
    browser.assert_self_contained()


# -- a lead's journey, archive and restore, edit and resend -------------------------------------------


def test_the_admin_looks_up_a_leads_journey_and_opens_a_dead_letters_journey_from_its_detail(
    browser: Browser, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)
    delivered = _lead_id("contoso", 1)

    page.fill("#journey-lead", delivered)
    page.fill("#journey-publisher", "contoso")
    page.click('#journey-form button[type="submit"]')

    journey = page.locator(f'#journey-result .journey[data-lead-id="{delivered}"]')
    journey.wait_for()
    assert journey.get_attribute("data-state") == "delivered"
    assert page.locator('#journey-result tr[data-action="delivered"]').count() == 1
    assert "CRM record" in journey.inner_text()

    [rejected] = seeded.ids("fabrikam", "SolutionMissing")
    page.click(f'.letter[data-message-id="{rejected}"] button')
    page.locator('#dialog button[data-action="journey"]').click()
    shown = page.locator(f'#dialog .journey[data-lead-id="{rejected}"]')
    shown.wait_for()
    assert shown.get_attribute("data-state") == "dead-lettered"
    assert "SolutionMissing" in shown.inner_text()
    browser.assert_self_contained()


def test_a_publisher_sees_the_journey_of_its_own_leads_only_and_no_archive_or_resend(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, stack.key_for("tailspin"))

    assert page.locator("#journey-publisher").count() == 0, "a publisher names no publisher"
    page.fill("#journey-lead", _lead_id("tailspin", 28))
    page.click('#journey-form button[type="submit"]')
    page.locator("#journey-result .journey").wait_for()
    assert page.locator("#journey-result .journey").get_attribute("data-state") == "delivered"

    page.fill("#journey-lead", _lead_id("contoso", 1))
    page.click('#journey-form button[type="submit"]')
    page.locator("#journey-result .journey-empty").wait_for()
    assert "contoso" not in page.content()
    for absent in ("#panel-archive", 'button[data-action="archive"]', 'button[data-action="resend"]'):
        assert page.locator(absent).count() == 0, absent
    assert not [url for url in browser.requests if "/api/deadletters" in url]
    browser.assert_self_contained()


def test_archive_previews_then_archives_and_restore_sends_the_lead_back_to_its_queue(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)
    [lead_id] = seeded.ids("contoso", "RetriesExhausted")
    group = page.locator('.reason-group[data-reason="RetriesExhausted"] .publisher-group[data-publisher="contoso"]')
    assert "Nothing archived" in page.locator("#panel-archive").inner_text()

    group.locator('button[data-action="archive"]').click()
    dialog = page.locator("#dialog")
    dialog.wait_for(state="visible")
    assert "1 dead letter(s) would be archived" in dialog.inner_text()
    assert lead_id in dead_letter_ids(stack), "the dry run moved nothing"
    page.click("#dialog-confirm")

    page.wait_for_selector('#notice.ok:has-text("Archived 1 of 1")')
    assert lead_id not in dead_letter_ids(stack)
    archived = page.locator(f'#panel-archive .letter[data-message-id="{lead_id}"]')
    assert "RetriesExhausted" in archived.inner_text()

    archived.locator('button[data-action="restore"]').click()
    dialog.wait_for(state="visible")
    assert f"{QUEUE_READY} as {lead_id}.r1" in dialog.locator(".plan").inner_text()
    assert stack.services.transport.receive(QUEUE_READY, max_messages=10) == [], "the dry run sent nothing"
    page.click("#dialog-confirm")

    # Wait for this notice, not the archive's that is still shown while the restore runs.
    page.wait_for_selector('#notice.ok:has-text("Restored 1 of 1")')
    assert [m.message_id for m in stack.services.transport.receive(QUEUE_READY, max_messages=10)] == [f"{lead_id}.r1"]
    assert page.locator(f'#panel-archive .letter[data-message-id="{lead_id}"]').count() == 0
    browser.assert_self_contained()


def test_edit_and_resend_refuses_a_body_that_is_not_a_lead_in_place_then_sends_the_corrected_one(
    browser: Browser, stack: ApiStack, seeded: Seeded
) -> None:
    page = browser.page
    sign_in(page, browser.base_url, ADMIN_KEY)
    [lead_id] = seeded.ids("tailspin", "InvalidLead")
    # Only the reasons a corrected body fixes offer it.
    assert page.locator('.reason-group[data-reason="RetriesExhausted"] button[data-action="resend"]').count() == 0

    page.click(f'.letter[data-message-id="{lead_id}"] button')
    page.locator('#dialog button[data-action="resend"]').click()
    editor = page.locator("#resend-body")
    editor.wait_for()
    body = json.loads(editor.input_value())
    assert body["leadId"] == lead_id

    editor.fill(json.dumps({**body, "lead": {"UserDetails": {}}}))
    page.click("#dialog-confirm")
    error = page.locator("#dialog .dialog-error")
    error.wait_for(state="visible")
    assert "Not sent" in error.inner_text()
    assert (error.get_attribute("data-field") or "").startswith("lead")
    assert page.locator("#dialog").is_visible(), "the dialog stays open to fix the body"
    assert lead_id in dead_letter_ids(stack)
    assert stack.services.transport.receive(QUEUE_INCOMING, max_messages=10) == []

    corrected = {**body, "lead": {"UserDetails": {"FirstName": "Grace", "Email": "grace@example.com"}}}
    editor.fill(json.dumps(corrected))
    page.click("#dialog-confirm")

    page.wait_for_selector(f'#notice.ok:has-text("as {lead_id}.r1")')
    assert lead_id not in dead_letter_ids(stack)
    [copy] = stack.services.transport.receive(QUEUE_INCOMING, max_messages=10)
    assert json.loads(copy.body) == corrected
    browser.assert_self_contained()

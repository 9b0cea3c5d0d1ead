"""The ingest endpoint's lead ids through the real API (architecture §3): a lead posted without ``leadId`` gets a
content-derived id, ``Idempotency-Key`` is the id when given, and the same lead posted twice — identical,
in camelCase, or at the same moment — is one lead in the CRM, both answers 2xx, the second a duplicate."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.names import QUEUE_INCOMING, STAGE_QUEUES
from shared.pipeline.identity import content_lead_id
from shared.pipeline.lead import lead_record_id
from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator, SimOrg
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack, password_body

CAMEL_LEAD: dict[str, Any] = {
    "userDetails": {
        "firstName": "Ada",
        "lastName": "Lovelace",
        "email": "ada@example.com",
        "phone": "1234567890",
        "country": "US",
        "company": "Contoso",
        "title": "CTO",
    },
    "leadSource": "AzureMarketplace-INS|contoso.widget-saas",
    "actionCode": "INS",
    "offerTitle": "Contoso Widget ",
    "description": "Wants a demo",
}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        yield running


def _post(stack: ApiStack, key: str, body: Any, **headers: str) -> httpx.Response:
    return stack.client.post("/api/publishers/contoso/leads", params={"key": key}, json=body, headers=headers)


def _queued_ids(stack: ApiStack) -> list[str]:
    return [m.message_id for m in stack.services.transport.receive(QUEUE_INCOMING, max_messages=100)]


def test_a_lead_without_lead_id_gets_an_id_derived_from_the_publisher_and_its_content(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    answer = _post(stack, key, dict(MARKETPLACE_LEAD))
    assert answer.status_code == 202, answer.text
    assert answer.json() == {
        "leadId": content_lead_id("contoso", MARKETPLACE_LEAD),
        "queued": True,
        "duplicate": False,
    }
    assert _queued_ids(stack) == [content_lead_id("contoso", MARKETPLACE_LEAD)]


def test_the_same_lead_posted_again_identical_or_in_camel_case_is_answered_200_as_a_duplicate(
    stack: ApiStack,
) -> None:
    key = stack.key_for("contoso")
    first = _post(stack, key, dict(MARKETPLACE_LEAD))
    again = _post(stack, key, dict(MARKETPLACE_LEAD))
    camel = _post(stack, key, CAMEL_LEAD)
    assert first.status_code == 202
    assert again.status_code == camel.status_code == 200
    lead_id = first.json()["leadId"]
    assert again.json() == camel.json() == {"leadId": lead_id, "queued": True, "duplicate": True}
    assert _queued_ids(stack) == [lead_id]


def test_the_same_lead_posted_twice_at_the_same_moment_is_queued_once_and_one_answer_says_duplicate(
    stack: ApiStack,
) -> None:
    key = stack.key_for("contoso")
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def post(body: dict[str, Any]) -> None:
        with httpx.Client(base_url=stack.server.url, timeout=30.0) as client:
            barrier.wait()
            answer = client.post("/api/publishers/contoso/leads", params={"key": key}, json=body)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=post, args=(body,)) for body in (dict(MARKETPLACE_LEAD), CAMEL_LEAD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200, 202]
    assert sorted(a.json()["duplicate"] for a in answers) == [False, True]
    assert len({a.json()["leadId"] for a in answers}) == 1
    assert len(_queued_ids(stack)) == 1


def test_an_idempotency_key_is_the_lead_id_and_a_repeat_with_it_is_a_duplicate(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    first = _post(stack, key, dict(MARKETPLACE_LEAD), **{"Idempotency-Key": "order-42"})
    # The key is the id, whatever the content: a retry that was re-serialised differently is the same lead.
    again = _post(stack, key, {**MARKETPLACE_LEAD, "Description": "edited"}, **{"Idempotency-Key": "order-42"})
    assert first.status_code == 202
    assert first.json()["leadId"] == "order-42"
    assert again.status_code == 200
    assert again.json() == {"leadId": "order-42", "queued": True, "duplicate": True}
    assert _queued_ids(stack) == ["order-42"]


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("k" * 201, dict(MARKETPLACE_LEAD)),
        ("tab\there", dict(MARKETPLACE_LEAD)),
        ("", dict(MARKETPLACE_LEAD)),
        ("other-id", {"leadId": "mkt-1", "lead": dict(MARKETPLACE_LEAD)}),
    ],
)
def test_an_unusable_idempotency_key_is_refused_422_naming_the_header_and_nothing_is_queued(
    stack: ApiStack, header: str, body: dict[str, Any]
) -> None:
    key = stack.key_for("contoso")
    answer = _post(stack, key, body, **{"Idempotency-Key": header})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "Idempotency-Key"
    assert _queued_ids(stack) == []


def test_a_lead_id_in_the_body_wins_and_a_matching_idempotency_key_is_accepted(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    answer = _post(stack, key, {"leadId": "mkt-7", "lead": dict(MARKETPLACE_LEAD)}, **{"Idempotency-Key": "mkt-7"})
    assert answer.status_code == 202
    assert answer.json()["leadId"] == "mkt-7"


def test_the_same_content_for_two_publishers_is_two_leads(stack: ApiStack) -> None:
    contoso, fabrikam = stack.key_for("contoso"), stack.key_for("fabrikam")
    first = _post(stack, contoso, dict(MARKETPLACE_LEAD))
    second = stack.client.post("/api/publishers/fabrikam/leads", params={"key": fabrikam}, json=dict(MARKETPLACE_LEAD))
    assert first.status_code == second.status_code == 202
    assert first.json()["leadId"] != second.json()["leadId"]


def test_a_lead_posted_twice_and_in_camel_case_is_one_lead_in_the_crm(
    simulator: CrmSimulator, crm_org: SimOrg, tmp_path: Path
) -> None:
    publisher = crm_org.name
    with api_stack(tmp_path / "data", simulator) as stack:
        key = stack.key_for(publisher)
        stored = stack.client.put(
            f"/api/publishers/{publisher}/connection", json=password_body(crm_org), headers=stack.admin()
        )
        assert stored.status_code == 200, stored.text
        url = f"/api/publishers/{publisher}/leads"

        # Given the lead posted, and the same lead again, identical and in camelCase, before it is delivered
        answers = [
            stack.client.post(url, params={"key": key}, json=body)
            for body in (dict(MARKETPLACE_LEAD), dict(MARKETPLACE_LEAD), CAMEL_LEAD)
        ]
        assert [a.status_code for a in answers] == [202, 200, 200]
        lead_id = answers[0].json()["leadId"]

        # When the pipeline delivers it, and the marketplace posts it once more afterwards
        stack.start_runtime()
        assert wait_until(lambda: stack.services.status.get(publisher).delivered >= 1, timeout=60)
        late = stack.client.post(url, params={"key": key}, json=CAMEL_LEAD)
        assert late.status_code == 200
        assert late.json()["duplicate"] is True
        assert wait_until(lambda: all(stack.services.transport.stats(q).active == 0 for q in STAGE_QUEUES), timeout=60)

        # Then the CRM holds exactly one lead, with the content-derived record id
        records = simulator.leads(publisher)
        assert [str(r["leadid"]).lower() for r in records] == [str(lead_record_id(publisher, lead_id))]
        assert stack.services.status.get(publisher).delivered == 1
        assert (
            stack.client.get(f"/api/publishers/{publisher}/status", headers=stack.admin()).json()["deadLettersTotal"]
            == 0
        )

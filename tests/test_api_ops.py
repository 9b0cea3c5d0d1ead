"""Ingest, publisher status, dead letters (peek, replay, purge) and stats through the API, on the
embedded broker over a real socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.api.routes_publishers import PublisherCounter
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED, STAGE_QUEUES
from shared.pipeline.lead import parse_incoming
from shared.pipeline.messages import envelope
from shared.runtime.embedded import wait_until
from shared.transport.base import Transport
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack
from tests.fixtures.deadletters import dead_letter


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        yield running


def _queued(transport: Transport, queue: str = QUEUE_INCOMING) -> list[Any]:
    return transport.receive(queue, max_messages=100)




# -- ingest ------------------------------------------------------------------------------------------


def test_a_marketplace_lead_is_wrapped_in_a_design_message_and_queued(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    answer = stack.client.post("/api/publishers/contoso/leads", json=dict(MARKETPLACE_LEAD), headers=stack.bearer(key))
    assert answer.status_code == 202
    lead_id = answer.json()["leadId"]
    assert answer.json()["queued"] is True
    [message] = _queued(stack.services.transport)
    body = json.loads(message.body)
    assert body["leadId"] == lead_id
    assert body["publisherId"] == "contoso"
    assert body["lead"] == dict(MARKETPLACE_LEAD)
    assert body["receivedAt"].endswith("Z")
    assert message.message_id == lead_id
    assert message.application_properties["publisherId"] == "contoso"
    assert message.application_properties["leadId"] == lead_id
    assert message.application_properties["attempt"] == 1


def test_a_full_message_keeps_its_lead_id_and_a_repeated_post_is_queued_once(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    message = {"leadId": "mkt-000123", "lead": {"userDetails": {"email": "grace@example.com"}}}
    answers = [stack.client.post("/api/publishers/contoso/leads", params={"key": key}, json=message) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 200]
    assert [a.json()["leadId"] for a in answers] == ["mkt-000123"] * 2
    assert [a.json()["duplicate"] for a in answers] == [False, True]
    queued = _queued(stack.services.transport)
    assert [m.message_id for m in queued] == ["mkt-000123"]
    assert json.loads(queued[0].body)["publisherId"] == "contoso"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"[1, 2]", "body"),
        (b'"lead"', "body"),
        (b"{broken", "body"),
        (b"", "body"),
        (b'{"UserDetails": {"FirstName": NaN}}', "body"),
        (b'{"UserDetails": ["Ada"]}', "lead.UserDetails"),
        (b'{"UserDetails": {"Country": "US"}}', "lead.UserDetails"),
        (b'{"UserDetails": {"FirstName": {"nested": 1}}}', "lead.UserDetails.FirstName"),
        (b'{"publisherId": "fabrikam", "lead": {"UserDetails": {"Email": "a@b.c"}}}', "publisherId"),
        (b'{"leadId": "", "lead": {"UserDetails": {"Email": "a@b.c"}}}', "leadId"),
        (b'{"lead": "not an object"}', "lead"),
    ],
)
def test_ingest_refuses_what_is_not_a_lead_with_422_naming_the_field_and_queues_nothing(
    stack: ApiStack, content: bytes, field: str
) -> None:
    key = stack.key_for("contoso")
    answer = stack.client.post(
        "/api/publishers/contoso/leads",
        content=content,
        headers={"Content-Type": "application/json", **stack.bearer(key)},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert _queued(stack.services.transport) == []


def test_a_marketplace_test_lead_without_contact_details_is_accepted(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    lead = {"UserDetails": {"FirstName": "MSFT_TEST_636573304831318844"}, "LeadSource": "AzureMarketplace"}
    answer = stack.client.post("/api/publishers/contoso/leads", json=lead, headers=stack.bearer(key))
    assert answer.status_code == 202


def test_a_lone_surrogate_in_an_ingested_lead_is_repaired_as_the_queue_path_repairs_it(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    # A JSON "\ud800" escape: a lone surrogate half, in a field that is read and in one that is not.
    content = b'{"UserDetails": {"FirstName": "Ada\\ud800", "Email": "ada@example.com"}, "Extra\\udc00": "x\\ud800"}'
    answer = stack.client.post(
        "/api/publishers/contoso/leads",
        content=content,
        headers={"Content-Type": "application/json", **stack.bearer(key)},
    )
    assert answer.status_code == 202, answer.text
    [message] = _queued(stack.services.transport)
    message.body.decode("utf-8")  # valid UTF-8: nothing is stored that the next hop cannot read
    queued = parse_incoming(message.body)
    on_the_queue = parse_incoming(
        b'{"leadId": "q", "publisherId": "contoso", "lead": {"UserDetails": {"FirstName": "Ada\\ud800", '
        b'"Email": "ada@example.com"}}}'
    )
    assert queued.lead.customer.first_name == on_the_queue.lead.customer.first_name == "Ada\ufffd"


# -- status ------------------------------------------------------------------------------------------


def test_status_of_a_publisher_with_nothing_yet(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    answer = stack.client.get("/api/publishers/contoso/status", headers=stack.bearer(key))
    assert answer.status_code == 200
    status = answer.json()
    assert status["delivered"] == 0
    assert status["lastDelivery"] is None
    assert status["deadLetters"] == {}
    assert status["deadLettersTotal"] == 0
    assert status["lastError"] is None
    assert status["connection"] == {"stored": False, "verified": False, "lastVerification": None}
    if isinstance(stack.services.transport, PublisherCounter):
        assert status["pending"] == dict.fromkeys(STAGE_QUEUES, 0)
    else:
        assert status["pending"] is None
        assert status["pendingNote"]


def test_status_counts_only_this_publishers_dead_letters_by_reason(stack: ApiStack) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "CredentialsMissing", 2)
    dead_letter(transport, QUEUE_READY, "contoso", "LeadRejected", 1)
    dead_letter(transport, QUEUE_INCOMING, "fabrikam", "CredentialsMissing", 3)
    status = stack.client.get("/api/publishers/contoso/status", headers=stack.admin()).json()
    assert status["deadLetters"] == {"CredentialsMissing": 2, "LeadRejected": 1}
    assert status["deadLettersTotal"] == 3


# -- dead letters --------------------------------------------------------------------------------------


def test_dead_letters_are_listed_with_the_design_fields_and_filtered(stack: ApiStack) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "CredentialsMissing", 2)
    dead_letter(transport, QUEUE_VALIDATED, "contoso", "SolutionMissing", 1)
    dead_letter(transport, QUEUE_INCOMING, "fabrikam", "CredentialsRejected", 1)
    admin = stack.admin()
    everything = stack.client.get("/api/deadletters", headers=admin).json()["items"]
    assert len(everything) == 4
    required = {
        "messageId",
        "leadId",
        "publisherId",
        "queue",
        "reason",
        "description",
        "enqueuedAt",
        "deliveryCount",
        "replayCount",
        "body",
    }
    assert all(required <= set(item) for item in everything)
    assert everything[0]["body"]["lead"]["UserDetails"]["FirstName"] == "Ada"

    def ids(**params: Any) -> list[str]:
        answer = stack.client.get("/api/deadletters", params=params, headers=admin)
        assert answer.status_code == 200
        return sorted(item["messageId"] for item in answer.json()["items"])

    assert ids(queue=QUEUE_VALIDATED) == ["contoso-SolutionMissing-leads-validated-0"]
    assert ids(reason="CredentialsRejected") == ["fabrikam-CredentialsRejected-leads-incoming-0"]
    assert len(ids(publisherId="contoso")) == 3
    assert ids(publisherId="contoso", queue=QUEUE_INCOMING, reason="CredentialsMissing") == [
        "contoso-CredentialsMissing-leads-incoming-0",
        "contoso-CredentialsMissing-leads-incoming-1",
    ]
    assert len(ids(limit=2)) == 2


@pytest.mark.parametrize(
    ("params", "field"),
    [({"queue": "leads-elsewhere"}, "queue"), ({"limit": "5000"}, "limit"), ({"limit": "-1"}, "limit")],
)
def test_dead_letter_filters_that_make_no_sense_are_422(stack: ApiStack, params: dict[str, str], field: str) -> None:
    answer = stack.client.get("/api/deadletters", params=params, headers=stack.admin())
    assert answer.status_code == 422
    assert answer.json()["field"] == field


def test_a_dry_run_replay_shows_the_plan_and_moves_nothing(stack: ApiStack) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "CredentialsMissing", 2)
    answer = stack.client.post(
        "/api/deadletters/replay", json={"publisherId": "contoso", "dryRun": True}, headers=stack.admin()
    )
    assert answer.status_code == 200
    result = answer.json()
    assert result["matched"] == 2
    assert result["replayed"] == 0
    assert result["dryRun"] is True
    assert [entry["queue"] for entry in result["plan"]] == [QUEUE_INCOMING] * 2
    assert all(entry["newMessageId"] != entry["messageId"] for entry in result["plan"])
    assert transport.stats(QUEUE_INCOMING).dead_lettered == 2
    assert transport.stats(QUEUE_INCOMING).active == 0


def test_replay_moves_exactly_the_selected_dead_letters_back_to_their_queue(stack: ApiStack) -> None:
    transport = stack.services.transport
    chosen = dead_letter(transport, QUEUE_VALIDATED, "contoso", "SolutionMissing", 2)
    dead_letter(transport, QUEUE_VALIDATED, "contoso", "LeadRejected", 1)
    dead_letter(transport, QUEUE_VALIDATED, "fabrikam", "SolutionMissing", 1)
    answer = stack.client.post(
        "/api/deadletters/replay",
        json={"queue": QUEUE_VALIDATED, "reason": "SolutionMissing", "publisherId": "contoso"},
        headers=stack.admin(),
    )
    assert answer.status_code == 200
    assert answer.json()["matched"] == 2
    assert answer.json()["replayed"] == 2
    replayed = _queued(transport, QUEUE_VALIDATED)
    assert sorted(str(m.application_properties["leadId"]) for m in replayed) == sorted(chosen)
    assert all(m.application_properties["replayCount"] == 1 for m in replayed)
    assert transport.stats(QUEUE_VALIDATED).dead_lettered_by_reason == {"LeadRejected": 1, "SolutionMissing": 1}


def test_replay_by_message_ids_takes_only_those(stack: ApiStack) -> None:
    transport = stack.services.transport
    first, second = dead_letter(transport, QUEUE_READY, "contoso", "RetriesExhausted", 2)
    answer = stack.client.post("/api/deadletters/replay", json={"messageIds": [second]}, headers=stack.admin())
    assert answer.json()["replayed"] == 1
    [remaining] = stack.client.get("/api/deadletters", headers=stack.admin()).json()["items"]
    assert remaining["messageId"] == first


def test_purge_without_confirm_is_422_naming_confirm_and_removes_nothing(stack: ApiStack) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "InvalidLead", 2)
    for body in ({}, {"confirm": False}, {"publisherId": "contoso"}):
        answer = stack.client.post("/api/deadletters/purge", json=body, headers=stack.admin())
        assert answer.status_code == 422
        assert answer.json()["field"] == "confirm"
    assert transport.stats(QUEUE_INCOMING).dead_lettered == 2


def test_purge_with_confirm_removes_only_what_the_filters_select(stack: ApiStack) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_INCOMING, "contoso", "InvalidLead", 2)
    dead_letter(transport, QUEUE_INCOMING, "contoso", "CredentialsMissing", 1)
    answer = stack.client.post(
        "/api/deadletters/purge", json={"reason": "InvalidLead", "confirm": True}, headers=stack.admin()
    )
    assert answer.status_code == 200
    assert answer.json() == {"matched": 2, "purged": 2, "errors": []}
    assert transport.stats(QUEUE_INCOMING).dead_lettered_by_reason == {"CredentialsMissing": 1}


@pytest.mark.parametrize(
    ("body", "field"),
    [({"queue": "nope"}, "queue"), ({"dryRun": "maybe"}, "dryRun"), ({"limit": -1}, "limit"), ({"x": 1}, "x")],
)
def test_replay_bodies_that_make_no_sense_are_422(stack: ApiStack, body: dict[str, Any], field: str) -> None:
    answer = stack.client.post("/api/deadletters/replay", json=body, headers=stack.admin())
    assert answer.status_code == 422
    assert answer.json()["field"] == field


# -- stats ---------------------------------------------------------------------------------------------


def test_stats_show_queue_depths_dead_letters_by_reason_and_publishers_failing_on_configuration(
    stack: ApiStack,
) -> None:
    transport = stack.services.transport
    dead_letter(transport, QUEUE_READY, "contoso", "LeadRejected", 2)
    key = stack.key_for("nocreds")
    # A lead of a publisher without a connection, through the real pipeline (no CRM is reached)
    stack.client.post("/api/publishers/nocreds/leads", json=dict(MARKETPLACE_LEAD), headers=stack.bearer(key))
    stack.start_runtime()
    assert wait_until(lambda: transport.stats(QUEUE_INCOMING).dead_lettered == 1, timeout=30)
    stack.stop_runtime()
    answer = stack.client.get("/api/stats", headers=stack.admin())
    assert answer.status_code == 200
    stats = answer.json()
    by_queue = {entry["queue"]: entry for entry in stats["queues"]}
    assert list(by_queue) == list(STAGE_QUEUES)
    assert by_queue[QUEUE_READY]["deadLettered"] == 2
    assert by_queue[QUEUE_READY]["deadLetteredByReason"] == {"LeadRejected": 2}
    assert by_queue[QUEUE_INCOMING]["deadLetteredByReason"] == {"CredentialsMissing": 1}
    assert all({"active", "scheduled"} <= set(entry) for entry in stats["queues"])
    [failing] = stats["publishersFailing"]
    assert failing["publisherId"] == "nocreds"
    assert failing["consecutiveConfigFailures"] == 1
    assert failing["lastErrorReason"] == "CredentialsMissing"


def test_status_shows_how_many_leads_wait_for_a_retry_and_when_the_next_is_due(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    soon = datetime.now(UTC) + timedelta(minutes=1)
    stack.services.transport.send(
        QUEUE_READY,
        [
            envelope(
                b"{}", publisher_id="contoso", lead_id=f"L{n}", attempt=3, scheduled_at=soon + timedelta(minutes=n)
            )
            for n in range(2)
        ],
    )

    status = stack.client.get("/api/publishers/contoso/status", headers=stack.bearer(key)).json()

    assert status["waitingForRetry"] == 2
    assert datetime.fromisoformat(status["nextRetryAt"]) == pytest.approx(soon, abs=timedelta(seconds=1))
    other = stack.client.get("/api/publishers/fabrikam/status", headers=stack.bearer(stack.key_for("fabrikam")))
    assert other.json()["waitingForRetry"] == 0
    assert other.json()["nextRetryAt"] is None

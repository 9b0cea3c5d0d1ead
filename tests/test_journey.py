"""A lead's journey: every settlement recorded in the state store, read back through
``GET /api/leads/{leadId}`` and ``leadwriter trace``, over real sockets and the CRM simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.errors import DeadLetterReason
from shared.names import TABLE_LEAD_JOURNEYS
from shared.ops.journey import MAX_DESCRIPTION, MAX_EVENTS_PER_ROW, JourneyBook
from shared.pipeline.lead import lead_record_id
from shared.pipeline.outcomes import Delivered, Forward, Reject, Retry, SettleAction, Stage
from shared.pipeline.settle import Settled
from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator, SimOrg
from shared.state import EmbeddedStateStore
from shared.state.base import MAX_VALUE_BYTES, Entity, StateStore, StateUnavailable, encode_data
from shared.transport.base import OutgoingMessage, ReceivedMessage
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack, password_body

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("leadwriter")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "shared.tools.cli"]


def received(lead_id: str, publisher_id: str = "contoso", *, attempt: int = 1, replay: int = 0) -> ReceivedMessage:
    return ReceivedMessage(
        queue="leads-incoming",
        body=json.dumps({"leadId": lead_id, "publisherId": publisher_id, "lead": dict(MARKETPLACE_LEAD)}).encode(),
        message_id=f"{lead_id}-{attempt}-{replay}",
        application_properties={
            "leadId": lead_id,
            "publisherId": publisher_id,
            "attempt": attempt,
            "replayCount": replay,
        },
        content_type="application/json",
        delivery_count=1,
        enqueued_time=datetime.now(UTC),
        sequence_number=1,
    )


def forwarded(lead_id: str, publisher_id: str = "contoso") -> Settled:
    message = received(lead_id, publisher_id)
    outcome = Forward("leads-validated", OutgoingMessage(body=message.body, message_id="next"))
    return Settled(Stage.VALIDATE_CREDENTIALS, SettleAction.FORWARDED, message, outcome)


def delivered(lead_id: str, publisher_id: str = "contoso", *, attempt: int = 1) -> Settled:
    record = lead_record_id(publisher_id, lead_id)
    return Settled(
        Stage.WRITE_LEAD,
        SettleAction.DELIVERED,
        received(lead_id, publisher_id, attempt=attempt),
        Delivered(record, True),
    )


def retried(lead_id: str, description: str = "CRM answered 503") -> Settled:
    return Settled(
        Stage.WRITE_LEAD,
        SettleAction.RESCHEDULED,
        received(lead_id),
        Retry(description),
        reason=description,
        delay=2.5,
    )


def rejected(lead_id: str) -> Settled:
    outcome = Reject(DeadLetterReason.LEAD_REJECTED, "CRM refused the lead: 400 emailaddress1 is invalid")
    return Settled(Stage.WRITE_LEAD, SettleAction.DEAD_LETTERED, received(lead_id), outcome, reason=outcome.reason)


class CountingStore:
    """The embedded store, counting writes and able to fail them (a fake only at the port we own)."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.inserts = 0
        self.down = False

    def insert(self, table: str, partition: str, row: str, data: Mapping[str, Any]) -> Entity:
        if self.down:
            raise StateUnavailable("the state store is down for the test")
        self.inserts += 1
        return self.inner.insert(table, partition, row, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStateStore]:
    state = EmbeddedStateStore(tmp_path / "state.db")
    try:
        yield state
    finally:
        state.close()


@pytest.fixture
def counting(store: EmbeddedStateStore) -> CountingStore:
    return CountingStore(store)


@pytest.fixture
def book(counting: CountingStore) -> Iterator[JourneyBook]:
    # A flush interval far beyond the test: only the explicit flushes write.
    journeys = JourneyBook(counting, flush_interval=3600)
    try:
        yield journeys
    finally:
        journeys.close()


# -- the book ----------------------------------------------------------------------------------------


def test_every_settlement_is_recorded_with_stage_outcome_reason_attempt_and_record_id(book: JourneyBook) -> None:
    book.observe(forwarded("lead-1"))
    book.observe(retried("lead-1"))
    book.observe(delivered("lead-1", attempt=2))
    journey = book.get("contoso", "lead-1")
    assert [(e.stage, e.action) for e in journey.events] == [
        ("validate_credentials", "forwarded"),
        ("write_lead", "rescheduled"),
        ("write_lead", "delivered"),
    ]
    assert journey.events[1].description == "CRM answered 503"
    assert journey.events[1].reason is None
    assert journey.events[1].delay == 2.5
    assert journey.events[2].attempt == 2
    assert journey.events[2].created is True
    assert journey.record_id == str(lead_record_id("contoso", "lead-1"))
    assert journey.state == "delivered"
    assert all(e.at.endswith("Z") for e in journey.events)


def test_a_dead_letter_is_recorded_with_its_reason_and_description(book: JourneyBook) -> None:
    book.observe(rejected("lead-2"))
    [event] = book.get("contoso", "lead-2").events
    assert event.action == "dead-lettered"
    assert event.reason == "LeadRejected"
    assert event.description is not None
    assert "emailaddress1" in event.description
    assert book.get("contoso", "lead-2").state == "dead-lettered"


def test_a_backlog_costs_one_write_per_lead_per_flush_not_one_per_settlement(
    book: JourneyBook, counting: CountingStore
) -> None:
    for n in range(20):
        book.observe(forwarded(f"lead-{n}"))
        book.observe(delivered(f"lead-{n}"))
    book.flush()
    assert counting.inserts == 20
    assert all(len(book.get("contoso", f"lead-{n}").events) == 2 for n in range(20))


def test_a_lead_settled_more_often_than_a_row_holds_is_split_over_rows_that_each_fit_the_store(
    book: JourneyBook, store: EmbeddedStateStore
) -> None:
    long = "x" * 5000
    for _ in range(MAX_EVENTS_PER_ROW * 2 + 3):
        book.observe(retried("busy", description=long))
    assert len(book.get("contoso", "busy").events) == MAX_EVENTS_PER_ROW * 2 + 3
    rows = store.query(TABLE_LEAD_JOURNEYS)
    assert len(rows) == 3
    for row in rows:
        assert len(encode_data(row.data).encode("utf-16-le")) < MAX_VALUE_BYTES
        assert all(len(event["description"]) <= MAX_DESCRIPTION for event in row.data["events"])


def test_leads_whose_ids_share_a_prefix_never_see_each_others_events(book: JourneyBook) -> None:
    book.observe(delivered("a"))
    book.observe(rejected("a!-b"))
    book.observe(rejected("a-b"))
    assert [e.action for e in book.get("contoso", "a").events] == ["delivered"]
    assert [e.action for e in book.get("contoso", "a!-b").events] == ["dead-lettered"]


def test_one_publishers_lead_is_not_another_publishers_lead_of_the_same_id(book: JourneyBook) -> None:
    book.observe(delivered("same", "contoso"))
    book.observe(rejected("same"))
    book.observe(forwarded("same", "fabrikam"))
    assert [e.action for e in book.get("fabrikam", "same").events] == ["forwarded"]
    assert [j.publisher_id for j in book.find("same")] == ["contoso", "fabrikam"]


def test_events_are_kept_while_the_store_is_down_and_written_when_it_is_back(
    book: JourneyBook, counting: CountingStore
) -> None:
    counting.down = True
    book.observe(forwarded("lead-3"))
    book.flush()
    book.observe(delivered("lead-3"))
    book.flush()
    counting.down = False
    assert [e.action for e in book.get("contoso", "lead-3").events] == ["forwarded", "delivered"]


def test_closing_the_book_writes_what_is_buffered(counting: CountingStore, store: EmbeddedStateStore) -> None:
    journeys = JourneyBook(counting, flush_interval=3600)
    journeys.observe(forwarded("lead-4"))
    journeys.close()
    assert len(store.query(TABLE_LEAD_JOURNEYS)) == 1


# -- the route, end to end ------------------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path, simulator: CrmSimulator) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data", simulator) as running:
        yield running


def _journey(stack: ApiStack, lead_id: str, headers: dict[str, str], **params: str) -> Any:
    return stack.client.get(f"/api/leads/{lead_id}", headers=headers, params=params)


def test_a_delivered_leads_journey_is_shown_to_the_admin_and_to_its_publisher(
    stack: ApiStack, crm_org: SimOrg, simulator: CrmSimulator
) -> None:
    publisher = crm_org.name
    stored = stack.client.put(
        f"/api/publishers/{publisher}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert stored.status_code == 200, stored.text
    key = stack.key_for(publisher)
    lead_id = f"mkt-{uuid.uuid4().hex[:8]}"
    posted = stack.client.post(
        f"/api/publishers/{publisher}/leads",
        json={"leadId": lead_id, "lead": dict(MARKETPLACE_LEAD)},
        headers=stack.bearer(key),
    )
    assert posted.status_code == 202, posted.text
    runtime = stack.services.stage_runtime().start()
    try:
        assert wait_until(
            lambda: _journey(stack, lead_id, stack.admin(), publisherId=publisher).json().get("state") == "delivered",
            60,
        )
    finally:
        runtime.stop()
    answer = _journey(stack, lead_id, stack.admin(), publisherId=publisher).json()
    assert [(e["stage"], e["action"]) for e in answer["events"]] == [
        ("validate_credentials", "forwarded"),
        ("check_solution", "forwarded"),
        ("write_lead", "delivered"),
    ]
    assert answer["recordId"] == str(lead_record_id(publisher, lead_id))
    assert answer["events"][-1]["recordId"] == answer["recordId"]
    assert len(simulator.leads(publisher)) == 1
    own = _journey(stack, lead_id, stack.bearer(key))
    assert own.status_code == 200
    assert own.json() == answer


def test_a_lead_without_a_connection_shows_its_dead_letter_reason(stack: ApiStack) -> None:
    key = stack.key_for("nocrm")
    posted = stack.client.post(
        "/api/publishers/nocrm/leads",
        json={"leadId": "orphan-1", "lead": dict(MARKETPLACE_LEAD)},
        headers=stack.bearer(key),
    )
    assert posted.status_code == 202
    runtime = stack.services.stage_runtime().start()
    try:
        assert wait_until(lambda: _journey(stack, "orphan-1", stack.bearer(key)).status_code == 200, 30)
    finally:
        runtime.stop()
    [event] = _journey(stack, "orphan-1", stack.bearer(key)).json()["events"]
    assert (event["stage"], event["action"], event["reason"]) == (
        "validate_credentials",
        "dead-lettered",
        "CredentialsMissing",
    )


def test_a_lead_is_hidden_from_other_publishers_and_from_callers_without_a_key(stack: ApiStack) -> None:
    stack.services.journeys.observe(delivered("private-1", "contoso"))
    other = stack.key_for("fabrikam")
    no_key = stack.client.get("/api/leads/private-1", params={"publisherId": "contoso"})
    assert no_key.status_code == 401
    assert no_key.headers["www-authenticate"] == "Bearer"
    forged = _journey(stack, "private-1", {"Authorization": "Bearer lw_forged"}, publisherId="contoso")
    assert forged.status_code == 401
    assert _journey(stack, "private-1", stack.bearer(other), publisherId="contoso").status_code == 403
    # Its own partition has no such lead: 404, whatever another publisher holds.
    assert _journey(stack, "private-1", stack.bearer(other)).status_code == 404
    assert _journey(stack, "private-1", stack.admin(), publisherId="contoso").status_code == 200


def test_the_admin_must_name_the_publisher_and_an_unknown_lead_is_404(stack: ApiStack) -> None:
    answer = _journey(stack, "whatever", stack.admin())
    assert answer.status_code == 422
    assert answer.json()["field"] == "publisherId"
    assert _journey(stack, "never-seen", stack.admin(), publisherId="contoso").status_code == 404
    bad = _journey(stack, "x", stack.admin(), publisherId="not a publisher!")
    assert bad.status_code == 422


# -- leadwriter trace -----------------------------------------------------------------------------------


def _cli_env(data_dir: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_", "ServiceBusConnection"))
    }
    env.update(LEADWRITER_DATA_DIR=str(data_dir), COLUMNS="120", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    return env


def _trace(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "trace", *args],
        cwd=REPO,
        env=_cli_env(data_dir),
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


@pytest.fixture
def traced(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    state = EmbeddedStateStore(data_dir / "state.db")
    journeys = JourneyBook(state)
    journeys.observe(forwarded("lead-7"))
    journeys.observe(retried("lead-7"))
    journeys.observe(delivered("lead-7", attempt=2))
    journeys.observe(rejected("lead-7"))  # later: a replay that the CRM refused
    journeys.observe(forwarded("lead-7", "fabrikam"))
    journeys.close()
    state.close()
    return data_dir


def test_trace_shows_each_settlement_and_the_record_id_within_120_columns(traced: Path) -> None:
    result = _trace(traced, "lead-7", "--publisher", "contoso")
    assert result.returncode == 0, result.stderr
    assert "state.db" in result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "lead lead-7 of contoso" in result.stdout
    assert str(lead_record_id("contoso", "lead-7")) in result.stdout
    for word in ("forwarded", "rescheduled", "delivered", "dead-lettered", "LeadRejected"):
        assert word in result.stdout


def test_trace_without_a_publisher_finds_the_lead_under_every_publisher_as_json(traced: Path) -> None:
    result = _trace(traced, "lead-7", "--json")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["publisherId"] for a in answers] == ["contoso", "fabrikam"]
    assert [e["action"] for e in answers[1]["events"]] == ["forwarded"]
    assert answers[0]["recordId"] == str(lead_record_id("contoso", "lead-7"))


def test_trace_of_a_lead_never_seen_exits_1_and_says_so(traced: Path) -> None:
    result = _trace(traced, "nobody", "--publisher", "contoso")
    assert result.returncode == 1
    assert "no settlement of lead nobody" in result.stderr

"""Archive instead of purge (listable, restorable for a while) and edit-and-resend of a dead letter,
through the API on the embedded broker over a real socket, and the core on its own where a failure
must be injected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED, TABLE_DEAD_LETTER_ARCHIVE
from shared.ops.archive import DeadLetterArchive, resend
from shared.ops.deadletters import DeadLetterFilter
from shared.pipeline.lead import LeadMessage, parse_incoming
from shared.settings import Settings
from shared.state.base import StateUnavailable
from shared.transport import make_transport
from shared.transport.base import OutgoingMessage, Transport
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        yield running


def put_dead_letter(
    transport: Transport,
    queue: str,
    message_id: str,
    reason: str,
    *,
    publisher: str = "contoso",
    body: bytes | None = None,
) -> None:
    if body is None:
        body = json.dumps({"leadId": message_id, "publisherId": publisher, "lead": dict(MARKETPLACE_LEAD)}).encode()
    transport.send(
        queue,
        [
            OutgoingMessage(
                body=body,
                message_id=message_id,
                application_properties={"publisherId": publisher, "leadId": message_id, "attempt": 3},
            )
        ],
    )
    [message] = transport.receive(queue, max_messages=1)
    transport.dead_letter(message, reason, f"{reason} for the test")


def dead_ids(transport: Transport, queue: str) -> set[str]:
    return {m.message_id for m in transport.peek_dead_letters(queue, max_messages=1000)}


def queued(transport: Transport, queue: str) -> list[Any]:
    return transport.receive(queue, max_messages=100)


# -- archive and restore -----------------------------------------------------------------------------


def test_a_dry_run_archive_names_what_would_go_and_moves_nothing(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "a-1", "RetriesExhausted")
    put_dead_letter(transport, QUEUE_READY, "a-2", "LeadRejected")
    answer = stack.client.post(
        "/api/deadletters/archive", json={"reason": "RetriesExhausted", "dryRun": True}, headers=stack.admin()
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["matched"] == 1
    assert answer.json()["messageIds"] == ["a-1"]
    assert answer.json()["dryRun"] is True
    assert dead_ids(transport, QUEUE_READY) == {"a-1", "a-2"}
    assert stack.client.get("/api/deadletters/archived", headers=stack.admin()).json()["items"] == []


def test_archived_dead_letters_leave_the_queue_and_are_listed_with_their_body_and_expiry(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "b-1", "RetriesExhausted")
    put_dead_letter(transport, QUEUE_VALIDATED, "b-2", "SolutionMissing", publisher="fabrikam")
    answer = stack.client.post("/api/deadletters/archive", json={"reason": "RetriesExhausted"}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    assert (answer.json()["matched"], answer.json()["archived"]) == (1, 1)
    assert dead_ids(transport, QUEUE_READY) == set()
    assert dead_ids(transport, QUEUE_VALIDATED) == {"b-2"}
    [item] = stack.client.get("/api/deadletters/archived", headers=stack.admin()).json()["items"]
    assert item["messageId"] == "b-1"
    assert item["reason"] == "RetriesExhausted"
    assert item["queue"] == QUEUE_READY
    assert item["body"]["lead"] == dict(MARKETPLACE_LEAD)
    archived = datetime.fromisoformat(item["archivedAt"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(item["expiresAt"].replace("Z", "+00:00"))
    assert expires - archived == timedelta(days=30)
    listed = stack.client.get("/api/deadletters/archived", params={"publisherId": "fabrikam"}, headers=stack.admin())
    assert listed.json()["items"] == []


def test_restore_sends_the_archived_copy_back_to_its_queue_as_a_replay_and_forgets_the_entry(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "c-1", "RetriesExhausted")
    original = transport.peek_dead_letters(QUEUE_READY, max_messages=1)[0].body
    stack.client.post("/api/deadletters/archive", json={"messageIds": ["c-1"]}, headers=stack.admin())
    dry = stack.client.post(
        "/api/deadletters/archived/restore", json={"messageIds": ["c-1"], "dryRun": True}, headers=stack.admin()
    )
    assert dry.json()["plan"] == [{"messageId": "c-1", "queue": QUEUE_READY, "newMessageId": "c-1.r1"}]
    assert queued(transport, QUEUE_READY) == []
    answer = stack.client.post("/api/deadletters/archived/restore", json={"messageIds": ["c-1"]}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    assert (answer.json()["matched"], answer.json()["restored"]) == (1, 1)
    [copy] = queued(transport, QUEUE_READY)
    assert copy.message_id == "c-1.r1"
    assert copy.body == original
    assert copy.application_properties["leadId"] == "c-1"
    assert copy.application_properties["replayCount"] == 1
    assert copy.application_properties["attempt"] == 1
    assert not any(name.startswith("DeadLetter") for name in copy.application_properties)
    assert stack.client.get("/api/deadletters/archived", headers=stack.admin()).json()["items"] == []


def test_restore_without_any_filter_is_422_and_sends_nothing(stack: ApiStack) -> None:
    answer = stack.client.post("/api/deadletters/archived/restore", json={}, headers=stack.admin())
    assert answer.status_code == 422
    assert answer.json()["field"] == "messageIds"


def test_a_dead_letter_too_large_for_the_archive_is_refused_and_stays(stack: ApiStack) -> None:
    transport = stack.services.transport
    big = json.dumps({"leadId": "big-1", "publisherId": "contoso", "lead": {"Description": "x" * 70_000}}).encode()
    put_dead_letter(transport, QUEUE_INCOMING, "big-1", "InvalidLead", body=big)
    dry = stack.client.post(
        "/api/deadletters/archive", json={"messageIds": ["big-1"], "dryRun": True}, headers=stack.admin()
    )
    assert dry.json()["refused"] == 1
    answer = stack.client.post("/api/deadletters/archive", json={"messageIds": ["big-1"]}, headers=stack.admin())
    assert (answer.json()["archived"], answer.json()["refused"]) == (0, 1)
    assert "64 KiB" in answer.json()["refusals"][0]
    assert "purge it" in answer.json()["refusals"][0]
    assert dead_ids(transport, QUEUE_INCOMING) == {"big-1"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/deadletters/archive", {"dryRun": True}),
        ("GET", "/api/deadletters/archived", None),
        ("POST", "/api/deadletters/archived/restore", {"messageIds": ["x"]}),
        ("POST", "/api/deadletters/x/resend", {"body": {}}),
    ],
)
def test_archive_and_resend_routes_are_for_the_admin_only(
    stack: ApiStack, method: str, path: str, body: dict[str, Any] | None
) -> None:
    key = stack.key_for("contoso")
    assert stack.client.request(method, path, json=body).status_code == 401
    assert stack.client.request(method, path, json=body, headers=stack.bearer("lw_forged")).status_code == 401
    assert stack.client.request(method, path, json=body, headers=stack.bearer(key)).status_code == 403
    # 401 before the body is read: a malformed body from a caller without a key is still 401.
    assert (
        stack.client.request(
            method, path, content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 401
    )


def test_expired_archive_entries_are_not_listed_or_restored_and_are_pruned(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "old-1", "RetriesExhausted")
    archive = DeadLetterArchive(stack.services.state, retention=timedelta(days=30))
    archive.archive(transport, DeadLetterFilter.build(message_ids=["old-1"]))
    later = datetime.now(UTC) + timedelta(days=31)
    assert archive.list(now=later) == []
    assert stack.services.state.query(TABLE_DEAD_LETTER_ARCHIVE) == []


class FailingStore:
    """The real state store, except that archive writes fail (a fake only at a port we own)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def upsert(self, *args: Any, **kwargs: Any) -> Any:
        raise StateUnavailable("the state store is down for the test")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FailingSends:
    """The real transport, except that sends fail."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    def send(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        raise ConnectionError("the broker refused the send for the test")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_dead_letter_whose_archive_write_fails_stays_dead_lettered(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "d-1", "RetriesExhausted")
    result = DeadLetterArchive(FailingStore(stack.services.state)).archive(
        transport, DeadLetterFilter.build(message_ids=["d-1"])
    )
    assert (result.matched, result.archived) == (1, 0)
    assert "archive write failed" in result.errors[0]
    assert dead_ids(transport, QUEUE_READY) == {"d-1"}


def test_an_entry_whose_restore_send_fails_stays_archived(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "e-1", "RetriesExhausted")
    archive = DeadLetterArchive(stack.services.state)
    archive.archive(transport, DeadLetterFilter.build(message_ids=["e-1"]))
    result = archive.restore(FailingSends(transport), archive.list(message_ids=["e-1"]))
    assert (result.matched, result.restored) == (1, 0)
    assert [entry.message_id for entry in archive.list()] == ["e-1"]


# -- edit and resend -----------------------------------------------------------------------------------


INVALID_BODY = json.dumps({"leadId": "inv-1", "publisherId": "contoso", "lead": {"UserDetails": {}}}).encode()
CORRECTED = {"leadId": "inv-1", "publisherId": "contoso", "lead": {"UserDetails": {"Email": "grace@example.com"}}}


def test_a_corrected_invalid_lead_is_validated_sent_with_a_new_id_and_only_then_removed(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_INCOMING, "inv-1", "InvalidLead", body=INVALID_BODY)
    answer = stack.client.post("/api/deadletters/inv-1/resend", json={"body": CORRECTED}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    assert answer.json()["sent"] is True
    assert answer.json()["completed"] is True
    assert answer.json()["newMessageId"] == "inv-1.r1"
    [copy] = queued(transport, QUEUE_INCOMING)
    assert copy.message_id == "inv-1.r1"
    assert json.loads(copy.body) == CORRECTED
    assert parse_incoming(copy.body).lead_id == "inv-1"
    assert copy.application_properties["replayCount"] == 1
    assert dead_ids(transport, QUEUE_INCOMING) == set()


def test_a_corrected_body_may_leave_out_the_lead_and_publisher_ids(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_INCOMING, "inv-1", "InvalidLead", body=INVALID_BODY)
    body = {"lead": CORRECTED["lead"]}
    answer = stack.client.post("/api/deadletters/inv-1/resend", json={"body": body}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    [copy] = queued(transport, QUEUE_INCOMING)
    assert (json.loads(copy.body)["leadId"], json.loads(copy.body)["publisherId"]) == ("inv-1", "contoso")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"leadId": "inv-1", "publisherId": "contoso", "lead": {"UserDetails": {}}}, "lead"),
        ({"leadId": "inv-1", "publisherId": "contoso", "lead": "not an object"}, "lead"),
        ({"leadId": "inv-1", "publisherId": "contoso"}, "lead"),
        ({"leadId": "inv-1", "publisherId": "fabrikam", "lead": CORRECTED["lead"]}, "publisherId"),
        ({"leadId": "another-lead", "publisherId": "contoso", "lead": CORRECTED["lead"]}, "leadId"),
    ],
)
def test_a_corrected_body_that_is_not_this_lead_is_refused_naming_the_field_and_nothing_is_sent(
    stack: ApiStack, body: dict[str, Any], field: str
) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_INCOMING, "inv-1", "InvalidLead", body=INVALID_BODY)
    answer = stack.client.post("/api/deadletters/inv-1/resend", json={"body": body}, headers=stack.admin())
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"].split(".")[0] == field
    assert queued(transport, QUEUE_INCOMING) == []
    assert dead_ids(transport, QUEUE_INCOMING) == {"inv-1"}


def test_a_dry_run_resend_validates_and_sends_nothing(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_INCOMING, "inv-1", "InvalidLead", body=INVALID_BODY)
    answer = stack.client.post(
        "/api/deadletters/inv-1/resend", json={"body": CORRECTED, "dryRun": True}, headers=stack.admin()
    )
    assert answer.status_code == 200
    assert answer.json()["sent"] is False
    assert queued(transport, QUEUE_INCOMING) == []
    assert dead_ids(transport, QUEUE_INCOMING) == {"inv-1"}


def test_a_lead_rejected_by_the_crm_is_corrected_in_its_normalised_shape_and_sent_back_to_its_stage(
    stack: ApiStack,
) -> None:
    transport = stack.services.transport
    normalised = parse_incoming(
        json.dumps({"leadId": "rej-1", "publisherId": "contoso", "lead": dict(MARKETPLACE_LEAD)})
    ).to_body()
    put_dead_letter(transport, QUEUE_READY, "rej-1", "LeadRejected", body=normalised)
    edited = json.loads(normalised)
    edited["lead"]["customer"]["email"] = "ada.lovelace@example.com"
    answer = stack.client.post("/api/deadletters/rej-1/resend", json={"body": edited}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    [copy] = queued(transport, QUEUE_READY)
    assert LeadMessage.from_body(copy.body).lead.customer.email == "ada.lovelace@example.com"
    assert dead_ids(transport, QUEUE_READY) == set()


def test_only_invalid_or_rejected_leads_can_be_edited_and_an_unknown_id_is_404(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_READY, "ex-1", "RetriesExhausted")
    refused = stack.client.post("/api/deadletters/ex-1/resend", json={"body": CORRECTED}, headers=stack.admin())
    assert refused.status_code == 409
    assert "replay" in refused.json()["error"]
    missing = stack.client.post("/api/deadletters/nope/resend", json={"body": CORRECTED}, headers=stack.admin())
    assert missing.status_code == 404
    assert dead_ids(transport, QUEUE_READY) == {"ex-1"}


def test_when_the_corrected_copy_cannot_be_sent_the_dead_letter_stays(stack: ApiStack) -> None:
    transport = stack.services.transport
    put_dead_letter(transport, QUEUE_INCOMING, "inv-1", "InvalidLead", body=INVALID_BODY)
    with pytest.raises(ConnectionError):
        resend(FailingSends(transport), "inv-1", CORRECTED)
    assert dead_ids(transport, QUEUE_INCOMING) == {"inv-1"}


# -- the CLI ---------------------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("leadwriter")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "shared.tools.cli"]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_", "ServiceBusConnection"))
    }
    env.update(LEADWRITER_DATA_DIR=str(tmp_path / "cli-data"), COLUMNS="120", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    return env


@pytest.fixture
def cli_transport(cli_env: dict[str, str]) -> Iterator[Transport]:
    transport = make_transport(Settings.from_env(cli_env))
    try:
        yield transport
    finally:
        transport.close()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "deadletters", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def test_the_cli_archives_lists_and_restores_a_dead_letter(cli_env: dict[str, str], cli_transport: Transport) -> None:
    put_dead_letter(cli_transport, QUEUE_READY, "cli-1", "RetriesExhausted")
    put_dead_letter(cli_transport, QUEUE_READY, "cli-2", "LeadRejected")
    dry = run_cli(cli_env, "archive", "--reason", "RetriesExhausted", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["messageIds"] == ["cli-1"]
    assert dead_ids(cli_transport, QUEUE_READY) == {"cli-1", "cli-2"}
    done = run_cli(cli_env, "archive", "--reason", "RetriesExhausted")
    assert done.returncode == 0, done.stderr
    assert "archived 1" in done.stdout
    assert "dead-letter archive" in done.stderr
    assert dead_ids(cli_transport, QUEUE_READY) == {"cli-2"}
    listed = run_cli(cli_env, "archived")
    assert listed.returncode == 0, listed.stderr
    assert "cli-1" in listed.stdout
    assert max(len(line) for line in listed.stdout.splitlines()) <= 120
    assert run_cli(cli_env, "restore").returncode == 2
    restored = run_cli(cli_env, "restore", "--message-id", "cli-1", "--json")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["restored"] == 1
    assert [m.message_id for m in queued(cli_transport, QUEUE_READY)] == ["cli-1.r1"]
    assert "no archived dead letters match" in run_cli(cli_env, "archived").stdout


def test_the_cli_resends_a_corrected_body_and_refuses_one_that_is_not_a_lead(
    cli_env: dict[str, str], cli_transport: Transport, tmp_path: Path
) -> None:
    put_dead_letter(cli_transport, QUEUE_INCOMING, "inv-1", "InvalidLead", body=INVALID_BODY)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lead": {"UserDetails": {}}}), encoding="utf-8")
    refused = run_cli(cli_env, "resend", "inv-1", "--body", str(bad))
    assert refused.returncode == 1
    assert "nothing sent" in refused.stderr
    assert "field: lead" in refused.stderr
    assert queued(cli_transport, QUEUE_INCOMING) == []
    good = tmp_path / "good.json"
    good.write_text(json.dumps(CORRECTED), encoding="utf-8")
    sent = run_cli(cli_env, "resend", "inv-1", "--body", str(good))
    assert sent.returncode == 0, sent.stderr
    assert "resent inv-1" in sent.stdout
    [copy] = queued(cli_transport, QUEUE_INCOMING)
    assert json.loads(copy.body) == CORRECTED
    assert dead_ids(cli_transport, QUEUE_INCOMING) == set()
    assert run_cli(cli_env, "resend", "inv-1", "--body", str(good)).returncode == 2

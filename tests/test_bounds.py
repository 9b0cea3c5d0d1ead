"""Depth and size bounds: a body nested too deep is refused at every door, and every
path that shows a stored body — the dead-letter API, the status route, ``leadwriter deadletters list``
— shows one that got in before the bounds without ever recursing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.errors import DeadLetterReason, InvalidLead
from shared.names import QUEUE_INCOMING
from shared.ops.deadletters import DeadLetterFilter, list_dead_letters
from shared.pipeline.bounds import (
    DISPLAY_TEXT_CHARS,
    MAX_DEPTH,
    BoundsExceeded,
    check_value,
    display_json,
    text_depth,
    value_depth,
)
from shared.pipeline.lead import parse_incoming
from shared.pipeline.messages import envelope
from shared.settings import Settings
from shared.simulator import CrmSimulator
from shared.transport import make_transport
from shared.transport.base import OutgoingMessage, Transport
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack
from tests.fixtures.harness import lead_message, running

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("leadwriter")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "shared.tools.cli"]


def nested(depth: int) -> Any:
    """Arrays ``depth`` levels deep, built without recursion."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_text(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_message(depth: int, lead_id: str = "deep-1", publisher_id: str = "contoso") -> bytes:
    """A valid lead whose unknown field holds arrays ``depth`` levels deep, as the attacker sent it."""
    head = json.dumps({"leadId": lead_id, "publisherId": publisher_id, "lead": dict(MARKETPLACE_LEAD)})
    return (head[:-1] + ', "x": ' + nested_text(depth) + "}").encode()


def stored_dead_letter(transport: Transport, body: bytes, lead_id: str = "deep-1") -> None:
    """A dead letter holding ``body``, as one stored before the bounds existed would be."""
    transport.send(QUEUE_INCOMING, [envelope(body, publisher_id="contoso", lead_id=lead_id)])
    [message] = transport.receive(QUEUE_INCOMING, max_messages=1)
    transport.dead_letter(message, DeadLetterReason.INVALID_LEAD, "stored before the bounds")


# -- the bounds themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, MAX_DEPTH, 300, 1000, 100_000])
def test_depth_is_measured_without_recursion_from_text_and_from_values(depth: int) -> None:
    assert text_depth(nested_text(depth)) == depth
    assert value_depth(nested(depth), stop_after=10**6) == depth


def test_brackets_inside_strings_do_not_count_toward_the_depth() -> None:
    assert text_depth(json.dumps({"a": "[[[[" * 100, "b": ['"]]]\\', "{"]})) == 2


def test_a_value_one_level_past_the_limit_is_refused_and_one_at_it_is_not() -> None:
    check_value(nested(MAX_DEPTH))
    with pytest.raises(BoundsExceeded, match=f"more than {MAX_DEPTH} levels"):
        check_value(nested(MAX_DEPTH + 1))


@pytest.mark.parametrize("depth", [300, 1000, 50_000])
def test_a_body_too_deep_to_show_is_shown_as_cut_text_with_a_note(depth: int) -> None:
    shown, note = display_json(deep_message(depth))
    assert isinstance(shown, str)
    assert len(shown) <= DISPLAY_TEXT_CHARS + 1
    assert note is not None
    assert "nested" in note


# -- refused at the door -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [300, 1000])
def test_the_queue_path_refuses_a_lead_nested_too_deep_as_an_invalid_lead(depth: int) -> None:
    with pytest.raises(InvalidLead, match="nested more than"):
        parse_incoming(deep_message(depth))
    with pytest.raises(InvalidLead, match="nested more than"):
        parse_incoming(json.loads(deep_message(300)))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running_stack:
        yield running_stack


@pytest.mark.parametrize("depth", [300, 1000, 5000])
@pytest.mark.parametrize("whole_message", [False, True])
def test_ingest_refuses_a_lead_nested_too_deep_with_422_naming_the_problem_and_stores_nothing(
    stack: ApiStack, depth: int, whole_message: bool
) -> None:
    key = stack.key_for("contoso")
    lead_only = json.dumps(dict(MARKETPLACE_LEAD)).encode()[:-1] + b', "x": ' + nested_text(depth).encode() + b"}"
    body = deep_message(depth) if whole_message else lead_only
    answer = stack.client.post(
        "/api/publishers/contoso/leads",
        content=body,
        headers={"Content-Type": "application/json", **stack.bearer(key)},
    )
    assert answer.status_code == 422, answer.text
    assert "nested more than 32 levels" in answer.json()["error"]
    assert answer.json()["reason"] == "InvalidLead"
    assert stack.services.transport.receive(QUEUE_INCOMING, max_messages=10) == []


def test_a_lead_nested_too_deep_on_the_queue_is_dead_lettered_invalid_lead(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        good = lead_message(publisher, 1)
        h.send([OutgoingMessage(body=deep_message(300, "deep-q", publisher), message_id="deep-q"), good])
        h.start()
        h.wait_for(lambda: len(h.dead_letters()) == 1 and len(h.written(publisher)) == 1)
        [dead] = h.dead_letters()
        assert dead.reason == DeadLetterReason.INVALID_LEAD
        assert "nested more than" in (dead.description or "")


# -- shown without recursing -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [300, 1000])
def test_dead_letters_stored_too_deep_are_listed_and_counted_by_the_api(stack: ApiStack, depth: int) -> None:
    stored_dead_letter(stack.services.transport, deep_message(depth))
    stored_dead_letter(stack.services.transport, json.dumps({"publisherId": "contoso", "ok": 1}).encode(), "fine")
    admin = stack.admin()
    answer = stack.client.get("/api/deadletters", headers=admin)
    assert answer.status_code == 200, answer.text
    items = {item["leadId"]: item for item in answer.json()["items"]}
    assert isinstance(items["deep-1"]["body"], str)
    assert "nested more than 32 levels" in items["deep-1"]["bodyNote"]
    assert items["fine"]["body"] == {"publisherId": "contoso", "ok": 1}
    assert "bodyNote" not in items["fine"]
    status = stack.client.get("/api/publishers/contoso/status", headers=admin)
    assert status.status_code == 200, status.text
    assert status.json()["deadLetters"] == {"InvalidLead": 2}


@pytest.mark.parametrize("depth", [300, 1000])
def test_replaying_a_dead_letter_stored_too_deep_sends_its_bytes_unchanged(stack: ApiStack, depth: int) -> None:
    body = deep_message(depth)
    stored_dead_letter(stack.services.transport, body)
    answer = stack.client.post("/api/deadletters/replay", json={}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    assert answer.json()["replayed"] == 1
    [copy] = stack.services.transport.receive(QUEUE_INCOMING, max_messages=10)
    assert copy.body == body


@pytest.mark.parametrize("depth", [300, 1000])
def test_leadwriter_deadletters_list_shows_a_dead_letter_stored_too_deep(tmp_path: Path, depth: int) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_", "ServiceBusConnection"))
    }
    env.update(LEADWRITER_DATA_DIR=str(tmp_path / "data"), COLUMNS="200", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    transport = make_transport(Settings.from_env(env))
    try:
        stored_dead_letter(transport, deep_message(depth))
        assert len(list_dead_letters(transport, DeadLetterFilter.build())) == 1
    finally:
        transport.close()
    for args in (["deadletters", "list"], ["deadletters", "list", "--json"]):
        done = subprocess.run(
            [*COMMAND, *args], cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "deep-1" in done.stdout
    [line] = done.stdout.splitlines()
    assert "nested more than 32 levels" in json.loads(line)["bodyNote"]

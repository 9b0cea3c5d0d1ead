"""The ingest route's short way (``shared.api.ingest.IngestShortcut``), over a real server: the answers
it gives are the route's own, byte for byte, and everything it is not sure of goes the long way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.api.auth import LIMITER_STATE, MAX_FAILED_KEYS, FailedKeyLimiter
from shared.api.ingest import IngestShortcut
from shared.names import QUEUE_INCOMING
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack

PATH = "/api/publishers/contoso/leads"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        yield running


def _shortcut(stack: ApiStack) -> IngestShortcut:
    """The app's shortcut instance, found down its middleware chain."""
    layer: Any = stack.server.app.middleware_stack
    while layer is not None and not isinstance(layer, IngestShortcut):
        layer = getattr(layer, "app", None)
    assert isinstance(layer, IngestShortcut), "the app has no ingest shortcut"
    return layer


def _answer(response: httpx.Response, lead_id: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (but the date) and body, with the lead id blanked out."""
    headers = {name: value for name, value in response.headers.items() if name != "date"}
    return response.status_code, headers, response.content.replace(lead_id.encode(), b"<id>")


def _post(stack: ApiStack, key: str, *idempotency_keys: str, body: Any = MARKETPLACE_LEAD) -> httpx.Response:
    headers = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
    headers += [("Idempotency-Key", value) for value in idempotency_keys]
    return stack.client.post(PATH, content=json.dumps(body).encode(), headers=headers)


def test_a_lead_the_shortcut_answers_gets_the_routes_answer_byte_for_byte_new_and_duplicate(
    stack: ApiStack,
) -> None:
    key = stack.key_for("contoso")
    shortcut = _shortcut(stack)
    # The same header twice is a request the shortcut leaves to the route (which takes it).
    by_route = _post(stack, key, "lead-one", "lead-one")
    assert shortcut.answered == 0
    by_shortcut = _post(stack, key, "lead-two")
    assert shortcut.answered == 1
    assert by_route.status_code == 202
    assert _answer(by_shortcut, "lead-two") == _answer(by_route, "lead-one")

    again_by_route = _post(stack, key, "lead-two", "lead-two")
    again_by_shortcut = _post(stack, key, "lead-one")
    assert shortcut.answered == 2
    assert again_by_route.status_code == 200
    assert again_by_route.json()["duplicate"] is True
    assert _answer(again_by_shortcut, "lead-one") == _answer(again_by_route, "lead-two")
    queued = stack.services.transport.receive(QUEUE_INCOMING, max_messages=10)
    assert sorted(m.message_id for m in queued) == ["lead-one", "lead-two"]


def test_refusals_on_the_ingest_route_are_the_routes_own_and_queue_nothing(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    other = stack.key_for("fabrikam")
    shortcut = _shortcut(stack)

    not_json = stack.client.post(PATH, content=b"{not json", headers={"Authorization": f"Bearer {key}"})
    assert not_json.status_code == 422
    assert not_json.json()["field"] == "body"
    no_lead = _post(stack, key, body={"lead": None, "leadId": "x"})
    assert no_lead.status_code == 422
    assert "lead" in no_lead.json()["error"]
    wrong_header = _post(stack, key, "has a\ttab")
    assert wrong_header.status_code == 422
    assert _post(stack, other).status_code == 403
    assert stack.client.post(PATH, json=MARKETPLACE_LEAD).status_code == 401
    too_large = stack.client.post(
        PATH, content=b'{"a":"' + b"x" * 2_000_000 + b'"}', headers={"Authorization": f"Bearer {key}"}
    )
    assert too_large.status_code == 413

    assert shortcut.answered == 0
    assert stack.services.transport.receive(QUEUE_INCOMING, max_messages=10) == []


def test_a_bad_key_on_the_ingest_route_is_counted_once_toward_the_limit(stack: ApiStack) -> None:
    stack.key_for("contoso")
    # The real limit (the stack's own is set out of reach).
    setattr(stack.server.app.state, LIMITER_STATE, FailedKeyLimiter())
    for _ in range(MAX_FAILED_KEYS - 1):
        assert _post(stack, "lw_contoso_not-a-key").status_code == 401
    # Counted twice (once by each way through) would have reached the limit already.
    assert _post(stack, "lw_contoso_not-a-key").status_code == 401
    assert _post(stack, "lw_contoso_not-a-key").status_code == 429


def test_a_key_given_as_a_query_parameter_takes_the_short_way_too(stack: ApiStack) -> None:
    key = stack.key_for("contoso")
    shortcut = _shortcut(stack)
    _post(stack, key, "warm-the-key-cache", "warm-the-key-cache")
    answer = stack.client.post(PATH, params={"key": key}, json=MARKETPLACE_LEAD)
    assert answer.status_code == 202, answer.text
    assert shortcut.answered == 1

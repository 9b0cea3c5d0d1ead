"""The Azure Functions adapters: registered bindings, and the stage triggers called with real SDK messages.

The Functions host cannot run here; these tests call the registered trigger functions the way the
Python worker would, with the SDK's own ``ServiceBusReceivedMessage`` (as the servicebus binding
extension hands it over: decoded from AMQP, no receiver) and a recording stand-in for the host's
``ServiceBusMessageActions`` (settlement over gRPC to the host — a seam we do not own a fake of).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED, SERVICEBUS_CONNECTION
from shared.services import use_process_services
from shared.simulator import CrmSimulator
from tests.fixtures.functions import registered
from tests.fixtures.harness import Harness, lead_message
from tests.fixtures.servicebus import sdk_message


@pytest.mark.parametrize(
    ("name", "queue"),
    [("validate_credentials", QUEUE_INCOMING), ("check_solution", QUEUE_VALIDATED), ("write_lead", QUEUE_READY)],
)
def test_each_stage_is_a_service_bus_trigger_on_its_queue_by_connection_setting(name: str, queue: str) -> None:
    trigger = registered()[name].get_trigger().get_dict_repr()
    assert trigger["type"] == "serviceBusTrigger"
    assert trigger["queueName"] == queue
    assert trigger["connection"] == SERVICEBUS_CONNECTION
    assert trigger["autoCompleteMessages"] is False
    cardinality = trigger.get("cardinality")
    assert str(getattr(cardinality, "value", cardinality or "one")) == ("many" if name == "write_lead" else "one")


def test_the_http_api_is_one_anonymous_catch_all_http_trigger() -> None:
    trigger = registered()["http_api"].get_trigger().get_dict_repr()
    assert trigger["type"] == "httpTrigger"
    assert trigger["route"] == "{*route}"
    assert str(trigger["authLevel"].value) == func.AuthLevel.ANONYMOUS.value
    assert set(registered()) == {"validate_credentials", "check_solution", "write_lead", "run_job", "http_api"}


class RecordingActions:
    """Records settlement calls and what the broker held at the moment of each."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _snapshot(self) -> dict[str, Any]:
        transport = self.harness.services.transport
        return {q: transport.stats(q).active for q in (QUEUE_VALIDATED, QUEUE_READY)}

    def complete(self, message: Any) -> None:
        self.calls.append(("complete", {"queues": self._snapshot(), "message_id": message.message_id}))

    def deadletter(
        self, message: Any, deadletter_reason: str | None = None, deadletter_error_description: str | None = None
    ) -> None:
        self.calls.append(("deadletter", {"reason": deadletter_reason, "description": deadletter_error_description}))


@pytest.fixture
def functions_host(simulator: CrmSimulator, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(simulator, tmp_path)
    use_process_services(harness.services)
    try:
        yield harness
    finally:
        use_process_services(None)
        harness.services.close()


def _trigger(name: str) -> Any:
    return registered()[name].get_user_function()


def test_a_valid_lead_is_forwarded_before_the_trigger_message_is_completed(functions_host: Harness) -> None:
    publisher = functions_host.publisher()
    body = json.dumps(lead_message(publisher, 1)).encode()
    message = sdk_message(
        None,
        message_id=f"{publisher}-00001",
        body=body,
        properties={"publisherId": publisher, "leadId": f"{publisher}-00001", "attempt": 1},
    )
    actions = RecordingActions(functions_host)

    _trigger("validate_credentials")(message, actions)

    [(action, details)] = actions.calls
    assert action == "complete"
    assert details["queues"][QUEUE_VALIDATED] == 1, "the forward was sent before the complete"


def test_a_malformed_lead_is_dead_lettered_at_once_with_its_reason(functions_host: Harness) -> None:
    message = sdk_message(
        None,
        message_id="bad-1",
        body=b'{"publisherId": "contoso", "lead": []}',
        properties={"publisherId": "contoso", "leadId": "bad-1"},
    )
    actions = RecordingActions(functions_host)

    _trigger("validate_credentials")(message, actions)

    [(action, details)] = actions.calls
    assert action == "deadletter"
    assert details["reason"] == "InvalidLead"
    assert "lead" in details["description"]


def test_the_write_trigger_delivers_the_lead_to_the_crm(functions_host: Harness, simulator: CrmSimulator) -> None:
    from shared.pipeline.lead import parse_incoming

    publisher = functions_host.publisher()
    normalised = parse_incoming(json.dumps(lead_message(publisher, 3)).encode()).to_body()
    message = sdk_message(
        None,
        message_id=f"{publisher}-00003",
        body=normalised,
        properties={"publisherId": publisher, "leadId": f"{publisher}-00003", "attempt": 1},
    )
    actions = RecordingActions(functions_host)

    _trigger("write_lead")([message], actions)

    assert [a for a, _ in actions.calls] == ["complete"]
    assert len(simulator.leads(publisher)) == 1


def test_the_write_trigger_sends_a_batch_of_one_publisher_as_one_crm_request(
    functions_host: Harness, simulator: CrmSimulator
) -> None:
    from shared.pipeline.lead import parse_incoming

    publisher = functions_host.publisher()
    messages = []
    for n in range(5):
        lead_id = f"{publisher}-{n:05d}"
        body = parse_incoming(json.dumps(lead_message(publisher, n)).encode()).to_body()
        messages.append(
            sdk_message(
                None,
                message_id=lead_id,
                body=body,
                properties={"publisherId": publisher, "leadId": lead_id, "attempt": 1},
            )
        )
    messages.append(
        sdk_message(
            None, message_id="broken", body=b"not json", properties={"publisherId": publisher, "leadId": "broken"}
        )
    )
    actions = RecordingActions(functions_host)

    _trigger("write_lead")(messages, actions)

    assert [a for a, _ in actions.calls] == ["complete"] * 5 + ["deadletter"]
    assert len(simulator.leads(publisher)) == 5
    log = simulator.requests(publisher)
    assert (log.create_multiple, log.batches, log.lead_writes) == (1, 0, 0)


def _ready_messages(publisher: str, count: int, *, locked_for: float = 300.0) -> list[Any]:
    from datetime import UTC, datetime, timedelta

    from shared.pipeline.lead import parse_incoming

    messages = []
    for n in range(count):
        lead_id = f"{publisher}-{n:05d}"
        messages.append(
            sdk_message(
                None,
                message_id=lead_id,
                body=parse_incoming(json.dumps(lead_message(publisher, n)).encode()).to_body(),
                properties={"publisherId": publisher, "leadId": lead_id, "attempt": 1},
                locked_until=datetime.now(UTC) + timedelta(seconds=locked_for),
            )
        )
    return messages


def test_the_batched_write_trigger_feeds_the_status_book_and_the_metrics(functions_host: Harness) -> None:
    publisher = functions_host.publisher()
    actions = RecordingActions(functions_host)

    _trigger("write_lead")(_ready_messages(publisher, 4), actions)

    assert functions_host.services.status.get(publisher).delivered == 4
    assert functions_host.services.metrics.snapshot().delivered == {"write_lead": 4}


def test_a_write_batch_that_outlives_its_lock_renews_it_and_settles_without_redelivery(
    functions_host: Harness, simulator: CrmSimulator
) -> None:
    publisher = functions_host.publisher()
    simulator.faults(publisher).latency = 1.5  # the $batch takes longer than the 0.8 s of lock left
    renewed: list[str] = []

    class RenewingActions(RecordingActions):
        def renew_message_lock(self, message: Any) -> None:
            renewed.append(message.message_id)

    actions = RenewingActions(functions_host)

    _trigger("write_lead")(_ready_messages(publisher, 3, locked_for=0.8), actions)

    assert [a for a, _ in actions.calls] == ["complete"] * 3
    assert set(renewed) == {f"{publisher}-{n:05d}" for n in range(3)}, "every lock was renewed during the call"
    assert len(simulator.leads(publisher)) == 3


def test_a_connection_stored_through_the_http_function_is_what_this_workers_stages_use(
    functions_host: Harness, simulator: CrmSimulator
) -> None:
    import functions.http
    from shared.crm.connection import ClientSecretAuth, Connection

    publisher = functions_host.publisher()
    services = functions_host.services
    old = services.pipeline.connection(publisher)  # cached by a stage
    client_id, secret = "9d9c0f56-4b41-4f0b-9b7e-3f0a2c0b1c11", "rotated-secret-value-123"
    simulator.add_app(publisher, client_id, secret)
    rotated = Connection(
        url=old.url,
        auth=ClientSecretAuth(tenantId=old.auth.tenant_id, clientId=client_id, clientSecret=secret),  # type: ignore[union-attr]
    )
    functions.http.api_app.cache_clear()
    try:
        app = functions.http.api_app()
        assert app.state.services is services, "the HTTP function and the triggers share one set of services"
        key = services.api_keys.issue(publisher)
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            answer = client.put(
                f"/api/publishers/{publisher}/connection",
                json={
                    "url": rotated.url,
                    "auth": {
                        "kind": "clientSecret",
                        "tenantId": old.auth.tenant_id,
                        "clientId": client_id,  # type: ignore[union-attr]
                        "clientSecret": secret,
                    },
                },
                headers={"Authorization": f"Bearer {key}"},
            )
        assert answer.status_code == 200, answer.text
    finally:
        functions.http.api_app.cache_clear()

    assert services.pipeline.connection(publisher).fingerprint() == rotated.fingerprint()

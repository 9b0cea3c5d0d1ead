"""Connections through the API against the CRM simulator over real sockets: verified live before they
are stored, refused with the architecture §5 reason and nothing stored, re-tested, removed, and a verified
update replays the publisher's configuration dead letters until they are delivered exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.errors import DeadLetterReason
from shared.names import QUEUE_INCOMING
from shared.pipeline.lead import lead_record_id
from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator, SimOrg
from shared.transport.base import OutgoingMessage
from tests.fixtures.api import (
    MARKETPLACE_LEAD,
    ApiStack,
    api_stack,
    client_secret_body,
    password_body,
)
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, sim_username


@pytest.fixture
def stack(simulator: CrmSimulator, tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data", simulator) as running:
        yield running


def test_a_verified_password_connection_is_stored_and_answered_without_its_password(
    stack: ApiStack, crm_org: SimOrg
) -> None:
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    assert SIM_PASSWORD not in answer.text
    assert payload["connection"]["auth"] == {"kind": "password", "username": sim_username(crm_org)}
    assert payload["connection"]["url"] == crm_org.url
    assert payload["verification"]["ok"] is True
    assert payload["verification"]["checks"] == {
        "token": "passed",
        "whoAmI": "passed",
        "solution": "passed",
        "createLeads": "passed",
    }
    assert payload["verification"]["solutionVersion"] == "1.0.0.0"
    assert payload["replayed"] == 0
    stored = stack.services.connections.get(crm_org.name)
    assert stored is not None
    assert stored.secret_value() == SIM_PASSWORD
    assert stored.verification is not None
    assert stored.verification.ok
    assert stored.updated_at is not None
    read = stack.client.get(f"/api/publishers/{crm_org.name}/connection", headers=stack.admin())
    assert read.status_code == 200
    assert read.json()["verification"]["ok"] is True
    assert SIM_PASSWORD not in read.text


def test_a_verified_client_secret_connection_is_stored_with_a_publisher_key(stack: ApiStack, crm_org: SimOrg) -> None:
    key = stack.key_for(crm_org.name)
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection",
        json=client_secret_body(crm_org, SIM_CLIENT_ID, SIM_CLIENT_SECRET),
        headers=stack.bearer(key),
    )
    assert answer.status_code == 200, answer.text
    assert SIM_CLIENT_SECRET not in answer.text
    assert answer.json()["connection"]["auth"] == {
        "kind": "clientSecret",
        "tenantId": crm_org.tenant_id,
        "clientId": SIM_CLIENT_ID,
    }
    assert stack.services.connections.get(crm_org.name) is not None


def _wrong_password(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return password_body(org, password=SIM_PASSWORD + "-wrong")


def _no_solution(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    simulator.set_solution(org.name, None)
    return password_body(org)


def _old_solution(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    simulator.set_solution(org.name, "0.9.5.0")
    return password_body(org)


def _no_role(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    simulator.set_role(org.name, sim_username(org), False)
    return password_body(org)


def _wrong_secret(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return client_secret_body(org, SIM_CLIENT_ID, SIM_CLIENT_SECRET + "x")


def _mfa(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    simulator.set_user_flags(org.name, sim_username(org), mfa_required=True)
    return password_body(org)


@pytest.mark.parametrize(
    ("arrange", "reason", "fragment", "failed_step"),
    [
        (_wrong_password, "CredentialsRejected", "password was rejected: check the user name", "token"),
        (_wrong_secret, "CredentialsRejected", "AADSTS7000215", "token"),
        (_mfa, "CredentialsRejected", "AADSTS50076", "token"),
        (_no_solution, "SolutionMissing", "solution is not installed in the CRM", "solution"),
        (_old_solution, "SolutionVersionUnsupported", "0.9.5.0", "solution"),
        (_no_role, "PermissionDenied", "lacks the Lead Writer role", "solution"),
    ],
    ids=["wrong-password", "wrong-secret", "mfa", "no-solution", "old-solution", "no-role"],
)
def test_a_connection_that_fails_verification_is_422_with_its_reason_and_nothing_is_stored(
    stack: ApiStack,
    simulator: CrmSimulator,
    crm_org: SimOrg,
    arrange: Callable[[CrmSimulator, SimOrg], dict[str, Any]],
    reason: str,
    fragment: str,
    failed_step: str,
) -> None:
    body = arrange(simulator, crm_org)
    answer = stack.client.put(f"/api/publishers/{crm_org.name}/connection", json=body, headers=stack.admin())
    assert answer.status_code == 422, answer.text
    payload = answer.json()
    assert payload["reason"] == reason
    assert fragment in payload["message"]
    assert payload["verification"]["ok"] is False
    assert payload["verification"]["checks"][failed_step] == "failed"
    assert SIM_PASSWORD not in answer.text
    assert SIM_CLIENT_SECRET not in answer.text
    assert stack.services.connections.get(crm_org.name) is None
    assert stack.client.get(f"/api/publishers/{crm_org.name}/connection", headers=stack.admin()).status_code == 404


def test_a_failed_update_keeps_the_connection_that_was_stored(stack: ApiStack, crm_org: SimOrg) -> None:
    path = f"/api/publishers/{crm_org.name}/connection"
    assert stack.client.put(path, json=password_body(crm_org), headers=stack.admin()).status_code == 200
    before = stack.services.connections.get(crm_org.name)
    refused = stack.client.put(path, json=password_body(crm_org, password="Wrong-1"), headers=stack.admin())
    assert refused.status_code == 422
    assert stack.services.connections.get(crm_org.name) == before


@pytest.mark.parametrize(
    ("inject", "retry_after"),
    [
        (lambda sim, org: sim.faults(org.name).fail_next(3, 503), None),
        (lambda sim, org: sim.faults(org.name).token_fail_next(1, 503), None),
        (lambda sim, org: sim.faults(org.name).throttle_next(1, retry_after=7), 7),
    ],
    ids=["crm-503", "authority-503", "crm-throttled"],
)
def test_a_transient_failure_during_verification_is_503_with_retry_after_and_nothing_stored(
    stack: ApiStack,
    simulator: CrmSimulator,
    crm_org: SimOrg,
    inject: Callable[[CrmSimulator, SimOrg], None],
    retry_after: int | None,
) -> None:
    inject(simulator, crm_org)
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection",
        json=client_secret_body(crm_org, SIM_CLIENT_ID, SIM_CLIENT_SECRET),
        headers=stack.admin(),
    )
    simulator.faults(crm_org.name).clear()
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["Retry-After"]) >= 1
    if retry_after is not None:
        assert int(answer.headers["Retry-After"]) == retry_after
    assert stack.services.connections.get(crm_org.name) is None


def test_verify_false_stores_without_checking_and_status_says_not_verified(stack: ApiStack, crm_org: SimOrg) -> None:
    requests_before = stack.simulator.requests(crm_org.name).total if stack.simulator else 0
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection",
        params={"verify": "false"},
        json=password_body(crm_org, password="Whatever-1"),
        headers=stack.admin(),
    )
    assert answer.status_code == 200
    assert "verification" not in answer.json()
    assert stack.simulator is not None
    assert stack.simulator.requests(crm_org.name).total == requests_before
    status = stack.client.get(f"/api/publishers/{crm_org.name}/status", headers=stack.admin()).json()
    assert status["connection"] == {"stored": True, "verified": False, "lastVerification": None}


def test_delete_removes_the_connection_and_a_second_delete_is_404(stack: ApiStack, crm_org: SimOrg) -> None:
    path = f"/api/publishers/{crm_org.name}/connection"
    stack.client.put(path, params={"verify": "false"}, json=password_body(crm_org), headers=stack.admin())
    first = stack.client.delete(path, headers=stack.admin())
    assert first.status_code == 204
    assert first.content == b""
    assert stack.services.connections.get(crm_org.name) is None
    assert stack.client.delete(path, headers=stack.admin()).status_code == 404
    assert stack.client.get(path, headers=stack.admin()).status_code == 404


def test_testing_a_connection_reverifies_it_and_stores_the_new_verification(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    base = f"/api/publishers/{crm_org.name}/connection"
    stored = stack.client.put(base, json=password_body(crm_org), headers=stack.admin()).json()
    passed = stack.client.post(f"{base}/test", headers=stack.admin())
    assert passed.status_code == 200
    assert passed.json()["verification"]["checkedAt"] >= stored["verification"]["checkedAt"]
    # When the role is taken away, the test fails with the reason, and the failure is remembered
    simulator.set_role(crm_org.name, sim_username(crm_org), False)
    failed = stack.client.post(f"{base}/test", headers=stack.admin())
    assert failed.status_code == 422
    assert failed.json()["reason"] == "PermissionDenied"
    remembered = stack.services.connections.get(crm_org.name)
    assert remembered is not None
    assert remembered.verification is not None
    assert remembered.verification.ok is False
    assert remembered.verification.reason == "PermissionDenied"
    assert remembered.secret_value() == SIM_PASSWORD
    status = stack.client.get(f"/api/publishers/{crm_org.name}/status", headers=stack.admin()).json()
    assert status["connection"]["verified"] is False


def test_testing_with_send_test_lead_writes_an_msft_test_lead_with_a_deterministic_id(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    base = f"/api/publishers/{crm_org.name}/connection"
    stack.client.put(base, json=client_secret_body(crm_org, SIM_CLIENT_ID, SIM_CLIENT_SECRET), headers=stack.admin())
    answer = stack.client.post(f"{base}/test", params={"sendTestLead": "true"}, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    test_lead = answer.json()["testLead"]
    assert test_lead["created"] is True
    assert test_lead["marker"].startswith("MSFT_TEST_")
    assert test_lead["marker"][10:].isdigit()
    assert test_lead["recordId"] == str(lead_record_id(crm_org.name, test_lead["leadId"]))
    [record] = simulator.leads(crm_org.name)
    assert str(record["leadid"]).lower() == test_lead["recordId"]
    assert str(record["subject"]).startswith("[TEST]")


def test_testing_without_a_stored_connection_is_404(stack: ApiStack, crm_org: SimOrg) -> None:
    answer = stack.client.post(f"/api/publishers/{crm_org.name}/connection/test", headers=stack.admin())
    assert answer.status_code == 404


def test_a_verified_update_replays_the_publishers_configuration_dead_letters_and_they_are_delivered_once(
    stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    publisher = crm_org.name
    key = stack.key_for(publisher)
    # Given leads ingested while no connection is stored, dead-lettered CredentialsMissing by the pipeline
    lead_ids = []
    for n in range(3):
        lead = {**MARKETPLACE_LEAD, "UserDetails": {"FirstName": f"Ada{n}", "Email": f"ada{n}@example.com"}}
        answer = stack.client.post(f"/api/publishers/{publisher}/leads", params={"key": key}, json=lead)
        assert answer.status_code == 202
        lead_ids.append(answer.json()["leadId"])
    # ... beside a dead letter of the same publisher that a connection does not fix, and another publisher's
    transport = stack.services.transport
    transport.send(
        QUEUE_INCOMING,
        [
            OutgoingMessage(body=b"not json", message_id="broken-1", application_properties={"publisherId": publisher}),
        ],
    )
    stack.start_runtime()
    assert wait_until(lambda: len(_dead(stack, publisher)) == 4, timeout=30), _dead(stack, publisher)
    reasons = sorted(item["reason"] for item in _dead(stack, publisher))
    assert reasons == ["CredentialsMissing"] * 3 + ["InvalidLead"]
    status = stack.client.get(f"/api/publishers/{publisher}/status", headers=stack.bearer(key)).json()
    assert status["deadLetters"] == {"CredentialsMissing": 3, "InvalidLead": 1}
    assert status["consecutiveConfigFailures"] == 3
    assert status["lastError"]["reason"] in {"CredentialsMissing", "InvalidLead"}  # whichever settled last

    # When the publisher stores a connection that verifies
    answer = stack.client.put(
        f"/api/publishers/{publisher}/connection", json=password_body(crm_org), headers=stack.bearer(key)
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["replayed"] == 3

    # Then those leads are delivered, each exactly once, and only the InvalidLead stays dead-lettered
    assert wait_until(lambda: len(simulator.leads(publisher)) >= 3, timeout=30)
    assert wait_until(lambda: stack.services.status.get(publisher).delivered == 3, timeout=30)
    records = simulator.leads(publisher)
    assert sorted(str(r["leadid"]).lower() for r in records) == sorted(
        str(lead_record_id(publisher, lead_id)) for lead_id in lead_ids
    )
    assert [item["reason"] for item in _dead(stack, publisher)] == [str(DeadLetterReason.INVALID_LEAD)]
    status = stack.client.get(f"/api/publishers/{publisher}/status", headers=stack.bearer(key)).json()
    assert status["delivered"] == 3
    assert status["lastDelivery"] is not None
    assert status["consecutiveConfigFailures"] == 0
    assert status["connection"]["verified"] is True


def _dead(stack: ApiStack, publisher: str) -> list[dict[str, Any]]:
    answer = stack.client.get("/api/deadletters", params={"publisherId": publisher}, headers=stack.admin())
    assert answer.status_code == 200
    items: list[dict[str, Any]] = answer.json()["items"]
    return items

"""CreateMultiple with its idempotent fallback (architecture §4), and the simulator's model of it: the
real client against the simulator over real HTTPS sockets."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from shared.crm import DataverseClient, LeadWrite, TokenProvider
from shared.crm.client import bulk_fallback
from shared.crm.connection import ClientSecretAuth, Connection
from shared.crm.pacing import Pacer
from shared.errors import CrmThrottled, CrmUnavailable, LeadRejected
from shared.pipeline import write_lead
from shared.pipeline.lead import parse_incoming
from shared.pipeline.outcomes import Delivered
from shared.settings import Settings
from shared.simulator import CrmSimulator, SimOrg
from shared.simulator.limits import CONCURRENCY_CODE, EXECUTION_CODE, ExecutionModel
from shared.transport.base import ReceivedMessage
from tests.fixtures.harness import lead_message, running
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, simulator_settings
from tests.test_simulator import app_token

API = "/api/data/v9.2/"


def connection(org: SimOrg) -> Connection:
    return Connection(
        url=org.url,
        auth=ClientSecretAuth(tenant_id=org.tenant_id, client_id=SIM_CLIENT_ID, client_secret=SIM_CLIENT_SECRET),
    )


def lead(n: int, **columns: object) -> LeadWrite:
    return LeadWrite(
        record_id=uuid.uuid5(uuid.NAMESPACE_URL, f"test/{uuid.uuid4()}/{n}"),
        columns={"subject": f"Lead {n}", "lastname": f"Lovelace {n}", **columns},
    )


@pytest.fixture
def settings(simulator: CrmSimulator, tmp_path: Path) -> Settings:
    return simulator_settings(simulator, tmp_path)


@pytest.fixture
def client(settings: Settings, crm_org: SimOrg) -> DataverseClient:
    return DataverseClient(connection(crm_org), settings, tokens=TokenProvider(settings), pacer=Pacer())


def stored_ids(simulator: CrmSimulator, org: SimOrg) -> list[str]:
    return [record["leadid"] for record in simulator.leads(org.name)]


# --- the client ------------------------------------------------------------------------------------


def test_a_group_of_leads_is_written_in_one_create_multiple_request_with_their_own_ids(
    simulator: CrmSimulator, crm_org: SimOrg, client: DataverseClient
) -> None:
    leads = [lead(n) for n in range(25)]

    results = client.create_many(leads)

    assert [(r.record_id, r.created, r.ok) for r in results] == [(w.record_id, True, True) for w in leads]
    assert stored_ids(simulator, crm_org) == [str(w.record_id) for w in leads]
    log = simulator.requests(crm_org.name)
    assert (log.create_multiple, log.create_multiple_targets, log.batches, log.lead_writes) == (1, 25, 0, 0)
    assert client.request_count == 1


def test_a_group_with_one_lead_already_there_falls_back_and_answers_each_leads_outcome(
    simulator: CrmSimulator, crm_org: SimOrg, client: DataverseClient
) -> None:
    existing = lead(0)
    client.create_lead(existing)
    leads = [lead(1), existing, lead(2)]

    results = client.create_many(leads)

    assert [(r.created, r.ok) for r in results] == [(True, True), (False, True), (True, True)]
    assert sorted(stored_ids(simulator, crm_org)) == sorted(str(w.record_id) for w in leads)
    log = simulator.requests(crm_org.name)
    assert (log.create_multiple, log.batches, log.batch_operations) == (1, 1, 3)


def test_a_group_with_one_refused_lead_falls_back_and_only_that_lead_is_rejected(
    simulator: CrmSimulator, crm_org: SimOrg, client: DataverseClient
) -> None:
    refused = lead(1, nosuchcolumn="x")
    leads = [lead(0), refused, lead(2)]

    results = client.create_many(leads)

    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, LeadRejected)
    assert "nosuchcolumn" in results[1].error.message
    assert sorted(stored_ids(simulator, crm_org)) == sorted(str(leads[i].record_id) for i in (0, 2))


def test_a_redelivered_group_creates_nothing_twice(
    simulator: CrmSimulator, crm_org: SimOrg, client: DataverseClient
) -> None:
    leads = [lead(n) for n in range(10)]
    client.create_many(leads)

    again = client.create_many(leads)

    assert [(r.created, r.ok) for r in again] == [(False, True)] * 10
    assert sorted(stored_ids(simulator, crm_org)) == sorted(str(w.record_id) for w in leads)


def test_a_throttled_create_multiple_raises_for_the_whole_group_without_falling_back(
    simulator: CrmSimulator, crm_org: SimOrg, client: DataverseClient
) -> None:
    client.whoami()
    simulator.faults(crm_org.name).throttle_next(1, retry_after=0.2)

    with pytest.raises(CrmThrottled):
        client.create_many([lead(0), lead(1)])

    log = simulator.requests(crm_org.name)
    assert (log.create_multiple, log.batches) == (1, 0)
    assert simulator.leads(crm_org.name) == []


def test_a_failing_create_multiple_raises_for_the_whole_group_and_its_retry_writes_each_once(
    simulator: CrmSimulator, crm_org: SimOrg, client: DataverseClient
) -> None:
    client.whoami()
    simulator.faults(crm_org.name).fail_next(1, status=503)
    leads = [lead(0), lead(1)]

    with pytest.raises(CrmUnavailable):
        client.create_many(leads)
    results = client.create_many(leads)

    assert all(r.created for r in results)
    assert sorted(stored_ids(simulator, crm_org)) == sorted(str(w.record_id) for w in leads)
    assert simulator.requests(crm_org.name).batches == 0


@pytest.mark.parametrize(
    ("status", "body", "fallback"),
    [
        (400, {"error": {"code": "0x80040237", "message": "Cannot insert duplicate key."}}, True),
        (500, {"error": {"code": "0x80040237", "message": "Cannot insert duplicate key."}}, True),
        (412, {"error": {"code": "0x80060882", "message": "A record with matching key values already exists."}}, True),
        (400, {"error": {"code": "0x80044331", "message": "A validation error occurred."}}, True),
        (404, {"error": {"code": "0x80040217", "message": "systemuser With Id = 1 Does Not Exist"}}, True),
        (403, {"error": {"code": "0x80040220", "message": "Principal user is missing prvCreateLead"}}, False),
        (429, {"error": {"code": "0x80072321", "message": "Combined execution time ..."}}, False),
        (500, {"error": {"code": "0x80040216", "message": "An unexpected error occurred."}}, False),
        (503, {"error": {"code": "", "message": "Service Unavailable."}}, False),
    ],
)
def test_only_a_failure_of_the_leads_themselves_falls_back_to_batch_parts(
    status: int, body: dict[str, object], fallback: bool
) -> None:
    assert bulk_fallback(status, json.dumps(body).encode()) is fallback


# --- the simulator's model -------------------------------------------------------------------------


def _post(simulator: CrmSimulator, org: SimOrg, token: str, payload: object) -> requests.Response:
    return requests.post(
        f"{org.url}{API}leads/Microsoft.Dynamics.CRM.CreateMultiple",
        json=payload,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        verify=str(simulator.ca_path),
        timeout=10,
    )


def _token(simulator: CrmSimulator, org: SimOrg) -> str:
    return app_token(simulator, org)


def _target(lead_id: str, **columns: object) -> dict[str, object]:
    return {"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": lead_id, "lastname": "L", **columns}


def test_the_simulator_answers_create_multiple_with_the_ids_in_target_order(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]

    response = _post(simulator, crm_org, _token(simulator, crm_org), {"Targets": [_target(i) for i in ids]})

    assert response.status_code == 200
    assert response.json()["Ids"] == ids
    assert response.json()["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse")


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ("existing", "0x80040237"),
        ("invalid", "0x80060888"),
        ("untyped", "0x80048d19"),
        ("twice", "0x80040237"),
    ],
)
def test_create_multiple_is_atomic_one_bad_target_fails_the_call_and_writes_nothing(
    simulator: CrmSimulator, crm_org: SimOrg, bad: str, code: str
) -> None:
    token = _token(simulator, crm_org)
    existing = str(uuid.uuid4())
    assert _post(simulator, crm_org, token, {"Targets": [_target(existing)]}).status_code == 200
    fresh = str(uuid.uuid4())
    odd = {
        "existing": _target(existing),
        "invalid": _target(str(uuid.uuid4()), nosuchcolumn="x"),
        "untyped": {"leadid": str(uuid.uuid4()), "lastname": "L"},
        "twice": _target(fresh),
    }[bad]

    response = _post(simulator, crm_org, token, {"Targets": [_target(fresh), odd, _target(str(uuid.uuid4()))]})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert stored_ids(simulator, crm_org) == [existing]


def test_the_execution_time_limit_answers_its_own_code_message_and_retry_after(
    simulator: CrmSimulator, crm_org: SimOrg
) -> None:
    name = f"exec-{uuid.uuid4().hex[:6]}"
    org = simulator.add_org(
        name, execution_seconds_per_window=0.05, window_seconds=60, execution=ExecutionModel(create_multiple_ms=30)
    )
    simulator.add_app(name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    token = _token(simulator, org)
    assert _post(simulator, org, token, {"Targets": [_target(str(uuid.uuid4())) for _ in range(2)]}).status_code == 200

    refused = _post(simulator, org, token, {"Targets": [_target(str(uuid.uuid4()))]})

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == EXECUTION_CODE
    assert refused.json()["error"]["message"].startswith(
        "Combined execution time of incoming requests exceeded limit of 50 milliseconds over time window of 60 seconds."
    )
    assert int(refused.headers["Retry-After"]) >= 1
    log = simulator.requests(name)
    assert log.create_multiple == 2
    assert log.execution_seconds >= 0.06


def test_responses_carry_the_orgs_dop_hint(simulator: CrmSimulator, crm_org: SimOrg) -> None:
    simulator.set_execution(crm_org.name, ExecutionModel(), dop_hint=4)

    response = _post(simulator, crm_org, _token(simulator, crm_org), {"Targets": [_target(str(uuid.uuid4()))]})

    assert response.headers["x-ms-dop-hint"] == "4"


def test_the_concurrency_limit_code_is_dataverses() -> None:
    assert (EXECUTION_CODE, CONCURRENCY_CODE) == ("0x80072321", "0x80072326")


# --- the write stage -------------------------------------------------------------------------------


def _ready(body: bytes, n: int) -> ReceivedMessage:
    return ReceivedMessage(
        queue="leads-ready",
        body=body,
        message_id=f"m{n}",
        application_properties={},
        content_type="application/json",
        delivery_count=1,
        enqueued_time=datetime.now(UTC),
        sequence_number=n,
    )


def test_the_write_stage_sends_a_backlog_as_one_create_multiple_and_a_redelivery_creates_nothing_twice(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher = h.publisher()
        leads = [parse_incoming(json.dumps(lead_message(publisher, n)).encode()) for n in range(6)]
        messages = [_ready(lead.to_body(), n) for n, lead in enumerate(leads)]
        pipeline = h.services.pipeline

        first = write_lead.run_many(pipeline, messages)
        again = write_lead.run_many(pipeline, messages)

        assert [type(o) for o in first + again] == [Delivered] * 12
        assert [o.created for o in first if isinstance(o, Delivered)] == [True] * 6
        assert [o.created for o in again if isinstance(o, Delivered)] == [False] * 6
        assert len(h.written(publisher)) == 6
        log = simulator.requests(publisher)
        assert (log.create_multiple, log.create_multiple_targets) == (2, 12)
        assert (log.batches, log.batch_operations) == (1, 6), "the redelivery fell back to per-lead parts"


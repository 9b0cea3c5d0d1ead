"""Mappings through the API against the CRM simulator over real sockets: validated live against the lead
metadata, option set and records before they are stored (a bad one → 422 naming it, nothing stored), and a
mapped, linked lead written with its binds."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.crm import LeadWrite
from shared.crm.metadata import ExistingRecords, lead_attributes, option_values
from shared.errors import LeadRejected
from shared.names import QUEUE_INCOMING, QUEUE_READY
from shared.pipeline.lead import lead_record_id, parse_incoming
from shared.pipeline.mapping import columns_for
from shared.runtime.embedded import wait_until
from shared.simulator import CrmSimulator, SimOrg
from shared.transport.base import OutgoingMessage
from tests.fixtures.api import MARKETPLACE_LEAD, ApiStack, api_stack, password_body


@pytest.fixture
def stack(simulator: CrmSimulator, tmp_path: Path) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data", simulator) as running:
        yield running


@pytest.fixture
def org(stack: ApiStack, simulator: CrmSimulator, crm_org: SimOrg) -> SimOrg:
    """``crm_org`` with a stored connection, custom columns, a campaign and a team."""
    answer = stack.client.put(
        f"/api/publishers/{crm_org.name}/connection", json=password_body(crm_org), headers=stack.admin()
    )
    assert answer.status_code == 200, answer.text
    simulator.add_column(crm_org.name, "new_country", "String", 80)
    simulator.add_column(crm_org.name, "new_offer", "String", 20)
    simulator.add_column(crm_org.name, "new_marketplacesource", "String", 200)
    simulator.add_column(crm_org.name, "new_score", "Integer")
    return crm_org


def _mapping(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {
        "leadSourceCode": 10,
        "leadSourceColumn": "new_marketplacesource",
        "campaignId": simulator.add_campaign(org.name),
        "owner": {"type": "team", "id": simulator.add_team(org.name)},
        "subjectTemplate": "{OfferTitle}: {ActionCode} — {Company}",
        "columns": {"new_country": "{Country}", "new_offer": "{OfferId}"},
        "linkExisting": "contact",
    }


def _message(lead_id: str, publisher: str, **lead: Any) -> Any:
    return parse_incoming({"leadId": lead_id, "publisherId": publisher, "lead": {**MARKETPLACE_LEAD, **lead}})


def test_a_valid_mapping_is_stored_and_answered_with_when_it_was_validated(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    body = _mapping(simulator, org)
    key = stack.key_for(org.name)
    answer = stack.client.put(f"/api/publishers/{org.name}/mapping", json=body, headers=stack.bearer(key))
    assert answer.status_code == 200, answer.text
    assert answer.json()["mapping"] == {**body, "onePerCustomerAndOffer": False}
    assert answer.json()["validatedAt"]
    got = stack.client.get(f"/api/publishers/{org.name}/mapping", headers=stack.bearer(key))
    assert got.status_code == 200
    assert got.json()["mapping"] == answer.json()["mapping"]
    assert got.json()["validatedAt"] == answer.json()["validatedAt"]


def _unknown_column(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"columns": {"new_missing": "{Email}"}}


def _wrong_type(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"columns": {"new_score": "{Phone}"}}


def _read_only(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"leadSourceColumn": "fullname"}


def _unknown_option(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"leadSourceCode": 99}


def _missing_campaign(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"campaignId": str(uuid.uuid4())}


def _missing_owner(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"owner": {"type": "systemuser", "id": str(uuid.uuid4())}}


def _unknown_field(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"subjectTemplate": "{OfferTitle} for {Customer}"}


def _literal_too_long(simulator: CrmSimulator, org: SimOrg) -> dict[str, Any]:
    return {"columns": {"new_offer": "Offer: {OfferId} " + "x" * 30}}


@pytest.mark.parametrize(
    ("arrange", "field", "fragment"),
    [
        (_unknown_column, "columns.new_missing", "no column new_missing"),
        (_wrong_type, "columns.new_score", "of type Integer"),
        (_read_only, "leadSourceColumn", "cannot be set"),
        (_unknown_option, "leadSourceCode", "99 is not a value"),
        (_missing_campaign, "campaignId", "no campaign"),
        (_missing_owner, "owner.id", "no systemuser"),
        (_unknown_field, "subjectTemplate", "unknown template field {Customer}"),
        (_literal_too_long, "columns.new_offer", "longer than column new_offer allows (20"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_a_mapping_the_crm_cannot_take_is_refused_422_naming_it_and_nothing_is_stored(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg, arrange: Any, field: str, fragment: str
) -> None:
    answer = stack.client.put(
        f"/api/publishers/{org.name}/mapping", json=arrange(simulator, org), headers=stack.admin()
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert fragment in answer.json()["error"]
    assert stack.client.get(f"/api/publishers/{org.name}/mapping", headers=stack.admin()).status_code == 404


def test_a_mapping_without_a_stored_connection_is_refused_unless_validation_is_skipped(stack: ApiStack) -> None:
    path = "/api/publishers/nocrm/mapping"
    refused = stack.client.put(path, json={"leadSourceCode": 8}, headers=stack.admin())
    assert refused.status_code == 422
    assert refused.json()["field"] == "connection"
    stored = stack.client.put(f"{path}?validate=false", json={"leadSourceCode": 8}, headers=stack.admin())
    assert stored.status_code == 200
    assert "validatedAt" not in stored.json()


def test_the_simulator_serves_lead_metadata_in_dataverse_shapes(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    connection = stack.services.connections.get(org.name)
    assert connection is not None
    client = stack.services.pipeline.client(connection)
    raw = client.get_json("EntityDefinitions(LogicalName='lead')/Attributes?$select=LogicalName,AttributeType")
    subject = next(row for row in raw["value"] if row["LogicalName"] == "subject")
    assert subject["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata"
    assert raw["@odata.context"].endswith("$metadata#EntityDefinitions('lead')/Attributes")
    attributes = lead_attributes(client)
    assert attributes["subject"].max_length == 300
    assert attributes["description"].type == "Memo"
    assert attributes["new_offer"].max_length == 20
    assert attributes["new_score"].type == "Integer"
    assert attributes["fullname"].valid_for_create is False
    assert option_values(client) == set(range(1, 11))
    missing = client.get_json(f"campaigns({uuid.uuid4()})?$select=campaignid", missing_ok=True)
    assert missing is None


def test_a_mapped_linked_lead_is_written_with_its_binds_and_one_query_per_email(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    # Given a stored mapping that links to an existing contact by e-mail
    body = _mapping(simulator, org)
    contact = simulator.add_contact(org.name, "ada@example.com")
    answer = stack.client.put(f"/api/publishers/{org.name}/mapping", json=body, headers=stack.admin())
    assert answer.status_code == 200, answer.text
    mapping = stack.app_mappings().get(org.name)
    assert mapping is not None
    connection = stack.services.connections.get(org.name)
    assert connection is not None
    client = stack.services.pipeline.client(connection)
    links = ExistingRecords()

    # When three leads of that customer are mapped and written
    for n in range(3):
        lead = _message(f"lead-{n}", org.name, OfferTitle="Contoso Widget " + "long " * 30)
        columns = columns_for(lead, mapping, link=links.find(client, mapping, lead))
        assert client.create_lead(LeadWrite(lead_record_id(org.name, lead.lead_id), columns)).created

    # Then each carries the campaign, the team, the contact and the templated columns, within their lengths
    records = simulator.leads(org.name)
    assert len(records) == 3
    for record in records:
        assert record["_campaignid_value"] == body["campaignId"]
        assert record["_ownerid_value"] == body["owner"]["id"]
        assert record["_parentcontactid_value"] == contact
        assert record["new_country"] == "US"
        assert record["new_offer"] == "contoso.widget-saas"[:20]
        assert record["new_marketplacesource"] == "AzureMarketplace-INS|contoso.widget-saas"
        assert record["leadsourcecode"] == 10
        assert len(record["subject"]) <= 300
    assert links.queries == 1


def test_a_write_naming_a_column_deleted_since_is_rejected_with_the_crms_message(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    answer = stack.client.put(
        f"/api/publishers/{org.name}/mapping", json={"columns": {"new_country": "{Country}"}}, headers=stack.admin()
    )
    assert answer.status_code == 200
    mapping = stack.app_mappings().get(org.name)
    simulator.remove_column(org.name, "new_country")
    connection = stack.services.connections.get(org.name)
    assert connection is not None
    lead = _message("gone-1", org.name)
    with pytest.raises(LeadRejected) as rejected:
        stack.services.pipeline.client(connection).create_lead(
            LeadWrite(lead_record_id(org.name, lead.lead_id), columns_for(lead, mapping))
        )
    assert "new_country" in rejected.value.message


def test_storing_a_mapping_replays_the_publishers_lead_rejected_dead_letters(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    transport = stack.services.transport
    message_id = f"{org.name}-rejected-1"
    transport.send(
        QUEUE_READY,
        [
            OutgoingMessage(
                body=json.dumps(
                    {"leadId": message_id, "publisherId": org.name, "lead": dict(MARKETPLACE_LEAD)}
                ).encode(),
                message_id=message_id,
                application_properties={"publisherId": org.name, "leadId": message_id, "attempt": 1},
            )
        ],
    )
    [received] = transport.receive(QUEUE_READY)
    transport.dead_letter(received, "LeadRejected", "the CRM rejected create lead: no column new_country")
    answer = stack.client.put(f"/api/publishers/{org.name}/mapping", json={"leadSourceCode": 8}, headers=stack.admin())
    assert answer.status_code == 200
    assert answer.json()["replayed"] == 1
    assert transport.peek_dead_letters(QUEUE_READY) == []


def test_a_mapping_for_a_connection_that_no_longer_signs_in_is_refused_422_with_the_reason(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    bad = password_body(org, password="Wrong-Passw0rd!")
    assert (
        stack.client.put(
            f"/api/publishers/{org.name}/connection?verify=false", json=bad, headers=stack.admin()
        ).status_code
        == 200
    )
    answer = stack.client.put(f"/api/publishers/{org.name}/mapping", json={"leadSourceCode": 8}, headers=stack.admin())
    assert answer.status_code == 422, answer.text
    assert answer.json()["reason"] == "CredentialsRejected"
    assert answer.json()["field"] == "connection"
    assert "Wrong-Passw0rd!" not in answer.text


@pytest.mark.usefixtures("runtime")
def test_a_mapped_backlog_flows_through_the_stages_with_its_binds_and_one_lookup_per_customer(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    # Given a stored mapping that links by e-mail, and a backlog of one customer's leads
    body = _mapping(simulator, org)
    contact = simulator.add_contact(org.name, "ada@example.com")
    assert stack.client.put(f"/api/publishers/{org.name}/mapping", json=body, headers=stack.admin()).status_code == 200
    key = stack.key_for(org.name)
    for n in range(12):
        lead = {**MARKETPLACE_LEAD, "Description": f"step {n}"}
        answer = stack.client.post(f"/api/publishers/{org.name}/leads", json=lead, headers=stack.bearer(key))
        assert answer.status_code == 202, answer.text
    before = simulator.requests(org.name).total

    # When the stages run (embedded workers, or the registered Functions triggers)
    runtime = stack.services.stage_runtime().start()
    try:
        assert wait_until(lambda: len(simulator.leads(org.name)) == 12, 60)
    finally:
        runtime.stop()

    # Then every lead carries the mapping, and the customer's contact was looked up once
    for record in simulator.leads(org.name):
        assert record["_campaignid_value"] == body["campaignId"]
        assert record["_ownerid_value"] == body["owner"]["id"]
        assert record["_parentcontactid_value"] == contact
        assert record["new_country"] == "US"
    assert stack.services.pipeline.links.queries == 1
    assert simulator.requests(org.name).total - before <= 12 + 3, "the mapping adds one lookup, not one per lead"


@pytest.mark.usefixtures("runtime")
def test_with_one_lead_per_customer_and_offer_a_later_step_updates_the_first_lead_once_even_when_replayed(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    # Given a publisher that wants one lead per customer and offer
    answer = stack.client.put(
        f"/api/publishers/{org.name}/mapping", json={"onePerCustomerAndOffer": True}, headers=stack.admin()
    )
    assert answer.status_code == 200, answer.text
    key = stack.key_for(org.name)

    def post(lead_id: str, action: str, source: str) -> None:
        lead = {**MARKETPLACE_LEAD, "LeadSource": source, "ActionCode": action, "leadId": lead_id}
        body = {"leadId": lead_id, "lead": lead}
        sent = stack.client.post(f"/api/publishers/{org.name}/leads", json=body, headers=stack.bearer(key))
        assert sent.status_code in (200, 202), sent.text

    # When the customer first asks for a trial, then installs — and the install is sent twice
    post("step-plt", "PLT", "AzureMarketplace-PLT|contoso.widget-saas")
    runtime = stack.services.stage_runtime().start()
    try:
        assert wait_until(lambda: len(simulator.leads(org.name)) == 1, 30)
        post("step-ins", "INS", "AzureMarketplace-INS|contoso.widget-saas")
        assert wait_until(lambda: "[step step-ins]" in str(simulator.leads(org.name)[0].get("description")), 30)
        # A redelivery or replay of the same step: a new message id, the same lead id
        stack.services.transport.send(
            QUEUE_READY,
            [
                OutgoingMessage(
                    body=_message("step-ins", org.name, ActionCode="INS").to_body(),
                    message_id="step-ins.r1",
                    application_properties={"publisherId": org.name, "leadId": "step-ins", "replayCount": 1},
                )
            ],
        )
        assert wait_until(lambda: stack.services.transport.stats(QUEUE_READY).active == 0, 30)
    finally:
        runtime.stop()

    # Then there is one lead, whose description names each step once
    [record] = simulator.leads(org.name)
    description = str(record["description"])
    assert description.count("[step step-plt]") == 1
    assert description.count("[step step-ins]") == 1


def test_a_mapped_linked_backlog_costs_at_most_a_fifth_of_a_crm_request_per_lead(
    stack: ApiStack, simulator: CrmSimulator, org: SimOrg
) -> None:
    body = _mapping(simulator, org)
    for n in range(4):
        simulator.add_contact(org.name, f"customer{n}@example.com")
    assert stack.client.put(f"/api/publishers/{org.name}/mapping", json=body, headers=stack.admin()).status_code == 200
    leads = [
        OutgoingMessage(
            body=json.dumps(
                {
                    "leadId": f"backlog-{n}",
                    "publisherId": org.name,
                    "lead": {
                        **MARKETPLACE_LEAD,
                        "UserDetails": {**MARKETPLACE_LEAD["UserDetails"], "Email": f"customer{n % 4}@example.com"},
                    },
                }
            ).encode(),
            message_id=f"backlog-{n}",
            application_properties={"publisherId": org.name, "leadId": f"backlog-{n}", "attempt": 1},
        )
        for n in range(400)
    ]
    stack.services.transport.send(QUEUE_INCOMING, leads)
    before = simulator.requests(org.name).total

    runtime = stack.services.embedded_runtime().start()
    try:
        assert wait_until(lambda: len(simulator.leads(org.name)) == 400, 90)
    finally:
        runtime.stop()

    assert all(record["_parentcontactid_value"] for record in simulator.leads(org.name))
    per_lead = (simulator.requests(org.name).total - before) / 400
    assert per_lead <= 0.2, f"{per_lead:.3f} CRM requests per lead"

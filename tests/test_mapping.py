"""The mapping body, its template language and columns_for (architecture §6 mapping), without a CRM."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.pipeline.lead import COLUMN_MAX_LENGTHS, parse_incoming, to_dataverse_columns, utf16_length
from shared.pipeline.mapping import (
    TEMPLATE_FIELDS,
    InvalidMapping,
    Mapping,
    ValidatedMapping,
    columns_for,
    parse_mapping,
    parse_template,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CAMPAIGN = uuid.UUID("3f2a0000-0000-4000-8000-000000000001")
TEAM = uuid.UUID("9c1d0000-0000-4000-8000-000000000002")
CONTACT = uuid.UUID("c0c0c0c0-0000-4000-8000-000000000003")


def message(**lead: Any) -> Any:
    body = {
        "UserDetails": {
            "FirstName": "Ada",
            "LastName": "Lovelace",
            "Email": "ada@example.com",
            "Company": "Contoso",
            "Country": "US",
            "Title": "CTO",
            "Phone": "123",
        },
        "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
        "ActionCode": "INS",
        "OfferTitle": "Contoso Widget",
        "Description": "Wants a demo",
        **lead,
    }
    return parse_incoming(
        {"leadId": "lead-1", "publisherId": "contoso", "receivedAt": "2026-11-20T10:00:00Z", "lead": body}
    )


def test_no_mapping_is_the_default_mapping_of_design_section_4() -> None:
    assert columns_for(message(), None) == to_dataverse_columns(message())
    assert columns_for(message(), Mapping()) == to_dataverse_columns(message())


def test_the_design_example_mapping_gives_its_columns_and_binds() -> None:
    mapping = parse_mapping(
        {
            "leadSourceCode": 10,
            "leadSourceColumn": "new_marketplacesource",
            "campaignId": str(CAMPAIGN),
            "owner": {"type": "team", "id": str(TEAM)},
            "subjectTemplate": "{OfferTitle}: {ActionCode} — {Company}",
            "columns": {"new_country": "{Country}", "new_offer": "{OfferId}"},
            "linkExisting": "contact",
        }
    )
    columns = columns_for(message(), mapping, link=CONTACT)
    assert columns["subject"] == "Contoso Widget: INS — Contoso"
    assert columns["leadsourcecode"] == 10
    assert columns["new_marketplacesource"] == "AzureMarketplace-INS|contoso.widget-saas"
    assert columns["new_country"] == "US"
    assert columns["new_offer"] == "contoso.widget-saas"
    assert columns["campaignid@odata.bind"] == f"/campaigns({CAMPAIGN})"
    assert columns["ownerid@odata.bind"] == f"/teams({TEAM})"
    assert columns["parentcontactid@odata.bind"] == f"/contacts({CONTACT})"
    assert columns["emailaddress1"] == "ada@example.com"


@pytest.mark.parametrize(
    ("owner", "bind"),
    [
        ({"type": "systemuser", "id": str(TEAM)}, f"/systemusers({TEAM})"),
        ({"type": "team", "id": str(TEAM)}, f"/teams({TEAM})"),
    ],
)
def test_the_owner_binds_to_a_user_or_a_team(owner: dict[str, str], bind: str) -> None:
    assert columns_for(message(), parse_mapping({"owner": owner}))["ownerid@odata.bind"] == bind


def test_linking_to_an_account_binds_parentaccountid_and_no_link_binds_nothing() -> None:
    mapping = parse_mapping({"linkExisting": "account"})
    assert columns_for(message(), mapping, link=CONTACT)["parentaccountid@odata.bind"] == f"/accounts({CONTACT})"
    assert not any(k.startswith("parent") for k in columns_for(message(), mapping, link=None))
    assert not any(k.startswith("parent") for k in columns_for(message(), parse_mapping({}), link=CONTACT))


@pytest.mark.parametrize("spelling", ["{company}", "{COMPANY}", "{ Company }", "{cOmPaNy}"])
def test_template_fields_are_case_insensitive(spelling: str) -> None:
    assert parse_template(spelling).fields == ("Company",)


def test_every_template_field_renders_from_the_lead() -> None:
    text = " | ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
    mapping = parse_mapping({"columns": {"new_all": text}})
    rendered = columns_for(message(), mapping)["new_all"].split(" | ")
    assert dict(zip(TEMPLATE_FIELDS, rendered, strict=True)) == {
        "FirstName": "Ada",
        "LastName": "Lovelace",
        "Email": "ada@example.com",
        "Phone": "123",
        "Country": "US",
        "Company": "Contoso",
        "Title": "CTO",
        "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
        "ActionCode": "INS",
        "Action": "installed or purchased",
        "Source": "AzureMarketplace",
        "OfferId": "contoso.widget-saas",
        "OfferTitle": "Contoso Widget",
        "Description": "Wants a demo",
        "LeadId": "lead-1",
        "ReceivedAt": "2026-11-20T10:00:00Z",
    }


def test_double_braces_are_literal_braces_and_missing_fields_render_empty() -> None:
    lead = message(UserDetails={"Email": "ada@example.com"})
    mapping = parse_mapping({"columns": {"new_x": "{{{Company}}} {Email}", "new_y": "{Company}"}})
    columns = columns_for(lead, mapping)
    assert columns["new_x"] == "{} ada@example.com"
    assert "new_y" not in columns  # an empty rendering leaves the column out


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"subjectTemplate": "{OfferTitle} {Nope}"}, "subjectTemplate", "unknown template field {Nope}"),
        ({"columns": {"new_x": "{Foo}"}}, "columns.new_x", "{Foo}"),
        ({"columns": {"new_x": "a } b"}}, "columns.new_x", "lone '}'"),
        ({"columns": {"New X": "{Email}"}}, "columns.New X", "logical name"),
        ({"columns": {"ownerid": "{Email}"}}, "columns.ownerid", "set by the mapping"),
        ({"leadSourceColumn": "Bad-Name"}, "leadSourceColumn", "logical name"),
        ({"owner": {"type": "user", "id": str(TEAM)}}, "owner.type", "systemuser"),
        ({"campaignId": "not-a-guid"}, "campaignId", "UUID"),
        ({"linkExisting": "lead"}, "linkExisting", "none"),
        ({"leadSourceCode": "web"}, "leadSourceCode", "integer"),
        ({"colour": "blue"}, "colour", "Extra"),
    ],
)
def test_a_bad_mapping_is_refused_naming_the_field(body: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidMapping) as refused:
        parse_mapping(body)
    assert refused.value.field == field
    assert fragment in refused.value.message
    assert refused.value.message.startswith(field)


def test_a_test_lead_keeps_its_marker_under_a_subject_template() -> None:
    lead = message(UserDetails={"FirstName": "MSFT_TEST_636573304831318844"})
    assert columns_for(lead, parse_mapping({"subjectTemplate": "{FirstName}"}))["subject"].startswith("[TEST] ")


def test_a_validated_mapping_truncates_custom_columns_to_the_length_the_crm_reported() -> None:
    mapping = ValidatedMapping.model_validate(
        {
            **parse_mapping({"columns": {"new_note": "{Description}"}}).model_dump(),
            "max_lengths": {"new_note": 10},
            "validated_at": datetime.now(UTC),
        }
    )
    lead = message(Description="😀" * 20)
    assert columns_for(lead, mapping)["new_note"] == "😀" * 5
    assert mapping.body().to_json() == {
        "columns": {"new_note": "{Description}"},
        "linkExisting": "none",
        "onePerCustomerAndOffer": False,
    }


TEXT = st.text(st.characters(codec="utf-8"), max_size=400)


@FAST
@given(
    offer=TEXT,
    company=TEXT,
    description=st.text(max_size=3000),
    literal=st.text(st.characters(codec="utf-8", exclude_characters="{}"), max_size=50),
)
def test_templated_standard_columns_never_exceed_their_length_or_split_a_surrogate_pair(
    offer: str, company: str, description: str, literal: str
) -> None:
    lead = message(
        OfferTitle=offer or "x",
        UserDetails={"Company": company or "c", "Email": "a@b.c"},
        Description=description or None,
    )
    mapping = parse_mapping(
        {
            "subjectTemplate": literal + "{OfferTitle}{Company}{Description}",
            "columns": {"description": "{Description}" * 3},
        }
    )
    columns = columns_for(lead, mapping)
    for column, limit in COLUMN_MAX_LENGTHS.items():
        value = columns.get(column)
        if isinstance(value, str):
            assert utf16_length(value) <= limit
            value.encode("utf-8")  # no lone surrogate


def test_one_lead_per_customer_and_offer_gives_every_step_of_a_customer_on_an_offer_one_record_id() -> None:
    from shared.pipeline.mapping import customer_offer_record_id

    mapping = parse_mapping({"onePerCustomerAndOffer": True})
    plt = message(ActionCode="PLT", UserDetails={"Email": "Ada@Example.com"})
    ins = message(ActionCode="INS", UserDetails={"Email": "ada@example.com "})
    other_offer = message(LeadSource="AppSource-INS|contoso.other", UserDetails={"Email": "ada@example.com"})
    assert customer_offer_record_id(plt, mapping) == customer_offer_record_id(ins, mapping) is not None
    assert customer_offer_record_id(other_offer, mapping) != customer_offer_record_id(ins, mapping)
    assert customer_offer_record_id(ins, parse_mapping({})) is None
    assert customer_offer_record_id(message(UserDetails={"Company": "Contoso"}), mapping) is None

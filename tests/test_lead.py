"""The lead model: parsing `leads-incoming` messages (architecture §3) and the Dataverse mapping (architecture §4)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from shared.errors import DeadLetterReason, InvalidLead
from shared.pipeline.lead import (
    ACTION_DESCRIPTIONS,
    COLUMN_MAX_LENGTHS,
    MAX_BODY_BYTES,
    Customer,
    LeadMessage,
    MarketplaceLead,
    lead_record_id,
    mask_email,
    parse_incoming,
    parse_marketplace_lead,
    to_dataverse_columns,
    truncate_utf16,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "leads.jsonl"
EMOJI = "\U0001f600"  # two UTF-16 code units


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def envelope(lead: Any = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "leadId": "lead-1",
        "publisherId": "contoso",
        "receivedAt": "2026-11-20T10:00:00Z",
        "lead": lead
        if lead is not None
        else {
            "UserDetails": {"FirstName": "Ada", "LastName": "Lovelace", "Email": "ada@example.com"},
            "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
            "OfferTitle": "Contoso Widget",
        },
    }
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not ...}


def as_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


def message(**lead_fields: Any) -> LeadMessage:
    customer = lead_fields.pop(
        "customer", Customer(first_name="Ada", last_name="Lovelace", email="ada@example.com")
    )
    return LeadMessage(
        lead_id=lead_fields.pop("lead_id", "lead-1"),
        publisher_id="contoso",
        received_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
        lead=MarketplaceLead(customer=customer, **lead_fields),
    )


# --------------------------------------------------------------------------------------------------
# parse_incoming: what is not a lead
# --------------------------------------------------------------------------------------------------

INVALID_BODIES: list[Any] = [
    pytest.param(b'{"publisherId": "contoso", "lead": "\xff\xfe"}', None, "not UTF-8", id="non-utf8"),
    pytest.param(b" " * (MAX_BODY_BYTES + 1), None, str(MAX_BODY_BYTES + 1), id="over-256KiB"),
    pytest.param(b'{"publisherId": "contoso",', None, "not valid JSON", id="truncated-json"),
    pytest.param(b'{"publisherId": "contoso", "x": NaN}', None, "NaN", id="json-nan"),
    pytest.param(b"[" * 50_000 + b"]" * 50_000, None, "JSON", id="json-nested-too-deep"),
    pytest.param(b"[1, 2]", None, "JSON object, got an array", id="a-list"),
    pytest.param(b'"lead"', None, "JSON object, got a string", id="a-string"),
    pytest.param(
        as_bytes(envelope(publisherId=...)), "publisherId", "no publisherId", id="missing-publisher"
    ),
    pytest.param(
        as_bytes(envelope(publisherId="con/toso")), "publisherId", "publisherId", id="bad-publisher"
    ),
    pytest.param(as_bytes(envelope(publisherId=42)), "publisherId", "got a number", id="numeric-publisher"),
    pytest.param(as_bytes(envelope(leadId=...)), "leadId", "no leadId", id="no-lead-id-no-message-id"),
    pytest.param(as_bytes(envelope(leadId="")), "leadId", "1-200", id="empty-lead-id"),
    pytest.param(as_bytes(envelope(leadId="x" * 201)), "leadId", "1-200", id="long-lead-id"),
    pytest.param(as_bytes(envelope(leadId="a\nb")), "leadId", "printable", id="unprintable-lead-id"),
    pytest.param(as_bytes(envelope(leadId=["a"])), "leadId", "got an array", id="array-lead-id"),
    pytest.param(as_bytes(envelope(receivedAt="yesterday")), "receivedAt", "ISO-8601", id="bad-received-at"),
    pytest.param(
        as_bytes(envelope(receivedAt=1700000000)), "receivedAt", "got a number", id="epoch-received-at"
    ),
    pytest.param(as_bytes(envelope(lead=...)), "lead", "no lead", id="missing-lead"),
    pytest.param(as_bytes(envelope(lead=[1])), "lead", "got an array", id="lead-is-array"),
    pytest.param(as_bytes(envelope(lead="Ada")), "lead", "got a string", id="lead-is-string"),
    pytest.param(
        as_bytes(envelope({"UserDetails": [], "LeadSource": "AppSource"})),
        "lead.UserDetails",
        "must be an object, got an array",
        id="user-details-array",
    ),
    pytest.param(
        as_bytes(envelope({"userDetails": 7})),
        "lead.userDetails",
        "must be an object, got a number",
        id="user-details-number",
    ),
    pytest.param(
        as_bytes(envelope({"UserDetails": {"FirstName": ["Ada"], "Email": "ada@example.com"}})),
        "lead.UserDetails.FirstName",
        "must be a string, got an array",
        id="first-name-array",
    ),
    pytest.param(
        as_bytes(envelope({"userdetails": {"email": {"work": "ada@example.com"}}})),
        "lead.userdetails.email",
        "must be a string, got an object",
        id="email-object",
    ),
    pytest.param(
        as_bytes(envelope({"UserDetails": {"Email": "ada@example.com", "Phone": True}})),
        "lead.UserDetails.Phone",
        "must be a string, got a boolean",
        id="phone-boolean",
    ),
    pytest.param(
        as_bytes(envelope({"UserDetails": {"Email": "ada@example.com"}, "LeadSource": {"a": 1}})),
        "lead.LeadSource",
        "must be a string, got an object",
        id="lead-source-object",
    ),
    pytest.param(
        as_bytes(envelope({"UserDetails": {"Email": "ada@example.com"}, "Description": [1, 2]})),
        "lead.Description",
        "must be a string, got an array",
        id="description-array",
    ),
    pytest.param(
        as_bytes(envelope({"UserDetails": {"Country": "US", "Title": "CTO"}, "LeadSource": "AppSource"})),
        "lead.UserDetails",
        "no contact details",
        id="no-contact",
    ),
    pytest.param(
        as_bytes(envelope({"UserDetails": {"FirstName": "  ", "Email": ""}, "LeadSource": "AppSource"})),
        "lead.UserDetails",
        "no contact details",
        id="blank-contact",
    ),
    pytest.param(
        as_bytes(envelope({"LeadSource": "AppSource"})), "lead.UserDetails", "no contact", id="no-details"
    ),
]


@pytest.mark.parametrize(("body", "field", "words"), INVALID_BODIES)
def test_malformed_message_is_an_invalid_lead_naming_the_field(
    body: bytes, field: str | None, words: str
) -> None:
    with pytest.raises(InvalidLead) as caught:
        parse_incoming(body)
    assert caught.value.field == field
    assert words in caught.value.message
    assert caught.value.reason is DeadLetterReason.INVALID_LEAD


def test_json_error_names_its_position() -> None:
    with pytest.raises(InvalidLead, match=r"line 2 column 12"):
        parse_incoming(b'{"publisherId": "contoso",\n "leadId": x}')


def test_bad_message_id_is_reported_as_the_lead_id() -> None:
    with pytest.raises(InvalidLead, match="message id") as caught:
        parse_incoming(as_bytes(envelope(leadId=...)), message_id="")
    assert caught.value.field == "leadId"


def test_error_message_does_not_echo_the_value() -> None:
    with pytest.raises(InvalidLead) as caught:
        parse_incoming(
            as_bytes(envelope({"UserDetails": {"Email": "ada@example.com", "Phone": ["hunter2-secret"]}}))
        )
    assert "hunter2" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# parse_incoming: what is a lead
# --------------------------------------------------------------------------------------------------


def test_documented_message_parses_into_the_model() -> None:
    body = {
        "leadId": "6f1c",
        "publisherId": "contoso",
        "receivedAt": "2026-11-20T10:00:00Z",
        "lead": {
            "UserDetails": {
                "FirstName": "Ada",
                "LastName": "Lovelace",
                "Email": "ada@example.com",
                "Phone": "1234567890",
                "Country": "US",
                "Company": "Contoso",
                "Title": "CTO",
            },
            "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
            "ActionCode": "INS",
            "OfferTitle": "Contoso Widget",
            "Description": "Bought it",
        },
    }

    parsed = parse_incoming(as_bytes(body), message_id="sb-1")

    assert parsed == LeadMessage(
        lead_id="6f1c",
        publisher_id="contoso",
        received_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
        lead=MarketplaceLead(
            customer=Customer(
                first_name="Ada",
                last_name="Lovelace",
                email="ada@example.com",
                phone="1234567890",
                country="US",
                company="Contoso",
                title="CTO",
            ),
            lead_source="AzureMarketplace-INS|contoso.widget-saas",
            source="AzureMarketplace",
            action_code="INS",
            publisher_offer="contoso.widget-saas",
            offer_title="Contoso Widget",
            description="Bought it",
            is_test=False,
        ),
    )


@pytest.mark.parametrize(
    "details_key", ["UserDetails", "userDetails", "userdetails", "USERDETAILS", "CustomerInfo"]
)
@pytest.mark.parametrize("first_name_key", ["FirstName", "firstName", "firstname", "FIRSTNAME"])
def test_keys_match_whatever_their_case(details_key: str, first_name_key: str) -> None:
    lead = {details_key: {first_name_key: "Ada"}, "leadsource": "AppSource", "ACTIONCODE": "ins"}

    parsed = parse_incoming(envelope(lead)).lead

    assert parsed.customer.first_name == "Ada"
    assert parsed.source == "AppSource"
    assert parsed.action_code == "INS"


@pytest.mark.parametrize(
    ("lead_source", "action_code", "expected"),
    [
        (
            "AzureMarketplace-INS|contoso.widget-saas",
            None,
            ("AzureMarketplace", "INS", "contoso.widget-saas"),
        ),
        ("AzurePortal-Create|contoso.vm", None, ("AzurePortal", "Create", "contoso.vm")),
        ("TestDrive-StartTestDrive|contoso.td", None, ("TestDrive", "StartTestDrive", "contoso.td")),
        ("AppSource", "PLT", ("AppSource", "PLT", None)),
        ("AzureMarketplace", "DNC", ("AzureMarketplace", "DNC", None)),
        ("appsource-ins|contoso.d365", None, ("AppSource", "INS", "contoso.d365")),
        ("AppSource|contoso.d365", "INS", ("AppSource", "INS", "contoso.d365")),
        ("AzureMarketplace-INS", None, ("AzureMarketplace", "INS", None)),
        # An explicit ActionCode is the marketplace's own statement: it wins over the one in LeadSource.
        (
            "AzureMarketplace-INS|contoso.widget-saas",
            "PLT",
            ("AzureMarketplace", "PLT", "contoso.widget-saas"),
        ),
        # Unknown sources and actions pass through as they are.
        (
            "AzureMarketplace-Trial|contoso.widget-saas",
            None,
            ("AzureMarketplace", "Trial", "contoso.widget-saas"),
        ),
        ("NewChannel-INS|contoso.x", None, ("NewChannel", "INS", "contoso.x")),
        ("AppSource", "SomethingNew", ("AppSource", "SomethingNew", None)),
        (None, "INS", (None, "INS", None)),
        ("AzureMarketplace-|contoso.x", None, ("AzureMarketplace", None, "contoso.x")),
    ],
)
def test_lead_source_formats_parse_into_source_action_and_offer(
    lead_source: str | None, action_code: str | None, expected: tuple[str | None, ...]
) -> None:
    lead: dict[str, Any] = {"UserDetails": {"Email": "ada@example.com"}}
    if lead_source is not None:
        lead["LeadSource"] = lead_source
    if action_code is not None:
        lead["ActionCode"] = action_code

    parsed = parse_marketplace_lead(lead)

    assert (parsed.source, parsed.action_code, parsed.publisher_offer) == expected
    assert parsed.lead_source == lead_source


def test_numeric_phone_becomes_text_without_a_decimal_point() -> None:
    parsed = parse_marketplace_lead({"UserDetails": {"Phone": 16175555555.0, "FirstName": "Ada"}})
    assert parsed.customer.phone == "16175555555"
    assert parse_marketplace_lead({"UserDetails": {"Phone": 4255550100}}).customer.phone == "4255550100"


def test_strings_are_stripped_and_blank_ones_are_missing() -> None:
    parsed = parse_marketplace_lead(
        {
            "UserDetails": {
                "FirstName": "  Ada \n",
                "LastName": "",
                "Email": " ada@example.com ",
                "Title": "\t",
            }
        }
    )
    assert parsed.customer == Customer(first_name="Ada", email="ada@example.com")


def test_missing_fields_are_none() -> None:
    parsed = parse_marketplace_lead({"UserDetails": {"Company": "Contoso"}})
    assert parsed.customer == Customer(company="Contoso")
    assert (
        parsed.lead_source,
        parsed.source,
        parsed.action_code,
        parsed.offer_title,
        parsed.description,
    ) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_lone_surrogates_are_replaced_so_the_text_stays_valid() -> None:
    parsed = parse_incoming(
        b'{"leadId":"1","publisherId":"p","lead":{"UserDetails":{"FirstName":"A\\ud800"}}}'
    )
    assert parsed.lead.customer.first_name == "A\ufffd"
    parsed.to_body().decode("utf-8")


def test_customer_info_as_a_json_string_is_accepted() -> None:
    parsed = parse_marketplace_lead({"CustomerInfo": '{"FirstName": "Ada", "Email": "ada@example.com"}'})
    assert parsed.customer == Customer(first_name="Ada", email="ada@example.com")


@pytest.mark.parametrize(
    "lead",
    [
        {"UserDetails": {"FirstName": "MSFT_TEST_636573304831318844"}},
        {"UserDetails": {"Email": "MSFT_TEST_123@example.com"}},
        {"UserDetails": {"Country": "US"}, "LeadSource": "MSFT_TEST_1-INS|contoso.widget"},
        {"LeadSource": "AzureMarketplace-INS|contoso.widget", "Description": "msft_test"},
    ],
)
def test_marketplace_test_lead_is_valid_and_marked_even_without_contact(lead: dict[str, Any]) -> None:
    parsed = parse_incoming(envelope(lead))
    assert parsed.lead.is_test is True


def test_ordinary_lead_is_not_a_test() -> None:
    assert parse_incoming(envelope()).lead.is_test is False


def test_missing_lead_id_takes_the_message_id() -> None:
    parsed = parse_incoming(as_bytes(envelope(leadId=None)), message_id="sb-42")
    assert parsed.lead_id == "sb-42"


def test_lead_id_in_the_body_wins_over_the_message_id() -> None:
    assert parse_incoming(as_bytes(envelope()), message_id="sb-42").lead_id == "lead-1"


@pytest.mark.parametrize(
    ("received_at", "expected"),
    [
        ("2026-11-20T10:00:00Z", datetime(2026, 11, 20, 10, 0, tzinfo=UTC)),
        ("2026-11-20T11:00:00+01:00", datetime(2026, 11, 20, 10, 0, tzinfo=UTC)),
        ("2026-11-20T10:00:00", datetime(2026, 11, 20, 10, 0, tzinfo=UTC)),
        (None, None),
    ],
)
def test_received_at_is_an_aware_utc_datetime(received_at: str | None, expected: datetime | None) -> None:
    parsed = parse_incoming(envelope(receivedAt=received_at))
    assert parsed.received_at == expected
    assert parsed.received_at is None or parsed.received_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("body_type", ["bytes", "str", "dict"])
def test_body_may_be_bytes_text_or_a_mapping(body_type: str) -> None:
    body = envelope()
    raw: Any = {"bytes": as_bytes(body), "str": json.dumps(body), "dict": body}[body_type]
    assert parse_incoming(raw).lead.customer.first_name == "Ada"


def test_utf8_byte_order_mark_is_tolerated() -> None:
    assert parse_incoming(b"\xef\xbb\xbf" + as_bytes(envelope())).lead_id == "lead-1"


# --------------------------------------------------------------------------------------------------
# LeadMessage body
# --------------------------------------------------------------------------------------------------


def test_message_body_is_compact_camel_case_json_that_round_trips() -> None:
    original = parse_incoming(envelope())
    body = original.to_body()

    decoded = json.loads(body)
    assert set(decoded) == {"leadId", "publisherId", "receivedAt", "lead"}
    assert decoded["lead"]["customer"]["firstName"] == "Ada"
    assert decoded["lead"]["isTest"] is False
    assert b" " not in body.replace(b"Contoso Widget", b"")
    assert LeadMessage.from_body(body) == original
    assert LeadMessage.from_body(body).to_body() == body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", None),
        (b'{"publisherId": "contoso", "lead": {}}', "leadId"),
        (b'{"leadId": "1", "publisherId": "bad/id", "lead": {}}', "publisherId"),
        (b'{"leadId": "1", "publisherId": "p", "lead": {"customer": {"email": 5}}}', "lead.customer.email"),
    ],
)
def test_from_body_raises_invalid_lead_for_anything_else(body: bytes, field: str | None) -> None:
    with pytest.raises(InvalidLead) as caught:
        LeadMessage.from_body(body)
    assert caught.value.field == field


# --------------------------------------------------------------------------------------------------
# Mapping to Dataverse columns
# --------------------------------------------------------------------------------------------------


def test_columns_carry_the_customer_and_the_lead_source_code() -> None:
    parsed = parse_incoming(
        envelope(
            {
                "UserDetails": {
                    "FirstName": "Ada",
                    "LastName": "Lovelace",
                    "Email": "ada@example.com",
                    "Phone": 1234567890,
                    "Country": "US",
                    "Company": "Contoso",
                    "Title": "CTO",
                },
                "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
                "OfferTitle": "Contoso Widget",
            }
        )
    )

    columns = to_dataverse_columns(parsed, lead_source_code=10)

    assert {key: value for key, value in columns.items() if key not in ("subject", "description")} == {
        "firstname": "Ada",
        "lastname": "Lovelace",
        "emailaddress1": "ada@example.com",
        "telephone1": "1234567890",
        "companyname": "Contoso",
        "jobtitle": "CTO",
        "address1_country": "US",
        "leadsourcecode": 10,
    }
    assert columns["subject"] == "Contoso Widget: installed or purchased (Azure Marketplace)"


@pytest.mark.parametrize(("action", "flagged"), [("DNC", True), ("INS", False), ("PLT", False), (None, False)])
def test_a_do_not_contact_lead_sets_the_contact_preference_columns(action: str | None, flagged: bool) -> None:
    lead: dict[str, object] = {"UserDetails": {"Email": "ada@example.com"}, "LeadSource": "AzureMarketplace"}
    if action:
        lead["ActionCode"] = action
    columns = to_dataverse_columns(parse_incoming(envelope(lead)))
    for column in ("donotemail", "donotphone", "donotbulkemail", "donotpostalmail"):
        assert columns.get(column, False) is flagged


def test_missing_values_are_omitted_and_read_only_columns_never_set() -> None:
    columns = to_dataverse_columns(message(customer=Customer(email="ada@example.com")))
    assert set(columns) == {"subject", "emailaddress1", "description", "leadsourcecode"}
    assert columns["leadsourcecode"] == 8


@pytest.mark.parametrize(
    ("lead_fields", "subject"),
    [
        (
            {"offer_title": "Contoso Widget", "action_code": "PLT", "source": "AppSource"},
            "Contoso Widget: asked to be contacted (partner-led trial) (AppSource)",
        ),
        (
            {"publisher_offer": "contoso.widget-vm", "action_code": "Create", "source": "AzurePortal"},
            "contoso.widget-vm: created the offer in the Azure portal (Azure portal)",
        ),
        ({"offer_title": "Contoso Widget", "action_code": "Trial"}, "Contoso Widget: action Trial"),
        (
            {"source": "TestDrive", "action_code": "StartTestDrive"},
            "Marketplace lead: started a test drive (Test Drive)",
        ),
        ({}, "Marketplace lead"),
        (
            {
                "offer_title": "Contoso Widget",
                "action_code": "INS",
                "source": "AzureMarketplace",
                "is_test": True,
            },
            "[TEST] Contoso Widget: installed or purchased (Azure Marketplace)",
        ),
    ],
)
def test_subject_says_which_offer_what_happened_and_where(lead_fields: dict[str, Any], subject: str) -> None:
    assert to_dataverse_columns(message(**lead_fields))["subject"] == subject


def test_long_offer_title_gives_way_in_the_subject() -> None:
    subject = to_dataverse_columns(
        message(offer_title="W" * 400, action_code="DNC", source="AzureMarketplace")
    )["subject"]
    assert units(subject) <= COLUMN_MAX_LENGTHS["subject"]
    assert subject.endswith("W…: does not want to be contacted (Azure Marketplace)")


def test_description_keeps_the_facts() -> None:
    parsed = parse_incoming(
        envelope(
            {
                "UserDetails": {"Email": "MSFT_TEST_42@example.com"},
                "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
                "ActionCode": "PLT",
                "OfferTitle": "Contoso Widget",
                "Description": "Wants a demo",
            },
            leadId="lead-77",
        )
    )

    description = to_dataverse_columns(parsed)["description"]

    for fact in (
        "Marketplace test lead",
        "Azure Marketplace",
        "PLT",
        ACTION_DESCRIPTIONS["PLT"],
        "contoso.widget-saas",
        "Contoso Widget",
        "AzureMarketplace-INS|contoso.widget-saas",
        "lead-77",
        "contoso",
        "2026-11-20T10:00:00Z",
        "Wants a demo",
    ):
        assert fact in description


def test_description_of_an_ordinary_lead_does_not_say_test() -> None:
    assert "test lead" not in to_dataverse_columns(message(description="hi"))["description"]


def test_long_marketplace_description_is_cut_before_the_facts() -> None:
    long_text = "x" * 5000
    parsed = message(
        lead_id="L" * 200,
        description=long_text,
        offer_title="T" * 300,
        publisher_offer="p" * 300,
        lead_source="s" * 600,
        source="AzureMarketplace",
        action_code="INS",
        is_test=True,
    )

    description = to_dataverse_columns(parsed)["description"]

    assert units(description) <= COLUMN_MAX_LENGTHS["description"]
    assert "Marketplace test lead" in description
    assert f"Lead id: {'L' * 200}" in description
    assert "Publisher id: contoso" in description
    assert "Received at: 2026-11-20T10:00:00Z" in description
    assert description.endswith("x…")


CUSTOMER_COLUMNS = [
    ("first_name", "firstname"),
    ("last_name", "lastname"),
    ("email", "emailaddress1"),
    ("phone", "telephone1"),
    ("company", "companyname"),
    ("title", "jobtitle"),
    ("country", "address1_country"),
]


@pytest.mark.parametrize(("field", "column"), CUSTOMER_COLUMNS)
@pytest.mark.parametrize(
    ("over_by", "tail", "expected_units"),
    [
        (0, "", 0),  # exactly at the limit: unchanged
        (1, "a", 0),  # one over: cut to the limit
        (0, EMOJI, 0),  # an emoji ending exactly at the limit stays whole
        (1, EMOJI, -1),  # an emoji straddling the limit is dropped whole: one unit short
    ],
)
def test_customer_columns_are_truncated_at_their_limit_in_utf16_units(
    field: str, column: str, over_by: int, tail: str, expected_units: int
) -> None:
    limit = COLUMN_MAX_LENGTHS[column]
    value = "a" * (limit - units(tail) + over_by) + tail
    columns = to_dataverse_columns(message(customer=Customer(**{field: value})))

    assert units(columns[column]) == min(units(value), limit + expected_units)
    assert value.startswith(columns[column])
    columns[column].encode("utf-8")  # no lone surrogate


@pytest.mark.parametrize(
    ("text", "max_units", "expected"),
    [
        ("abc", 3, "abc"),
        ("abcd", 3, "abc"),
        ("", 0, ""),
        ("abc", 0, ""),
        (f"ab{EMOJI}", 4, f"ab{EMOJI}"),
        (f"ab{EMOJI}", 3, "ab"),
        (f"{EMOJI}{EMOJI}", 3, EMOJI),
        ("\ud83d\ude00x", 1, ""),  # a pair stored as two code points is not split either
        ("\ud83d\ude00x", 2, "\ud83d\ude00"),
        ("é" * 10, 5, "é" * 5),
    ],
)
def test_truncate_utf16_counts_code_units_and_never_splits_a_pair(
    text: str, max_units: int, expected: str
) -> None:
    assert truncate_utf16(text, max_units) == expected


def test_truncate_utf16_refuses_a_negative_length() -> None:
    with pytest.raises(ValueError, match="negative"):
        truncate_utf16("abc", -1)


# --------------------------------------------------------------------------------------------------
# Record id
# --------------------------------------------------------------------------------------------------


def test_record_id_is_deterministic_uuid5() -> None:
    first = lead_record_id("contoso", "lead-1")
    assert first == lead_record_id("contoso", "lead-1")
    assert first.version == 5
    assert first == parse_incoming(envelope()).record_id()


def test_record_id_is_pinned_so_replays_after_an_upgrade_find_the_lead() -> None:
    # Changing the namespace or the name format would write every replayed lead a second time.
    assert lead_record_id("contoso", "6f1c") == uuid.UUID("a73a86c4-3a7d-5983-a75d-a2a3b9da5b44")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("contoso", "lead-1"), ("fabrikam", "lead-1")),
        (("contoso", "lead-1"), ("contoso", "lead-2")),
        (("a", "b-c"), ("a-b", "c")),
        (("a.b", "c"), ("a", "b.c")),
        (("Contoso", "1"), ("contoso", "1")),
    ],
)
def test_record_ids_differ_across_publishers_and_leads(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert lead_record_id(*a) != lead_record_id(*b)


def test_publisher_with_a_slash_cannot_collide_with_a_lead_id_containing_one() -> None:
    lead_record_id("pub", "x/y")
    with pytest.raises(InvalidLead) as caught:
        lead_record_id("pub/x", "y")
    assert caught.value.field == "publisherId"


def test_record_id_refuses_an_empty_lead_id() -> None:
    with pytest.raises(InvalidLead):
        lead_record_id("contoso", "")


# --------------------------------------------------------------------------------------------------
# Log helpers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("ada@example.com", "a***@example.com"),
        ("@example.com", "***@example.com"),
        ("not-an-email", "***"),
        ("a@b@example.com", "a***@example.com"),
        (None, None),
    ],
)
def test_mask_email_hides_the_local_part(email: str | None, masked: str | None) -> None:
    assert mask_email(email) == masked


# --------------------------------------------------------------------------------------------------
# The demo's sample batch
# --------------------------------------------------------------------------------------------------


def sample_lines() -> list[tuple[int, bytes]]:
    return [
        (number, line) for number, line in enumerate(SAMPLES.read_bytes().splitlines(), 1) if line.strip()
    ]


def test_sample_batch_is_varied() -> None:
    parsed = [
        parse_incoming(line, message_id=f"sb-{n}") for n, line in sample_lines() if b"malformed" not in line
    ]
    assert len(parsed) >= 18
    assert {"INS", "PLT", "DNC", "Create", "StartTestDrive"} <= {m.lead.action_code for m in parsed}
    assert {"AzureMarketplace", "AzurePortal", "AppSource", "TestDrive"} <= {m.lead.source for m in parsed}
    assert any(m.lead.is_test for m in parsed)
    assert any(m.lead.publisher_offer is None and m.lead.source == "AppSource" for m in parsed)
    assert any(len(m.lead.description or "") > COLUMN_MAX_LENGTHS["description"] for m in parsed)
    assert all(m.publisher_id == "contoso" for m in parsed)


def test_every_sample_line_parses_except_the_malformed_one() -> None:
    failures = []
    for number, line in sample_lines():
        try:
            to_dataverse_columns(parse_incoming(line, message_id=f"sb-{number}"))
        except InvalidLead as exc:
            failures.append((json.loads(line)["leadId"], exc.field))
    assert failures == [("mp-0021-malformed", "lead.UserDetails")]


def test_tz_offsets_in_samples_become_utc() -> None:
    stamps = [parse_incoming(line).received_at for _, line in sample_lines() if b"-05:00" in line]
    assert stamps == [datetime(2026, 11, 23, 17, 45, tzinfo=timezone(timedelta(hours=-5))).astimezone(UTC)]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"publisherId": "p", "leadId": "1", "lead": {"UserDetails": {"Phone": ' + b"9" * 5000 + b"}}}",
            id="json",
        ),
        pytest.param(envelope({"UserDetails": {"Phone": 10**5000}}), id="mapping"),
    ],
)
def test_number_beyond_python_int_limits_is_an_invalid_lead(body: Any) -> None:
    with pytest.raises(InvalidLead):
        parse_incoming(body)

"""Properties of the lead model that must hold for any input, not only the examples we thought of."""

from __future__ import annotations

import json
import string
from datetime import UTC, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidLead
from shared.pipeline.lead import (
    COLUMN_MAX_LENGTHS,
    DO_NOT_CONTACT_COLUMNS,
    Customer,
    LeadMessage,
    MarketplaceLead,
    lead_record_id,
    parse_incoming,
    to_dataverse_columns,
    truncate_utf16,
)
from shared.secretstore.base import PUBLISHER_ID_PATTERN

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any Unicode, lone surrogates included: a JSON "\ud800" escape or a Python caller can produce them.
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]))
ANY_TEXT = st.text(ANY_CHAR, max_size=60)
LONG_TEXT = st.text(ANY_CHAR, max_size=2500)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    ANY_TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4),
    max_leaves=12,
)


def any_case(word: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flips: "".join(c.upper() if up else c.lower() for c, up in zip(word, flips, strict=True))
    )


def keyed(words: list[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects using the words the parser looks for, in random case, with random values."""
    return st.lists(st.tuples(st.sampled_from(words).flatmap(any_case), values), max_size=len(words) + 2).map(
        dict
    )


CUSTOMER_WORDS = ["FirstName", "LastName", "Email", "Phone", "Country", "Company", "Title", "JobTitle"]
STRINGY = st.one_of(ANY_TEXT, LONG_TEXT, st.integers(), st.floats(), JSONISH)
LEAD_WORDS = ["UserDetails", "CustomerInfo", "LeadSource", "ActionCode", "OfferTitle", "Description"]
LEAD_SOURCES = st.one_of(
    ANY_TEXT,
    st.builds(
        "{}-{}|{}".format,
        st.sampled_from(["AzureMarketplace", "AppSource", "AzurePortal", "TestDrive", "x", "MSFT_TEST_1"]),
        st.sampled_from(["INS", "PLT", "DNC", "Create", "StartTestDrive", "", "Weird"]),
        ANY_TEXT,
    ),
)
LEADS = st.one_of(
    JSONISH,
    keyed(
        LEAD_WORDS,
        st.one_of(keyed(CUSTOMER_WORDS, STRINGY), LEAD_SOURCES, STRINGY),
    ),
)
PUBLISHER_IDS = st.from_regex(PUBLISHER_ID_PATTERN, fullmatch=True)
CUSTOMER_VALUES = st.one_of(ANY_TEXT, LONG_TEXT, st.integers(), st.floats(), st.none())
PLAUSIBLE_LEADS = st.tuples(
    any_case("UserDetails"),
    keyed(CUSTOMER_WORDS, CUSTOMER_VALUES),
    keyed(["LeadSource", "ActionCode", "OfferTitle", "Description"], st.one_of(LEAD_SOURCES, LONG_TEXT)),
).map(lambda parts: {parts[0]: parts[1], **parts[2]})
PLAUSIBLE_ENVELOPES = st.fixed_dictionaries(
    {"publisherId": PUBLISHER_IDS, "lead": PLAUSIBLE_LEADS},
    optional={
        "leadId": ANY_TEXT,
        "receivedAt": st.datetimes(timezones=st.none() | st.just(UTC)).map(lambda d: d.isoformat()),
    },
)
RANDOM_ENVELOPES = st.fixed_dictionaries(
    {},
    optional={
        "leadId": st.one_of(ANY_TEXT, JSONISH),
        "publisherId": st.one_of(PUBLISHER_IDS, JSONISH),
        "receivedAt": st.one_of(st.datetimes().map(lambda d: d.isoformat()), ANY_TEXT, JSONISH),
        "lead": LEADS,
    },
)
ENVELOPES = st.one_of(RANDOM_ENVELOPES, PLAUSIBLE_ENVELOPES)


def encodings(envelope: dict[str, Any]) -> list[Any]:
    text = json.dumps(envelope)  # ensure_ascii: lone surrogates travel as \ud800 escapes
    return [envelope, text, text.encode("utf-8")]


def check_columns(message: LeadMessage) -> None:
    columns = to_dataverse_columns(message)
    assert columns["leadsourcecode"] == 8
    assert "subject" in columns
    assert "description" in columns
    # A do-not-contact lead (action code DNC) sets Dynamics' own flags, and only such a lead does.
    flags = {column: columns.pop(column) for column in DO_NOT_CONTACT_COLUMNS if column in columns}
    if message.lead.action_code == "DNC":
        assert flags == dict.fromkeys(DO_NOT_CONTACT_COLUMNS, True)
    else:
        assert flags == {}
    for column, value in columns.items():
        if column == "leadsourcecode":
            continue
        assert isinstance(value, str)
        assert value
        value.encode("utf-8")  # raises on a lone surrogate
        assert len(value.encode("utf-16-le")) // 2 <= COLUMN_MAX_LENGTHS[column]


def outcome(body: Any, message_id: str | None = None) -> LeadMessage | InvalidLead:
    """The parsed message or the InvalidLead; any other exception escapes and fails the test."""
    try:
        return parse_incoming(body, message_id=message_id)
    except InvalidLead as exc:
        return exc


@FAST
@given(ENVELOPES, st.one_of(st.none(), ANY_TEXT))
def test_parse_incoming_raises_nothing_but_invalid_lead(
    envelope: dict[str, Any], message_id: str | None
) -> None:
    from_mapping, from_text, from_bytes = (outcome(body, message_id) for body in encodings(envelope))
    # As text and as bytes the message is the same lead (or the same refusal). The mapping may differ
    # in one way only: JSON text refuses NaN anywhere, a mapping only in a field that is read.
    assert type(from_text) is type(from_bytes)
    if isinstance(from_text, LeadMessage):
        assert from_bytes == from_text
        assert from_mapping == from_text
    for result in (from_mapping, from_text):
        if isinstance(result, InvalidLead):
            assert result.message
        else:
            check_columns(result)
            assert LeadMessage.from_body(result.to_body()) == result


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_lead_or_an_invalid_lead(body: bytes) -> None:
    assert isinstance(outcome(body), LeadMessage | InvalidLead)


@FAST
@given(st.binary(max_size=200))
def test_from_body_raises_nothing_but_invalid_lead(body: bytes) -> None:
    try:
        message = LeadMessage.from_body(body)
    except InvalidLead as exc:
        assert exc.reason == "InvalidLead"  # noqa: PT017 - a property over many inputs, not one raise
    else:
        assert message.to_body()


OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
LEAD_IDS = st.text(st.characters(exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"])).filter(
    lambda s: 1 <= len(s) <= 200 and s.isprintable()
) | st.text(string.ascii_letters + string.digits + "-/ ", min_size=1, max_size=200)
TEXTS = st.one_of(st.none(), st.text(max_size=40), st.text(ANY_CHAR, max_size=3000))


def _make(model: type[Any]) -> Any:
    # Not st.builds(Model): it would also infer the models' alias parameters (leadId, …) from the
    # pydantic signature and fill them with arbitrary values that win over ours.
    return lambda **fields: model(**fields)


MESSAGES = st.builds(
    _make(LeadMessage),
    lead_id=LEAD_IDS,
    publisher_id=PUBLISHER_IDS,
    received_at=st.one_of(st.none(), st.datetimes(timezones=OFFSETS)),
    lead=st.builds(
        _make(MarketplaceLead),
        customer=st.builds(
            _make(Customer),
            first_name=TEXTS,
            last_name=TEXTS,
            email=TEXTS,
            phone=TEXTS,
            country=TEXTS,
            company=TEXTS,
            title=TEXTS,
        ),
        lead_source=TEXTS,
        source=TEXTS,
        action_code=TEXTS,
        publisher_offer=TEXTS,
        offer_title=TEXTS,
        description=TEXTS,
        is_test=st.booleans(),
    ),
)


@FAST
@given(MESSAGES)
def test_columns_never_exceed_their_length_and_are_valid_text(message: LeadMessage) -> None:
    check_columns(message)


@FAST
@given(MESSAGES)
def test_message_body_round_trips_exactly(message: LeadMessage) -> None:
    body = message.to_body()
    again = LeadMessage.from_body(body)
    assert again == message
    assert again.to_body() == body
    if message.received_at is not None:
        assert again.received_at is not None
        assert again.received_at.utcoffset() == UTC.utcoffset(None)


@FAST
@given(st.text(ANY_CHAR, max_size=300), st.integers(min_value=0, max_value=320))
def test_truncate_utf16_gives_the_longest_whole_prefix(text: str, max_units: int) -> None:
    cut = truncate_utf16(text, max_units)
    length = len(cut.encode("utf-16-le", "surrogatepass")) // 2
    full = len(text.encode("utf-16-le", "surrogatepass")) // 2
    assert text.startswith(cut)
    assert length <= max_units
    # Only a surrogate pair at the boundary may leave one unit unused.
    assert length >= min(full, max_units - 1)


@FAST
@given(PUBLISHER_IDS, st.text(min_size=1), PUBLISHER_IDS, st.text(min_size=1))
def test_record_ids_differ_whenever_publisher_or_lead_differs(p1: str, l1: str, p2: str, l2: str) -> None:
    same = (p1, l1) == (p2, l2)
    assert (lead_record_id(p1, l1) == lead_record_id(p2, l2)) is same

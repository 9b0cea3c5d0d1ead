"""Content-derived lead ids (architecture §3): the canonical form's properties, the Idempotency-Key rule, and the
seen-id table's first-time answer."""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared.pipeline.identity import (
    CONTENT_ID_PREFIX,
    InvalidIdempotencyKey,
    SqliteSeenIds,
    canonical_form,
    check_idempotency_key,
    content_lead_id,
)
from shared.pipeline.lead import LeadMessage, MarketplaceLead

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys in letters whose case round-trips under case folding (as the marketplace's keys do), and any text.
KEY_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéüÆøß_0123456789"
KEYS = st.text(KEY_LETTERS, min_size=1, max_size=12)
ANY_TEXT = st.text(st.characters(), max_size=30)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    ANY_TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=16,
)
LEADS = st.dictionaries(KEYS, JSONISH, max_size=6)
PUBLISHERS = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
# Whitespace str.strip() removes, the no-break and ideographic spaces included.
PADDING = st.text(" \t\n\r\u00a0\u2003\u3000", max_size=3)


def map_strings(value: Any, on_key: Any, on_text: Any) -> Any:
    if isinstance(value, dict):
        return {on_key(key): map_strings(member, on_key, on_text) for key, member in value.items()}
    if isinstance(value, list):
        return [map_strings(item, on_key, on_text) for item in value]
    if isinstance(value, str):
        return on_text(value)
    return value


def reversed_order(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: reversed_order(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_order(item) for item in value]
    return value


def reference(value: Any) -> Any:
    """What the canonical form says a lead is, written the obvious way; None when folded keys collide."""
    if isinstance(value, dict):
        members = {
            unicodedata.normalize("NFC", unicodedata.normalize("NFC", key).strip().casefold()): reference(member)
            for key, member in value.items()
            if member is not None
        }
        return members if len(members) == len([m for m in value.values() if m is not None]) else None
    if isinstance(value, list):
        return [reference(item) for item in value]
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value).strip()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def has_collision(value: Any) -> bool:
    if isinstance(value, dict):
        return reference(value) is None or any(has_collision(member) for member in value.values())
    if isinstance(value, list):
        return any(has_collision(item) for item in value)
    return False


# -- the canonical form ------------------------------------------------------------------------------


@FAST
@given(lead=LEADS, flips=st.randoms(use_true_random=False))
def test_key_case_does_not_change_the_id(lead: dict[str, Any], flips: Any) -> None:
    recased = map_strings(
        lead, lambda key: "".join(c.upper() if flips.random() < 0.5 else c.lower() for c in key), lambda text: text
    )
    assert content_lead_id("contoso", recased) == content_lead_id("contoso", lead)


@FAST
@given(lead=LEADS)
def test_unicode_normalisation_does_not_change_the_id(lead: dict[str, Any]) -> None:
    decomposed = map_strings(
        lead, lambda key: unicodedata.normalize("NFD", key), lambda text: unicodedata.normalize("NFD", text)
    )
    assert canonical_form(decomposed) == canonical_form(lead)
    assert content_lead_id("contoso", decomposed) == content_lead_id("contoso", lead)


@FAST
@given(lead=LEADS, before=PADDING, after=PADDING)
def test_surrounding_whitespace_does_not_change_the_id(lead: dict[str, Any], before: str, after: str) -> None:
    padded = map_strings(lead, lambda key: before + key + after, lambda text: before + text + after)
    assert content_lead_id("contoso", padded) == content_lead_id("contoso", lead)


@FAST
@given(lead=LEADS)
def test_key_order_does_not_change_the_id(lead: dict[str, Any]) -> None:
    assert content_lead_id("contoso", reversed_order(lead)) == content_lead_id("contoso", lead)


@FAST
@given(lead=LEADS)
def test_the_canonical_form_is_ascii_json_meaning_the_normalised_lead(lead: dict[str, Any]) -> None:
    assume(not has_collision(lead))
    text = canonical_form(lead)
    assert text.isascii()
    assert json.loads(text) == reference(lead)


@FAST
@given(first=LEADS, second=LEADS)
def test_different_content_gives_different_ids(first: dict[str, Any], second: dict[str, Any]) -> None:
    assume(not has_collision(first) and not has_collision(second))
    assume(reference(first) != reference(second))
    assert content_lead_id("contoso", first) != content_lead_id("contoso", second)


@FAST
@given(lead=LEADS, first=PUBLISHERS, second=PUBLISHERS)
def test_the_same_lead_of_two_publishers_gets_two_ids(lead: dict[str, Any], first: str, second: str) -> None:
    assume(first != second)
    assert content_lead_id(first, lead) != content_lead_id(second, lead)


@FAST
@given(lead=LEADS, publisher=PUBLISHERS)
def test_a_content_id_is_a_valid_lead_id_and_always_the_same(lead: dict[str, Any], publisher: str) -> None:
    lead_id = content_lead_id(publisher, lead)
    assert lead_id == content_lead_id(publisher, json.loads(json.dumps(lead)))
    assert lead_id.startswith(CONTENT_ID_PREFIX)
    assert len(lead_id) == len(CONTENT_ID_PREFIX) + 64
    LeadMessage(lead_id=lead_id, publisher_id=publisher, lead=MarketplaceLead())


def test_user_details_spelled_either_way_is_one_lead() -> None:
    pascal = {
        "UserDetails": {"FirstName": "Ada", "LastName": "Lovelace", "Email": "ada@example.com"},
        "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
        "ActionCode": "INS",
        "OfferTitle": "Contoso Widget",
    }
    camel = {
        "offerTitle": " Contoso Widget ",
        "actionCode": "INS",
        "leadSource": "AzureMarketplace-INS|contoso.widget-saas",
        "userDetails": {"email": "ada@example.com", "lastName": "Lovelace", "firstName": "Ada", "phone": None},
    }
    assert content_lead_id("contoso", camel) == content_lead_id("contoso", pascal)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"Email": "ada@example.com"}, {"Email": "Ada@example.com"}),  # values keep their case
        ({"Email": "a b"}, {"Email": "a  b"}),  # only surrounding whitespace is trimmed
        ({"Phone": "1234567890"}, {"Phone": 1234567890}),  # a string is not a number
        ({"Tags": ["a", "b"]}, {"Tags": ["b", "a"]}),  # arrays keep their order
        ({"A": {"B": 1}}, {"A": [["b", 1]]}),
        ({"Email": ""}, {}),
    ],
)
def test_leads_that_differ_in_content_get_different_ids(first: dict[str, Any], second: dict[str, Any]) -> None:
    assert content_lead_id("contoso", first) != content_lead_id("contoso", second)


def test_keys_that_fold_to_one_give_the_same_id_in_either_order() -> None:
    assert content_lead_id("p", {"Email": "a@x", "email": "b@x"}) == content_lead_id(
        "p", {"email": "b@x", "Email": "a@x"}
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()])
def test_what_json_cannot_hold_has_no_canonical_form(value: Any) -> None:
    with pytest.raises(ValueError, match=r"JSON|form"):
        canonical_form({"Description": value})


# -- Idempotency-Key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_key", "expected"), [("abc-123", "abc-123"), ("  spaced  ", "spaced"), ("k" * 200, "k" * 200)]
)
def test_a_printable_bounded_idempotency_key_is_the_id(given_key: str, expected: str) -> None:
    assert check_idempotency_key(given_key) == expected


@pytest.mark.parametrize("given_key", ["", "   ", "k" * 201, "abc\x00def", "tab\tinside", "line\nbreak"])
def test_an_empty_overlong_or_unprintable_idempotency_key_is_refused_naming_the_header(given_key: str) -> None:
    with pytest.raises(InvalidIdempotencyKey) as raised:
        check_idempotency_key(given_key)
    assert raised.value.field == "Idempotency-Key"


# -- the seen-id table -------------------------------------------------------------------------------


def test_a_lead_id_is_seen_for_the_first_time_once_per_publisher(tmp_path: Path) -> None:
    seen = SqliteSeenIds(tmp_path / "seen.db")
    assert seen.first_time("contoso", "lead-1") is True
    assert seen.first_time("contoso", "lead-1") is False
    assert seen.first_time("fabrikam", "lead-1") is True
    assert seen.first_time("contoso", "lead-2") is True
    # Another process (another instance on the same file) agrees.
    assert SqliteSeenIds(tmp_path / "seen.db").first_time("contoso", "lead-1") is False


def test_of_many_callers_asking_at_once_exactly_one_is_first(tmp_path: Path) -> None:
    seen = SqliteSeenIds(tmp_path / "seen.db")
    callers = 8
    barrier = threading.Barrier(callers)
    answers: list[bool] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        answer = seen.first_time("contoso", "same-lead")
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=ask) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [False] * (callers - 1) + [True]


def test_a_seen_id_is_forgotten_after_the_retention(tmp_path: Path) -> None:
    now = [1_000_000.0]
    seen = SqliteSeenIds(tmp_path / "seen.db", retention=60.0, clock=lambda: now[0])
    assert seen.first_time("contoso", "lead-1") is True
    now[0] += 59
    assert seen.first_time("contoso", "lead-1") is False
    now[0] += 60
    assert seen.first_time("contoso", "lead-1") is True


def test_the_table_is_created_on_first_use_not_when_built(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "seen.db"
    seen = SqliteSeenIds(path)
    assert not path.exists()
    assert seen.first_time("contoso", "x") is True
    assert path.exists()

"""The marketplace lead, the message carried between stages, and its mapping to Dataverse (architecture §3, §4).

Parsing is lenient where the marketplace is inconsistent (key case, numbers for phone numbers, the two
``LeadSource`` formats, unknown action codes) and strict where a guess would write garbage into a
publisher's CRM (objects where text is expected, no way to contact anyone). Everything that is not a
lead raises :class:`~shared.errors.InvalidLead` naming the field, and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, NoReturn

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from shared.errors import InvalidLead, InvalidPublisherId
from shared.pipeline.bounds import MAX_BODY_BYTES as MAX_BODY_BYTES  # re-exported: the limit lives in bounds
from shared.pipeline.bounds import MAX_DEPTH as MAX_DEPTH
from shared.pipeline.bounds import BoundsExceeded, check_json_text, check_value
from shared.secretstore.base import validate_publisher_id

logger = logging.getLogger(__name__)

MAX_LEAD_ID_LENGTH: Final = 200

#: Namespace of the Dataverse lead ids (architecture §4). Fixed forever: changing it would re-create every
#: lead that is replayed after the change instead of recognising it as delivered.
LEAD_RECORD_NAMESPACE: Final = uuid.UUID("78b55ea8-4c6e-5598-84c8-a9b269e2d29a")

COLUMN_MAX_LENGTHS: Mapping[str, int] = MappingProxyType(
    {
        "subject": 300,
        "firstname": 50,
        "lastname": 50,
        "emailaddress1": 100,
        "telephone1": 50,
        "companyname": 100,
        "jobtitle": 100,
        "address1_country": 80,
        "description": 2000,
    }
)

ACTION_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "INS": "installed or purchased",
        "PLT": "asked to be contacted (partner-led trial)",
        "DNC": "does not want to be contacted",
        "Create": "created the offer in the Azure portal",
        "StartTestDrive": "started a test drive",
    }
)

#: Known ``LeadSource`` sources and how a salesperson reads them.
SOURCE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "AzureMarketplace": "Azure Marketplace",
        "AzurePortal": "Azure portal",
        "AppSource": "AppSource",
        "TestDrive": "Test Drive",
    }
)

#: Marketplace test leads carry values like ``MSFT_TEST_636573304831318844`` (in names, email, source).
TEST_LEAD_PATTERN: Final = re.compile(r"MSFT_TEST(?:_\d+)?", re.IGNORECASE)

_ACTIONS_BY_KEY = {code.lower(): code for code in ACTION_DESCRIPTIONS}
_SOURCES_BY_KEY = {source.lower(): source for source in SOURCE_NAMES}

# Keys inside the marketplace lead, lowercased, in order of preference. The alternatives are the
# names the marketplace's other lead destinations (table storage, CRM connectors) use.
_USER_DETAILS_KEYS = ("userdetails", "customerinfo")
_CUSTOMER_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "first_name": ("firstname",),
        "last_name": ("lastname",),
        "email": ("email", "emailaddress"),
        "phone": ("phone", "phonenumber"),
        "country": ("country",),
        "company": ("company", "companyname"),
        "title": ("title", "jobtitle"),
    }
)
_CONTACT_FIELDS = ("email", "phone", "first_name", "last_name", "company")

_SINGLE_LINE_JUNK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
_MULTI_LINE_JUNK = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FACT_MAX_UNITS = 200
_ELLIPSIS = "…"


def _fix_surrogates(text: str) -> str:
    """Pair up surrogate halves and replace lone ones, so the text is valid Unicode (and JSON).

    The one rule for lone surrogates, on the queue path and at the HTTP door alike.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def repair_text(value: Any) -> Any:
    """``value`` (parsed JSON) with :func:`_fix_surrogates` applied to every string, keys included.

    Iterative, so it is safe on any value; call :func:`shared.pipeline.bounds.check_value` first to
    bound the work. Raises nothing.
    """
    if isinstance(value, str):
        return _fix_surrogates(value)
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [value]
    # (source container, target container) pairs still to copy.
    pending: list[tuple[Any, Any]] = []

    def copy(item: Any) -> Any:
        if isinstance(item, str):
            return _fix_surrogates(item)
        if isinstance(item, dict):
            target: Any = {}
        elif isinstance(item, list):
            target = []
        else:
            return item
        pending.append((item, target))
        return target

    root[0] = copy(value)
    while pending:
        source, target = pending.pop()
        if isinstance(source, dict):
            for key, child in source.items():
                target[_fix_surrogates(key) if isinstance(key, str) else key] = copy(child)
        else:
            target.extend(copy(child) for child in source)
    return root[0]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, alias_generator=to_camel, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # Lone surrogates (from a JSON "\ud800" escape or a Python caller) cannot be serialised to
        # JSON or stored in Dataverse; fixing them here makes to_body and the mapping total.
        return _fix_surrogates(value) if isinstance(value, str) else value


class Customer(_Model):
    """The person behind the lead. Any field may be missing."""

    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    country: str | None = None
    company: str | None = None
    title: str | None = None


class MarketplaceLead(_Model):
    """The marketplace lead, normalised."""

    customer: Customer = Customer()
    #: ``LeadSource`` as received, e.g. ``AzureMarketplace-INS|contoso.widget-saas``.
    lead_source: str | None = None
    #: ``AzureMarketplace``, ``AzurePortal``, ``AppSource``, ``TestDrive`` or an unknown source as-is.
    source: str | None = None
    #: ``INS``, ``PLT``, ``DNC``, ``Create``, ``StartTestDrive`` or an unknown code as-is.
    action_code: str | None = None
    #: ``publisher.offer``, the part of ``LeadSource`` after ``|``.
    publisher_offer: str | None = None
    offer_title: str | None = None
    description: str | None = None
    #: A marketplace test lead (``MSFT_TEST_…``): written, marked as a test.
    is_test: bool = False


class LeadMessage(_Model):
    """The normalised message carried between stages. Never holds a secret or a token."""

    lead_id: str
    publisher_id: str
    received_at: datetime | None = None
    lead: MarketplaceLead

    @field_validator("lead_id")
    @classmethod
    def _check_lead_id(cls, value: str) -> str:
        _check_lead_id_text(value)
        return value

    @field_validator("publisher_id")
    @classmethod
    def _check_publisher_id(cls, value: str) -> str:
        return validate_publisher_id(value)

    @field_validator("received_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _to_utc(value)

    def to_body(self) -> bytes:
        """Compact JSON with camelCase keys; the same message always gives the same bytes."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")

    @classmethod
    def from_body(cls, body: bytes) -> LeadMessage:
        """Inverse of :meth:`to_body`.

        Raises InvalidLead (with ``field`` set to the offending key path) when ``body`` is not one.
        """
        try:
            return cls.model_validate_json(body)
        except ValidationError as exc:
            # Compose the message from the location and pydantic's message only: the error's own
            # text echoes the input value.
            first = exc.errors(include_url=False, include_input=False)[0]
            field = ".".join(str(part) for part in first["loc"]) or None
            where = f" at {field}" if field else ""
            raise InvalidLead(f"not a lead message{where}: {first['msg']}", field=field) from None

    def record_id(self) -> uuid.UUID:
        """The Dataverse lead id of this message (see :func:`lead_record_id`)."""
        return lead_record_id(self.publisher_id, self.lead_id)


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


class _BadJsonConstant(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise _BadJsonConstant(f"{name} is not allowed in JSON")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _decode_envelope(body: bytes | bytearray | memoryview | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        try:
            check_value(body)
        except BoundsExceeded as exc:
            raise InvalidLead(f"body is {exc}") from None
        return body
    if isinstance(body, str):
        size = len(body.encode("utf-8", "surrogatepass"))
        text = body
    else:
        raw = bytes(body)
        size = len(raw)
    if size > MAX_BODY_BYTES:
        raise InvalidLead(f"body is {size} bytes, over the limit of {MAX_BODY_BYTES} bytes")
    if not isinstance(body, str):
        try:
            # utf-8-sig: a byte order mark is legal UTF-8 and some senders add one.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidLead("body is not UTF-8 text") from None
    try:
        # Before parsing: the parser recurses once per level, and a stored body must be displayable.
        check_json_text(text)
    except BoundsExceeded as exc:
        raise InvalidLead(f"body is {exc}") from None
    try:
        envelope = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidLead(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
        ) from None
    except _BadJsonConstant as exc:
        raise InvalidLead(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidLead("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        # e.g. an integer literal longer than Python's int/str conversion limit.
        raise InvalidLead(f"body is not valid JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise InvalidLead(f"body must be a JSON object, got {_describe(envelope)}")
    return envelope


def decode_json_object(body: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """A body as a JSON object, under the bounds every door applies (size, depth, UTF-8, no NaN).

    Raises InvalidLead (``field`` ``body``) for anything else.
    """
    envelope = _decode_envelope(body)
    assert isinstance(envelope, dict)  # only a Mapping passed in comes back as something else
    return envelope


def _check_lead_id_text(value: str) -> None:
    if not 1 <= len(value) <= MAX_LEAD_ID_LENGTH:
        raise ValueError(f"leadId must be 1-{MAX_LEAD_ID_LENGTH} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError("leadId must contain only printable characters")


def _lead_id(envelope: Mapping[str, Any], message_id: str | None) -> str:
    value = envelope.get("leadId")
    source = "leadId"
    if value is None:
        value, source = message_id, "the message id"
    if value is None:
        raise InvalidLead("the message has no leadId and no message id", field="leadId")
    if not isinstance(value, str):
        raise InvalidLead(f"leadId must be a string, got {_describe(value)}", field="leadId")
    try:
        _check_lead_id_text(value)
    except ValueError as exc:
        message = str(exc) if source == "leadId" else f"{exc} (taken from the message id)"
        raise InvalidLead(message, field="leadId") from None
    return value


def _publisher_id(envelope: Mapping[str, Any]) -> str:
    value = envelope.get("publisherId")
    if value is None:
        raise InvalidLead("the message has no publisherId", field="publisherId")
    if not isinstance(value, str):
        raise InvalidLead(f"publisherId must be a string, got {_describe(value)}", field="publisherId")
    try:
        return validate_publisher_id(value)
    except InvalidPublisherId as exc:
        raise InvalidLead(str(exc), field="publisherId") from None


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the date-time is out of range in UTC") from None


def _received_at(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidLead("receivedAt is not an ISO-8601 date-time", field="receivedAt") from None
    else:
        raise InvalidLead(
            f"receivedAt must be an ISO-8601 string, got {_describe(value)}", field="receivedAt"
        )
    try:
        return _to_utc(parsed)
    except ValueError as exc:
        raise InvalidLead(f"receivedAt: {exc}", field="receivedAt") from None


def _lookup(obj: Mapping[Any, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    """The first (key, value) whose key matches one of ``names`` ignoring case, with a non-null value.

    ``names`` are in order of preference; among keys differing only in case, the first one wins.
    """
    for name in names:
        for key, value in obj.items():
            if isinstance(key, str) and key.lower() == name and value is not None:
                return key, value
    return None


def _text(value: Any, path: str, *, multi_line: bool = False) -> str | None:
    """A string field's value as clean text (None when missing or blank); raise InvalidLead otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidLead(f"{path} must be a string, got a boolean", field=path)
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:
            raise InvalidLead(f"{path} must be a string, got a number too large", field=path) from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidLead(f"{path} must be a string, got a number that is not finite", field=path)
        # Phone numbers arrive as JSON numbers: 1234567890.0 must read "1234567890", not "1234567890.0".
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise InvalidLead(f"{path} must be a string, got {_describe(value)}", field=path)
    text = _fix_surrogates(value)
    if multi_line:
        text = _MULTI_LINE_JUNK.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    else:
        text = _SINGLE_LINE_JUNK.sub(" ", text).strip()
    return text or None


def _field(
    obj: Mapping[Any, Any], names: tuple[str, ...], prefix: str, *, multi_line: bool = False
) -> str | None:
    found = _lookup(obj, names)
    if found is None:
        return None
    key, value = found
    return _text(value, f"{prefix}.{key}", multi_line=multi_line)


def _user_details(lead: Mapping[Any, Any]) -> tuple[Mapping[Any, Any], str]:
    found = _lookup(lead, _USER_DETAILS_KEYS)
    if found is None:
        return {}, "lead.UserDetails"
    key, value = found
    path = f"lead.{key}"
    if isinstance(value, str) and value.lstrip().startswith("{"):
        # The marketplace's table-storage destination stores customer info as a JSON string.
        try:
            value = json.loads(value, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise InvalidLead(
                f"{path} must be an object, got a string that is not a JSON object", field=path
            ) from None
    if not isinstance(value, Mapping):
        raise InvalidLead(f"{path} must be an object, got {_describe(value)}", field=path)
    return value, path


def _canonical_action(code: str | None) -> str | None:
    return None if code is None else _ACTIONS_BY_KEY.get(code.lower(), code)


def _split_lead_source(raw: str) -> tuple[str | None, str | None, str | None]:
    """``Source-Action|publisher.offer`` (or ``Source`` alone) → (source, action, publisher.offer)."""
    head, _, offer = raw.partition("|")
    head = head.strip()
    source, action = head, ""
    for key, known in _SOURCES_BY_KEY.items():
        if head.lower() == key:
            source, action = known, ""
            break
        if head.lower().startswith(key + "-"):
            source, action = known, head[len(key) + 1 :]
            break
    else:
        if "-" in head:
            source, _, action = head.partition("-")
    return source.strip() or None, _canonical_action(action.strip() or None), offer.strip() or None


def parse_marketplace_lead(payload: Mapping[str, Any]) -> MarketplaceLead:
    """Normalise the marketplace's lead object (the ``lead`` of a ``leads-incoming`` message).

    Keys match case-insensitively at every level. A separate ``ActionCode`` wins over the action
    inside ``LeadSource`` when both are present (the dedicated field is the marketplace's explicit
    statement; the raw ``LeadSource`` is kept in ``lead_source`` and in the CRM description).

    Raises InvalidLead naming the field path (``lead.UserDetails.FirstName``) for a value of the wrong
    type, and when the lead has no contact details at all (unless it is a marketplace test lead).
    """
    if not isinstance(payload, Mapping):
        raise InvalidLead(f"lead must be an object, got {_describe(payload)}", field="lead")
    details, details_path = _user_details(payload)
    customer = Customer(
        **{name: _field(details, keys, details_path) for name, keys in _CUSTOMER_KEYS.items()}
    )
    lead_source = _field(payload, ("leadsource",), "lead")
    source = action = publisher_offer = None
    if lead_source is not None:
        source, action, publisher_offer = _split_lead_source(lead_source)
    explicit_action = _canonical_action(_field(payload, ("actioncode",), "lead"))
    if explicit_action is not None:
        if action is not None and action != explicit_action:
            logger.debug("ActionCode %s overrides action %s in LeadSource", explicit_action, action)
        action = explicit_action
    offer_title = _field(payload, ("offertitle",), "lead")
    description = _field(payload, ("description",), "lead", multi_line=True)

    texts = [*customer.model_dump().values(), lead_source, action, publisher_offer, offer_title, description]
    is_test = any(text is not None and TEST_LEAD_PATTERN.search(text) for text in texts)
    if not is_test and not any(getattr(customer, name) for name in _CONTACT_FIELDS):
        raise InvalidLead(
            "the lead has no contact details (no email, phone, first name, last name or company)",
            field=details_path,
        )
    return MarketplaceLead(
        customer=customer,
        lead_source=lead_source,
        source=source,
        action_code=action,
        publisher_offer=publisher_offer,
        offer_title=offer_title,
        description=description,
        is_test=is_test,
    )


def parse_incoming(
    body: bytes | bytearray | memoryview | str | Mapping[str, Any], *, message_id: str | None = None
) -> LeadMessage:
    """Parse a ``leads-incoming`` message (architecture §3) into a :class:`LeadMessage`.

    ``message_id`` (the Service Bus message id) is the lead id when the body has no ``leadId``.

    Raises InvalidLead (``field`` names the offending field when there is one) when the body is not
    UTF-8, is over :data:`MAX_BODY_BYTES`, is not a JSON object, lacks a valid ``publisherId``, a lead id
    or a ``lead`` object, or when the lead itself is invalid (see :func:`parse_marketplace_lead`).
    """
    envelope = _decode_envelope(body)
    publisher_id = _publisher_id(envelope)
    lead_id = _lead_id(envelope, message_id)
    received_at = _received_at(envelope.get("receivedAt"))
    payload = envelope.get("lead")
    if payload is None:
        raise InvalidLead("the message has no lead object", field="lead")
    if not isinstance(payload, Mapping):
        raise InvalidLead(f"lead must be an object, got {_describe(payload)}", field="lead")
    lead = parse_marketplace_lead(payload)
    return LeadMessage(lead_id=lead_id, publisher_id=publisher_id, received_at=received_at, lead=lead)


# --------------------------------------------------------------------------------------------------
# Mapping to Dataverse
# --------------------------------------------------------------------------------------------------


def lead_record_id(publisher_id: str, lead_id: str) -> uuid.UUID:
    """The Dataverse ``leadid``: UUIDv5 of ``publisherId/leadId`` in :data:`LEAD_RECORD_NAMESPACE`.

    The name is unambiguous because a publisher id can never contain ``/``: the first ``/`` always
    separates the two, so (``pub``, ``x/y``) and (``pub/x``, ``y``) cannot collide — the latter is
    refused. Raises InvalidLead for an invalid publisher id or an empty lead id.
    """
    try:
        validate_publisher_id(publisher_id)
    except InvalidPublisherId as exc:
        raise InvalidLead(str(exc), field="publisherId") from None
    if not lead_id:
        raise InvalidLead("leadId must not be empty", field="leadId")
    return uuid.uuid5(LEAD_RECORD_NAMESPACE, f"{publisher_id}/{lead_id}")


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units, as Dataverse counts it (an emoji is 2)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def truncate_utf16(text: str, max_units: int) -> str:
    """The longest prefix of ``text`` that is at most ``max_units`` UTF-16 code units long.

    Never splits a surrogate pair, so the result may be one unit shorter than ``max_units``.
    Raises ValueError for a negative ``max_units``.
    """
    if max_units < 0:
        raise ValueError("max_units must not be negative")
    if len(text) * 2 <= max_units:
        return text
    units = 0
    for index, char in enumerate(text):
        width = 2 if ord(char) > 0xFFFF else 1
        if units + width > max_units:
            # A high surrogate stored as its own character must not be left without its low half.
            if index and "\ud800" <= text[index - 1] <= "\udbff" and "\udc00" <= char <= "\udfff":
                index -= 1
            return text[:index]
        units += width
    return text


def _shorten(text: str, max_units: int) -> str:
    """``text`` cut to ``max_units`` with an ellipsis marking the cut."""
    if utf16_length(text) <= max_units:
        return text
    return truncate_utf16(text, max_units - 1) + _ELLIPSIS


def _source_name(source: str) -> str:
    return SOURCE_NAMES.get(source, source)


def _subject(message: LeadMessage) -> str:
    lead = message.lead
    offer = lead.offer_title or lead.publisher_offer or "Marketplace lead"
    suffix = ""
    if lead.action_code:
        suffix += f": {ACTION_DESCRIPTIONS.get(lead.action_code, f'action {lead.action_code}')}"
    if lead.source:
        suffix += f" ({_source_name(lead.source)})"
    prefix = "[TEST] " if lead.is_test else ""
    limit = COLUMN_MAX_LENGTHS["subject"]
    # The offer gives way first, so what happened and where stays readable.
    suffix = _shorten(suffix, limit // 2)
    offer = _shorten(offer, limit - utf16_length(prefix) - utf16_length(suffix))
    return truncate_utf16(prefix + offer + suffix, limit)


def _description(message: LeadMessage) -> str:
    lead = message.lead
    facts: list[tuple[str, str]] = []
    if lead.source:
        name = _source_name(lead.source)
        facts.append(("Source", name if name == lead.source else f"{name} ({lead.source})"))
    if lead.action_code:
        meaning = ACTION_DESCRIPTIONS.get(lead.action_code)
        facts.append(("Action", f"{lead.action_code} — {meaning}" if meaning else lead.action_code))
    if lead.publisher_offer or lead.offer_title:
        offer = " / ".join(part for part in (lead.publisher_offer, lead.offer_title) if part)
        facts.append(("Offer", offer))
    if lead.lead_source:
        facts.append(("Lead source", lead.lead_source))
    facts.append(("Lead id", message.lead_id))
    facts.append(("Publisher id", message.publisher_id))
    if message.received_at is not None:
        facts.append(("Received at", message.received_at.isoformat().replace("+00:00", "Z")))
    lines = ["Marketplace test lead"] if lead.is_test else []
    lines += [f"{label}: {_shorten(value, _FACT_MAX_UNITS)}" for label, value in facts]
    text = "\n".join(lines)
    limit = COLUMN_MAX_LENGTHS["description"]
    if lead.description:
        # The facts are bounded (each value ≤ _FACT_MAX_UNITS) and come first; the free text takes
        # what is left, so it is what gets cut.
        room = limit - utf16_length(text) - 2
        if room > len(_ELLIPSIS):
            text += "\n\n" + _shorten(lead.description, room)
    return truncate_utf16(text, limit)


#: Contact-preference columns set for a ``DNC`` (do not contact) lead.
DO_NOT_CONTACT_COLUMNS: tuple[str, ...] = ("donotemail", "donotphone", "donotbulkemail", "donotpostalmail")


def to_dataverse_columns(message: LeadMessage, *, lead_source_code: int = 8) -> dict[str, Any]:
    """The Dataverse ``lead`` columns for ``message`` (architecture §4), each within its maximum length.

    Missing values are omitted; ``fullname`` (read-only) and ``leadid`` (the caller puts the id in the
    URL) are never set. ``lead_source_code`` is the ``leadsourcecode`` option value (8 = Web).
    Raises nothing for a valid :class:`LeadMessage`.
    """
    customer = message.lead.customer
    values: dict[str, str | None] = {
        "subject": _subject(message),
        "firstname": customer.first_name,
        "lastname": customer.last_name,
        "emailaddress1": customer.email,
        "telephone1": customer.phone,
        "companyname": customer.company,
        "jobtitle": customer.title,
        "address1_country": customer.country,
        "description": _description(message),
    }
    columns: dict[str, Any] = {}
    for column, value in values.items():
        if not value:
            continue
        limit = COLUMN_MAX_LENGTHS[column]
        cut = truncate_utf16(value, limit)
        if cut != value:
            logger.debug("lead %s: column %s truncated to %d UTF-16 units", message.lead_id, column, limit)
        columns[column] = cut
    columns["leadsourcecode"] = lead_source_code
    if message.lead.action_code == "DNC":
        # The customer asked not to be contacted: record it where Dynamics enforces it (marketing lists,
        # bulk e-mail, dialers), not only in the description.
        columns.update(dict.fromkeys(DO_NOT_CONTACT_COLUMNS, True))
    return columns


def mask_email(email: str | None) -> str | None:
    """``ada@example.com`` → ``a***@example.com``, for log lines. Raises nothing."""
    if email is None:
        return None
    local, at, domain = email.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"

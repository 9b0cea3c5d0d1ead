"""How one publisher's leads land (architecture §6 mapping body): the :class:`Mapping`
model, its small template language, and :func:`columns_for`, which turns a lead into Dataverse columns.

Templates put lead fields in braces, case-insensitively: ``{OfferTitle}: {ActionCode} — {Company}``;
``{{`` and ``}}`` are literal braces. The fields are :data:`TEMPLATE_FIELDS`; any other name is an
error naming it. A templated value longer than its column is truncated as in architecture §4.

Everything here is pure: validating a mapping against a CRM's metadata is in
:mod:`shared.crm.metadata`, storing it in :mod:`shared.api.routes_mapping`. This module must not import
the CRM client, the API or the transports.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from shared.errors import InvalidInput
from shared.pipeline.lead import (
    ACTION_DESCRIPTIONS,
    COLUMN_MAX_LENGTHS,
    LEAD_RECORD_NAMESPACE,
    LeadMessage,
    to_dataverse_columns,
    truncate_utf16,
)

logger = logging.getLogger(__name__)

#: The ``leadsourcecode`` value of the default mapping (8 = Web).
DEFAULT_LEAD_SOURCE_CODE: Final = 8
#: A Dataverse logical column name: lower case, starting with a letter, as the platform makes them.
COLUMN_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,99}$")
MAX_TEMPLATE_LENGTH: Final = 4000
MAX_COLUMNS: Final = 50

#: Template fields, by their case-folded name: the spelling architecture §6 gives each.
TEMPLATE_FIELDS: Final = (
    "FirstName",
    "LastName",
    "Email",
    "Phone",
    "Country",
    "Company",
    "Title",
    "LeadSource",
    "ActionCode",
    "Action",
    "Source",
    "OfferId",
    "OfferTitle",
    "Description",
    "LeadId",
    "ReceivedAt",
)
_FIELDS_BY_KEY = {name.casefold(): name for name in TEMPLATE_FIELDS}
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
#: Columns a mapping may not fill through ``columns``: the key, a read-only one, and the lookups it sets
#: through its own fields.
RESERVED_COLUMNS: Final = frozenset(
    {"leadid", "fullname", "leadsourcecode", "campaignid", "ownerid", "parentcontactid", "parentaccountid"}
)


class InvalidMapping(InvalidInput):
    """A mapping that cannot be used; ``field`` names the offending part (``columns.new_offer``)."""


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and field names (canonical spelling), in order."""

    parts: tuple[tuple[bool, str], ...]  # (is_field, text or field name)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(text for is_field, text in self.parts if is_field)

    @property
    def literal(self) -> str:
        """The text a rendering always contains, whatever the lead."""
        return "".join(text for is_field, text in self.parts if not is_field)

    def render(self, values: AbcMapping[str, str | None]) -> str:
        """The text with each field replaced by its value (a missing value is empty), trimmed."""
        return "".join(text if not is_field else (values.get(text) or "") for is_field, text in self.parts).strip()


def parse_template(text: str, *, where: str = "template") -> Template:
    """Parse ``text``. Raises InvalidMapping (field ``where``) naming an unknown field or a lone brace."""
    parts: list[tuple[bool, str]] = []
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() > position:
            parts.append((False, text[position : match.start()]))
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append((False, token[0]))
        elif match.group(1) is not None:
            name = match.group(1).strip()
            canonical = _FIELDS_BY_KEY.get(name.casefold())
            if canonical is None:
                raise InvalidMapping(
                    f"{where}: unknown template field {{{name}}}; the fields are {', '.join(TEMPLATE_FIELDS)}",
                    field=where,
                )
            parts.append((True, canonical))
        else:
            raise InvalidMapping(
                f"{where}: a lone '{token}' at character {match.start() + 1}; write '{token * 2}' for a brace",
                field=where,
            )
        position = match.end()
    if position < len(text):
        parts.append((False, text[position:]))
    return Template(tuple(parts))


def template_values(message: LeadMessage) -> dict[str, str | None]:
    """The value of every template field for ``message`` (None when the lead does not have it)."""
    lead, customer = message.lead, message.lead.customer
    action = lead.action_code
    return {
        "FirstName": customer.first_name,
        "LastName": customer.last_name,
        "Email": customer.email,
        "Phone": customer.phone,
        "Country": customer.country,
        "Company": customer.company,
        "Title": customer.title,
        "LeadSource": lead.lead_source,
        "ActionCode": action,
        "Action": ACTION_DESCRIPTIONS.get(action, action) if action else None,
        "Source": lead.source,
        "OfferId": lead.publisher_offer,
        "OfferTitle": lead.offer_title,
        "Description": lead.description,
        "LeadId": message.lead_id,
        "ReceivedAt": message.received_at.isoformat().replace("+00:00", "Z") if message.received_at else None,
    }


# --------------------------------------------------------------------------------------------------
# The mapping body (architecture §6)
# --------------------------------------------------------------------------------------------------

_Column = Annotated[str, StringConstraints(pattern=COLUMN_NAME.pattern)]
_TemplateText = Annotated[str, StringConstraints(max_length=MAX_TEMPLATE_LENGTH)]


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Owner(_Body):
    """The owner of the mapped leads: a user or a team."""

    type: Literal["systemuser", "team"]
    id: uuid.UUID

    def bind(self) -> str:
        """The ``ownerid@odata.bind`` value."""
        return f"/{self.type}s({self.id})"


class Mapping(_Body):
    """The mapping body of ``PUT /api/publishers/{publisherId}/mapping``; every field optional, absent =
    the default mapping of architecture §4. Templates are checked on construction (unknown field → error)."""

    lead_source_code: int | None = Field(default=None, ge=0, le=2_147_483_647)
    lead_source_column: _Column | None = None
    campaign_id: uuid.UUID | None = None
    owner: Owner | None = None
    subject_template: _TemplateText | None = None
    columns: dict[_Column, _TemplateText] = Field(default_factory=dict, max_length=MAX_COLUMNS)
    link_existing: Literal["none", "contact", "account"] = "none"
    one_per_customer_and_offer: bool = False

    @field_validator("subject_template")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            parse_template(value, where="subjectTemplate")
        return value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        for column, text in value.items():
            if column in RESERVED_COLUMNS:
                raise InvalidMapping(
                    f"columns.{column}: this column is set by the mapping's own fields or by Lead Writer",
                    field=f"columns.{column}",
                )
            parse_template(text, where=f"columns.{column}")
        return value

    def to_json(self) -> dict[str, Any]:
        """The body as camelCase JSON, absent fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ValidatedMapping(Mapping):
    """A mapping checked against the publisher's CRM (:func:`shared.crm.metadata.validate_mapping`): it
    knows the maximum length of each text column it fills. Not a request body: built by the validation."""

    model_config = ConfigDict(extra="ignore")

    #: Text column → maximum length in UTF-16 code units, from the CRM's metadata.
    max_lengths: dict[str, int] = Field(default_factory=dict)
    validated_at: datetime | None = None

    def body(self) -> Mapping:
        """The plain mapping body (without what the validation learnt)."""
        return Mapping.model_validate(self.model_dump(include=set(Mapping.model_fields)))


def parse_mapping(data: Any) -> Mapping:
    """A :class:`Mapping` from a JSON body. Raises InvalidMapping naming the first bad field."""
    try:
        return Mapping.model_validate(data)
    except InvalidMapping:
        raise
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        context = first.get("ctx") or {}
        inner = context.get("error")
        if isinstance(inner, InvalidMapping):
            raise InvalidMapping(inner.message, field=inner.field) from None
        known = set(Mapping.model_fields) | set(Owner.model_fields)
        parts = [str(part) for part in first["loc"] if part != "[key]"]
        field = ".".join(to_camel(part) if part in known else part for part in parts)
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "string_pattern_mismatch":
            message = "not a Dataverse column logical name (lower case letters, digits and _, starting with a letter)"
        raise InvalidMapping(f"{field or 'body'}: {message}", field=field or "body") from None


# --------------------------------------------------------------------------------------------------
# Applying a mapping
# --------------------------------------------------------------------------------------------------


def _fit(message: LeadMessage, column: str, text: str, limit: int | None) -> str:
    if limit is None:
        return text
    cut = truncate_utf16(text, limit)
    if cut != text:
        logger.debug("lead %s: column %s truncated to %d UTF-16 units", message.lead_id, column, limit)
    return cut


def columns_for(lead: LeadMessage, mapping: Mapping | None, *, link: uuid.UUID | None = None) -> dict[str, Any]:
    """The Dataverse ``lead`` columns for ``lead`` under ``mapping`` (None: the default mapping of §4).

    On top of :func:`~shared.pipeline.lead.to_dataverse_columns`: the ``leadsourcecode`` value, the raw
    ``LeadSource`` in ``leadSourceColumn``, ``campaignid@odata.bind``, ``ownerid@odata.bind``, the subject
    template (a test lead keeps its ``[TEST]`` prefix), the templated ``columns`` (an empty result is left
    out), and, when ``link`` is the id of the contact or account found by e-mail
    (:func:`shared.crm.metadata.find_existing`), ``parentcontactid@odata.bind`` /
    ``parentaccountid@odata.bind``. Text is truncated to each column's length: the standard columns'
    from architecture §4, others' from a :class:`ValidatedMapping` (an unvalidated mapping leaves them whole).
    Raises nothing for a valid message and mapping.
    """
    if mapping is None:
        return to_dataverse_columns(lead)
    code = mapping.lead_source_code if mapping.lead_source_code is not None else DEFAULT_LEAD_SOURCE_CODE
    columns = to_dataverse_columns(lead, lead_source_code=code)
    lengths: dict[str, int] = dict(COLUMN_MAX_LENGTHS)
    if isinstance(mapping, ValidatedMapping):
        lengths.update(mapping.max_lengths)
    values = template_values(lead)
    if mapping.subject_template is not None:
        subject = parse_template(mapping.subject_template).render(values)
        if subject:
            prefix = "[TEST] " if lead.lead.is_test else ""
            columns["subject"] = _fit(lead, "subject", prefix + subject, lengths["subject"])
    for column, text in mapping.columns.items():
        rendered = parse_template(text).render(values)
        if rendered:
            columns[column] = _fit(lead, column, rendered, lengths.get(column))
        else:
            columns.pop(column, None)
    if mapping.lead_source_column is not None and lead.lead.lead_source:
        column = mapping.lead_source_column
        columns[column] = _fit(lead, column, lead.lead.lead_source, lengths.get(column))
    if mapping.campaign_id is not None:
        columns["campaignid@odata.bind"] = f"/campaigns({mapping.campaign_id})"
    if mapping.owner is not None:
        columns["ownerid@odata.bind"] = mapping.owner.bind()
    if link is not None and mapping.link_existing != "none":
        table = "contacts" if mapping.link_existing == "contact" else "accounts"
        columns[f"parent{mapping.link_existing}id@odata.bind"] = f"/{table}({link})"
    return columns


def customer_offer_record_id(lead: LeadMessage, mapping: Mapping | None) -> uuid.UUID | None:
    """With ``onePerCustomerAndOffer``, the Dataverse id every step of one customer (e-mail, case-folded)
    on one offer (``publisher.offer``, else the offer title) shares — so the first step's create makes
    the lead and a later step's create answers 412 (already there) and becomes an update of that lead.
    None when the option is off or the lead has no e-mail or offer (it is then written as its own lead).

    The UUIDv5 name is ``<publisherId>/customer-offer/<len>:<email>/<offer>`` in the lead namespace: it
    equals a per-lead id (:func:`~shared.pipeline.lead.lead_record_id`) only for a ``leadId`` that is itself
    ``customer-offer/…``, which neither the marketplace nor a content-derived id is. Raises nothing.
    """
    if mapping is None or not mapping.one_per_customer_and_offer:
        return None
    email = (lead.lead.customer.email or "").strip().casefold()
    offer = (lead.lead.publisher_offer or lead.lead.offer_title or "").strip().casefold()
    if not email or not offer:
        return None
    return uuid.uuid5(LEAD_RECORD_NAMESPACE, f"{lead.publisher_id}/customer-offer/{len(email)}:{email}/{offer}")

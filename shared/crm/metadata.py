"""A publisher's CRM as a mapping sees it (architecture §6 mapping): the ``lead`` metadata,
the option set, the records a mapping names, and the contact or account a lead links to by e-mail.

:func:`validate_mapping` checks a :class:`~shared.pipeline.mapping.Mapping` live — an unknown column, a
column of the wrong type, an option value the org does not have, a campaign or owner that does not
exist → :class:`~shared.pipeline.mapping.InvalidMapping` naming it — and answers a
:class:`~shared.pipeline.mapping.ValidatedMapping` that knows each filled column's length.
:class:`ExistingRecords` finds the contact/account of an e-mail with one cached query per e-mail, so a
backlog of one customer's leads costs one request.

Requests go through :meth:`DataverseClient.get_json`, so penalties, pacing and the URL guard apply.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote

from shared.cache import KeyedLocks
from shared.crm.client import DataverseClient
from shared.errors import CrmUnavailable
from shared.pipeline.lead import LeadMessage
from shared.pipeline.mapping import InvalidMapping, Mapping, ValidatedMapping, parse_template

logger = logging.getLogger(__name__)

_LEAD: Final = "EntityDefinitions(LogicalName='lead')/Attributes"
#: Attribute types a template can fill.
TEXT_TYPES: Final = frozenset({"String", "Memo"})
#: How long a found (or not found) contact/account stays cached, in seconds.
LINK_CACHE_SECONDS: Final = 300.0
LINK_CACHE_SIZE: Final = 10_000


@dataclass(frozen=True)
class Attribute:
    """One ``lead`` attribute of the org's metadata."""

    name: str
    type: str
    max_length: int | None
    valid_for_create: bool


def _rows(data: Any, operation: str) -> list[dict[str, Any]]:
    rows = data.get("value") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise CrmUnavailable(f"the CRM answered the {operation} with an unexpected body")
    return [row for row in rows if isinstance(row, dict)]


def lead_attributes(client: DataverseClient) -> dict[str, Attribute]:
    """The org's ``lead`` attributes by logical name, with ``MaxLength`` for String and Memo ones (three
    requests: the attributes, and the String and Memo casts, which alone carry ``MaxLength``).

    Raises like :meth:`DataverseClient.get_json`.
    """
    operation = "lead metadata query"
    listed = _rows(
        client.get_json(f"{_LEAD}?$select=LogicalName,AttributeType,IsValidForCreate", operation=operation),
        operation,
    )
    lengths: dict[str, int] = {}
    for cast in ("StringAttributeMetadata", "MemoAttributeMetadata"):
        for row in _rows(
            client.get_json(
                f"{_LEAD}/Microsoft.Dynamics.CRM.{cast}?$select=LogicalName,MaxLength", operation=operation
            ),
            operation,
        ):
            if isinstance(row.get("LogicalName"), str) and isinstance(row.get("MaxLength"), int):
                lengths[row["LogicalName"]] = row["MaxLength"]
    attributes = {}
    for row in listed:
        name = row.get("LogicalName")
        if isinstance(name, str):
            attributes[name] = Attribute(
                name=name,
                type=str(row.get("AttributeType") or ""),
                max_length=lengths.get(name),
                valid_for_create=row.get("IsValidForCreate") is not False,
            )
    return attributes


def option_values(client: DataverseClient, column: str = "leadsourcecode") -> set[int]:
    """The values of a ``lead`` option set (``leadsourcecode``: orgs customise it). Raises like get_json."""
    operation = f"{column} option set query"
    data = client.get_json(
        f"{_LEAD}(LogicalName='{column}')/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        "?$select=LogicalName&$expand=OptionSet($select=Options)",
        operation=operation,
    )
    options = (data.get("OptionSet") or {}).get("Options") if isinstance(data, dict) else None
    if not isinstance(options, list):
        return set()
    return {o["Value"] for o in options if isinstance(o, dict) and isinstance(o.get("Value"), int)}


def record_exists(client: DataverseClient, entity_set: str, record_id: uuid.UUID, key: str) -> bool:
    """Whether ``<entity_set>(<id>)`` exists (404 → False). Raises like get_json."""
    data = client.get_json(
        f"{entity_set}({record_id})?$select={key}", operation=f"{entity_set} lookup", missing_ok=True
    )
    return data is not None


def find_by_email(client: DataverseClient, kind: Literal["contact", "account"], email: str) -> uuid.UUID | None:
    """The id of the first contact/account whose ``emailaddress1`` is ``email``, or None. Raises like get_json."""
    table, key = ("contacts", "contactid") if kind == "contact" else ("accounts", "accountid")
    literal = email.replace("'", "''")
    query = quote(f"emailaddress1 eq '{literal}'", safe="'")
    rows = _rows(
        client.get_json(f"{table}?$select={key}&$filter={query}&$top=1", operation=f"{kind} query by e-mail"),
        f"{kind} query by e-mail",
    )
    for row in rows:
        try:
            return uuid.UUID(str(row.get(key)))
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _text_column(attributes: dict[str, Attribute], column: str, where: str) -> Attribute:
    found = attributes.get(column)
    if found is None:
        raise InvalidMapping(f"{where}: the CRM's lead table has no column {column}", field=where)
    if found.type not in TEXT_TYPES:
        raise InvalidMapping(
            f"{where}: column {column} is of type {found.type or 'unknown'}; a template fills text columns "
            "(String or Memo)",
            field=where,
        )
    if not found.valid_for_create:
        raise InvalidMapping(f"{where}: column {column} cannot be set when a lead is created", field=where)
    return found


def _owner_entity(kind: str) -> tuple[str, str]:
    return ("systemusers", "systemuserid") if kind == "systemuser" else ("teams", "teamid")


def validate_mapping(
    client: DataverseClient, mapping: Mapping, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> ValidatedMapping:
    """Check ``mapping`` against the publisher's CRM and learn its columns' lengths.

    Raises:
        InvalidMapping: (422) naming the field: a column the lead table does not have, of a type a
            template cannot fill, or read-only; a literal text longer than its column; an option value
            the org's ``leadsourcecode`` lacks; a campaign or owner that does not exist.
        PermissionDenied: the principal may not read the metadata or the records named.
        RetryLater: the CRM is unavailable or throttling.
    """
    attributes = lead_attributes(client)
    lengths: dict[str, int] = {}
    for standard in ("subject", "description"):
        found = attributes.get(standard)
        if found is not None and found.max_length is not None:
            lengths[standard] = found.max_length
    filled: list[tuple[str, str, str]] = [(f"columns.{c}", c, text) for c, text in mapping.columns.items()]
    if mapping.lead_source_column is not None:
        filled.append(("leadSourceColumn", mapping.lead_source_column, ""))
    for where, column, text in filled:
        found = _text_column(attributes, column, where)
        if found.max_length is not None:
            lengths[column] = found.max_length
            literal = parse_template(text, where=where).literal.strip()
            if len(literal.encode("utf-16-le")) // 2 > found.max_length:
                raise InvalidMapping(
                    f"{where}: the template's own text is longer than column {column} allows "
                    f"({found.max_length} characters)",
                    field=where,
                )
    if mapping.lead_source_code is not None:
        values = option_values(client)
        if mapping.lead_source_code not in values:
            shown = ", ".join(str(v) for v in sorted(values)) or "none"
            raise InvalidMapping(
                f"leadSourceCode: {mapping.lead_source_code} is not a value of the org's leadsourcecode option "
                f"set (its values: {shown})",
                field="leadSourceCode",
            )
    if mapping.campaign_id is not None and not record_exists(client, "campaigns", mapping.campaign_id, "campaignid"):
        raise InvalidMapping(f"campaignId: the CRM has no campaign {mapping.campaign_id}", field="campaignId")
    if mapping.owner is not None:
        entity_set, key = _owner_entity(mapping.owner.type)
        if not record_exists(client, entity_set, mapping.owner.id, key):
            raise InvalidMapping(f"owner.id: the CRM has no {mapping.owner.type} {mapping.owner.id}", field="owner.id")
    for lookup, wanted in (("contact", "parentcontactid"), ("account", "parentaccountid")):
        if mapping.link_existing == lookup and wanted not in attributes:
            raise InvalidMapping(f"linkExisting: the CRM's lead table has no column {wanted}", field="linkExisting")
    return ValidatedMapping.model_validate({**mapping.model_dump(), "max_lengths": lengths, "validated_at": now()})


# --------------------------------------------------------------------------------------------------
# Linking to an existing contact or account
# --------------------------------------------------------------------------------------------------


class ExistingRecords:
    """The contact/account of an e-mail per CRM, found once and cached (hits and misses) for
    ``ttl`` seconds: a backlog of one customer's leads costs one query. Thread-safe."""

    def __init__(
        self,
        *,
        ttl: float = LINK_CACHE_SECONDS,
        size: int = LINK_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], tuple[float, uuid.UUID | None]] = {}
        self._key_locks: KeyedLocks[tuple[str, str, str]] = KeyedLocks()
        self.queries = 0

    def find(self, client: DataverseClient, mapping: Mapping | None, lead: LeadMessage) -> uuid.UUID | None:
        """The id to link ``lead`` to under ``mapping`` (None: no linking, no e-mail, or no record).

        Pass it to :func:`~shared.pipeline.mapping.columns_for` as ``link``. Raises like get_json
        (a failed lookup is the caller's to retry, like the write it precedes).
        """
        if mapping is None or mapping.link_existing == "none" or not lead.lead.customer.email:
            return None
        kind: Literal["contact", "account"] = "contact" if mapping.link_existing == "contact" else "account"
        key = (client.origin, kind, lead.lead.customer.email.strip().lower())
        # One lookup per e-mail at a time: concurrent writers of one customer's leads wait for it.
        with self._key_locks.lock(key):
            now = self._clock()
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None and cached[0] > now:
                    return cached[1]
            found = find_by_email(client, kind, lead.lead.customer.email.strip())
            with self._lock:
                self.queries += 1
                if len(self._cache) >= self._size:
                    self._expire(now)
                self._cache[key] = (now + self._ttl, found)
            return found

    def prefetch(self, client: DataverseClient, mapping: Mapping | None, leads: Iterable[LeadMessage]) -> None:
        """Look up each distinct e-mail of ``leads`` once (a batch's worth). Raises like :meth:`find`."""
        for lead in leads:
            self.find(client, mapping, lead)

    def _expire(self, now: float) -> None:
        for key in [key for key, (until, _) in self._cache.items() if until <= now]:
            del self._cache[key]
        while len(self._cache) >= self._size:
            self._cache.pop(next(iter(self._cache)))

    def forget(self) -> None:
        """Drop everything cached (after a mapping or connection change)."""
        with self._lock:
            self._cache.clear()


__all__ = [
    "Attribute",
    "ExistingRecords",
    "find_by_email",
    "lead_attributes",
    "option_values",
    "record_exists",
    "validate_mapping",
]

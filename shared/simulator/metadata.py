"""The simulated metadata and records a publisher's mapping refers to, in Dataverse's
shapes and with its errors: ``EntityDefinitions(LogicalName='lead')/Attributes`` (and the String / Memo /
Picklist casts with ``MaxLength`` and the option set), ``campaigns``, ``systemusers``, ``teams``,
``contacts`` and ``accounts`` by id or by ``$filter=emailaddress1 eq '…'``, and the lookups
(``campaignid@odata.bind`` …) a lead create may carry.

The data lives in :class:`~shared.simulator.state.CrmRecords` on the org; :class:`~shared.simulator.
dataverse.DataverseApp` routes here what it does not serve itself.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from shared.simulator.server import Response
from shared.simulator.state import OrgState

#: Lookup columns of ``lead`` and the entity sets each may bind to.
LOOKUPS: Mapping[str, tuple[str, ...]] = {
    "campaignid": ("campaigns",),
    "ownerid": ("systemusers", "teams"),
    "parentcontactid": ("contacts",),
    "parentaccountid": ("accounts",),
}
#: The entity sets served here: set name → (logical name, primary key column).
ENTITY_SETS: Mapping[str, tuple[str, str]] = {
    "campaigns": ("campaign", "campaignid"),
    "systemusers": ("systemuser", "systemuserid"),
    "teams": ("team", "teamid"),
    "contacts": ("contact", "contactid"),
    "accounts": ("account", "accountid"),
}
#: Attribute types a text template may fill.
TEXT_TYPES = frozenset({"String", "Memo"})

_ATTRIBUTES = re.compile(
    r"^EntityDefinitions\(LogicalName='([^']*)'\)/Attributes"
    r"(?:\(LogicalName='([^']*)'\))?(?:/Microsoft\.Dynamics\.CRM\.(\w+))?$"
)
_BY_ID = re.compile(r"^(\w+)\(([^)]*)\)$")
_BIND = re.compile(r"^/?(\w+)\(([0-9a-fA-F-]{36})\)$")
_EMAIL_FILTER = re.compile(r"^\s*emailaddress1\s+eq\s+'((?:[^']|'')*)'\s*$", re.IGNORECASE)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_CASTS = {
    "StringAttributeMetadata": "String",
    "MemoAttributeMetadata": "Memo",
    "PicklistAttributeMetadata": "Picklist",
    "BooleanAttributeMetadata": "Boolean",
    "LookupAttributeMetadata": "Lookup",
}


def standard_lead_attributes(text_columns: Mapping[str, int]) -> dict[str, tuple[str, int | None, bool]]:
    """The lead attributes every org has: logical name → (AttributeType, MaxLength, IsValidForCreate)."""
    attributes: dict[str, tuple[str, int | None, bool]] = {
        "leadid": ("Uniqueidentifier", None, True),
        "fullname": ("String", 160, False),
        "createdon": ("DateTime", None, False),
        "leadsourcecode": ("Picklist", None, True),
        "statecode": ("State", None, False),
        "campaignid": ("Lookup", None, True),
        "ownerid": ("Owner", None, True),
        "parentcontactid": ("Lookup", None, True),
        "parentaccountid": ("Lookup", None, True),
    }
    for name in ("donotemail", "donotphone", "donotbulkemail", "donotpostalmail", "donotsendmm"):
        attributes[name] = ("Boolean", None, True)
    for name, length in text_columns.items():
        attributes[name] = ("Memo" if name == "description" else "String", length, True)
    return attributes


def lead_attributes(org: OrgState, text_columns: Mapping[str, int]) -> dict[str, tuple[str, int | None, bool]]:
    """Standard and custom lead attributes of ``org``."""
    attributes = standard_lead_attributes(text_columns)
    with org.lock:
        for name, (kind, length) in org.records.columns.items():
            attributes[name] = (kind, length, True)
    return attributes


def _metadata_id(org: OrgState, name: str) -> str:
    return str(uuid.uuid5(uuid.UUID(org.organization_id), f"lead.{name}"))


def _label(text: str) -> dict[str, Any]:
    label = {"Label": text, "LanguageCode": 1033}
    return {"LocalizedLabels": [label], "UserLocalizedLabel": label}


def route(
    org: OrgState,
    method: str,
    path: str,
    query: Mapping[str, str],
    base: str,
    text_columns: Mapping[str, int],
    error: Callable[[int, str, str], Response],
    answer: Callable[[int, Any], Response],
) -> Response | None:
    """Answer a metadata or record request, or None when ``path`` is not one of ours."""
    match = _ATTRIBUTES.match(path)
    if match:
        if method != "GET":
            return error(405, "0x80060888", "The requested resource does not support this HTTP method.")
        entity, single, cast = match.groups()
        return _attributes(org, entity, single, cast, query, base, text_columns, error, answer)
    if path in ENTITY_SETS:
        if method != "GET":
            return None  # creating these records is not simulated: the caller's 404/405 stands
        return _query(org, path, query, base, error, answer)
    match = _BY_ID.match(path)
    if match and match.group(1) in ENTITY_SETS:
        if method != "GET":
            return error(405, "0x80060888", "The requested resource does not support this HTTP method.")
        return _by_id(org, match.group(1), match.group(2).strip("'"), base, error, answer)
    return None


def _attributes(
    org: OrgState,
    entity: str,
    single: str | None,
    cast: str | None,
    query: Mapping[str, str],
    base: str,
    text_columns: Mapping[str, int],
    error: Callable[[int, str, str], Response],
    answer: Callable[[int, Any], Response],
) -> Response:
    if entity != "lead":
        return error(404, "0x80040217", f"Could not find an entity with the name '{entity}'.")
    if cast is not None and cast not in _CASTS:
        return error(400, "0x80060888", f"The type 'Microsoft.Dynamics.CRM.{cast}' is not a known metadata type.")
    attributes = lead_attributes(org, text_columns)
    wanted = _CASTS.get(cast) if cast else None
    if single is not None:
        found = attributes.get(single)
        if found is None:
            return error(404, "0x80040217", f"Could not find attribute with name '{single}' on entity 'lead'.")
        if wanted is not None and found[0] != wanted:
            return error(400, "0x80060888", f"The attribute '{single}' is not of type 'Microsoft.Dynamics.CRM.{cast}'.")
        item = _attribute(org, single, found, base)
        if found[0] == "Picklist" and "OptionSet" in query.get("$expand", ""):
            with org.lock:
                codes = sorted(org.lead_source_codes)
            item["OptionSet"] = {
                "MetadataId": _metadata_id(org, f"{single}.options"),
                "Options": [{"Value": code, "Label": _label(f"Source {code}")} for code in codes],
            }
        context = f"{base}$metadata#EntityDefinitions('lead')/Attributes/$entity"
        return answer(200, {"@odata.context": context, **item})
    rows = [
        _attribute(org, name, found, base)
        for name, found in sorted(attributes.items())
        if wanted is None or found[0] == wanted
    ]
    context = f"{base}$metadata#EntityDefinitions('lead')/Attributes"
    return answer(200, {"@odata.context": context, "value": rows})


def _attribute(org: OrgState, name: str, found: tuple[str, int | None, bool], base: str) -> dict[str, Any]:
    kind, length, valid_for_create = found
    type_name = {"Memo": "Memo", "String": "String", "Picklist": "Picklist", "Boolean": "Boolean"}.get(kind)
    item: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{type_name or 'Attribute'}AttributeMetadata",
        "LogicalName": name,
        "AttributeType": kind,
        "IsValidForCreate": valid_for_create,
        "IsCustomAttribute": name not in standard_lead_attributes({}) and "_" in name,
        "MetadataId": _metadata_id(org, name),
    }
    if kind in TEXT_TYPES:
        item["MaxLength"] = length
    return item


def _records(org: OrgState, entity_set: str) -> dict[str, str]:
    records = org.records
    if entity_set == "systemusers":
        users = {p.system_user_id.lower(): p.name for p in org.principals.values()}
        return {**users, **records.system_users}
    table: dict[str, str] = getattr(records, entity_set)
    return table


def _by_id(
    org: OrgState,
    entity_set: str,
    record_id: str,
    base: str,
    error: Callable[[int, str, str], Response],
    answer: Callable[[int, Any], Response],
) -> Response:
    logical, key = ENTITY_SETS[entity_set]
    if not _GUID.match(record_id):
        return error(400, "0x80060888", "Bad Request - Error in query syntax.")
    with org.lock:
        exists = record_id.lower() in _records(org, entity_set)
    if not exists:
        return error(404, "0x80040217", f"{logical} With Id = {record_id.lower()} Does Not Exist")
    context = f"{base}$metadata#{entity_set}({key})/$entity"
    return answer(200, {"@odata.context": context, "@odata.etag": 'W/"1"', key: record_id.lower()})


def _query(
    org: OrgState,
    entity_set: str,
    query: Mapping[str, str],
    base: str,
    error: Callable[[int, str, str], Response],
    answer: Callable[[int, Any], Response],
) -> Response:
    _logical, key = ENTITY_SETS[entity_set]
    if entity_set not in ("contacts", "accounts"):
        return error(501, "0x80060888", f"The simulator queries {entity_set} by id only.")
    filter_text = query.get("$filter", "")
    match = _EMAIL_FILTER.match(filter_text)
    if match is None:
        return error(400, "0x80060888", f"Invalid $filter expression: '{filter_text}'.")
    email = match.group(1).replace("''", "'").lower()
    try:
        top = int(query.get("$top", "5000"))
    except ValueError:
        return error(400, "0x80060888", "Invalid value for $top.")
    with org.lock:
        found = [rid for rid, address in _records(org, entity_set).items() if address.lower() == email]
    rows = [{"@odata.etag": 'W/"1"', key: rid} for rid in found[:top]]
    return answer(200, {"@odata.context": f"{base}$metadata#{entity_set}({key})", "value": rows})


def check_lookups(
    org: OrgState, body: Mapping[str, Any], error: Callable[[int, str, str], Response]
) -> Response | None:
    """Check a lead body's ``<lookup>@odata.bind`` values as Dataverse does on save: a known lookup, a
    reference to an entity set it may bind to, and a record that exists."""
    for name, value in body.items():
        if not name.endswith("@odata.bind"):
            continue
        column = name[: -len("@odata.bind")]
        allowed = LOOKUPS.get(column)
        if allowed is None:
            return error(
                400,
                "0x80060888",
                f"An undeclared property '{column}' which only has property annotations in the payload but no "
                "property value was found in the payload.",
            )
        match = _BIND.match(value) if isinstance(value, str) else None
        if match is None or match.group(1) not in allowed:
            return error(400, "0x80060888", f"The value of '{name}' is not a valid entity reference: {value!r}.")
        entity_set, record_id = match.group(1), match.group(2).lower()
        with org.lock:
            exists = record_id in _records(org, entity_set)
        if not exists:
            logical = ENTITY_SETS[entity_set][0]
            return error(404, "0x80040217", f"{logical} With Id = {record_id} Does Not Exist")
    return None


def lookup_values(body: Mapping[str, Any]) -> dict[str, Any]:
    """The stored form of a body's binds, as Dataverse reads them back: ``_campaignid_value`` etc."""
    values: dict[str, Any] = {}
    for name, value in body.items():
        if name.endswith("@odata.bind") and isinstance(value, str):
            match = _BIND.match(value)
            if match:
                values[f"_{name[: -len('@odata.bind')]}_value"] = match.group(2).lower()
    return values

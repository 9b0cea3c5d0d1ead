"""Stage 3, ``write_lead`` (queue ``leads-ready``): map the lead onto Dataverse ``lead`` columns and
write it idempotently (record id = UUIDv5 of publisherId/leadId, ``If-None-Match: *``). Several
messages of one publisher go as one ``CreateMultiple`` (record ids preset), or — when that fails as a
whole, or with LEADWRITER_CREATE_MULTIPLE off — as one ``$batch``, each lead in its own part."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.crm import DataverseClient, LeadWrite, WriteResult
from shared.errors import InvalidLead, LeadWriterError
from shared.pipeline.lead import (
    COLUMN_MAX_LENGTHS,
    LeadMessage,
    lead_record_id,
    to_dataverse_columns,
    truncate_utf16,
    utf16_length,
)
from shared.pipeline.mapping import columns_for, customer_offer_record_id
from shared.pipeline.outcomes import Delivered, Outcome, Retry, outcome_for_error
from shared.transport.base import ReceivedMessage

if TYPE_CHECKING:
    from shared.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

#: Default leads per $batch request (Dataverse allows 1000; smaller batches keep one slow batch short).
#: The setting LEADWRITER_MAX_BATCH (Settings.max_batch) overrides it; 1 disables batching.
MAX_BATCH = 100
DESCRIPTION_LENGTH = COLUMN_MAX_LENGTHS["description"]


def lead_write(pipeline: Pipeline, lead: LeadMessage, client: DataverseClient) -> LeadWrite:
    """The one way a lead becomes a CRM write: its deterministic record id, and its columns under the
    publisher's mapping (linked to the customer's contact or account when the mapping says so; that
    lookup is cached per e-mail). Raises what the lookup raises (retried like the write)."""
    mapping = pipeline.mapping(lead.publisher_id)
    if mapping is None:
        return LeadWrite(lead_record_id(lead.publisher_id, lead.lead_id), to_dataverse_columns(lead))
    link = pipeline.links.find(client, mapping, lead)
    return LeadWrite(lead_record_id(lead.publisher_id, lead.lead_id), columns_for(lead, mapping, link=link))


def run(pipeline: Pipeline, message: ReceivedMessage, fresh: bool) -> Outcome:
    """Raises InvalidLead, CredentialsMissing, LeadRejected, PermissionDenied, RetryLater."""
    lead = pipeline.lead(message, incoming=False)
    connection = pipeline.connection(lead.publisher_id, fresh=fresh)
    client = pipeline.client(connection)
    shared_id = customer_offer_record_id(lead, pipeline.mapping(lead.publisher_id))
    if shared_id is not None:
        return _write_step(pipeline, client, lead, shared_id)
    result = client.create_lead(lead_write(pipeline, lead, client))
    return Delivered(result.record_id, result.created)


def _write_step(pipeline: Pipeline, client: DataverseClient, lead: LeadMessage, record_id: uuid.UUID) -> Outcome:
    """One lead per customer and offer: the first step creates the lead under the id every step of
    that customer and offer shares; a later step (``INS`` after ``PLT``, say) updates that lead's
    description instead of creating a second one. Idempotent: each step leaves a marker naming its
    lead id, so a redelivered or replayed step finds it and appends nothing twice. Steps of one lead
    are taken one at a time in a process (two instances racing on one customer's steps could each
    read the description before the other wrote it: the later write wins, the other step's line is
    lost from the description, never the lead)."""
    columns = dict(lead_write(pipeline, lead, client).columns)
    marker = step_marker(lead)
    step = truncate_utf16(f"{marker} {str(columns.get('description') or '').strip()}".strip(), DESCRIPTION_LENGTH)
    columns["description"] = step
    with pipeline.key_locks.lock(("step", record_id)):
        result = client.create_lead(LeadWrite(record_id, columns))
        if result.created:
            return Delivered(record_id, created=True)
        existing = client.get_json(f"leads({record_id})?$select=description", operation="read lead") or {}
        description = str(existing.get("description") or "")
        if marker in description:
            return Delivered(record_id, created=False)
        updated = _appended(description, step)
        client.update_lead(record_id, {"description": updated})
        return Delivered(record_id, created=False)


def _appended(description: str, step: str) -> str:
    """``step`` as the description's last line; when that is too long for the column, the oldest
    later steps go first (the first lead's own line stays, and so does the newest step)."""
    lines = [line for line in description.split("\n") if line] + [step]
    while len(lines) > 2 and utf16_length("\n".join(lines)) > DESCRIPTION_LENGTH:
        del lines[1]
    return truncate_utf16("\n".join(lines), DESCRIPTION_LENGTH)


def step_marker(lead: LeadMessage) -> str:
    """The line prefix that says this lead's step is in the description already."""
    return f"[step {lead.lead_id}]"


def run_many(pipeline: Pipeline, messages: Sequence[ReceivedMessage]) -> list[Outcome]:
    """The write stage for several messages: one ``$batch`` per publisher where there are several.

    Never raises; the outcomes are in the order of ``messages``.
    """
    outcomes: list[Outcome | None] = [None] * len(messages)
    by_publisher: dict[str, list[tuple[int, LeadMessage]]] = {}
    for index, message in enumerate(messages):
        try:
            lead = pipeline.lead(message, incoming=False)
        except InvalidLead as exc:
            outcomes[index] = outcome_for_error(exc)
            continue
        if customer_offer_record_id(lead, pipeline.mapping(lead.publisher_id)) is not None:
            # A step that may update an earlier lead of the same customer: written on its own.
            outcomes[index] = pipeline.handle("write_lead", message)
            continue
        by_publisher.setdefault(lead.publisher_id, []).append((index, lead))
    for group in by_publisher.values():
        if len(group) == 1:
            index, _ = group[0]
            outcomes[index] = pipeline.handle("write_lead", messages[index])
            continue
        size = pipeline.settings.max_batch
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            for (index, _), outcome in zip(chunk, _write_batch(pipeline, [lead for _, lead in chunk]), strict=True):
                outcomes[index] = outcome
    return [o if o is not None else Retry("internal error: no outcome") for o in outcomes]


def _write_batch(pipeline: Pipeline, leads: list[LeadMessage]) -> list[Outcome]:
    def attempt(fresh: bool) -> list[Outcome]:
        connection = pipeline.connection(leads[0].publisher_id, fresh=fresh)
        client = pipeline.client(connection)
        writes = [lead_write(pipeline, lead, client) for lead in leads]
        # CreateMultiple spends far less of the CRM's execution-time budget per lead; it falls back
        # to per-lead $batch parts itself when one lead fails the whole call (architecture §4).
        create = client.create_many if pipeline.settings.create_multiple else client.create_leads
        results = create(writes)
        return [_result_outcome(result) for result in results]

    try:
        return pipeline.with_fresh_retry(attempt)
    except Exception as exc:
        if not isinstance(exc, LeadWriterError):
            logger.exception("unexpected error writing a batch of %d leads", len(leads))
        return [outcome_for_error(exc)] * len(leads)


def _result_outcome(result: WriteResult) -> Outcome:
    if result.error is not None:
        return outcome_for_error(result.error)
    return Delivered(result.record_id, result.created)

"""Beyond replay and purge: archive a dead letter (and restore it), or correct one and resend it.

**Archive.** Discarding a dead letter keeps a copy in the shared state store (table
``deadletterarchive``; partition = ``safe_key(publisherId)``, row = ``safe_key(messageId)``) for
:data:`RETENTION_DAYS`: listable, and restorable until it expires. The order is the safe one of
architecture §5: the archive entry is written **before** the dead letter is completed, so a crash in
between leaves both (a re-run writes the same entry again and completes it). An entry holds the
dead letter's exact body, properties and reason; one entry must fit one state entity (64 KiB as
UTF-16), so a dead letter whose body does not fit is refused with an error saying so and stays.

**Restore** sends the archived copy back to the stage queue it died on exactly as a replay does
(:func:`shared.ops.deadletters.replay_copy`: a new, deterministic message id, ``replayCount`` + 1)
and only then deletes the entry. A crash in between re-sends the same id on the next run, which
duplicate detection drops.

**Edit and resend** (``InvalidLead`` and ``LeadRejected`` only, the reasons a person can fix in the
body): the corrected body is validated as a lead first (:func:`shared.pipeline.lead.parse_incoming`;
nothing is sent when it fails, and the error names the field), keeps the dead letter's ``leadId`` and
``publisherId``, is sent as the replay copy would be, and only then is the dead letter completed.

Nothing here imports the API or Azure; the transport and the state store are the ports it uses.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.errors import DeadLetterReason, InvalidFilter, InvalidInput, InvalidLead, LockLost
from shared.names import QUEUE_INCOMING, STAGE_QUEUES, TABLE_DEAD_LETTER_ARCHIVE
from shared.ops.deadletters import (
    DEFAULT_BATCH_SIZE,
    UNKNOWN_REASON,
    DeadLetterFilter,
    DeadLetterItem,
    _peek_matching,
    _Sweep,
    _sweep_all,
    lead_id_of,
    publisher_id_of,
    reason_of,
    replay_copy,
)
from shared.pipeline.lead import LeadMessage, parse_incoming
from shared.state.base import (
    MAX_VALUE_BYTES,
    Entity,
    StatePreconditionFailed,
    StateStore,
    StateValueTooLarge,
    encode_data,
    safe_key,
)
from shared.transport.base import PropertyValue, ReceivedMessage, Transport

logger = logging.getLogger(__name__)

#: Days an archived dead letter can be restored; after that it is gone (pruned when met).
RETENTION_DAYS = 30
#: The partition of dead letters that name no publisher (``safe_key`` never starts a key with ``!n``).
NO_PUBLISHER = "!none"
#: Dead letters whose body a person may correct and resend.
EDITABLE_REASONS: frozenset[str] = frozenset({DeadLetterReason.INVALID_LEAD, DeadLetterReason.LEAD_REJECTED})


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _partition(publisher_id: str | None) -> str:
    return safe_key(publisher_id) if publisher_id else NO_PUBLISHER


# --------------------------------------------------------------------------------------------------
# Archive entries


@dataclass(frozen=True)
class ArchivedDeadLetter:
    """One archived dead letter: what the listing shows, and what a restore sends back."""

    item: DeadLetterItem
    body: bytes
    content_type: str | None
    application_properties: dict[str, PropertyValue]
    archived_at: datetime
    expires_at: datetime
    etag: str = ""

    @property
    def message_id(self) -> str:
        return self.item.message_id

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        """The dead letter's API shape plus ``archivedAt`` and ``expiresAt``."""
        return {**self.item.to_json(), "archivedAt": _iso(self.archived_at), "expiresAt": _iso(self.expires_at)}

    def to_data(self) -> dict[str, Any]:
        """What the state entity holds: the body as text when it is UTF-8, else base64."""
        data: dict[str, Any] = {**self.to_json(), "contentType": self.content_type}
        data["properties"] = dict(self.application_properties)
        try:
            data["bodyText"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            data["bodyBase64"] = base64.b64encode(self.body).decode("ascii")
        data.pop("body", None)  # the listing's parsed body is derived from the raw one on reading
        return data

    @classmethod
    def from_message(cls, message: ReceivedMessage, *, now: datetime, retention: timedelta) -> ArchivedDeadLetter:
        return cls(
            item=DeadLetterItem.from_message(message),
            body=message.body,
            content_type=message.content_type,
            application_properties=dict(message.application_properties),
            archived_at=now,
            expires_at=now + retention,
        )

    @classmethod
    def from_entity(cls, entity: Entity) -> ArchivedDeadLetter:
        data = entity.data
        if "bodyText" in data:
            body = str(data["bodyText"]).encode("utf-8")
        else:
            body = base64.b64decode(str(data.get("bodyBase64", "")))
        message = cls._message(data, body)
        archived = _parse_time(data.get("archivedAt")) or datetime.now(UTC)
        return cls(
            item=DeadLetterItem.from_message(message),
            body=body,
            content_type=message.content_type,
            application_properties=dict(message.application_properties),
            archived_at=archived,
            expires_at=_parse_time(data.get("expiresAt")) or archived + timedelta(days=RETENTION_DAYS),
            etag=entity.etag,
        )

    def as_message(self) -> ReceivedMessage:
        """The dead letter as it was received (for :func:`replay_copy`)."""
        return self._message(
            {**self.to_json(), "contentType": self.content_type, "properties": self.application_properties}, self.body
        )

    @staticmethod
    def _message(data: Mapping[str, Any], body: bytes) -> ReceivedMessage:
        props = data.get("properties")
        properties: dict[str, PropertyValue] = {
            str(k): v
            for k, v in (props.items() if isinstance(props, Mapping) else [])
            if isinstance(v, str | int | float | bool)
        }
        return ReceivedMessage(
            queue=str(data.get("queue") or QUEUE_INCOMING),
            body=body,
            message_id=str(data.get("messageId", "")),
            application_properties=properties,
            content_type=data.get("contentType") or None,
            delivery_count=int(data.get("deliveryCount") or 0),
            enqueued_time=_parse_time(data.get("enqueuedAt")) or datetime.now(UTC),
            sequence_number=0,
            dead_letter_reason=data.get("reason") or None,
            dead_letter_description=data.get("description") or None,
        )


def _too_large(message: ReceivedMessage) -> str | None:
    """Why the dead letter cannot be archived (its entry would not fit one state entity), or None."""
    entry = ArchivedDeadLetter.from_message(message, now=datetime.now(UTC), retention=timedelta(days=RETENTION_DAYS))
    try:
        encode_data(entry.to_data())
    except StateValueTooLarge:
        return (
            f"{message.message_id} on {message.queue}: its body is {len(message.body)} bytes, more than an archive "
            f"entry holds ({MAX_VALUE_BYTES // 1024} KiB as UTF-16); it stays dead-lettered: purge it if it must go"
        )
    return None


@dataclass
class ArchiveResult:
    """What an archive sweep did (or, with ``dry_run``, would do)."""

    matched: int = 0
    archived: int = 0
    #: Dead letters that cannot be archived (too large); they stay dead-lettered.
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    dry_run: bool = False
    message_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "matched": self.matched,
            "archived": self.archived,
            "refused": self.refused,
            "errors": list(self.errors),
            "refusals": list(self.refusals),
            "dryRun": self.dry_run,
        }
        if self.dry_run:
            answer["messageIds"] = list(self.message_ids)
        return answer


class DeadLetterArchive:
    """Archive, list, restore and prune archived dead letters on the state store."""

    def __init__(self, store: StateStore, *, retention: timedelta = timedelta(days=RETENTION_DAYS)) -> None:
        self._store = store
        self.retention = retention

    # -- archive ------------------------------------------------------------------------------------

    def archive(
        self,
        transport: Transport,
        flt: DeadLetterFilter,
        *,
        limit: int | None = None,
        dry_run: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        receive_wait: float = 0.0,
    ) -> ArchiveResult:
        """Archive the dead letters ``flt`` selects (module docstring), then remove them from the broker.

        ``dry_run`` changes nothing and names what would be archived (and what would be refused).
        Raises InvalidFilter for a negative ``limit``; whatever the transport raises when receiving
        fails (dead letters held by the sweep are released first).
        """
        if limit is not None and limit < 0:
            raise InvalidFilter("limit: must be 0 or more", field="limit")
        result = ArchiveResult(dry_run=dry_run)
        if dry_run:
            for message in _peek(transport, flt, 10_000 if limit is None else limit):
                result.matched += 1
                result.message_ids.append(message.message_id)
                refusal = _too_large(message)
                if refusal:
                    result.refused += 1
                    result.refusals.append(refusal)
            return result

        def act(queue: str, batch: list[ReceivedMessage], sweep: _Sweep) -> None:
            now = datetime.now(UTC)
            for message in batch:
                refusal = _too_large(message)
                if refusal is not None:
                    result.refused += 1
                    result.refusals.append(refusal)
                    sweep.hold(message)
                    continue
                entry = ArchivedDeadLetter.from_message(message, now=now, retention=self.retention)
                try:
                    # Written first: a crash before the completion leaves the dead letter, and the
                    # next run writes the same entry again.
                    self._store.upsert(
                        TABLE_DEAD_LETTER_ARCHIVE,
                        _partition(entry.item.publisher_id),
                        safe_key(message.message_id),
                        entry.to_data(),
                    )
                except Exception as exc:  # recorded per dead letter, which stays
                    logger.warning("archiving dead letter %s on %s failed", message.message_id, queue, exc_info=True)
                    result.errors.append(f"{message.message_id} on {queue}: archive write failed: {type(exc).__name__}")
                    sweep.hold(message)
                    continue
                try:
                    transport.complete(message)
                except LockLost:
                    if sweep.lock_lost(message):
                        result.errors.append(
                            f"{message.message_id} on {queue}: archived, but its lock was lost before it could be "
                            "removed; archive it again to remove it"
                        )
                    continue
                sweep.settled(message)
                result.archived += 1

        result.matched, unsettled = _sweep_all(
            transport, flt, act, limit=limit, batch_size=batch_size, receive_wait=receive_wait, progress=None
        )
        result.errors += [
            f"{message_id} on {queue}: archived, but its lock was lost before it could be removed; archive it again"
            for queue, message_id in unsettled
        ]
        logger.info(
            "archive finished: matched=%d archived=%d refused=%d", result.matched, result.archived, result.refused
        )
        return result

    # -- list ---------------------------------------------------------------------------------------

    def list(
        self,
        *,
        queue: str | Sequence[str] | None = None,
        reason: str | Sequence[str] | None = None,
        publisher_id: str | None = None,
        message_ids: Sequence[str] | None = None,
        limit: int = 100,
        now: datetime | None = None,
    ) -> list[ArchivedDeadLetter]:
        """Archived dead letters that match, newest archived first, at most ``limit``. Expired ones
        are deleted as they are met. Raises InvalidFilter for an unknown queue or a negative limit;
        StateUnavailable when the store cannot answer."""
        if limit < 0:
            raise InvalidFilter("limit: must be 0 or more", field="limit")
        flt = DeadLetterFilter.build(queue=queue, reason=reason, publisher_id=publisher_id, message_ids=message_ids)
        moment = now or datetime.now(UTC)
        partition = _partition(publisher_id) if publisher_id else None
        found: list[ArchivedDeadLetter] = []
        for entity in self._store.query(TABLE_DEAD_LETTER_ARCHIVE, partition):
            entry = ArchivedDeadLetter.from_entity(entity)
            if entry.expired(moment):
                self._forget(entity.partition, entity.row, entity.etag)
                continue
            if _matches(entry, flt):
                found.append(entry)
        found.sort(key=lambda e: e.archived_at, reverse=True)
        return found[:limit]

    def _forget(self, partition: str, row: str, etag: str) -> None:
        try:
            self._store.delete(TABLE_DEAD_LETTER_ARCHIVE, partition, row, etag=etag)
        except StatePreconditionFailed:
            pass  # rewritten meanwhile (archived again): it is not expired any more
        except Exception:  # pruning is best effort; the next listing tries again
            logger.warning("an expired archive entry could not be deleted; it is skipped", exc_info=True)

    # -- restore ------------------------------------------------------------------------------------

    def restore(
        self, transport: Transport, entries: Sequence[ArchivedDeadLetter], *, dry_run: bool = False
    ) -> RestoreResult:
        """Send each entry back to its queue as a replay would, then delete the entry (send first).

        Raises nothing for a single entry's failure (recorded in ``errors``; the entry stays)."""
        result = RestoreResult(matched=len(entries), dry_run=dry_run)
        for entry in entries:
            copy = replay_copy(entry.as_message())
            result.plan.append(
                {"messageId": entry.message_id, "queue": entry.item.queue, "newMessageId": copy.message_id}
            )
            if dry_run:
                continue
            try:
                transport.send(entry.item.queue, [copy])
            except Exception as exc:  # recorded; the entry stays archived
                logger.warning("restoring %s failed", entry.message_id, exc_info=True)
                result.errors.append(f"{entry.message_id}: send to {entry.item.queue} failed: {type(exc).__name__}")
                continue
            try:
                self._store.delete(
                    TABLE_DEAD_LETTER_ARCHIVE, _partition(entry.item.publisher_id), safe_key(entry.message_id)
                )
            except Exception as exc:  # noqa: BLE001 - the copy is sent; a re-run re-sends the same id (dropped)
                result.errors.append(
                    f"{entry.message_id}: sent back to {entry.item.queue}, but its archive entry could not be deleted "
                    f"({type(exc).__name__}); restoring it again does not send it twice"
                )
                continue
            result.restored += 1
        logger.info("restore finished: matched=%d restored=%d", result.matched, result.restored)
        return result


@dataclass
class RestoreResult:
    matched: int = 0
    restored: int = 0
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False
    plan: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "matched": self.matched,
            "restored": self.restored,
            "errors": list(self.errors),
            "dryRun": self.dry_run,
        }
        if self.dry_run:
            answer["plan"] = list(self.plan)
        return answer


def _matches(entry: ArchivedDeadLetter, flt: DeadLetterFilter) -> bool:
    item = entry.item
    if item.queue not in flt.queues:
        return False
    if flt.message_ids is not None and item.message_id not in flt.message_ids:
        return False
    if flt.reasons is not None and (item.reason or UNKNOWN_REASON) not in flt.reasons:
        return False
    return flt.publisher_id is None or item.publisher_id == flt.publisher_id


def _peek(transport: Transport, flt: DeadLetterFilter, limit: int | None = None) -> list[ReceivedMessage]:
    """The raw dead letters ``flt`` selects (peeked, nothing locked), at most ``limit``."""
    found: list[ReceivedMessage] = []
    if limit == 0:
        return found
    for message in _peek_matching(transport, flt, page_size=DEFAULT_BATCH_SIZE):
        found.append(message)
        if limit is not None and len(found) >= limit:
            break
    return found


# --------------------------------------------------------------------------------------------------
# Edit and resend


class NotEditable(InvalidInput):
    """The dead letter's reason is not one a corrected body fixes (only InvalidLead, LeadRejected)."""


class DeadLetterNotFound(InvalidInput):
    """No dead letter has that message id (any more)."""


@dataclass(frozen=True)
class ResendResult:
    message_id: str
    queue: str
    new_message_id: str
    lead_id: str
    publisher_id: str
    sent: bool
    completed: bool
    dry_run: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "messageId": self.message_id,
            "queue": self.queue,
            "newMessageId": self.new_message_id,
            "leadId": self.lead_id,
            "publisherId": self.publisher_id,
            "sent": self.sent,
            "completed": self.completed,
            "dryRun": self.dry_run,
        }
        if self.error:
            answer["error"] = self.error
        return answer


def corrected_body(body: bytes | str | Mapping[str, Any], queue: str) -> tuple[LeadMessage, bytes]:
    """Validate a corrected body for ``queue``: (the lead, the bytes to send).

    On ``leads-incoming`` the body is a marketplace message, validated by :func:`parse_incoming` and
    sent as given. On a later queue it may be that too (it is normalised and sent in the shape the
    stage reads) or the normalised shape the stages pass on (what such a dead letter holds).
    Raises InvalidLead naming the field.
    """
    raw = json.dumps(dict(body), ensure_ascii=False).encode("utf-8") if isinstance(body, Mapping) else body
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    try:
        lead = parse_incoming(data)
    except InvalidLead as incoming_error:
        if queue == QUEUE_INCOMING or not _normalised_shape(data):
            raise
        try:
            lead = LeadMessage.from_body(data)
        except InvalidLead:
            raise incoming_error from None
        return lead, lead.to_body()
    return lead, data if queue == QUEUE_INCOMING else lead.to_body()


def _with_identity(
    body: bytes | str | Mapping[str, Any], lead_id: str | None, publisher_id: str | None
) -> bytes | str | Mapping[str, Any]:
    """``body`` with the dead letter's ``leadId`` and ``publisherId`` where it names none (an edited
    body need not repeat them); anything that is not a JSON object is left for validation to refuse."""
    value: Any = body
    if not isinstance(body, Mapping):
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body
    if not isinstance(value, dict):
        return body
    filled = dict(value)
    if lead_id and "leadId" not in filled:
        filled["leadId"] = lead_id
    if publisher_id and "publisherId" not in filled:
        filled["publisherId"] = publisher_id
    return filled


def _normalised_shape(data: bytes) -> bool:
    try:
        value = json.loads(data)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("lead"), dict) and "customer" in value["lead"]


def resend(
    transport: Transport,
    message_id: str,
    body: bytes | str | Mapping[str, Any],
    *,
    dry_run: bool = False,
    receive_wait: float = 0.0,
) -> ResendResult:
    """Correct dead letter ``message_id`` with ``body`` and send it again (module docstring).

    Raises DeadLetterNotFound (field ``messageId``), NotEditable (field ``reason``), InvalidLead
    naming the field of the body at fault, or InvalidInput (``leadId``/``publisherId`` changed) —
    all before anything is sent; whatever the transport raises when the broker fails.
    """
    flt = DeadLetterFilter(message_ids=frozenset({message_id}))
    found = _peek(transport, flt, 1)
    if not found:
        raise DeadLetterNotFound(f"messageId: no dead letter {message_id}", field="messageId")
    original = found[0]
    reason = reason_of(original) or UNKNOWN_REASON
    if reason not in EDITABLE_REASONS:
        raise NotEditable(
            f"reason: dead letter {message_id} is {reason}; only InvalidLead and LeadRejected dead letters can be "
            "corrected and resent (replay this one instead)",
            field="reason",
        )
    expected_lead = lead_id_of(original)
    expected_publisher = publisher_id_of(original)
    lead, data = corrected_body(_with_identity(body, expected_lead, expected_publisher), original.queue)
    if expected_publisher and lead.publisher_id != expected_publisher:
        raise InvalidLead(
            f"publisherId: the corrected body must keep the publisher {expected_publisher}", field="publisherId"
        )
    if expected_lead and lead.lead_id != expected_lead:
        raise InvalidLead(f"leadId: the corrected body must keep the lead id {expected_lead}", field="leadId")
    template = replay_copy(original)
    props = dict(template.application_properties)
    copy = replace(template, body=data, application_properties=props)
    outcome = ResendResult(
        message_id=message_id,
        queue=original.queue,
        new_message_id=copy.message_id,
        lead_id=lead.lead_id,
        publisher_id=lead.publisher_id,
        sent=False,
        completed=False,
        dry_run=dry_run,
    )
    if dry_run:
        return outcome
    state: dict[str, Any] = {"sent": False, "completed": False, "error": None}

    def act(queue: str, batch: list[ReceivedMessage], sweep: _Sweep) -> None:
        for message in batch:
            if not state["sent"]:
                transport.send(queue, [copy])  # first: the original stays until the copy is accepted
                state["sent"] = True
            try:
                transport.complete(message)
            except LockLost:
                if sweep.lock_lost(message):
                    state["error"] = "the corrected copy was sent, but the dead letter's lock was lost; resend again"
                continue
            sweep.settled(message)
            state["completed"] = True

    matched, _unsettled = _sweep_all(
        transport,
        replace(flt, queues=(original.queue,) if original.queue in STAGE_QUEUES else STAGE_QUEUES),
        act,
        limit=1,
        batch_size=DEFAULT_BATCH_SIZE,
        receive_wait=receive_wait,
        progress=None,
    )
    if matched == 0:
        raise DeadLetterNotFound(f"messageId: dead letter {message_id} was taken by someone else", field="messageId")
    logger.info("resent corrected dead letter %s as %s on %s", message_id, copy.message_id, original.queue)
    return replace(outcome, sent=state["sent"], completed=state["completed"], error=state["error"])

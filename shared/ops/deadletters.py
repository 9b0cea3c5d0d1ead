"""The dead-letter core: list, group, plan and replay safely, purge (architecture §5, §6).

Pure where it can be: filters, item shapes, replay copies and plans are plain functions of messages;
only :func:`list_dead_letters`, :func:`plan_replay`, :func:`replay` and :func:`purge` talk to a
:class:`~shared.transport.base.Transport`, and nothing here knows which broker is behind it.

Safe replay, in this order, for each dead letter the filter selects:

1. build the copy: same body, ``leadId`` and ``publisherId`` kept, ``attempt`` reset to 1,
   ``replayCount`` + 1, no ``DeadLetter*`` properties, and a **new** message id derived from
   ``(leadId, replayCount)`` (:func:`shared.pipeline.messages.hop_message_id`);
2. send it to the stage queue the lead died on;
3. only then complete the dead letter.

Because the new id is deterministic, a replay killed between 2 and 3 is simply run again: the copy is
re-sent with the same id, duplicate detection drops it, and the dead letter is completed. Nothing is
lost and nothing is doubled in the queue (and the idempotent CRM write covers a re-run outside the
duplicate-detection window).

Dead letters the filter does not select are never completed: they stay locked by this sweep (so the
next receive reaches past them) and are abandoned, i.e. released unchanged, when the sweep ends.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.errors import CONFIGURATION_REASONS, InvalidFilter
from shared.names import PROP_ATTEMPT, PROP_LEAD_ID, PROP_PUBLISHER_ID, PROP_REPLAY_COUNT, STAGE_QUEUES
from shared.pipeline.bounds import MAX_BODY_BYTES, display_json
from shared.pipeline.messages import hop_message_id, replay_count_of
from shared.transport.base import LockLost, OutgoingMessage, PropertyValue, ReceivedMessage, Transport

logger = logging.getLogger(__name__)

#: The grouping label (and filter value) of a dead letter that carries no reason at all.
UNKNOWN_REASON = "Unknown"
#: Dead letters received, sent and settled per round trip.
DEFAULT_BATCH_SIZE = 100
#: The key that marks a body which is not UTF-8 text, base64-encoded (``{"$base64": "..."}``).
BASE64_MARKER = "$base64"

#: The Service Bus SDK keeps these as application properties on dead letters; a replayed copy
#: must not carry them (it is not a dead letter), and so nothing named ``DeadLetter*`` survives.
DEAD_LETTER_PROPERTY_PREFIX = "DeadLetter"
_SDK_REASON_PROPERTY = "DeadLetterReason"
_SDK_DESCRIPTION_PROPERTY = "DeadLetterErrorDescription"

#: How often one sweep takes a dead letter whose completion lost its lock before giving up on it.
_MAX_SETTLE_TRIES = 3
#: Rounds in a row that bring nothing new before a sweep stops, whatever the batches look like.
_MAX_STALE_ROUNDS = 3


# --------------------------------------------------------------------------------------------------
# Reading a dead letter


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_body(body: bytes) -> Any:
    """The parsed body when it is JSON within the bounds, else None (never recurses past them)."""
    try:
        value, note = display_json(body)
    except UnicodeDecodeError:
        return None
    return None if note is not None else value


def _str_prop(props: Mapping[str, PropertyValue], name: str) -> str | None:
    value = props.get(name)
    return None if value is None or value == "" else str(value)


def _body_field(message: ReceivedMessage, name: str) -> str | None:
    body = _json_body(message.body)
    if isinstance(body, dict):
        value = body.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


def reason_of(message: ReceivedMessage) -> str | None:
    """The dead-letter reason: the broker's field, else the SDK's application property."""
    return message.dead_letter_reason or _str_prop(message.application_properties, _SDK_REASON_PROPERTY)


def description_of(message: ReceivedMessage) -> str | None:
    """The dead-letter description: the broker's field, else the SDK's application property."""
    return message.dead_letter_description or _str_prop(
        message.application_properties, _SDK_DESCRIPTION_PROPERTY
    )


def publisher_id_of(message: ReceivedMessage) -> str | None:
    """The ``publisherId`` property, else the body's (a lead dead-lettered at intake may lack it)."""
    return _str_prop(message.application_properties, PROP_PUBLISHER_ID) or _body_field(message, "publisherId")


def lead_id_of(message: ReceivedMessage) -> str | None:
    """The ``leadId`` property, else the body's; None when neither names one."""
    return _str_prop(message.application_properties, PROP_LEAD_ID) or _body_field(message, "leadId")


def decode_body(body: bytes) -> Any:
    """The body for display: parsed JSON, else UTF-8 text, else ``{"$base64": "..."}``.

    A body nested deeper or larger than the bounds (:mod:`shared.pipeline.bounds`) comes back as its
    text, cut; :func:`decode_body_with_note` says so.
    """
    return decode_body_with_note(body)[0]


def decode_body_with_note(body: bytes) -> tuple[Any, str | None]:
    """:func:`decode_body` and the note on a body shown as cut text (None when shown whole)."""
    try:
        return display_json(body)
    except UnicodeDecodeError:
        encoded = base64.b64encode(body[:MAX_BODY_BYTES]).decode("ascii")
        note = None if len(body) <= MAX_BODY_BYTES else f"only the first {MAX_BODY_BYTES} bytes are shown"
        return {BASE64_MARKER: encoded}, note


# --------------------------------------------------------------------------------------------------
# Filters and items


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operation touches. Every set criterion must hold (AND); None = any.

    ``reasons`` match the dead-letter reason (a dead letter without one matches ``"Unknown"``);
    ``message_ids`` match the dead letter's own message id; the time window compares the message's
    enqueued time (naive datetimes are taken as UTC), ``enqueued_after`` inclusive and
    ``enqueued_before`` exclusive.

    Raises:
        ValueError: no queue, or a queue that is not a stage queue.
    """

    queues: tuple[str, ...] = STAGE_QUEUES
    reasons: frozenset[str] | None = None
    publisher_id: str | None = None
    message_ids: frozenset[str] | None = None
    enqueued_before: datetime | None = None
    enqueued_after: datetime | None = None

    def __post_init__(self) -> None:
        if not self.queues:
            raise InvalidFilter("queue: at least one queue is needed", field="queue")
        unknown = [queue for queue in self.queues if queue not in STAGE_QUEUES]
        if unknown:
            raise InvalidFilter(f"queue: {unknown[0]!r} is not one of {', '.join(STAGE_QUEUES)}", field="queue")
        # Each queue once, in pipeline order, so a sweep never visits a queue twice.
        object.__setattr__(self, "queues", tuple(q for q in STAGE_QUEUES if q in self.queues))
        for name in ("enqueued_before", "enqueued_after"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _utc(value))

    @classmethod
    def build(
        cls,
        *,
        queue: str | Iterable[str] | None = None,
        reason: str | Iterable[str] | None = None,
        publisher_id: str | None = None,
        message_ids: Iterable[str] | None = None,
        enqueued_before: datetime | None = None,
        enqueued_after: datetime | None = None,
    ) -> DeadLetterFilter:
        """A filter from optional API / CLI parameters; empty strings and empty lists mean "any".

        Raises:
            ValueError: an unknown queue.
        """

        def many(value: str | Iterable[str] | None) -> list[str]:
            if value is None:
                return []
            items = [value] if isinstance(value, str) else list(value)
            return [item for item in items if item]

        queues = many(queue)
        reasons = many(reason)
        ids = many(message_ids)
        return cls(
            queues=tuple(queues) if queues else STAGE_QUEUES,
            reasons=frozenset(reasons) if reasons else None,
            publisher_id=publisher_id or None,
            message_ids=frozenset(ids) if ids else None,
            enqueued_before=enqueued_before,
            enqueued_after=enqueued_after,
        )

    def matches(self, message: ReceivedMessage) -> bool:
        """True when the dead letter meets every criterion of this filter."""
        if message.queue not in self.queues:
            return False
        if self.message_ids is not None and message.message_id not in self.message_ids:
            return False
        if self.reasons is not None and (reason_of(message) or UNKNOWN_REASON) not in self.reasons:
            return False
        if self.publisher_id is not None and publisher_id_of(message) != self.publisher_id:
            return False
        enqueued = _utc(message.enqueued_time)
        if self.enqueued_after is not None and enqueued < self.enqueued_after:
            return False
        return not (self.enqueued_before is not None and enqueued >= self.enqueued_before)


def configuration_filter(publisher_id: str) -> DeadLetterFilter:
    """The dead letters replayed automatically once ``publisher_id``'s connection is verified (architecture §5)."""
    return DeadLetterFilter(reasons=frozenset(CONFIGURATION_REASONS), publisher_id=publisher_id)


def _iso(value: datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class DeadLetterItem:
    """One dead letter as the API shows it (architecture §6)."""

    message_id: str
    lead_id: str | None
    publisher_id: str | None
    queue: str
    reason: str | None
    description: str | None
    enqueued_at: datetime
    delivery_count: int
    replay_count: int
    #: Parsed JSON when the body is JSON, else the text; bytes that are not UTF-8: ``{"$base64": ...}``.
    body: Any
    #: Set when the body is too deep or too large to show whole: it is then its text, cut.
    body_note: str | None = None

    @classmethod
    def from_message(cls, message: ReceivedMessage) -> DeadLetterItem:
        """The API shape of a peeked or received dead letter."""
        body, note = decode_body_with_note(message.body)
        return cls(
            message_id=message.message_id,
            lead_id=lead_id_of(message),
            publisher_id=publisher_id_of(message),
            queue=message.queue,
            reason=reason_of(message),
            description=description_of(message),
            enqueued_at=_utc(message.enqueued_time),
            delivery_count=message.delivery_count,
            replay_count=replay_count_of(message),
            body=body,
            body_note=note,
        )

    def to_json(self) -> dict[str, Any]:
        """The architecture §6 object: camelCase keys, ISO 8601 UTC time."""
        return {
            "messageId": self.message_id,
            "leadId": self.lead_id,
            "publisherId": self.publisher_id,
            "queue": self.queue,
            "reason": self.reason,
            "description": self.description,
            "enqueuedAt": _iso(self.enqueued_at),
            "deliveryCount": self.delivery_count,
            "replayCount": self.replay_count,
            "body": self.body,
            **({"bodyNote": self.body_note} if self.body_note else {}),
        }


def _peek_matching(
    transport: Transport, flt: DeadLetterFilter, *, page_size: int
) -> Iterable[ReceivedMessage]:
    """Matching dead letters of every filtered queue, in queue then sequence order, without locks."""
    for queue in flt.queues:
        next_sequence = 0
        while True:
            page = transport.peek_dead_letters(queue, max_messages=page_size, from_sequence=next_sequence)
            if not page:
                break
            last = max(message.sequence_number for message in page)
            for message in page:
                if message.sequence_number >= next_sequence and flt.matches(message):
                    yield message
            if last < next_sequence:  # an adapter that does not move forward must not loop forever
                break
            next_sequence = last + 1


def list_dead_letters(
    transport: Transport, flt: DeadLetterFilter, *, limit: int = 100
) -> list[DeadLetterItem]:
    """Peek the dead letters the filter selects (no locks, nothing changes), at most ``limit`` of them.

    Raises:
        ValueError: ``limit`` below 0.
        Exception: whatever the transport raises when the broker cannot be read.
    """
    if limit < 0:
        raise InvalidFilter("limit: must be 0 or more", field="limit")
    items: list[DeadLetterItem] = []
    if limit == 0:
        return items
    for message in _peek_matching(transport, flt, page_size=DEFAULT_BATCH_SIZE):
        items.append(DeadLetterItem.from_message(message))
        if len(items) >= limit:
            break
    return items


def group_counts(items: Iterable[DeadLetterItem]) -> dict[tuple[str, str, str | None], int]:
    """Count dead letters by ``(queue, reason, publisherId)``; a missing reason counts as ``"Unknown"``.

    Keys come out sorted (queue in pipeline order, then reason, then publisher) so tables are stable.
    """
    counts = Counter((item.queue, item.reason or UNKNOWN_REASON, item.publisher_id) for item in items)
    order = {queue: index for index, queue in enumerate(STAGE_QUEUES)}
    return dict(
        sorted(
            counts.items(),
            key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][0], kv[0][1], kv[0][2] or ""),
        )
    )


# --------------------------------------------------------------------------------------------------
# Replay


def _refusal(message: ReceivedMessage, max_replays: int) -> str | None:
    count = replay_count_of(message)
    if count >= max_replays:
        return (
            f"dead letter {message.message_id} on {message.queue} was replayed {count} times already; "
            f"the replay cap is {max_replays}: inspect or purge it instead"
        )
    return None


def replay_copy(message: ReceivedMessage) -> OutgoingMessage:
    """The message that replays dead letter ``message`` on the queue it died on (module docstring)."""
    lead_id = lead_id_of(message) or message.message_id
    publisher_id = publisher_id_of(message)
    replay = replay_count_of(message) + 1
    props: dict[str, PropertyValue] = {
        name: value
        for name, value in message.application_properties.items()
        if not name.startswith(DEAD_LETTER_PROPERTY_PREFIX)
        and name not in (PROP_LEAD_ID, PROP_PUBLISHER_ID, PROP_ATTEMPT, PROP_REPLAY_COUNT)
    }
    props[PROP_LEAD_ID] = lead_id
    if publisher_id is not None:
        props[PROP_PUBLISHER_ID] = publisher_id
    props[PROP_ATTEMPT] = 1
    props[PROP_REPLAY_COUNT] = replay
    return OutgoingMessage(
        body=message.body,
        message_id=hop_message_id(lead_id, replay=replay),
        application_properties=props,
        content_type=message.content_type or "application/json",
    )


@dataclass(frozen=True)
class ReplayPlanEntry:
    """What a replay would do with one dead letter: move ``message_id`` to ``queue`` as ``new_message_id``."""

    message_id: str
    queue: str
    new_message_id: str
    reason: str | None
    publisher_id: str | None
    #: The replay count the copy would carry (the dead letter's + 1).
    replay_count: int
    #: Why it will not be replayed (the replay cap), or None when it will.
    refused: str | None

    def to_json(self) -> dict[str, Any]:
        """camelCase keys, for the API's dry run."""
        return {
            "messageId": self.message_id,
            "queue": self.queue,
            "newMessageId": self.new_message_id,
            "reason": self.reason,
            "publisherId": self.publisher_id,
            "replayCount": self.replay_count,
            "refused": self.refused,
        }


def _check_common(max_replays: int | None, limit: int | None, batch_size: int | None = None) -> None:
    if max_replays is not None and max_replays < 0:
        raise InvalidFilter("max_replays: must be 0 or more", field="maxReplays")
    if limit is not None and limit < 0:
        raise InvalidFilter("limit: must be 0 or more", field="limit")
    if batch_size is not None and batch_size < 1:
        raise InvalidFilter("batch_size: must be 1 or more", field="batchSize")


def plan_replay(
    transport: Transport, flt: DeadLetterFilter, *, max_replays: int = 5, limit: int | None = None
) -> list[ReplayPlanEntry]:
    """Dry run: exactly what a replay with the same arguments would move where. Nothing moves.

    Raises:
        ValueError: ``max_replays`` or ``limit`` below 0.
        Exception: whatever the transport raises when the broker cannot be read.
    """
    _check_common(max_replays, limit)
    plan: list[ReplayPlanEntry] = []
    if limit == 0:
        return plan
    for message in _peek_matching(transport, flt, page_size=DEFAULT_BATCH_SIZE):
        copy = replay_copy(message)
        plan.append(
            ReplayPlanEntry(
                message_id=message.message_id,
                queue=message.queue,
                new_message_id=copy.message_id,
                reason=reason_of(message),
                publisher_id=publisher_id_of(message),
                replay_count=replay_count_of(message) + 1,
                refused=_refusal(message, max_replays),
            )
        )
        if limit is not None and len(plan) >= limit:
            break
    return plan


@dataclass
class ReplayResult:
    """What a replay did. ``matched`` = ``replayed`` + ``refused`` + dead letters that failed."""

    matched: int = 0
    replayed: int = 0
    refused: int = 0
    #: One line per dead letter that could not be replayed this time (it stays dead-lettered).
    errors: list[str] = field(default_factory=list)
    #: One line per refused dead letter, naming the replay cap.
    refusals: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        """The API answer (architecture §6: ``matched``, ``replayed``; the rest is extra detail)."""
        return {
            "matched": self.matched,
            "replayed": self.replayed,
            "refused": self.refused,
            "errors": list(self.errors),
            "refusals": list(self.refusals),
            "dryRun": self.dry_run,
        }


@dataclass
class PurgeResult:
    """What a purge did."""

    matched: int = 0
    purged: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The API answer (architecture §6)."""
        return {"matched": self.matched, "purged": self.purged, "errors": list(self.errors)}


class _Sweep:
    """Peek-lock the dead letters of one queue batch by batch, each at most once per sweep.

    Dead letters the caller does not settle (they do not match, were refused, or failed) are *held*:
    they stay locked by the sweep so the next receive reaches past them, and when their lock lapses
    and they come back they are simply held again. :meth:`release` abandons them, unchanged, at the
    end. A dead letter whose completion lost its lock is *pending*: it is offered again when it comes
    back, up to a few times, then held.
    """

    def __init__(self, transport: Transport, queue: str, *, batch_size: int, receive_wait: float) -> None:
        self.transport = transport
        self.queue = queue
        self.batch_size = batch_size
        self.receive_wait = receive_wait
        self.held: dict[int, ReceivedMessage] = {}
        self.pending: dict[int, str] = {}
        self._tries: Counter[int] = Counter()

    def hold(self, message: ReceivedMessage) -> None:
        self.pending.pop(message.sequence_number, None)
        self.held[message.sequence_number] = message

    def lock_lost(self, message: ReceivedMessage) -> bool:
        """Note that settling ``message`` lost its lock; True when the sweep gives up on it (held)."""
        seq = message.sequence_number
        self._tries[seq] += 1
        if self._tries[seq] >= _MAX_SETTLE_TRIES:
            self.hold(message)
            return True
        self.pending[seq] = message.message_id
        return False

    def settled(self, message: ReceivedMessage) -> None:
        self.pending.pop(message.sequence_number, None)

    def batches(self) -> Iterable[list[ReceivedMessage]]:
        """Batches of dead letters not held yet; the caller holds or settles each one."""
        stale_rounds = 0
        while True:
            batch = self.transport.receive_dead_letters(
                self.queue, max_messages=self.batch_size, max_wait=self.receive_wait
            )
            if not batch:
                return
            fresh: list[ReceivedMessage] = []
            for message in batch:
                if message.sequence_number in self.held:
                    self.hold(message)  # its lock lapsed and it came back: keep it out of the way
                else:
                    fresh.append(message)
            if fresh:
                stale_rounds = 0
                yield fresh
                continue
            # Only held ones came back. A short batch means nothing else is visible: done. A full one
            # may hide more behind them; they are locked again now, so look once more (bounded).
            stale_rounds += 1
            if len(batch) < self.batch_size or stale_rounds >= _MAX_STALE_ROUNDS:
                return

    def release(self) -> None:
        """Abandon every held dead letter so it is visible, unchanged, to the next reader."""
        for message in self.held.values():
            try:
                self.transport.abandon(message)
            except LockLost:
                pass  # the lock lapsed: the dead letter is visible again already
            except Exception:  # releasing is best effort: an expired lock frees it anyway
                logger.warning(
                    "could not release dead letter %s on %s; it is released when its lock expires",
                    message.message_id,
                    self.queue,
                    exc_info=True,
                )
        self.held.clear()


#: Handles the matching dead letters of one batch: settles each or holds it in the sweep.
_Act = Callable[[str, list[ReceivedMessage], _Sweep], None]


def _sweep_all(
    transport: Transport,
    flt: DeadLetterFilter,
    act: _Act,
    *,
    limit: int | None,
    batch_size: int,
    receive_wait: float,
    progress: Callable[[int], None] | None,
) -> tuple[int, list[tuple[str, str]]]:
    """Run ``act`` on the dead letters ``flt`` selects, queue by queue: (matched, unsettled).

    ``unsettled`` lists (queue, message id) of dead letters whose settlement lost its lock and that
    did not come back before the sweep ended (another reader holds them, or they are gone).
    """
    matched = 0
    unsettled: list[tuple[str, str]] = []
    for queue in flt.queues:
        if limit is not None and matched >= limit:
            break
        sweep = _Sweep(transport, queue, batch_size=batch_size, receive_wait=receive_wait)
        try:
            for batch in sweep.batches():
                chosen: list[ReceivedMessage] = []
                for message in batch:
                    if not flt.matches(message):
                        sweep.hold(message)
                        continue
                    if message.sequence_number not in sweep.pending:  # pending ones were counted already
                        if limit is not None and matched >= limit:
                            sweep.hold(message)
                            continue
                        matched += 1
                    chosen.append(message)
                if chosen:
                    act(queue, chosen, sweep)
                if progress is not None:
                    progress(matched)
                # Past the limit the rest of a big dead-letter queue need not be locked only to be released.
                if limit is not None and matched >= limit and not sweep.pending:
                    break
            unsettled += [(queue, message_id) for message_id in sweep.pending.values()]
        finally:
            sweep.release()
    return matched, unsettled


def _send_copies(
    transport: Transport, queue: str, work: Sequence[ReceivedMessage]
) -> tuple[list[ReceivedMessage], list[tuple[ReceivedMessage, str]]]:
    """Send the replay copies of ``work`` to ``queue``: (sent, [(failed, why)]).

    One batch send first; if the broker refuses the batch, each copy alone so one bad message does
    not hold back the others.
    """
    copies = [replay_copy(message) for message in work]
    try:
        transport.send(queue, copies)
        return list(work), []
    except Exception:  # adapters raise their own errors; retried one by one below
        if len(work) == 1:
            logger.warning("replay send to %s failed for %s", queue, work[0].message_id, exc_info=True)
            return [], [(work[0], "send failed")]
        logger.info("batch replay send to %s failed; sending one by one", queue, exc_info=True)
    sent: list[ReceivedMessage] = []
    failed: list[tuple[ReceivedMessage, str]] = []
    for message, copy in zip(work, copies, strict=True):
        try:
            transport.send(queue, [copy])
        except Exception as exc:  # recorded per dead letter, which stays dead-lettered
            logger.warning("replay send to %s failed for %s", queue, message.message_id, exc_info=True)
            failed.append((message, f"send failed: {type(exc).__name__}"))
        else:
            sent.append(message)
    return sent, failed


def replay(
    transport: Transport,
    flt: DeadLetterFilter,
    *,
    max_replays: int = 5,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    receive_wait: float = 0.0,
) -> ReplayResult:
    """Replay the dead letters the filter selects, safely (module docstring), in batches.

    ``progress`` is called after each batch with the number of matching dead letters dealt with so
    far (replayed, refused or failed). ``limit`` caps how many matching dead letters are taken.
    A dead letter already replayed ``max_replays`` times is refused and stays dead-lettered.
    ``dry_run`` moves nothing and reports what :func:`plan_replay` would do.

    Raises:
        ValueError: ``max_replays``, ``limit`` below 0 or ``batch_size`` below 1.
        Exception: whatever the transport raises when receiving or completing fails for a reason other
            than a lost lock; dead letters this call holds are released first, and any copy sent but
            not yet completed is re-sent harmlessly by the next run (same id).
    """
    _check_common(max_replays, limit, batch_size)
    result = ReplayResult(dry_run=dry_run)
    if dry_run:
        plan = plan_replay(transport, flt, max_replays=max_replays, limit=limit)
        result.matched = len(plan)
        result.refusals = [entry.refused for entry in plan if entry.refused]
        result.refused = len(result.refusals)
        if progress is not None:
            progress(result.matched)
        return result

    def act(queue: str, batch: list[ReceivedMessage], sweep: _Sweep) -> None:
        work: list[ReceivedMessage] = []
        for message in batch:
            refusal = _refusal(message, max_replays)
            if refusal is None:
                work.append(message)
                continue
            logger.warning("replay refused: %s", refusal)
            result.refused += 1
            result.refusals.append(refusal)
            sweep.hold(message)
        if work:
            _replay_batch(transport, queue, work, sweep, result)

    result.matched, unsettled = _sweep_all(
        transport,
        flt,
        act,
        limit=limit,
        batch_size=batch_size,
        receive_wait=receive_wait,
        progress=progress,
    )
    result.errors += [
        f"{message_id} on {queue}: its copy was sent but the dead letter could not be completed; "
        "re-run the replay to complete it (the copy is not sent twice)"
        for queue, message_id in unsettled
    ]
    logger.info(
        "replay finished: matched=%d replayed=%d refused=%d failed=%d",
        result.matched,
        result.replayed,
        result.refused,
        len(result.errors),
    )
    return result


def _replay_batch(
    transport: Transport, queue: str, work: Sequence[ReceivedMessage], sweep: _Sweep, result: ReplayResult
) -> None:
    sent, failed = _send_copies(transport, queue, work)
    for message, why in failed:
        result.errors.append(f"{message.message_id} on {queue}: {why}; it stays dead-lettered")
        sweep.hold(message)
    # Completing only now, after the copy was accepted, is what makes the replay safe (architecture §5).
    for message in sent:
        try:
            transport.complete(message)
        except LockLost:
            # Unless given up on, it comes back in a later batch; its re-sent copy (same id) is
            # dropped by duplicate detection, and then it is completed.
            if sweep.lock_lost(message):
                result.errors.append(
                    f"{message.message_id} on {queue}: lock lost before completing; its copy was sent, "
                    "re-run the replay to complete it (the copy is not sent twice)"
                )
            continue
        sweep.settled(message)
        result.replayed += 1
        logger.debug("replayed dead letter %s on %s", message.message_id, queue)


def purge(
    transport: Transport,
    flt: DeadLetterFilter,
    *,
    confirm: bool,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    receive_wait: float = 0.0,
) -> PurgeResult:
    """Delete the dead letters the filter selects (receive-lock, complete); release all others.

    ``progress`` is called after each batch with the number of matching dead letters dealt with so far.

    Raises:
        ValueError: ``confirm`` is not True ("purge needs confirm=true"), ``limit`` below 0 or
            ``batch_size`` below 1.
        Exception: whatever the transport raises when receiving or completing fails for a reason other
            than a lost lock; dead letters this call holds are released first.
    """
    if confirm is not True:
        raise InvalidFilter("confirm: a purge needs confirm=true", field="confirm")
    _check_common(None, limit, batch_size)
    result = PurgeResult()

    def act(queue: str, batch: list[ReceivedMessage], sweep: _Sweep) -> None:
        for message in batch:
            try:
                transport.complete(message)
            except LockLost:
                if sweep.lock_lost(message):
                    result.errors.append(f"{message.message_id} on {queue}: lock lost; not purged")
                continue
            sweep.settled(message)
            result.purged += 1

    result.matched, unsettled = _sweep_all(
        transport,
        flt,
        act,
        limit=limit,
        batch_size=batch_size,
        receive_wait=receive_wait,
        progress=progress,
    )
    result.errors += [f"{message_id} on {queue}: lock lost; not purged" for queue, message_id in unsettled]
    logger.info("purge finished: matched=%d purged=%d", result.matched, result.purged)
    return result

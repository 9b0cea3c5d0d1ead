"""Stage logic (DESIGN §2): from a received message to an outcome. Knows nothing of azure.functions.

Each stage returns one of:

- :class:`Forward` — send ``message`` to ``queue`` (the next stage), then complete this one;
- :class:`Delivered` — the lead is in the CRM (written now, or found there already);
- :class:`Retry` — transient failure; :mod:`shared.pipeline.settle` turns it into a rescheduled copy or, when
  the retry schedule is spent, a ``RetriesExhausted`` dead letter;
- :class:`Reject` — dead-letter now with a reason of DESIGN §5.

The caches here are what make a steady stream cost about one CRM request per lead: connections
(short TTL, so a rotated password is picked up), tokens (in the TokenProvider, until near expiry)
and the solution check (per publisher, minutes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

from shared.crm import DataverseClient, LeadWrite, TokenProvider, WriteResult
from shared.crm.connection import Connection
from shared.crm.pacing import Pacer
from shared.crm.penalties import PenaltyBook, Throttle
from shared.errors import (
    CONFIGURATION_REASONS,
    CredentialsMissing,
    CrmPaced,
    DeadLetter,
    DeadLetterReason,
    InvalidLead,
    InvalidPublisherId,
    LeadWriterError,
    RetryLater,
    SolutionMissing,
    SolutionVersionUnsupported,
    UnsafeCrmUrl,
)
from shared.names import QUEUE_INCOMING, QUEUE_READY, QUEUE_VALIDATED
from shared.pipeline.lead import LeadMessage, lead_record_id, parse_incoming, to_dataverse_columns
from shared.pipeline.messages import envelope, replay_count_of
from shared.secretstore.base import ConnectionStore
from shared.settings import Settings, parse_version
from shared.transport.base import OutgoingMessage, ReceivedMessage

logger = logging.getLogger(__name__)

CONNECTION_TTL = 30.0
SOLUTION_TTL = 300.0
SOLUTION_NEGATIVE_TTL = 30.0
#: Default leads per $batch request (Dataverse allows 1000; smaller batches keep one slow batch short).
#: The setting LEADWRITER_MAX_BATCH (Settings.max_batch) overrides it; 1 disables batching.
MAX_BATCH = 100
_MISSING = "\0missing"


@dataclass(frozen=True)
class Forward:
    queue: str
    message: OutgoingMessage


@dataclass(frozen=True)
class Delivered:
    record_id: UUID
    created: bool


@dataclass(frozen=True)
class Retry:
    description: str
    retry_after: float | None = None
    #: Nothing reached the CRM (a penalty, or pacing said "not yet"): a runtime with a backlog may
    #: hold the message ``retry_after`` seconds instead of rescheduling it (no attempt is spent).
    not_sent: bool = False


@dataclass(frozen=True)
class Reject:
    reason: DeadLetterReason
    description: str


Outcome = Forward | Delivered | Retry | Reject

STAGES: dict[str, str] = {
    "validate_credentials": QUEUE_INCOMING,
    "check_solution": QUEUE_VALIDATED,
    "write_lead": QUEUE_READY,
}

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class TtlCache(Generic[K, V]):
    """A small thread-safe cache whose entries expire; ``ttl`` may differ per entry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] <= self._clock():
                self._items.pop(key, None)
                return None
            return item[1]

    def put(self, key: K, value: V, ttl: float) -> None:
        with self._lock:
            self._items[key] = (self._clock() + ttl, value)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def pop_where(self, predicate: Callable[[K], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]


def outcome_for_error(exc: BaseException) -> Outcome:
    """Map any exception a stage raised onto an outcome: the one place that decides.

    Unexpected exceptions (bugs, unforeseen library errors) are retried on the normal schedule and
    then dead-lettered ``RetriesExhausted``: a worker never stops and a message never loops forever.
    """
    if isinstance(exc, DeadLetter):
        return Reject(exc.reason, str(exc))
    if isinstance(exc, CrmPaced):
        return Retry(str(exc), exc.retry_after, not_sent=True)
    if isinstance(exc, RetryLater):
        return Retry(str(exc), exc.retry_after)
    if isinstance(exc, UnsafeCrmUrl):
        return Reject(DeadLetterReason.CREDENTIALS_REJECTED, f"the stored CRM URL is refused: {exc}")
    if isinstance(exc, InvalidPublisherId):
        return Reject(DeadLetterReason.INVALID_LEAD, str(exc))
    return Retry(f"internal error: {type(exc).__name__}")


class Pipeline:
    """The three stages over shared caches. Thread-safe; one instance per process."""

    def __init__(
        self,
        settings: Settings,
        connections: ConnectionStore,
        *,
        tokens: TokenProvider | None = None,
        throttle: Throttle | None = None,
        pacer: Pacer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.pacer = pacer
        self.connections = connections
        self.tokens = tokens or TokenProvider(settings)
        self.throttle = throttle or PenaltyBook(settings.data_dir / "penalties.json")
        self._connection_cache: TtlCache[str, Connection] = TtlCache(clock)
        self._solution_cache: TtlCache[tuple[str, str], str | None] = TtlCache(clock)
        self._clients: dict[str, DataverseClient] = {}
        self._clients_lock = threading.Lock()
        self._key_locks: dict[object, threading.Lock] = {}

    # -- shared pieces -------------------------------------------------------------------------

    def connection(self, publisher_id: str, *, fresh: bool = False) -> Connection:
        """The publisher's connection (cached). Raises CredentialsMissing when none is stored."""
        if not fresh:
            cached = self._connection_cache.get(publisher_id)
            if cached is not None:
                return cached
        connection = self.connections.get(publisher_id)
        if connection is None:
            self._connection_cache.pop(publisher_id)
            raise CredentialsMissing(f"no CRM connection is stored for publisher {publisher_id!r}")
        self._connection_cache.put(publisher_id, connection, CONNECTION_TTL)
        return connection

    def client(self, connection: Connection) -> DataverseClient:
        """A client per connection, kept so its HTTP session keeps connections alive."""
        key = connection.fingerprint()
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                client = DataverseClient(
                    connection, self.settings, tokens=self.tokens, throttle=self.throttle, pacer=self.pacer
                )
                self._clients[key] = client
            return client

    def enable_pacing(self, pacer: Pacer | None = None) -> Pacer:
        """Pace CRM requests per CRM user from now on (shared/crm/pacing.py); returns the pacer in use.

        Only a runtime that can hold a paced message in a backlog turns this on (the embedded
        runtime): without one, "not yet" would reschedule the message and spend one of its attempts.
        """
        with self._clients_lock:
            if self.pacer is None:
                self.pacer = pacer or Pacer()
                # Clients made before keep no pacer; they are rebuilt on next use.
                self._clients.clear()
            return self.pacer

    def pacing_room(self, publisher_id: str) -> tuple[float, int]:
        """How long until the publisher's CRM user may take a request, and how many it may take now
        (shared/crm/pacing.py). Only what is cached is consulted — never the secret store — so a runtime
        may ask while it dispatches; an unknown publisher answers "now, any number"."""
        pacer = self.pacer
        connection = self._connection_cache.get(publisher_id)
        if pacer is None or connection is None:
            return 0.0, self.settings.max_batch
        with self._clients_lock:
            client = self._clients.get(connection.fingerprint())
        if client is None:
            return 0.0, self.settings.max_batch
        return pacer.room(client.throttle_key)

    def forget(self, publisher_id: str) -> None:
        """Drop what is cached for a publisher (after its connection changed)."""
        self._connection_cache.pop(publisher_id)
        self._solution_cache.pop_where(lambda key: key[0] == publisher_id)

    def check_solution_of(self, publisher_id: str, connection: Connection) -> str:
        """The installed solution version; raises SolutionMissing / SolutionVersionUnsupported.

        One query per publisher at a time: concurrent messages of a publisher whose result is not
        cached wait for the first one's answer instead of each asking the CRM (and, when it throttles,
        each sending into the penalty).
        """
        key = (publisher_id, connection.fingerprint())
        cached = self._solution_cache.get(key)
        if cached is None:
            with self._key_lock(key):
                cached = self._solution_cache.get(key)
                if cached is None:
                    version = self.client(connection).solution_version(self.settings.solution_name)
                    cached = version if version is not None else _MISSING
                    self._solution_cache.put(key, cached, SOLUTION_TTL if version else SOLUTION_NEGATIVE_TTL)
        if cached == _MISSING:
            raise SolutionMissing(
                f"the {self.settings.solution_name} solution is not installed in the CRM; "
                "import the Microsoft Marketplace Lead Writer solution"
            )
        try:
            installed = parse_version(cached)
        except ValueError:
            raise SolutionVersionUnsupported(f"the CRM reports an unreadable solution version {cached!r}") from None
        if installed < self.settings.min_version:
            raise SolutionVersionUnsupported(
                f"solution version {cached} is installed; {self.settings.min_solution_version} or later is required"
            )
        return cached

    def _key_lock(self, key: object) -> threading.Lock:
        with self._clients_lock:
            return self._key_locks.setdefault(key, threading.Lock())

    # -- the stages ---------------------------------------------------------------------------

    def handle(self, stage: str, message: ReceivedMessage) -> Outcome:
        """Run one stage on one message; never raises (errors become outcomes)."""
        step = {
            "validate_credentials": self._validate_credentials,
            "check_solution": self._check_solution,
            "write_lead": self._write_lead,
        }[stage]
        try:
            return self._with_fresh_retry(lambda fresh: step(message, fresh))
        except Exception as exc:
            if not isinstance(exc, LeadWriterError):
                logger.exception("unexpected error in stage %s for message %s", stage, message.message_id)
            return outcome_for_error(exc)

    def _with_fresh_retry(self, run: Callable[[bool], T]) -> T:
        """Run with cached configuration; if that ends in a configuration dead letter, try once more
        with the connection read fresh — a publisher who just fixed its connection (and whose dead
        letters were replayed) must not be refused again by a stale cache of another instance."""
        try:
            return run(False)
        except DeadLetter as exc:
            if exc.reason not in CONFIGURATION_REASONS:
                raise
            return run(True)

    def _lead(self, message: ReceivedMessage, *, incoming: bool) -> LeadMessage:
        if incoming:
            return parse_incoming(message.body, message_id=message.message_id)
        return LeadMessage.from_body(message.body)

    def _validate_credentials(self, message: ReceivedMessage, fresh: bool) -> Outcome:
        lead = self._lead(message, incoming=True)
        connection = self.connection(lead.publisher_id, fresh=fresh)
        if fresh:
            self.tokens.invalidate(connection)
        self.client(connection)  # checks the URL against the allowed hosts
        self.tokens.token(connection)
        return self._forward(lead, message, QUEUE_VALIDATED)

    def _check_solution(self, message: ReceivedMessage, fresh: bool) -> Outcome:
        lead = self._lead(message, incoming=False)
        connection = self.connection(lead.publisher_id, fresh=fresh)
        if fresh:
            self._solution_cache.pop((lead.publisher_id, connection.fingerprint()))
        self.check_solution_of(lead.publisher_id, connection)
        return self._forward(lead, message, QUEUE_READY)

    def _write_lead(self, message: ReceivedMessage, fresh: bool) -> Outcome:
        lead = self._lead(message, incoming=False)
        connection = self.connection(lead.publisher_id, fresh=fresh)
        result = self.client(connection).create_lead(self._lead_write(lead))
        return Delivered(result.record_id, result.created)

    @staticmethod
    def _lead_write(lead: LeadMessage) -> LeadWrite:
        return LeadWrite(lead_record_id(lead.publisher_id, lead.lead_id), to_dataverse_columns(lead))

    @staticmethod
    def _forward(lead: LeadMessage, message: ReceivedMessage, queue: str) -> Forward:
        return Forward(
            queue,
            envelope(
                lead.to_body(),
                publisher_id=lead.publisher_id,
                lead_id=lead.lead_id,
                replay=replay_count_of(message),
            ),
        )

    def write_leads(self, messages: Sequence[ReceivedMessage]) -> list[Outcome]:
        """The write stage for several messages: one ``$batch`` per publisher where there are several.

        Never raises; the outcomes are in the order of ``messages``.
        """
        outcomes: list[Outcome | None] = [None] * len(messages)
        by_publisher: dict[str, list[tuple[int, LeadMessage]]] = {}
        for index, message in enumerate(messages):
            try:
                lead = self._lead(message, incoming=False)
            except InvalidLead as exc:
                outcomes[index] = outcome_for_error(exc)
                continue
            by_publisher.setdefault(lead.publisher_id, []).append((index, lead))
        for group in by_publisher.values():
            if len(group) == 1:
                index, _ = group[0]
                outcomes[index] = self.handle("write_lead", messages[index])
                continue
            size = self.settings.max_batch
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                for (index, _), outcome in zip(chunk, self._write_batch([lead for _, lead in chunk]), strict=True):
                    outcomes[index] = outcome
        return [o if o is not None else Retry("internal error: no outcome") for o in outcomes]

    def _write_batch(self, leads: list[LeadMessage]) -> list[Outcome]:
        def run(fresh: bool) -> list[Outcome]:
            connection = self.connection(leads[0].publisher_id, fresh=fresh)
            results = self.client(connection).create_leads([self._lead_write(lead) for lead in leads])
            return [_result_outcome(result) for result in results]

        try:
            return self._with_fresh_retry(run)
        except Exception as exc:
            if not isinstance(exc, LeadWriterError):
                logger.exception("unexpected error writing a batch of %d leads", len(leads))
            outcome = outcome_for_error(exc)
            return [outcome] * len(leads)


def _result_outcome(result: WriteResult) -> Outcome:
    if result.error is not None:
        return outcome_for_error(result.error)
    return Delivered(result.record_id, result.created)


__all__ = [
    "STAGES",
    "Delivered",
    "Forward",
    "Outcome",
    "Pipeline",
    "Reject",
    "Retry",
    "TtlCache",
    "outcome_for_error",
]

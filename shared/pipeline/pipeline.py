"""The pipeline: what the three stages share in one process, and the entry points that run them.

:class:`Pipeline` holds the caches that make a steady stream cost about one CRM request per lead —
connections (short TTL, so a rotated password is picked up), a Dataverse client per connection
(keeping its HTTP connections alive), tokens (in the TokenProvider, until near expiry) and the
solution check (per publisher, minutes) — and the pacer every client consults. The stages themselves
live one per module: :mod:`.validate_credentials`, :mod:`.check_solution`, :mod:`.write_lead`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from shared.cache import KeyedLocks, LruCache, TtlCache
from shared.crm import DataverseClient, TokenProvider
from shared.crm.connection import Connection
from shared.crm.metadata import ExistingRecords
from shared.crm.pacing import Pacer
from shared.errors import CONFIGURATION_REASONS, CredentialsMissing, CrmUnavailable, DeadLetter, LeadWriterError
from shared.pipeline import check_solution, validate_credentials, write_lead
from shared.pipeline.lead import LeadMessage, parse_incoming
from shared.pipeline.mapping import ValidatedMapping
from shared.pipeline.mapping_store import MappingStore
from shared.pipeline.outcomes import Outcome, Stage, outcome_for_error
from shared.secretstore.base import ConnectionStore
from shared.settings import Settings
from shared.transport.base import ReceivedMessage

logger = logging.getLogger(__name__)

CONNECTION_TTL = 30.0
#: A publisher with no connection is remembered as such this long: one unconfigured publisher's
#: backlog must not become a secret-store (Key Vault) read per lead.
MISSING_TTL = 30.0
#: Even a "read it fresh" (after a configuration dead letter) asks the store at most this often.
FRESH_READ_INTERVAL = 5.0
T = TypeVar("T")

@dataclass(frozen=True)
class MappingFound:
    """A publisher's mapping as last read (None: none stored)."""

    mapping: ValidatedMapping | None


StageStep = Callable[["Pipeline", ReceivedMessage, bool], Outcome]

_STEPS: dict[Stage, StageStep] = {
    Stage.VALIDATE_CREDENTIALS: validate_credentials.run,
    Stage.CHECK_SOLUTION: check_solution.run,
    Stage.WRITE_LEAD: write_lead.run,
}


def _missing(publisher_id: str) -> CredentialsMissing:
    return CredentialsMissing(f"no CRM connection is stored for publisher {publisher_id!r}")


class Pipeline:
    """The three stages over shared caches. Thread-safe; one instance per process (the composition
    root in :mod:`shared.services` makes it), so a connection update seen by the API is seen by the
    stages of the same worker."""

    def __init__(
        self,
        settings: Settings,
        connections: ConnectionStore,
        *,
        tokens: TokenProvider | None = None,
        pacer: Pacer | None = None,
        mappings: MappingStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.connections = connections
        self.tokens = tokens or TokenProvider(settings)
        #: Every client of this process asks this pacer (and, through it, the one penalty record).
        self.pacer = pacer or Pacer()
        self._connection_cache: TtlCache[str, Connection] = TtlCache(clock)
        #: Publishers found without a connection, by any read and by a fresh one.
        self._missing: TtlCache[str, bool] = TtlCache(clock)
        self._fresh_missing: TtlCache[str, bool] = TtlCache(clock)
        #: Solution version per (publisher, connection fingerprint); None = not installed.
        self.solution_cache: TtlCache[tuple[str, str], check_solution.SolutionFound] = TtlCache(clock)
        #: A solution query that just failed, shared with the messages that waited for it.
        self.solution_failures: TtlCache[tuple[str, str], CrmUnavailable] = TtlCache(clock)
        self._clients: LruCache[str, DataverseClient] = LruCache()
        #: How each publisher's leads land (None: the default mapping for every publisher).
        self.mappings = mappings
        self._mapping_cache: TtlCache[str, MappingFound] = TtlCache(clock)
        #: Contacts/accounts found by e-mail for linking, per CRM (one query per customer, cached).
        self.links = ExistingRecords()
        self.key_locks: KeyedLocks[object] = KeyedLocks()

    # -- shared pieces -------------------------------------------------------------------------

    def connection(self, publisher_id: str, *, fresh: bool = False) -> Connection:
        """The publisher's connection (cached). Raises CredentialsMissing when none is stored."""
        cached = self._cached_connection(publisher_id, fresh)
        if cached is not None:
            return cached
        # One read per publisher at a time: a backlog's first leads arrive together on every worker
        # thread, and each must not become its own secret-store transaction.
        with self.key_locks.lock(("connection", publisher_id)):
            cached = self._cached_connection(publisher_id, fresh)
            if cached is not None:
                return cached
            return self._read_connection(publisher_id)

    def _cached_connection(self, publisher_id: str, fresh: bool) -> Connection | None:
        """What the caches know: the connection, None (ask the store), or CredentialsMissing raised."""
        if not fresh:
            cached = self._connection_cache.get(publisher_id)
            if cached is not None:
                return cached
            if self._missing.get(publisher_id):
                raise _missing(publisher_id)
        elif self._fresh_missing.get(publisher_id):
            raise _missing(publisher_id)
        return None

    def _read_connection(self, publisher_id: str) -> Connection:
        connection = self.connections.get(publisher_id)
        if connection is None:
            self._connection_cache.pop(publisher_id)
            self._missing.put(publisher_id, True, MISSING_TTL)
            self._fresh_missing.put(publisher_id, True, FRESH_READ_INTERVAL)
            raise _missing(publisher_id)
        self._missing.pop(publisher_id)
        self._fresh_missing.pop(publisher_id)
        self._connection_cache.put(publisher_id, connection, CONNECTION_TTL)
        return connection

    def client(self, connection: Connection) -> DataverseClient:
        """A client per connection, kept so its HTTP session keeps connections alive. A rotated
        credential's client is dropped once it is the least recently used beyond the bound."""
        return self._clients.get_or_create(
            connection.fingerprint(),
            lambda: DataverseClient(connection, self.settings, tokens=self.tokens, pacer=self.pacer),
        )

    def pacing_room(self, publisher_id: str) -> tuple[float, int]:
        """How long until the publisher's CRM user may take a request, and how many it may take now
        (:mod:`shared.crm.pacing`). Only what is cached is consulted — never the secret store — so a
        runtime may ask while it dispatches; an unknown publisher answers "now, any number"."""
        connection = self._connection_cache.get(publisher_id)
        if connection is None:
            return 0.0, self.settings.max_batch
        client = self._clients.get(connection.fingerprint())
        if client is None:
            return 0.0, self.settings.max_batch
        return self.pacer.room(client.throttle_key)

    def throttle_key(self, publisher_id: str) -> str | None:
        """The pacer's key (CRM user) of the publisher's client, from what is cached only (None when
        this process holds no client for it yet): what :mod:`shared.pipeline.recovery` paces by."""
        connection = self._connection_cache.get(publisher_id)
        client = self._clients.get(connection.fingerprint()) if connection is not None else None
        return client.throttle_key if client is not None else None

    def mapping(self, publisher_id: str) -> ValidatedMapping | None:
        """The publisher's mapping (cached like a connection); None: the default mapping."""
        if self.mappings is None:
            return None
        found = self._mapping_cache.get(publisher_id)
        if found is None:
            found = MappingFound(self.mappings.get(publisher_id))
            self._mapping_cache.put(publisher_id, found, CONNECTION_TTL)
        return found.mapping

    def forget(self, publisher_id: str) -> None:
        """Drop what is cached for a publisher (after its connection or its mapping changed)."""
        self._connection_cache.pop(publisher_id)
        self._mapping_cache.pop(publisher_id)
        self._missing.pop(publisher_id)
        self._fresh_missing.pop(publisher_id)
        self.solution_cache.pop_where(lambda key: key[0] == publisher_id)
        self.solution_failures.pop_where(lambda key: key[0] == publisher_id)

    # -- running the stages ---------------------------------------------------------------------

    def handle(self, stage: Stage | str, message: ReceivedMessage) -> Outcome:
        """Run one stage on one message; never raises (errors become outcomes)."""
        step = _STEPS[Stage(stage)]
        try:
            return self.with_fresh_retry(lambda fresh: step(self, message, fresh))
        except Exception as exc:
            if not isinstance(exc, LeadWriterError):
                logger.exception("unexpected error in stage %s for message %s", stage, message.message_id)
            return outcome_for_error(exc)

    def write_leads(self, messages: Sequence[ReceivedMessage]) -> list[Outcome]:
        """The write stage for several messages (one ``$batch`` per publisher); never raises; the
        outcomes are in the order of ``messages``."""
        return write_lead.run_many(self, messages)

    def with_fresh_retry(self, run: Callable[[bool], T]) -> T:
        """Run with cached configuration; if that ends in a configuration dead letter, try once more
        with the connection read fresh — a publisher who just fixed its connection (and whose dead
        letters were replayed) must not be refused again by a stale cache of another instance."""
        try:
            return run(False)
        except DeadLetter as exc:
            if exc.reason not in CONFIGURATION_REASONS:
                raise
            return run(True)

    @staticmethod
    def lead(message: ReceivedMessage, *, incoming: bool) -> LeadMessage:
        """The lead a stage message carries. Raises InvalidLead."""
        if incoming:
            return parse_incoming(message.body, message_id=message.message_id)
        return LeadMessage.from_body(message.body)


__all__ = ["CONNECTION_TTL", "Pipeline"]

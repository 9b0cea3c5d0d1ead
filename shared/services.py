"""The composition root: the one builder of the services a process uses.

``leadwriter serve``, the Azure Functions stage triggers, the Functions HTTP app, the CLI, the demo,
the bench and the tests all ask :meth:`Services.from_settings` (or, inside a Functions worker,
:func:`process_services`, which builds one per process). Everything a stage and the API share — the
pipeline's caches, the pacer and its penalty record, the status book, the metrics — exists once per
process, so a connection update the API makes is seen by the stages of the same worker, and every
settlement (single or batched, embedded or Functions) reaches the same observer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import datadir
from shared.crm.pacing import Pacer
from shared.crm.penalties import Penalties, StatePenaltyStore
from shared.ops.alerts import AlertService
from shared.ops.apikeys import ApiKeyStore, StateRecords
from shared.ops.jobs import Jobs
from shared.ops.journey import JourneyBook
from shared.ops.status import StatusBook
from shared.ops.telemetry import Metrics, configure_telemetry, fan_out
from shared.pipeline.identity import SeenIds, StateSeenIds
from shared.pipeline.mapping_store import StateMappingStore
from shared.pipeline.pipeline import Pipeline
from shared.pipeline.recovery import Recovery
from shared.pipeline.settle import Settled
from shared.secretstore import make_secret_store
from shared.secretstore.base import ConnectionStore, SecretStore
from shared.settings import Settings
from shared.state import make_state_store
from shared.state.base import StateStore
from shared.state.scheduled import StateScheduledRetries
from shared.transport import make_transport
from shared.transport.base import Transport
from shared.transport.grouped import GroupSender

if TYPE_CHECKING:
    from shared.runtime.embedded import EmbeddedRuntime
    from shared.runtime.functions import FunctionsRuntime


@dataclass
class Services:
    settings: Settings
    transport: Transport
    secrets: SecretStore
    connections: ConnectionStore
    api_keys: ApiKeyStore
    pipeline: Pipeline
    status: StatusBook
    state: StateStore
    #: Lead ids the ingest endpoint accepted (a repeated POST is answered as a duplicate).
    seen_ids: SeenIds
    #: Sweep jobs (replay, purge of many dead letters) over the state store and the jobs queue.
    jobs: Jobs
    #: Every settlement of every lead, on the state store (shared.ops.journey); fed by :meth:`observe`.
    journeys: JourneyBook
    #: Alert webhooks of publishers (shared.ops.alerts); fed by :meth:`observe`, delivering off the path.
    alerts: AlertService
    #: Settlement counters of this process (shared.ops.telemetry); fed by :meth:`observe`.
    metrics: Metrics = field(default_factory=Metrics)
    #: Releases a healed CRM's scheduled retries early; fed by :meth:`observe`. Its
    #: releaser thread starts on the first recovery and stops in :meth:`close`.
    recovery: Recovery = field(init=False)
    #: The ingest endpoint's sends to ``leads-incoming``: concurrent requests share one broker send.
    ingest: GroupSender = field(init=False)

    def __post_init__(self) -> None:
        self.recovery = Recovery(self.transport, self.pipeline.pacer, self.pipeline.throttle_key)
        self.ingest = GroupSender(self.transport)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Build every service the settings select. Raises ConfigurationError for a bad setting."""
        # 0700, writable (a read-only data dir fails here, naming it).
        datadir.prepare(settings.data_dir)
        secrets = make_secret_store(settings)
        connections = ConnectionStore(secrets)
        state = make_state_store(settings)
        # Embedded, a penalty read is a local SQLite read: look every time. Across Azure instances
        # (Table Storage), at most once a second per CRM user.
        refresh = 1.0 if settings.state_backend == "tables" else 0.0
        penalties = Penalties(StatePenaltyStore(state, refresh_interval=refresh))
        # Service Bus cannot list scheduled messages: it records their sequence numbers in the state
        # store, so a healed CRM's retries can be released early.
        transport = make_transport(settings, ledger=StateScheduledRetries(state))
        return cls(
            settings=settings,
            transport=transport,
            secrets=secrets,
            connections=connections,
            api_keys=ApiKeyStore(StateRecords(state, legacy=secrets)),
            pipeline=Pipeline(
                settings, connections, pacer=Pacer(penalties=penalties), mappings=StateMappingStore(state)
            ),
            seen_ids=StateSeenIds(state),
            status=StatusBook(state),
            state=state,
            jobs=Jobs(state, transport),
            journeys=JourneyBook(state),
            alerts=AlertService(
                state, secrets, allowed_hosts=settings.webhook_allowed_hosts, ca_bundle=settings.ca_bundle
            ),
        )

    @property
    def pacer(self) -> Pacer:
        return self.pipeline.pacer

    def observe(self, settled: Settled) -> None:
        """The settlement observer of every runtime: the status book, the metrics, the journeys, the
        alerts and recovery detection (a healed CRM's waiting retries go early). Raises nothing."""
        fan_out(
            self.status.observe, self.metrics.observe, self.journeys.observe, self.alerts.observe, self.recovery.observe
        )(settled)

    def embedded_runtime(
        self, *, concurrency: int | None = None, publisher_concurrency: int | None = None
    ) -> EmbeddedRuntime:
        """The three stage workers over these services (concurrency from settings unless given),
        every settlement observed by :meth:`observe`."""
        from shared.runtime.embedded import EmbeddedRuntime

        return EmbeddedRuntime(
            self.transport,
            self.pipeline,
            concurrency=concurrency or self.settings.worker_concurrency,
            publisher_concurrency=publisher_concurrency or self.settings.publisher_concurrency,
            observer=self.observe,
        )

    def stage_runtime(self) -> EmbeddedRuntime | FunctionsRuntime:
        """What runs the stages on this machine, as ``LEADWRITER_RUNTIME`` says: the embedded stage
        workers, or the registered Functions triggers called as the host calls them."""
        if self.settings.runtime == "functions":
            from shared.runtime.functions import FunctionsRuntime

            return FunctionsRuntime(self)
        return self.embedded_runtime()

    def close(self) -> None:
        self.recovery.close()  # first: it releases through the transport
        self.status.close()
        self.journeys.close()
        self.alerts.close()
        self.transport.close()
        self.state.close()


_process_lock = threading.Lock()
_process: Services | None = None


def process_services() -> Services:
    """The services of this process, built once from the environment on first use (never at import
    or in decorator arguments) with telemetry configured: what the Functions triggers and the
    Functions HTTP app share. Raises ConfigurationError for a missing or invalid setting (every
    invocation then fails the same way and its messages are redelivered; nothing is lost)."""
    global _process
    with _process_lock:
        if _process is None:
            settings = Settings.from_env()
            configure_telemetry(settings)
            _process = Services.from_settings(settings)
        return _process


def use_process_services(services: Services | None) -> None:
    """Make ``services`` this process's (None: build anew from the environment on next use). For the
    harness that runs the registered Functions triggers, and for tests."""
    global _process
    with _process_lock:
        _process = services

"""The services one process uses, built once from settings: the composition root below the entry points.

``leadwriter serve``, the Azure Functions adapters, the CLI and the tests all build a :class:`Services`
and hand its parts to the API, the stage workers and the ops tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.crm.penalties import Throttle, penalty_book_for
from shared.ops.apikeys import ApiKeyStore
from shared.ops.status import StatusBook
from shared.ops.telemetry import Metrics, fan_out
from shared.pipeline.settle import Settled
from shared.pipeline.stages import Pipeline
from shared.secretstore import make_secret_store
from shared.secretstore.base import ConnectionStore, SecretStore
from shared.settings import Settings
from shared.transport import make_transport
from shared.transport.base import Transport


@dataclass
class Services:
    settings: Settings
    transport: Transport
    secrets: SecretStore
    connections: ConnectionStore
    api_keys: ApiKeyStore
    pipeline: Pipeline
    status: StatusBook
    #: Settlement counters of this process (shared.ops.telemetry); fed by :meth:`observe`.
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Build every service the settings select. Raises ConfigurationError for a bad setting."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        secrets = make_secret_store(settings)
        connections = ConnectionStore(secrets)
        return cls(
            settings=settings,
            transport=make_transport(settings),
            secrets=secrets,
            connections=connections,
            api_keys=ApiKeyStore(secrets),
            pipeline=Pipeline(settings, connections, throttle=penalties_for(settings, secrets)),
            status=StatusBook(settings.data_dir / "status.db"),
        )

    def observe(self, settled: Settled) -> None:
        """The settlement observer of a stage worker: the status book and the metrics. Raises nothing."""
        fan_out(self.status.observe, self.metrics.observe)(settled)

    def close(self) -> None:
        self.transport.close()


def penalties_for(settings: Settings, secrets: SecretStore) -> Throttle:
    """Where 429 penalties are kept: the data dir (shared by the processes of one machine), and with
    Key Vault also the vault, so that every Azure instance honours a penalty any of them received."""
    shared = secrets if settings.secret_backend == "keyvault" else None  # noqa: S105 - a backend name
    return penalty_book_for(settings.data_dir, shared)


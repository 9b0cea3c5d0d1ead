"""Queue transports (architecture §2): the :class:`Transport` port and its two adapters.

``EmbeddedBroker`` (SQLite) is imported eagerly; ``ServiceBusTransport`` lazily, because importing
azure-servicebus costs a quarter of a second that the embedded default never needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.names import BROKER_FILE
from shared.settings import Settings
from shared.transport.base import (
    LockLost,
    OutgoingMessage,
    PropertyValue,
    QueueStats,
    ReceivedMessage,
    ScheduleLedger,
    Transport,
)
from shared.transport.embedded import EmbeddedBroker

if TYPE_CHECKING:
    from shared.transport.servicebus import ServiceBusTransport

__all__ = [
    "EmbeddedBroker",
    "LockLost",
    "OutgoingMessage",
    "PropertyValue",
    "QueueStats",
    "ReceivedMessage",
    "ServiceBusTransport",
    "Transport",
    "make_transport",
]



def __getattr__(name: str) -> object:
    if name == "ServiceBusTransport":
        from shared.transport.servicebus import ServiceBusTransport

        return ServiceBusTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_transport(settings: Settings, *, ledger: ScheduleLedger | None = None) -> Transport:
    """Build the transport ``settings.queue_backend`` names.

    ``embedded``: an :class:`EmbeddedBroker` on ``<data_dir>/broker.db`` (the directory is created).
    ``servicebus``: a :class:`ServiceBusTransport` on ``settings.servicebus_namespace`` with
    ``DefaultAzureCredential`` (managed identity in Azure). Raises ConfigurationError when the
    namespace is missing (from Settings), OSError when the data dir cannot be created. ``ledger``
    keeps Service Bus's scheduled sequence numbers so they can be released early (the embedded
    broker needs none: it moves the visible time).
    """
    if settings.queue_backend == "servicebus":
        from azure.identity import DefaultAzureCredential

        from shared.transport.servicebus import ServiceBusTransport

        # Settings refuse a servicebus backend without a namespace (the one place that checks it).
        assert settings.servicebus_namespace is not None
        return ServiceBusTransport(settings.servicebus_namespace, DefaultAzureCredential(), ledger=ledger)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return EmbeddedBroker(
        settings.data_dir / BROKER_FILE,
        lock_duration=settings.lock_duration,
        max_delivery_count=settings.max_delivery_count,
    )

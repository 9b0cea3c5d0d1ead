"""Azure's code path on one machine: the registered trigger functions of ``function_app.py``, run over
the embedded broker as the Functions host runs them (``LEADWRITER_RUNTIME=functions``).

This is a harness for our adapters, not a Functions host. It finds the functions through
``app.get_functions()``, reads each Service Bus trigger's queue and cardinality from its binding and
the concurrency from ``host.json`` (``maxConcurrentCalls``, ``maxMessageBatchSize``), turns each
broker message into the SDK's ``ServiceBusReceivedMessage`` through the servicebus binding extension's
own converter (AMQP-encoded, lock token in front, as the host hands it over), and passes a
``ServiceBusMessageActions`` stand-in whose complete / dead-letter / renew go to the embedded broker.
A trigger that raises leaves its messages locked: they are delivered again when the lock expires, as
in Azure. What it does not reproduce: the host's own retry of a failed invocation, scale-out across
instances, and ``maxAutoLockRenewalDuration`` for single-message triggers (locks are renewed here
while a function runs, which the host does too for those).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uamqp
from azure.servicebus import ServiceBusReceivedMessage as SdkReceivedMessage
from azurefunctions.extensions.base import Datum
from azurefunctions.extensions.bindings.servicebus import ServiceBusConverter, ServiceBusReceivedMessage
from uamqp import types as amqp_types

from shared.errors import LockLost
from shared.services import Services, use_process_services
from shared.transport.base import ReceivedMessage

logger = logging.getLogger(__name__)

HOST_JSON = Path(__file__).resolve().parents[2] / "host.json"
RECEIVE_WAIT = 0.25
_LOCK_TOKEN = b"x-opt-lock-token"


@dataclass(frozen=True)
class _ModelBindingData:
    """What the host sends the worker for one Service Bus message (``model_binding_data``)."""

    content: bytes
    version: str = "1.0"
    source: str = "AzureServiceBusReceivedMessage"
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class _CollectionModelBindingData:
    model_binding_data: list[_ModelBindingData]


@dataclass(frozen=True)
class ServiceBusTrigger:
    """A registered Service Bus-triggered function."""

    name: str
    queue: str
    many: bool
    function: Callable[..., Any]


_indexed_lock = threading.Lock()
_indexed: dict[int, tuple[Any, list[Any]]] = {}


def registered_functions(app: Any) -> list[Any]:
    """``app.get_functions()``, indexed once per app object (a second call raises a duplicate-name
    error: the host, too, indexes an app once)."""
    with _indexed_lock:
        found = _indexed.get(id(app))
        if found is None or found[0] is not app:
            found = (app, list(app.get_functions()))
            _indexed[id(app)] = found
        return found[1]


def service_bus_triggers(app: Any) -> list[ServiceBusTrigger]:
    """The Service Bus triggers ``app`` registers, as the host indexes them."""
    triggers = []
    for fn in registered_functions(app):
        trigger = fn.get_trigger().get_dict_repr()
        if trigger.get("type") != "serviceBusTrigger":
            continue
        cardinality = trigger.get("cardinality")
        many = str(getattr(cardinality, "value", cardinality or "one")).lower() == "many"
        triggers.append(ServiceBusTrigger(fn.get_function_name(), trigger["queueName"], many, fn.get_user_function()))
    return triggers


def host_settings(path: Path = HOST_JSON) -> tuple[int, int]:
    """``maxConcurrentCalls`` and ``maxMessageBatchSize`` of host.json's serviceBus extension."""
    service_bus = json.loads(path.read_text()).get("extensions", {}).get("serviceBus", {})
    return int(service_bus.get("maxConcurrentCalls", 16)), int(service_bus.get("maxMessageBatchSize", 1000))


def _timestamp(when: datetime) -> amqp_types.AMQPLong:
    return amqp_types.AMQPLong(int(when.timestamp() * 1000))


def binding_data(message: ReceivedMessage, lock_token: uuid.UUID) -> _ModelBindingData:
    """``message`` as the host hands it to the worker: the lock token, then the AMQP message."""
    header = uamqp.message.MessageHeader()
    header.delivery_count = max(message.delivery_count - 1, 0)  # AMQP counts the earlier deliveries
    locked_until = message.locked_until or datetime.now(UTC) + timedelta(seconds=60)
    amqp = uamqp.Message(
        body=message.body,
        properties=uamqp.message.MessageProperties(
            message_id=message.message_id, content_type=message.content_type or "application/json"
        ),
        application_properties=dict(message.application_properties),
        annotations={
            amqp_types.AMQPSymbol("x-opt-sequence-number"): amqp_types.AMQPLong(message.sequence_number),
            amqp_types.AMQPSymbol("x-opt-enqueued-time"): _timestamp(message.enqueued_time),
            amqp_types.AMQPSymbol("x-opt-locked-until"): _timestamp(locked_until),
        },
        header=header,
    )
    return _ModelBindingData(lock_token.bytes_le + _LOCK_TOKEN + amqp.encode_message())


def decode(data: _ModelBindingData | Sequence[_ModelBindingData]) -> Any:
    """The binding extension's own decoding, as the worker runs it for a trigger parameter."""
    if isinstance(data, _ModelBindingData):
        return ServiceBusConverter.decode(
            Datum(data, "model_binding_data"), trigger_metadata=None, pytype=ServiceBusReceivedMessage
        )
    return ServiceBusConverter.decode(
        Datum(_CollectionModelBindingData(list(data)), "collection_model_binding_data"),
        trigger_metadata=None,
        pytype=list[ServiceBusReceivedMessage],
    )


class BrokerMessageActions:
    """``ServiceBusMessageActions`` backed by the embedded broker: settlement by lock token."""

    def __init__(self, services: Services) -> None:
        self._transport = services.transport
        self._lock = threading.Lock()
        self._messages: dict[str, ReceivedMessage] = {}
        self._auto_renew: set[str] = set()

    def track(self, message: ReceivedMessage, *, auto_renew: bool) -> uuid.UUID:
        """Hand ``message`` to an invocation under a fresh lock token. ``auto_renew``: its lock is renewed
        by :meth:`renew_due` while the invocation runs (the host's ``maxAutoLockRenewalDuration``, which
        applies to single-message triggers only; a batch trigger renews its own)."""
        token = uuid.uuid4()
        with self._lock:
            self._messages[str(token)] = message
            if auto_renew:
                self._auto_renew.add(str(token))
        return token

    def renew_due(self, margin: float) -> None:
        """Renew the auto-renewed locks that end within ``margin`` seconds."""
        threshold = datetime.now(UTC) + timedelta(seconds=margin)
        with self._lock:
            due = [
                m
                for token, m in self._messages.items()
                if token in self._auto_renew and m.locked_until is not None and m.locked_until < threshold
            ]
        for message in due:
            try:
                self._transport.renew_lock(message)
            except LockLost:
                logger.warning("could not renew the lock of message %s", message.message_id)

    def _take(self, sdk_message: SdkReceivedMessage) -> ReceivedMessage:
        with self._lock:
            message = self._messages.pop(str(sdk_message.lock_token), None)
            self._auto_renew.discard(str(sdk_message.lock_token))
        if message is None:
            raise LockLost("the message was settled already or is not one of this host's")
        return message

    def _held(self, sdk_message: SdkReceivedMessage) -> ReceivedMessage | None:
        with self._lock:
            return self._messages.get(str(sdk_message.lock_token))

    def complete(self, message: SdkReceivedMessage) -> None:
        self._transport.complete(self._take(message))

    def abandon(self, message: SdkReceivedMessage) -> None:
        self._transport.abandon(self._take(message))

    def deadletter(
        self,
        message: SdkReceivedMessage,
        deadletter_reason: str | None = None,
        deadletter_error_description: str | None = None,
    ) -> None:
        self._transport.dead_letter(self._take(message), deadletter_reason or "", deadletter_error_description or "")

    def renew_message_lock(self, message: SdkReceivedMessage) -> None:
        held = self._held(message)
        if held is None:
            raise LockLost("the message was settled already or is not one of this host's")
        self._transport.renew_lock(held)

    def forget(self, tokens: Sequence[uuid.UUID]) -> None:
        """Drop what an invocation left unsettled (its lock expires and the broker redelivers it)."""
        with self._lock:
            for token in tokens:
                self._messages.pop(str(token), None)
                self._auto_renew.discard(str(token))


class FunctionsRuntime:
    """The registered Service Bus triggers of ``app``, each fed from its queue on the embedded broker."""

    def __init__(self, services: Services, app: Any | None = None, *, host_json: Path = HOST_JSON) -> None:
        if app is None:
            import function_app

            app = function_app.app
        self.services = services
        self.triggers = service_bus_triggers(app)
        self.max_concurrent_calls, self.max_batch = host_settings(host_json)
        self.actions = BrokerMessageActions(services)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pools: list[ThreadPoolExecutor] = []

    def start(self) -> FunctionsRuntime:
        # The triggers ask the process's services: make them these.
        use_process_services(self.services)
        for trigger in self.triggers:
            # A batch trigger takes up to maxMessageBatchSize per invocation, one invocation at a time
            # per queue listener; a single-message trigger runs up to maxConcurrentCalls at once.
            workers = 1 if trigger.many else self.max_concurrent_calls
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"lw-fn-{trigger.name}")
            self._pools.append(pool)
            thread = threading.Thread(
                target=self._listen, args=(trigger, pool, workers), name=f"lw-fn-{trigger.name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        renewer = threading.Thread(target=self._renew_loop, name="lw-fn-renew", daemon=True)
        self._threads.append(renewer)
        renewer.start()
        return self

    def _renew_loop(self) -> None:
        margin = min(20.0, self.services.settings.lock_duration / 2)
        while not self._stop.wait(min(1.0, margin / 2)):
            self.actions.renew_due(margin)

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop listening; invocations in flight finish (their messages are settled or left locked)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        for pool in self._pools:
            pool.shutdown(wait=True)
        use_process_services(None)

    def __enter__(self) -> FunctionsRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, trigger: ServiceBusTrigger, pool: ThreadPoolExecutor, workers: int) -> None:
        busy = threading.Semaphore(workers)
        while not self._stop.is_set():
            if not busy.acquire(timeout=RECEIVE_WAIT):
                continue
            try:
                messages = self.services.transport.receive(
                    trigger.queue, max_messages=self.max_batch if trigger.many else 1, max_wait=RECEIVE_WAIT
                )
            except Exception:
                busy.release()
                logger.exception("function %s: receive failed; retrying in a second", trigger.name)
                self._stop.wait(1.0)
                continue
            if not messages:
                busy.release()
                continue
            pool.submit(self._invoke, trigger, messages, busy)

    def _invoke(self, trigger: ServiceBusTrigger, messages: list[ReceivedMessage], busy: threading.Semaphore) -> None:
        tokens = [self.actions.track(m, auto_renew=not trigger.many) for m in messages]
        try:
            data = [binding_data(m, t) for m, t in zip(messages, tokens, strict=True)]
            if trigger.many:
                trigger.function(decode(data), self.actions)
            else:
                trigger.function(decode(data[0]), self.actions)
        except Exception:
            logger.exception(
                "function %s failed; its unsettled messages are delivered again when their locks expire", trigger.name
            )
        finally:
            self.actions.forget(tokens)
            busy.release()

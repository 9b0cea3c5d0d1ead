"""The sweep jobs' trigger: one step of a replay or purge job per message on ``leadwriter-jobs``.

A step is bounded (``shared.ops.jobs.STEP_LIMIT`` dead letters), so it finishes well inside the
function time limit, and the host renews the message's lock while it runs (single-message trigger).
The next step's message is sent before this one is completed.
"""

# No `from __future__ import annotations` here: the Functions worker reads the binding types from the
# trigger function's annotations at indexing time, and needs them as real objects.

import azure.functions as func
import azurefunctions.extensions.bindings.servicebus as servicebus

from shared.names import QUEUE_JOBS, SERVICEBUS_CONNECTION
from shared.ops.jobs import settle_job
from shared.services import process_services
from shared.transport.servicebus import from_service_bus_message

jobs = func.Blueprint()  # type: ignore[no-untyped-call]  # azure-functions is untyped here


@jobs.function_name("run_job")
@jobs.service_bus_queue_trigger(
    arg_name="message", queue_name=QUEUE_JOBS, connection=SERVICEBUS_CONNECTION, auto_complete_messages=False
)
def run_job(
    message: servicebus.ServiceBusReceivedMessage, message_actions: servicebus.ServiceBusMessageActions
) -> None:
    services = process_services()
    received = from_service_bus_message(message, QUEUE_JOBS, from_dead_letter=False, peeked=False)
    settle_job(services.jobs, services.transport, received, complete=lambda _: message_actions.complete(message))

"""One Blueprint per stage: a Service Bus trigger that hands the message to the stage and settles it.

Bindings name the connection *setting* (``ServiceBusConnection``, identity-based in Azure) and the
queue names from :mod:`shared.names`, never values read from the environment.
"""

# No `from __future__ import annotations` here: the Functions worker reads the binding types from the
# trigger function's annotations at indexing time, and needs them as real objects.

import azure.functions as func
import azurefunctions.extensions.bindings.servicebus as servicebus

from functions._host import run_stage, run_write_batch
from shared.names import SERVICEBUS_CONNECTION
from shared.pipeline.outcomes import Stage


def stage_blueprint(stage: Stage) -> func.Blueprint:
    """A Blueprint with the trigger function ``stage`` on its queue (auto-complete off)."""
    bp = func.Blueprint()  # type: ignore[no-untyped-call]  # azure-functions is untyped here

    @bp.function_name(stage.value)
    @bp.service_bus_queue_trigger(
        arg_name="message",
        queue_name=stage.queue,
        connection=SERVICEBUS_CONNECTION,
        auto_complete_messages=False,
    )
    def trigger(
        message: servicebus.ServiceBusReceivedMessage, message_actions: servicebus.ServiceBusMessageActions
    ) -> None:
        run_stage(stage, message, message_actions)

    return bp


def write_blueprint() -> func.Blueprint:
    """The write stage takes the messages the host has in a batch (``maxMessageBatchSize`` in host.json),
    so a backlog goes to the CRM as ``$batch`` requests — about 0.1 CRM requests per lead instead of 1."""
    bp = func.Blueprint()  # type: ignore[no-untyped-call]  # azure-functions is untyped here

    @bp.function_name(Stage.WRITE_LEAD.value)
    @bp.service_bus_queue_trigger(
        arg_name="messages",
        queue_name=Stage.WRITE_LEAD.queue,
        connection=SERVICEBUS_CONNECTION,
        auto_complete_messages=False,
        cardinality="many",
    )
    def trigger(
        messages: list[servicebus.ServiceBusReceivedMessage], message_actions: servicebus.ServiceBusMessageActions
    ) -> None:
        run_write_batch(messages, message_actions)

    return bp


validate_credentials = stage_blueprint(Stage.VALIDATE_CREDENTIALS)
check_solution = stage_blueprint(Stage.CHECK_SOLUTION)
write_lead = write_blueprint()

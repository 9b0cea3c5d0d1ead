"""Stage 1, ``validate_credentials`` (queue ``leads-incoming``): parse and validate the marketplace
lead, load the publisher's connection, obtain a token for its CRM; forward to ``leads-validated``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.names import QUEUE_VALIDATED
from shared.pipeline.messages import forward
from shared.pipeline.outcomes import Outcome
from shared.transport.base import ReceivedMessage

if TYPE_CHECKING:
    from shared.pipeline.pipeline import Pipeline


def run(pipeline: Pipeline, message: ReceivedMessage, fresh: bool) -> Outcome:
    """Raises InvalidLead, CredentialsMissing, CredentialsRejected, UnsafeCrmUrl, RetryLater."""
    lead = pipeline.lead(message, incoming=True)
    connection = pipeline.connection(lead.publisher_id, fresh=fresh)
    if fresh:
        pipeline.tokens.invalidate(connection)
    pipeline.client(connection)  # checks the URL against the allowed hosts
    pipeline.tokens.token(connection)
    return forward(lead, message, QUEUE_VALIDATED)

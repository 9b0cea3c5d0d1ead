"""Stage 2, ``check_solution`` (queue ``leads-validated``): the Lead Writer solution is installed in
the publisher's CRM at a supported version (the rule: :mod:`shared.crm.solution`); forward to
``leads-ready``. The CRM is asked once per publisher per few minutes, and one query at a time."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.crm.connection import Connection
from shared.crm.solution import require_supported
from shared.errors import CrmUnavailable
from shared.names import QUEUE_READY
from shared.pipeline.messages import forward
from shared.pipeline.outcomes import Outcome
from shared.transport.base import ReceivedMessage

if TYPE_CHECKING:
    from shared.pipeline.pipeline import Pipeline

SOLUTION_TTL = 300.0
SOLUTION_NEGATIVE_TTL = 30.0
#: How long a failed query (timeout, reset, 5xx) is kept for the messages that waited on it to share.
SOLUTION_FAILURE_TTL = 5.0


@dataclass(frozen=True)
class SolutionFound:
    """What the solutions query answered: the installed version, or None when not installed."""

    version: str | None


def run(pipeline: Pipeline, message: ReceivedMessage, fresh: bool) -> Outcome:
    """Raises SolutionMissing, SolutionVersionUnsupported, InvalidLead, CredentialsMissing, RetryLater."""
    lead = pipeline.lead(message, incoming=False)
    connection = pipeline.connection(lead.publisher_id, fresh=fresh)
    if fresh:
        pipeline.solution_cache.pop((lead.publisher_id, connection.fingerprint()))
        pipeline.solution_failures.pop((lead.publisher_id, connection.fingerprint()))
    solution_of(pipeline, lead.publisher_id, connection)
    return forward(lead, message, QUEUE_READY)


def solution_of(pipeline: Pipeline, publisher_id: str, connection: Connection) -> str:
    """The installed, supported solution version (cached). Raises SolutionMissing /
    SolutionVersionUnsupported.

    One query per publisher at a time: concurrent messages of a publisher whose result is not cached
    wait for the first one's answer instead of each asking the CRM (and, when it throttles, each
    sending into the penalty). When that query fails (CrmUnavailable: a CRM that hangs until the read
    timeout, resets or answers 5xx), the messages that waited for it fail with it instead of each
    waiting out a timeout of its own in turn; a message that comes later asks again.
    """
    key = (publisher_id, connection.fingerprint())
    found = pipeline.solution_cache.get(key)
    if found is None:
        # Only a failure met while this message waited is shared: one recorded before it came is not
        # its answer (a retry must ask the CRM again, or it would spend attempts on no request at all).
        before = pipeline.solution_failures.get(key)
        with pipeline.key_locks.lock(key):
            found = pipeline.solution_cache.get(key)
            failure = pipeline.solution_failures.get(key) if found is None else None
            if failure is not None and failure is not before:
                raise copy.copy(failure)
            if found is None:
                try:
                    version = pipeline.client(connection).solution_version(pipeline.settings.solution_name)
                except CrmUnavailable as exc:
                    pipeline.solution_failures.put(key, exc, SOLUTION_FAILURE_TTL)
                    raise
                found = SolutionFound(version)
                ttl = SOLUTION_TTL if found.version else SOLUTION_NEGATIVE_TTL
                pipeline.solution_cache.put(key, found, ttl)
    return require_supported(found.version, pipeline.settings)

"""The retry policy: when a transient failure is rescheduled, and when it gives up (architecture §5).

A message that failed transiently is sent again as a scheduled copy (``attempt + 1``) after
``BACKOFF_SCHEDULE[attempt - 1]`` seconds (±10 % jitter, so a burst of failures does not return as a
burst). The schedule spans about eight hours, long enough to ride out a CRM maintenance window or a
night-long outage, short enough that ops hear about it the same day. After the last step the
message is dead-lettered ``RetriesExhausted`` and can be replayed.

``Retry-After`` wins: a throttled request waits exactly as long as the CRM asked (never less —
sending during the penalty extends it), plus a little upward jitter so a throttled backlog does not
return in one burst.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Seconds to wait before attempt n+1, indexed by n-1 (attempt 1 failed → wait 5 s).
BACKOFF_SCHEDULE: tuple[float, ...] = (5, 15, 60, 300, 900, 1800, 3600, 7200, 14400)

#: Attempts a message gets in one stage before it is dead-lettered RetriesExhausted.
MAX_ATTEMPTS = len(BACKOFF_SCHEDULE) + 1

JITTER = 0.1
#: Upper bound of the upward jitter added to a Retry-After.
RETRY_AFTER_JITTER_MAX = 2.0


@dataclass(frozen=True)
class RetryDecision:
    """Either wait ``delay`` seconds and try again, or give up (``delay`` is None)."""

    delay: float | None

    @property
    def give_up(self) -> bool:
        return self.delay is None


def next_retry(
    attempt: int,
    retry_after: float | None = None,
    *,
    rand: Callable[[], float] = random.random,
    schedule: Sequence[float] = BACKOFF_SCHEDULE,
) -> RetryDecision:
    """Decide what happens after attempt number ``attempt`` (1-based) failed transiently.

    A message gets ``len(schedule) + 1`` attempts. ``rand`` returns a float in [0, 1); tests pin it
    to make the jitter deterministic.
    """
    schedule = schedule or BACKOFF_SCHEDULE
    if attempt > len(schedule):
        return RetryDecision(None)
    if retry_after is not None and retry_after > 0:
        return RetryDecision(retry_after + min(retry_after * JITTER, RETRY_AFTER_JITTER_MAX) * rand())
    base = schedule[attempt - 1]
    return RetryDecision(base * (1 - JITTER + 2 * JITTER * rand()))

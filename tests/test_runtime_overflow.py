"""What the embedded runtime does with a message its publisher has no room for: a penalty's hold is
waited out, a failing CRM follows the retry schedule, and a healthy but busy CRM is back-pressure —
put off for about as long as the backlog takes to drain, spending no retry attempt."""

from __future__ import annotations

from collections import deque

import pytest

from shared.runtime.embedded import MAX_OVERFLOW_DELAY, MIN_OVERFLOW_DELAY, StageWorker, _PublisherState
from shared.transport.base import ReceivedMessage

NOW = 1000.0


def _state(*, backlog: int, failing: bool = False, settled_per_second: float = 0.0) -> _PublisherState:
    state = _PublisherState(failing=failing)
    state.backlog = deque((ReceivedMessage.__new__(ReceivedMessage), NOW) for _ in range(backlog))
    count = int(settled_per_second * 10)
    state.finished.extend(NOW - 10 + 10 * (n + 1) / (count + 1) for n in range(count))
    return state


@pytest.mark.parametrize(
    ("state", "held_for", "not_sent", "delay"),
    [
        (_state(backlog=100), 30.0, True, 30.0),  # a penalty: wait it out, no attempt spent
        (_state(backlog=100, failing=True), 0.0, False, None),  # a failing CRM: the retry schedule
        (_state(backlog=100, settled_per_second=20.0), 0.0, True, 5.0),  # busy: drains in ~5 s
        (_state(backlog=100, settled_per_second=1000.0), 0.0, True, MIN_OVERFLOW_DELAY),
        (_state(backlog=5000, settled_per_second=1.0), 0.0, True, MAX_OVERFLOW_DELAY),
    ],
    ids=["penalty", "failing", "busy", "busy-fast", "busy-slow"],
)
def test_overflow_waits_out_a_penalty_retries_a_failing_crm_and_puts_off_a_busy_one_without_an_attempt(
    state: _PublisherState, held_for: float, not_sent: bool, delay: float | None
) -> None:
    outcome = StageWorker._overflow(state, held_for, NOW)

    assert outcome.not_sent is not_sent
    if delay is None:
        assert outcome.retry_after is None
    else:
        assert outcome.retry_after == pytest.approx(delay, rel=0.05)

"""The retry policy: a table of attempts, Retry-After and give-up points."""

from __future__ import annotations

import pytest

from shared.pipeline.retry import BACKOFF_SCHEDULE, MAX_ATTEMPTS, RETRY_AFTER_JITTER_MAX, next_retry


@pytest.mark.parametrize(
    ("attempt", "retry_after", "rand", "expected"),
    [
        (1, None, 0.5, BACKOFF_SCHEDULE[0]),
        (2, None, 0.5, BACKOFF_SCHEDULE[1]),
        (3, None, 0.5, BACKOFF_SCHEDULE[2]),
        (MAX_ATTEMPTS - 1, None, 0.5, BACKOFF_SCHEDULE[-1]),
        (1, None, 0.0, BACKOFF_SCHEDULE[0] * 0.9),
        (1, 30.0, 0.0, 30.0),
        (1, 30.0, 0.999999, 30.0 + RETRY_AFTER_JITTER_MAX * 0.999999),
        (4, 1.0, 0.5, 1.0 + 0.05),
        (2, 600.0, 1.0, 600.0 + RETRY_AFTER_JITTER_MAX),
    ],
)
def test_next_retry_follows_the_schedule_and_retry_after_wins(
    attempt: int, retry_after: float | None, rand: float, expected: float
) -> None:
    decision = next_retry(attempt, retry_after, rand=lambda: rand)
    assert not decision.give_up
    assert decision.delay == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [MAX_ATTEMPTS, MAX_ATTEMPTS + 1, 1000])
def test_next_retry_gives_up_once_the_schedule_is_spent(attempt: int) -> None:
    assert next_retry(attempt, rand=lambda: 0.5).give_up
    assert next_retry(attempt, 5.0, rand=lambda: 0.5).give_up


def test_retry_after_is_never_shortened_by_jitter() -> None:
    for rand in (0.0, 0.3, 0.99):
        delay = next_retry(1, 7.0, rand=lambda r=rand: r).delay
        assert delay is not None
        assert delay >= 7.0


def test_the_schedule_grows_and_spans_hours() -> None:
    assert list(BACKOFF_SCHEDULE) == sorted(BACKOFF_SCHEDULE)
    assert sum(BACKOFF_SCHEDULE) > 6 * 3600

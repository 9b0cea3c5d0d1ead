"""Client-side pacing (shared/crm/pacing.py): AIMD rate, concurrency cap and penalties as tables over a
hand-driven clock; then the pacer in the real client and runtime against the CRM simulator."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.crm.pacing import Decision, Pacer, PacingPolicy, Permit, RequestWindow, Wait, request_window_of
from shared.errors import ConfigurationError, CrmPaced, CrmThrottled
from shared.pipeline.outcomes import Delivered, Retry, outcome_for_error
from shared.pipeline.settle import Settled
from shared.runtime.embedded import EmbeddedRuntime
from shared.settings import Settings
from shared.simulator import CrmSimulator
from tests.fixtures.harness import lead_message, running

KEY = "https://contoso.crm4.dynamics.com|svc@contoso.example"
OTHER = "https://fabrikam.crm4.dynamics.com|svc@fabrikam.example"


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pacer(**policy: float) -> tuple[Pacer, Clock]:
    clock = Clock()
    return Pacer(PacingPolicy(**policy), clock=clock), clock  # type: ignore[arg-type]


def granted(decision: Decision) -> Permit:
    assert decision.permit is not None, f"expected a slot, got a wait of {decision.wait} s ({decision.reason})"
    return decision.permit


# --- decisions: rate, concurrency, penalty ---------------------------------------------------------


@pytest.mark.parametrize(
    ("burst", "steps", "expected"),
    [
        # (advance seconds before deciding) per request → granted or (reason, wait), at 10 req/s
        (1.0, [0.0], ["ok"]),
        (1.0, [0.0, 0.0], ["ok", (Wait.RATE, 0.1)]),
        (1.0, [0.0, 0.04], ["ok", (Wait.RATE, 0.06)]),
        (1.0, [0.0, 0.1], ["ok", "ok"]),
        (1.0, [0.0, 0.1, 0.0, 0.05], ["ok", "ok", (Wait.RATE, 0.1), (Wait.RATE, 0.05)]),
        # A bucket holds ``burst`` requests: a new key may send that many at once, and no more.
        (3.0, [0.0, 0.0, 0.0, 0.0], ["ok", "ok", "ok", (Wait.RATE, 0.1)]),
        # An idle key refills up to ``burst``, and no further.
        (3.0, [0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0], ["ok", "ok", "ok", "ok", "ok", "ok", (Wait.RATE, 0.1)]),
    ],
)
def test_requests_go_at_the_paced_rate_and_are_told_how_long_to_wait(
    burst: float, steps: list[float], expected: list[object]
) -> None:
    pacer, clock = make_pacer(initial_rate=10.0, burst=burst)
    for advance, want in zip(steps, expected, strict=True):
        clock.advance(advance)
        decision = pacer.decide(KEY)
        if want == "ok":
            assert decision.granted
        else:
            assert (decision.reason, decision.wait) == (want[0], pytest.approx(want[1]))  # type: ignore[index]
            assert not decision.granted


def test_the_concurrency_cap_holds_until_a_request_in_flight_ends() -> None:
    pacer, clock = make_pacer(initial_rate=1000.0, burst=10.0, max_concurrent=2)
    clock.advance(1.0)
    first, _second = granted(pacer.decide(KEY)), granted(pacer.decide(KEY))

    refused = pacer.decide(KEY)
    assert refused.reason == Wait.CONCURRENCY
    assert refused.wait == pytest.approx(pacer.policy.concurrency_wait)

    pacer.release(first, ok=True)
    assert pacer.decide(KEY).granted


def test_a_429_holds_the_crm_user_for_exactly_retry_after_then_lets_one_request_go() -> None:
    pacer, clock = make_pacer(initial_rate=10.0, burst=4.0)
    permit = granted(pacer.decide(KEY))
    pacer.release(permit, ok=False, retry_after=5.0)

    clock.advance(4.5)
    held = pacer.decide(KEY)
    assert held.reason == Wait.PENALTY
    assert held.wait == pytest.approx(0.5)
    clock.advance(0.5)
    assert pacer.decide(KEY).granted, "the first request goes the moment Retry-After has elapsed"
    assert pacer.decide(KEY).reason == Wait.RATE, "then evenly spaced, no burst"


def test_a_penalty_of_one_crm_user_leaves_another_alone() -> None:
    pacer, _ = make_pacer()
    pacer.release(granted(pacer.decide(KEY)), ok=False, retry_after=60.0)
    assert pacer.decide(KEY).reason == Wait.PENALTY
    assert pacer.decide(OTHER).granted


def test_a_penalty_learnt_elsewhere_holds_the_user_without_changing_its_rate() -> None:
    pacer, clock = make_pacer(initial_rate=10.0)
    pacer.penalties.penalise(KEY, 3.0)
    assert pacer.decide(KEY).reason == Wait.PENALTY
    assert pacer.snapshot(KEY).rate == 10.0
    clock.advance(3.0)
    assert pacer.decide(KEY).granted


# --- AIMD: additive increase, multiplicative decrease -----------------------------------------------


def _send_at_limit(pacer: Pacer, clock: Clock, *, ok: bool = True, retry_after: float | None = None) -> None:
    """One request that had to wait for its token (demand at the paced rate), then its answer."""
    decision = pacer.decide(KEY)
    if not decision.granted:
        clock.advance(decision.wait)
        decision = pacer.decide(KEY)
    permit = granted(decision)
    assert permit.at_limit
    pacer.release(permit, ok=ok, retry_after=retry_after)


@pytest.mark.parametrize(
    ("answers", "expected_rate"),
    [
        # Before any push-back each success adds ``increase`` (1 req/s).
        (["ok"], 11.0),
        (["ok"] * 5, 15.0),
        # A 429 halves the rate; afterwards each success adds increase / rate (≈ 1 req/s per second).
        (["ok", "ok", 429], 6.0),
        ([429, "ok"], 5.0 + 1 / 5.0),
        ([429, 429, 429, 429, 429, 429], 0.5),  # never below min_rate
        # A network failure or 5xx neither grows nor shrinks the rate.
        (["fail", "fail"], 10.0),
    ],
)
def test_the_rate_grows_additively_on_success_and_halves_on_a_429(answers: list[object], expected_rate: float) -> None:
    pacer, clock = make_pacer(initial_rate=10.0, min_rate=0.5, increase=1.0, burst=1.0)
    for answer in answers:
        if answer == 429:
            _send_at_limit(pacer, clock, ok=False, retry_after=1.0)
            clock.advance(1.0)
        else:
            _send_at_limit(pacer, clock, ok=answer == "ok")
    assert pacer.snapshot(KEY).rate == pytest.approx(expected_rate)


def test_the_rate_never_exceeds_its_maximum() -> None:
    pacer, clock = make_pacer(initial_rate=10.0, max_rate=12.0, burst=1.0)
    for _ in range(5):
        _send_at_limit(pacer, clock)
    assert pacer.snapshot(KEY).rate == 12.0


def test_requests_below_the_paced_rate_do_not_grow_it() -> None:
    pacer, clock = make_pacer(initial_rate=10.0, burst=8.0)
    for _ in range(20):
        clock.advance(1.0)  # one request a second: the bucket is full each time
        permit = granted(pacer.decide(KEY))
        assert not permit.at_limit
        pacer.release(permit, ok=True)
    assert pacer.snapshot(KEY).rate == 10.0


def test_a_429_inside_a_batch_pushes_back_like_one_on_the_request() -> None:
    pacer, clock = make_pacer(initial_rate=10.0)
    pacer.push_back(KEY, 2.0)
    snapshot = pacer.snapshot(KEY)
    assert (snapshot.rate, snapshot.pushed_back, snapshot.penalty_remaining) == (5.0, True, 2.0)
    clock.advance(2.0)
    assert pacer.decide(KEY).granted


@pytest.mark.parametrize(
    "policy",
    [
        {"initial_rate": 0.0},
        {"min_rate": 20.0, "initial_rate": 10.0},
        {"decrease": 1.0},
        {"decrease": 0.0},
        {"increase": -1.0},
        {"burst": 0.5},
        {"max_concurrent": 0},
        {"max_concurrent": 53},
        {"max_wait": -0.1},
    ],
)
def test_a_policy_that_cannot_work_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        PacingPolicy(**policy)  # type: ignore[arg-type]


# --- the request window a 429 names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Number of requests exceeded the limit of 6000 over time window of 300 seconds.", RequestWindow(6000, 300.0)),
        ("Number of requests exceeded the limit of 6,000 over time window of 300 seconds.", RequestWindow(6000, 300.0)),
        ("number of requests exceeded the limit of 300 over time window of 30 seconds", RequestWindow(300, 30.0)),
        (
            "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time "
            "window of 300 seconds. Decrease number of concurrent requests or reduce the duration of requests "
            "and try again later.",
            None,
        ),
        ("Number of concurrent requests exceeded the limit of 52.", None),
        ("Number of requests exceeded the limit of 0 over time window of 300 seconds.", None),
        ("Too Many Requests", None),
        ("", None),
        (None, None),
    ],
)
def test_the_request_limit_is_read_from_the_429_message_and_nothing_else_is(
    message: str | None, expected: RequestWindow | None
) -> None:
    assert request_window_of(message) == expected


def test_once_a_429_names_the_window_no_more_requests_go_than_it_allows() -> None:
    pacer, clock = make_pacer(initial_rate=1000.0, burst=1000.0, window_margin=0.5)
    for _ in range(4):
        pacer.release(granted(pacer.decide(KEY)), ok=True)
    refused = granted(pacer.decide(KEY))
    pacer.release(refused, ok=False, retry_after=1.0, window=RequestWindow(4, 10.0))
    clock.advance(1.0)

    held = pacer.decide(KEY)
    # Four requests count (the refused one does not): the oldest leaves the window 10.5 s after it went.
    assert held.reason == Wait.WINDOW
    assert held.wait == pytest.approx(9.5)
    clock.advance(9.5)
    assert pacer.decide(KEY).granted
    assert pacer.snapshot(KEY).window == RequestWindow(4, 10.0)


def test_429s_for_requests_in_flight_with_the_first_extend_the_penalty_but_halve_the_rate_once() -> None:
    pacer, clock = make_pacer(initial_rate=16.0, burst=8.0)
    permits = [granted(pacer.decide(KEY)) for _ in range(3)]
    pacer.release(permits[0], ok=False, retry_after=5.0)
    clock.advance(0.1)
    pacer.release(permits[1], ok=False, retry_after=5.0)
    pacer.release(permits[2], ok=False, retry_after=5.0)

    snapshot = pacer.snapshot(KEY)
    assert snapshot.rate == 8.0
    assert snapshot.penalty_remaining == pytest.approx(5.0)
    assert snapshot.in_flight_at_push_back == 2


# --- acquire: a short moment at most, then "not yet" ------------------------------------------------


def test_acquire_answers_not_yet_with_the_wait_instead_of_blocking() -> None:
    pacer, _ = make_pacer(initial_rate=2.0, burst=1.0)
    pacer.acquire(KEY, max_wait=0.0)
    with pytest.raises(CrmPaced) as paced:
        pacer.acquire(KEY, max_wait=0.0)
    assert paced.value.retry_after == pytest.approx(0.5)
    assert paced.value.wait == "rate"
    assert isinstance(paced.value, CrmThrottled), "callers that know only CrmThrottled still hold off"


def test_acquire_during_a_penalty_says_how_long_is_left() -> None:
    pacer, clock = make_pacer()
    pacer.release(pacer.acquire(KEY, max_wait=0.0), ok=False, retry_after=30.0)
    clock.advance(10.0)
    with pytest.raises(CrmPaced) as paced:
        pacer.acquire(KEY)
    assert paced.value.wait == "penalty"
    assert paced.value.retry_after == pytest.approx(20.0)


def test_acquire_waits_a_short_moment_for_a_slot_that_frees() -> None:
    # The real clock: the slot frees when another thread releases its permit.
    pacer = Pacer(PacingPolicy(initial_rate=1000.0, burst=10.0, max_concurrent=1, max_wait=30.0))
    first = pacer.acquire(KEY)
    releaser = threading.Timer(0.01, lambda: pacer.release(first, ok=True))
    releaser.start()
    second = pacer.acquire(KEY)
    releaser.join()
    assert second.key == KEY
    assert pacer.snapshot(KEY).in_flight == 1


def test_a_paced_error_becomes_a_retry_that_says_nothing_was_sent() -> None:
    outcome = outcome_for_error(CrmPaced("not sent: paced (rate) for 0.20 s", retry_after=0.2, wait="rate"))
    assert outcome == Retry("not sent: paced (rate) for 0.20 s", 0.2, not_sent=True)
    sent_and_refused = outcome_for_error(CrmThrottled("429", retry_after=3.0, status=429))
    assert isinstance(sent_and_refused, Retry)
    assert not sent_and_refused.not_sent


# --- the LEADWRITER_MAX_BATCH setting ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, 100), ("1", 1), ("250", 250), ("1000", 1000)])
def test_max_batch_is_a_setting_with_a_default(value: str | None, expected: int) -> None:
    env = {} if value is None else {"LEADWRITER_MAX_BATCH": value}
    assert Settings.from_env(env).max_batch == expected


@pytest.mark.parametrize("value", ["0", "1001", "-5", "many"])
def test_a_max_batch_outside_what_dataverse_takes_fails_at_start_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigurationError, match="LEADWRITER_MAX_BATCH"):
        Settings.from_env({"LEADWRITER_MAX_BATCH": value})


# --- in the runtime, against the simulator ----------------------------------------------------------


def _recorder() -> tuple[list[Settled], Callable[[Settled], None]]:
    seen: list[Settled] = []
    lock = threading.Lock()

    def observe(settled: Settled) -> None:
        with lock:
            seen.append(settled)

    return seen, observe


def test_paced_messages_wait_in_the_backlog_without_spending_an_attempt(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path, LEADWRITER_MAX_BATCH="1") as h:
        publisher = h.publisher()
        h.send([lead_message(publisher, n) for n in range(15)])
        seen, observe = _recorder()
        # Slow and strictly paced: most requests are told "not yet" at first.
        h.services.pipeline.pacer = Pacer(PacingPolicy(initial_rate=20.0, increase=0.0, burst=1.0, max_wait=0.0))
        h.runtime = EmbeddedRuntime(h.services.transport, h.services.pipeline, observer=observe).start()
        h.wait_for(lambda: len(h.written(publisher)) == 15)
        assert [s for s in seen if s.action == "rescheduled"] == []
        writes = [s for s in seen if s.stage == "write_lead"]
        assert len(writes) == 15
        assert all(isinstance(s.outcome, Delivered) for s in writes)
        log = simulator.requests(publisher)
        assert log.lead_writes == 15, "one request per lead: paced messages were never sent twice"
        assert log.throttled == 0


def test_a_penalty_holds_the_publisher_and_nothing_reaches_its_crm_until_it_ends(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        publisher, other = h.publisher(), h.publisher()
        simulator.faults(publisher).throttle_next(1, retry_after=2)
        h.send([lead_message(p, n) for n in range(10) for p in (publisher, other)])
        seen, observe = _recorder()
        h.runtime = EmbeddedRuntime(h.services.transport, h.services.pipeline, observer=observe).start()
        h.wait_for(lambda: len(h.written(publisher)) == 10 and len(h.written(other)) == 10, timeout=60)
        log = simulator.requests(publisher)
        assert (log.throttled, log.during_penalty) == (1, 0)
        rescheduled = [s for s in seen if s.action == "rescheduled"]
        assert len(rescheduled) <= 1, "only the request the CRM refused is rescheduled; the rest waited"
        assert h.dead_letters() == []


def test_the_write_stage_never_batches_more_than_max_batch(simulator: CrmSimulator, tmp_path: Path) -> None:
    with running(simulator, tmp_path, LEADWRITER_MAX_BATCH="4") as h:
        publisher = h.publisher()
        h.send([lead_message(publisher, n) for n in range(30)])
        h.start()
        h.wait_for(lambda: len(h.written(publisher)) == 30)
        log = simulator.requests(publisher)
        assert log.create_multiple_targets + log.batch_operations + log.lead_writes == 30
        assert log.create_multiple + log.batches >= 30 // 4
        assert log.create_multiple_targets <= 4 * log.create_multiple

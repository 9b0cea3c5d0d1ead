"""Pacing for whichever limit binds (shared/crm/pacing.py): the execution-time window, the concurrency
limit and the server's x-ms-dop-hint, as tables over a hand-driven clock; then learnt by the real
client from the simulator over real sockets."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared.crm import DataverseClient, LeadWrite, TokenProvider
from shared.crm.pacing import (
    ConcurrencyLimit,
    ExecutionWindow,
    Pacer,
    PacingPolicy,
    RequestWindow,
    Wait,
    dop_hint_of,
    limit_of,
)
from shared.errors import CrmThrottled
from shared.simulator import CrmSimulator
from shared.simulator.limits import ExecutionModel
from tests.fixtures.simulator import SIM_CLIENT_ID, SIM_CLIENT_SECRET, simulator_settings
from tests.test_create_multiple import connection
from tests.test_pacing import KEY, Clock, granted

# --- what a 429 names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            RequestWindow(6000, 300.0),
        ),
        (
            "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time "
            "window of 300 seconds. Decrease number of concurrent requests or reduce the duration of requests "
            "and try again later.",
            ExecutionWindow(1_200_000.0, 300.0),
        ),
        (
            "Combined execution time of incoming requests exceeded limit of 2500 milliseconds over time window "
            "of 30 seconds.",
            ExecutionWindow(2500.0, 30.0),
        ),
        ("Number of concurrent requests exceeded the limit of 52.", ConcurrencyLimit(52)),
        ("Combined execution time of incoming requests exceeded limit of 0 milliseconds over time window "
         "of 30 seconds.", None),
        ("Number of concurrent requests exceeded the limit of 0.", None),
        ("Too many requests.", None),
        (None, None),
    ],
)
def test_a_429_message_names_the_limit_it_enforces(message: str | None, expected: object) -> None:
    assert limit_of(message) == expected


@pytest.mark.parametrize(
    ("header", "expected"), [("8", 8), (" 4 ", 4), ("1", 1), ("0", None), ("-2", None), ("many", None), (None, None)]
)
def test_the_dop_hint_header_is_a_positive_parallelism(header: str | None, expected: int | None) -> None:
    assert dop_hint_of(header) == expected


# --- the execution-time window -----------------------------------------------------------------------


def exec_pacer(**policy: float) -> tuple[Pacer, Clock]:
    """A pacer whose rate never binds, with a learnt budget of 1,000 ms per 10 s spent to the full."""
    clock = Clock()
    settings = {"initial_rate": 2000.0, "max_rate": 2000.0, "burst": 1000.0, "execution_share": 1.0,
                "window_margin": 0.0, **policy}
    pacer = Pacer(PacingPolicy(**settings), clock=clock)  # type: ignore[arg-type]
    pacer.push_back(KEY, 0.0, ExecutionWindow(1000.0, 10.0))
    return pacer, clock


# Each step: ("send", cost) sends one request that ends after costing ``cost`` s of execution time,
# ("hold",) takes a slot and keeps it in flight, ("wait", s) moves the clock; expected: after the
# steps, the next decision — "ok", or (reason, wait).
@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], "ok"),
        ([("send", 0.4)], "ok"),
        # 0.4 + 0.4 spent, and the next one would cost about 0.4 more: over 1 s until the first leaves.
        ([("send", 0.4), ("wait", 2.0), ("send", 0.4)], (Wait.EXECUTION, 8.0)),
        ([("send", 0.4), ("wait", 2.0), ("send", 0.4), ("wait", 8.0)], "ok"),
        ([("send", 0.3), ("send", 0.3), ("send", 0.3)], (Wait.EXECUTION, 10.0)),
        # Requests in flight are counted at the dearest recent cost.
        ([("send", 0.3), ("hold",)], "ok"),
        ([("send", 0.3), ("hold",), ("hold",)], (Wait.EXECUTION, 10.0)),
        ([("send", 0.1), ("send", 0.4), ("hold",)], (Wait.EXECUTION, 10.0)),
        ([("send", 0.1), ("send", 0.1), ("hold",), ("hold",)], "ok"),
        # A read's duration is the network's share of every later one: 0.45 s less 0.05 s costs 0.4 s.
        ([("read", 0.05), ("send", 0.45), ("wait", 2.0), ("send", 0.45)], (Wait.EXECUTION, 8.0)),
        ([("read", 0.05), ("send", 0.3), ("send", 0.3)], "ok"),
        # Cheap requests (CreateMultiple) fit many more into the same budget.
        ([("send", 0.05)] * 19, "ok"),
        ([("send", 0.05)] * 20, (Wait.EXECUTION, 10.0)),
    ],
)
def test_requests_keep_inside_the_learnt_execution_time_budget(
    steps: list[tuple[object, ...]], expected: object
) -> None:
    pacer, clock = exec_pacer()
    for step in steps:
        if step[0] in ("send", "read"):
            permit = granted(pacer.decide(KEY))
            clock.advance(0.002)
            pacer.release(permit, ok=True, cost=float(step[1]), floor_sample=step[0] == "read")  # type: ignore[arg-type]
        elif step[0] == "hold":
            granted(pacer.decide(KEY))
            clock.advance(0.002)
        else:
            clock.advance(float(step[1]))  # type: ignore[arg-type]

    decision = pacer.decide(KEY)

    if expected == "ok":
        granted(decision)
    else:
        reason, wait = expected  # type: ignore[misc]
        assert (decision.reason, decision.wait) == (reason, pytest.approx(wait, abs=0.05))


def test_costs_before_the_window_is_learnt_do_not_hold_requests_back() -> None:
    clock = Clock()
    pacer = Pacer(PacingPolicy(initial_rate=2000.0, max_rate=2000.0, burst=1000.0), clock=clock)
    for _ in range(50):
        permit = granted(pacer.decide(KEY))
        pacer.release(permit, ok=True, cost=1.0)

    granted(pacer.decide(KEY))
    assert pacer.snapshot(KEY).execution_spent == pytest.approx(50.0)


def test_a_refused_request_costs_nothing_and_teaches_the_execution_window() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    permit = granted(pacer.decide(KEY))

    pacer.release(permit, ok=False, retry_after=2.0, window=ExecutionWindow(5000.0, 60.0), cost=3.0)

    snapshot = pacer.snapshot(KEY)
    assert snapshot.execution == ExecutionWindow(5000.0, 60.0)
    assert snapshot.execution_spent == 0.0
    assert snapshot.penalty_remaining == pytest.approx(2.0)


def test_each_execution_push_back_after_the_window_is_known_widens_the_margin() -> None:
    pacer, clock = exec_pacer()  # learnt once: the full budget (a share of 1.0 here)
    spent = 0
    for _ in range(3):
        while (decision := pacer.decide(KEY)).granted:
            assert decision.permit is not None
            clock.advance(0.01)
            pacer.release(decision.permit, ok=True, cost=0.01)
            spent += 1
        clock.advance(11.0)
        permit = granted(pacer.decide(KEY))
        pacer.release(permit, ok=False, retry_after=0.0, window=ExecutionWindow(1000.0, 10.0))
        clock.advance(11.0)

    allowed = 0
    while (decision := pacer.decide(KEY)).granted:
        assert decision.permit is not None
        clock.advance(0.01)
        pacer.release(decision.permit, ok=True, cost=0.01)
        allowed += 1

    assert allowed == pytest.approx(100 * 0.95**3, abs=1.5)


def test_room_says_how_long_until_the_execution_budget_frees() -> None:
    pacer, _clock = exec_pacer()
    permit = granted(pacer.decide(KEY))
    pacer.release(permit, ok=True, cost=0.9)

    wait, room = pacer.room(KEY)

    assert (room, wait) == (0, pytest.approx(10.0, abs=0.01))


# --- the concurrency limit and the dop hint -------------------------------------------------------------


@pytest.mark.parametrize(
    ("learnt", "dop_hint", "honour", "cap"),
    [
        (None, None, True, 48),
        (ConcurrencyLimit(10), None, True, 10),
        (None, 4, True, 4),
        (ConcurrencyLimit(10), 4, True, 4),
        (ConcurrencyLimit(3), 8, True, 3),
        (None, 4, False, 48),
        (None, 200, True, 48),
    ],
)
def test_requests_in_flight_stay_under_the_lowest_of_the_policy_the_learnt_limit_and_the_dop_hint(
    learnt: ConcurrencyLimit | None, dop_hint: int | None, honour: bool, cap: int
) -> None:
    clock = Clock()
    pacer = Pacer(
        PacingPolicy(initial_rate=2000.0, max_rate=2000.0, burst=1000.0, honour_dop_hint=honour), clock=clock
    )
    first = granted(pacer.decide(KEY))
    if learnt is not None:
        pacer.release(first, ok=False, retry_after=0.0, window=learnt, dop_hint=dop_hint)
    else:
        pacer.release(first, ok=True, dop_hint=dop_hint)
    clock.advance(1.0)

    held = 0
    while (decision := pacer.decide(KEY)).granted:
        held += 1
        clock.advance(0.001)
        assert held <= 100

    assert held == cap
    assert decision.reason == Wait.CONCURRENCY
    assert pacer.snapshot(KEY).concurrency_cap == cap


# --- learnt from the simulator by the real client ------------------------------------------------------


def test_the_client_learns_the_execution_window_and_the_dop_hint_from_the_crm(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    name = f"execpace-{uuid.uuid4().hex[:6]}"
    org = simulator.add_org(
        name,
        execution_seconds_per_window=0.05,
        window_seconds=30,
        execution=ExecutionModel(create_multiple_ms=40),
        dop_hint=3,
    )
    simulator.add_app(name, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    settings = simulator_settings(simulator, tmp_path)
    pacer = Pacer()
    client = DataverseClient(connection(org), settings, tokens=TokenProvider(settings), pacer=pacer)
    leads = [LeadWrite(uuid.uuid4(), {"lastname": f"L{n}"}) for n in range(4)]

    client.create_many(leads[:2])
    with pytest.raises(CrmThrottled):
        client.create_many(leads[2:])

    snapshot = pacer.snapshot(client.throttle_key)
    assert snapshot.execution == ExecutionWindow(50.0, 30.0)
    assert snapshot.concurrency_cap == 3
    assert snapshot.execution_spent >= 0.08, "the request's own duration is its cost"
    assert len(simulator.leads(name)) == 2

"""The one record of 429 penalties: shared through its store, immune to wall-clock steps, best effort."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.crm.pacing import Pacer, Wait
from shared.crm.penalties import MAX_KEYS, FilePenaltyStore, Penalties

KEY = "https://contoso.crm4.dynamics.com|app"


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_a_penalty_recorded_by_one_process_holds_another_that_shares_the_data_dir(tmp_path: Path) -> None:
    mono, wall = Clock(), Clock(1_800_000_000.0)
    first = Penalties(FilePenaltyStore(tmp_path / "penalties.json", wall=wall), clock=mono, wall=wall)
    second = Penalties(FilePenaltyStore(tmp_path / "penalties.json", wall=wall), clock=mono, wall=wall)

    first.penalise(KEY, 30)

    assert second.remaining(KEY) == pytest.approx(30)
    mono.now += 10
    wall.now += 10
    assert second.remaining(KEY) == pytest.approx(20)


def test_a_restarted_process_finds_the_penalty_in_the_data_dir(tmp_path: Path) -> None:
    wall = Clock(1_800_000_000.0)
    Penalties(FilePenaltyStore(tmp_path / "penalties.json", wall=wall), clock=Clock(), wall=wall).penalise(KEY, 30)
    wall.now += 5

    restarted = Penalties(FilePenaltyStore(tmp_path / "penalties.json", wall=wall), clock=Clock(5.0), wall=wall)

    assert restarted.remaining(KEY) == pytest.approx(25)


@pytest.mark.parametrize("step", [-3600.0, 3600.0, 86_400.0])
def test_a_wall_clock_step_neither_cuts_a_penalty_short_nor_stretches_it(tmp_path: Path, step: float) -> None:
    mono, wall = Clock(), Clock(1_800_000_000.0)
    penalties = Penalties(FilePenaltyStore(tmp_path / "penalties.json", wall=wall), clock=mono, wall=wall)
    penalties.penalise(KEY, 30)

    wall.now += step
    mono.now += 10

    assert penalties.remaining(KEY) == pytest.approx(20)


def test_a_store_that_fails_leaves_this_process_penalised() -> None:
    class Broken:
        refresh_interval = 0.0

        def read(self, key: str) -> float | None:
            raise OSError("unreachable")

        def extend(self, key: str, until: float) -> None:
            raise OSError("unreachable")

    penalties = Penalties(Broken(), clock=Clock(), wall=Clock())
    penalties.penalise(KEY, 30)

    assert penalties.remaining(KEY) == pytest.approx(30)
    assert penalties.remaining("another|user") == 0


def test_the_pacer_grants_nothing_inside_a_penalty_it_learnt_from_the_shared_record(tmp_path: Path) -> None:
    mono, wall = Clock(), Clock(1_800_000_000.0)
    shared = FilePenaltyStore(tmp_path / "penalties.json", wall=wall)
    Penalties(shared, clock=mono, wall=wall).penalise(KEY, 12)
    pacer = Pacer(
        penalties=Penalties(FilePenaltyStore(tmp_path / "penalties.json", wall=wall), clock=mono, wall=wall), clock=mono
    )

    assert pacer.penalty_remaining(KEY) == pytest.approx(12)
    decision = pacer.decide(KEY)

    assert decision.permit is None
    assert decision.reason is Wait.PENALTY


def test_penalties_of_many_crm_users_stay_bounded() -> None:
    clock = Clock()
    penalties = Penalties(clock=clock, wall=clock)
    for n in range(MAX_KEYS + 50):
        penalties.penalise(f"https://org{n}.crm.dynamics.com|user", 60 + n)

    assert len(penalties._until) == MAX_KEYS
    assert penalties.remaining(f"https://org{MAX_KEYS + 49}.crm.dynamics.com|user") > 0


def test_a_request_window_one_instance_learnt_from_a_429_is_kept_by_another_from_its_first_request(
    tmp_path: Path,
) -> None:
    from shared.crm.pacing import RequestWindow
    from shared.crm.penalties import StatePenaltyStore
    from shared.state import EmbeddedStateStore

    state = EmbeddedStateStore(tmp_path / "state.db")
    clock = Clock()
    first = Pacer(
        penalties=Penalties(StatePenaltyStore(state, refresh_interval=0.0), clock=clock, wall=clock), clock=clock
    )
    second = Pacer(
        penalties=Penalties(StatePenaltyStore(state, refresh_interval=0.0), clock=clock, wall=clock), clock=clock
    )
    permit = first.decide(KEY).permit
    assert permit is not None
    first.release(permit, ok=False, retry_after=1.0, window=RequestWindow(limit=3, seconds=60))
    clock.now += 2

    assert second.penalty_remaining(KEY) == 0  # the penalty is over; what the 429 taught is not
    granted = [second.decide(KEY).permit is not None for _ in range(5)]

    assert second.snapshot(KEY).window == RequestWindow(limit=3, seconds=60)
    assert granted.count(True) <= 3
    state.close()

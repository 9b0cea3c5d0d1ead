"""The ``publishers`` bench scenario in miniature: many publishers, some of whose CRMs throttle or
hang. Correctness only — every healthy lead written exactly once, nothing lost, nothing sent into a
known penalty; no timing assertions (the figures are in BENCHMARKS.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shared.tools.bench import SCENARIOS, run_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    small = replace(
        SCENARIOS["publishers"],
        leads=60,
        publishers=12,
        throttled_publishers=1,
        hung_publishers=1,
        in_flight_leads=240,
        latency=0.0,
        read_timeout=1.0,
    )
    return run_scenario(small)


def test_every_healthy_lead_is_written_exactly_once_in_every_run(report: dict[str, object]) -> None:
    runs = report["runs"]
    assert isinstance(runs, dict)
    assert set(runs) == {"in_flight", "calm", "alone", "faulty"}
    for name, run in runs.items():
        assert run["awaited_delivered"] == run["awaited_leads"] > 0, name
        assert run["delivered_twice"] == 0, name


def test_no_lead_is_lost_each_is_written_waiting_in_the_broker_or_dead_lettered(report: dict[str, object]) -> None:
    runs = report["runs"]
    assert isinstance(runs, dict)
    for name, run in runs.items():
        assert run["lost"] == 0, name
        assert run["written"] + run["in_broker"] + run["dead_lettered"] == run["leads"], name
    calm = runs["calm"]
    assert calm["written"] == calm["leads"], "with no faulty CRM every lead is written"


def test_the_faulty_publishers_leads_wait_and_nothing_is_sent_into_a_known_penalty(report: dict[str, object]) -> None:
    pubs = report["publishers"]
    assert isinstance(pubs, dict)
    for run in ("in_flight", "faulty"):
        faulty = pubs["faulty_orgs"][run]
        # Each message carries the run's figures, so a failure under load says which count moved.
        assert faulty["throttled_429s"] == 1, f"one request meets the 429, the rest wait: {run} {faulty}"
        assert faulty["throttled_during_penalty"] == 0, f"{run} {faulty}"
        assert faulty["hung_requests"] >= 1, f"{run} {faulty}"
    faulty_run = report["runs"]["faulty"]  # type: ignore[index]
    assert faulty_run["in_broker"] + faulty_run["dead_lettered"] == 2 * 5, f"faulty leads kept: {faulty_run}"


def test_the_report_names_every_target_with_a_measured_figure(report: dict[str, object]) -> None:
    targets = report["targets"]
    assert isinstance(targets, list)
    assert {t["name"] for t in targets} >= {
        "healthy publishers' throughput vs all calm",
        "healthy publishers' throughput vs them alone",
        "requests to the throttled CRMs during their penalty",
        "leads lost (every run)",
    }
    assert all(t["measured"] is not None for t in targets)

"""``leadwriter bench`` in miniature: correctness only (every lead delivered, figures present and sane).

No timing assertions: machines are shared and noisy; the figures themselves are in BENCHMARKS.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from typer.testing import CliRunner

from shared.tools.bench import SCENARIOS, run_bench, run_scenario
from shared.tools.cli import app

pytestmark = pytest.mark.slow

FIGURES = (
    "leads_per_second",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_p99",
    "crm_requests_per_lead",
    "token_requests_per_lead",
    "secret_reads_per_lead",
    "cpu_ms_per_lead",
    "peak_rss_mb",
    "requests_during_penalty",
    "throttled",
)


def _assert_sane(figures: dict[str, Any], *, max_crm_requests_per_lead: float) -> None:
    for name in FIGURES:
        assert isinstance(figures[name], int | float), name
    assert figures["leads_per_second"] > 0
    assert 0 <= figures["latency_ms_p50"] <= figures["latency_ms_p95"] <= figures["latency_ms_p99"]
    assert 0 < figures["crm_requests_per_lead"] <= max_crm_requests_per_lead
    assert 0 < figures["token_requests_per_lead"] <= 1
    assert 0 < figures["secret_reads_per_lead"] <= 1
    assert figures["cpu_ms_per_lead"] > 0
    assert figures["peak_rss_mb"] > 0
    assert figures["requests_during_penalty"] == 0
    assert figures["throttled"] == 0


def test_a_small_bench_delivers_every_lead_and_prints_every_figure_as_json() -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--leads",
            "60",
            "--publishers",
            "2",
            "--latency",
            "0",
            "--naive-leads",
            "5",
            "--max-batch",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    assert report["scenario"] == "throughput"
    assert report["config"] | {"leads": 60, "publishers": 2, "crmLatencyMs": 0.0, "maxBatch": 1} == report["config"]
    ours, naive = report["leadwriter"], report["naive"]
    assert ours["delivered"] == ours["leads"] == 60
    assert set(ours["per_publisher_leads_per_second"]) == {"bench00", "bench01"}
    _assert_sane(ours, max_crm_requests_per_lead=1.05)
    assert naive["delivered"] == 5
    assert naive["crm_requests_per_lead"] == 2.0, "the naive deliverer checks the solution and creates, per lead"
    assert naive["token_requests_per_lead"] == 1.0
    assert report["speedup"] > 0
    assert {t["name"] for t in report["targets"]} >= {"CRM requests per lead (batching)"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])


def test_with_one_publisher_throttled_the_others_are_delivered_and_nothing_is_sent_into_its_penalty() -> None:
    scenario = SCENARIOS["isolation"]
    small = replace(scenario, leads=60, publishers=3, latency=0.0)

    report = run_scenario(small)

    iso = report["isolation"]
    assert report["unthrottled"]["delivered"] == 40, "the two others alone"
    assert report["leadwriter"]["delivered"] == 40, "the two others beside the throttled one, which waits"
    assert iso["throttled_org"]["throttled"] == 1
    assert iso["throttled_org"]["during_penalty"] == 0
    assert iso["throttled_org"]["requests"] == 1, "one request met the 429; the rest wait out the penalty"
    assert iso["ratio"] is not None
    assert iso["ratio"] > 0


def test_an_unknown_scenario_is_refused() -> None:
    assert run_bench(scenario="nonsense") == 2


def test_the_heal_scenario_reports_heal_to_last_lead_delivered() -> None:
    small = replace(SCENARIOS["heal"], leads=20, latency=0.0)

    report = run_scenario(small)

    ours = report["leadwriter"]
    assert ours["delivered"] == ours["leads"] == 21, "the waiting leads and the one that showed the heal"
    assert ours["waiting_for_retry_at_heal"] == 20
    assert ours["next_slot_seconds_at_heal"] >= small.heal_after_slot
    assert ours["heal_to_last_delivered_seconds"] is not None
    assert ours["heal_to_last_delivered_seconds"] < ours["next_slot_seconds_at_heal"], "not at their slots"
    assert ours["requests_during_penalty"] == 0
    assert {t["name"] for t in report["targets"]} == {
        "heal → last lead delivered (s)",
        "requests to the CRM during a penalty",
    }


def test_the_execution_scenario_delivers_every_lead_once_on_both_write_paths() -> None:
    small = replace(
        SCENARIOS["execution"], leads=120, window_seconds=3.0, execution_seconds_per_window=0.3, latency=0.0
    )

    report = run_scenario(small)

    bulk, batch = report["leadwriter"], report["batch_path"]
    assert bulk["delivered"] == batch["delivered"] == 120, "every lead, once, on each path"
    paths = report["execution"]
    for path in ("create_multiple", "batch"):
        assert paths[path]["execution_ms_per_lead"] > 0
        assert paths[path]["sent_into_known_penalty"] == 0
    assert bulk["crm_requests_per_lead"] < 0.2, "the CreateMultiple path sends a group per request"
    assert {t["name"] for t in report["targets"]} >= {"sustained share of the execution budget ($batch)"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])

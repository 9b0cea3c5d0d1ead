"""``leadwriter bench --scenario endtoend`` in miniature: the real ``serve`` and ``enqueue`` processes
and the HTTP ingest endpoint deliver every lead exactly once, and every figure is there.

No timing assertions: machines are shared and noisy; the figures themselves are in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from shared.tools.bench import SCENARIOS, run_scenario

pytestmark = pytest.mark.slow


def test_both_entry_points_store_every_lead_once_and_leave_nothing_behind() -> None:
    small = replace(SCENARIOS["endtoend"], leads=60, naive_leads=5, latency=0.0)

    report = run_scenario(small)

    paths = report["endtoend"]
    assert set(paths) == {"enqueue", "http"}
    for name, run in (("enqueue", report["leadwriter"]), ("http", report["http_path"])):
        path = paths[name]
        assert run["delivered"] == run["leads"] == 60, name
        assert path["stored_once"], f"{name}: each lead in the CRM exactly once"
        assert (path["missing"], path["unexpected"]) == (0, 0), name
        assert (path["left_in_queues"], path["dead_lettered"]) == (0, 0), f"{name}: nothing left or dead-lettered"
        assert path["serve_exit_status"] == 0, f"{name}: serve stopped gracefully on SIGTERM"
        assert run["cpu_ms_per_lead"] > 0
        assert run["peak_rss_mb"] > 0
        assert 0 < run["token_requests_per_lead"] <= 1
        assert 0 < run["secret_reads_per_lead"] <= 1
        assert run["requests_during_penalty"] == run["throttled"] == 0
        assert path["speedup"] is not None
    assert paths["http"]["answers"] == {"202": 60}
    assert report["naive"]["delivered"] == 5
    assert {t["name"] for t in report["targets"]} == {
        "end to end via enqueue: speed-up over naive (x)",
        "end to end via HTTP ingest: speed-up over naive (x)",
        "end to end: each lead stored once, none left",
    }
    assert next(t for t in report["targets"] if "stored once" in t["name"])["met"]

"""The ``publishers`` bench scenario: many publishers, some of whose CRMs throttle or hang.

Scale of publishers: 200 publishers, 20 of whose CRMs misbehave — half answer their
first request 429 with a long ``Retry-After``, half accept connections and never answer (the
simulator's ``hang_all``; the client's read timeout bounds each request). Four runs, each with a
fresh Lead Writer (data dir) against one simulator in a child process:

1. **in flight**: ``in_flight_leads`` (50,000) enqueued at once over the 180 healthy and 20 faulty
   publishers; the process's peak RSS while the healthy ones' leads are delivered. It runs first, so
   no earlier run's heap is in the figure; the peak is reset at its start where Linux allows.
2. **calm**: the healthy 180 and 20 other publishers, none faulty (the same 200 in shape: the faulty
   ones of runs 1 and 4 keep their simulator penalty, so they cannot serve as calm ones).
3. **alone**: the healthy 180 only.
4. **faulty**: the healthy 180 and 20 fresh faulty publishers.

Compared: the healthy 180's leads/s in run 4 against runs 2 and 3, their enqueue→written p95 and
max, and what reached the faulty CRMs (requests, 429s, arrivals inside a penalty). Every run also
accounts for every lead: written to the CRM (once — the simulator keeps records by id), still in
the broker (active or scheduled, on any stage queue), or dead-lettered; ``lost`` is what is none of
these and must be 0.

The producer here is lean on purpose (leads made as they are sent, per-lead figures in arrays), so
that the peak RSS is Lead Writer's, not the bench's.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.names import PROP_LEAD_ID, PROP_PUBLISHER_ID, QUEUE_INCOMING, STAGE_QUEUES
from shared.pipeline.messages import envelope
from shared.pipeline.outcomes import SettleAction, Stage
from shared.pipeline.settle import Settled
from shared.runtime.embedded import EmbeddedRuntime
from shared.services import Services
from shared.settings import Settings
from shared.tools.bench import _cpu_seconds, _message, _percentile, _ratio
from shared.transport.embedded import EmbeddedBroker

if TYPE_CHECKING:
    from shared.tools.bench import Scenario, SimulatorProcess

#: Leads sent to the broker per transaction.
SEND_BATCH = 500
#: Seconds a hung CRM takes to answer: far beyond any run (the client times out first).
HANG_SECONDS = 3600.0


@dataclass
class PublishersRun:
    """One run's figures. ``leads_per_second``, the latencies and ``peak_rss_mb`` are for the run
    (the latencies and throughput over the awaited — healthy — publishers' leads)."""

    publishers: int
    leads: int
    awaited_leads: int
    awaited_delivered: int
    delivered: int
    seconds: float
    leads_per_second: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_max: float
    crm_requests_per_lead: float
    cpu_ms_per_lead: float
    peak_rss_mb: float
    #: Where every lead is after the run (each publisher's own sum must be its leads).
    written: int = 0
    in_broker: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    #: Settlements seen as delivered more than once for one lead (a repeat write answered "already there").
    delivered_twice: int = 0
    #: The slowest healthy publisher's leads/s, and the spread across the healthy ones.
    slowest_publisher_leads_per_second: float = 0.0
    #: What the faulty CRMs saw during the run: requests, 429s, arrivals inside a penalty.
    faulty: dict[str, dict[str, int]] = field(default_factory=dict)


def _peak_reset() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    """The peak RSS since the last reset (VmHWM), or over the process's life (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _lead_id(publisher: str, tag: str, n: int) -> str:
    return f"{publisher}-{tag}{n:07d}"


def run_publishers_once(
    sim: SimulatorProcess,
    publishers: list[str],
    leads: int,
    *,
    awaited: set[str],
    data_dir: Path,
    tag: str,
    concurrency: int = 16,
    publisher_concurrency: int = 8,
    read_timeout: float | None = None,
    timeout: float = 900.0,
    status: Any = None,
) -> PublishersRun:
    """Enqueue ``leads`` at once, round robin over ``publishers``; run Lead Writer until every lead
    of the ``awaited`` publishers is delivered (or ``timeout``); then account for every lead.
    Raises ConfigurationError for a bad setting."""
    env = {
        "LEADWRITER_DATA_DIR": str(data_dir),
        "LEADWRITER_CRM_ALLOWED_HOSTS": f"{sim.info.host}:*",
        "AZURE_AUTHORITY_HOST": sim.info.authority_host,
        "REQUESTS_CA_BUNDLE": sim.info.ca_path,
        "LEADWRITER_LOG_LEVEL": "WARNING",
    }
    if read_timeout is not None:
        env["LEADWRITER_CRM_READ_TIMEOUT"] = str(read_timeout)
    services = Services.from_settings(Settings.from_env(env))
    transport = services.transport
    assert isinstance(transport, EmbeddedBroker), "the bench runs on the embedded broker"
    for publisher in publishers:
        services.connections.put(publisher, sim.connection(publisher))
    index = {p: i for i, p in enumerate(publishers)}
    logs_before = {p: sim.request_log(p) for p in publishers}
    leads_before = {p: sim.leads(p) for p in publishers}
    count = len(publishers)
    expected = sum(1 for n in range(leads) if publishers[n % count] in awaited)
    # Per lead (by its number): when it was sent, when first delivered, how often delivered.
    sent_at = array("d", bytes(8 * leads))
    delivered_at = array("d", bytes(8 * leads))
    deliveries = bytearray(leads)
    prefix = len(tag)
    state = {"awaited_done": 0, "delivered": 0, "twice": 0}
    done = threading.Event()
    lock = threading.Lock()

    def observe(settled: Settled) -> None:
        if settled.stage is not Stage.WRITE_LEAD or settled.action is not SettleAction.DELIVERED:
            return
        props = settled.message.application_properties
        publisher = str(props.get(PROP_PUBLISHER_ID))
        lead_id = str(props.get(PROP_LEAD_ID))
        n = int(lead_id[len(publisher) + 1 + prefix :])
        with lock:
            if deliveries[n]:
                state["twice"] += 1
                deliveries[n] = min(255, deliveries[n] + 1)
                return
            deliveries[n] = 1
            delivered_at[n] = time.monotonic()
            state["delivered"] += 1
            if publisher in awaited:
                state["awaited_done"] += 1
                if state["awaited_done"] >= expected:
                    done.set()

    def produce() -> Iterator[list[Any]]:
        batch = []
        for n in range(leads):
            publisher = publishers[n % count]
            lead_id = _lead_id(publisher, tag, n)
            body = json.dumps({**_message(publisher, n), "leadId": lead_id}).encode()
            batch.append(envelope(body, publisher_id=publisher, lead_id=lead_id))
            if len(batch) == SEND_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    crm_before = sum(int(log["total"]) for log in logs_before.values())
    _peak_reset()
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    runtime = EmbeddedRuntime(
        transport,
        services.pipeline,
        concurrency=concurrency,
        publisher_concurrency=publisher_concurrency,
        observer=observe,
    ).start()
    try:
        sent = 0
        for batch in produce():
            now = time.monotonic()
            transport.send(QUEUE_INCOMING, batch)
            for k in range(sent, sent + len(batch)):
                sent_at[k] = now
            sent += len(batch)
        deadline = started + timeout
        next_status = started + 10.0
        while not done.wait(0.5) and time.monotonic() < deadline:
            if status is not None and time.monotonic() >= next_status:
                next_status += 10.0
                with lock:
                    status(f"  … {state['awaited_done']} of {expected} awaited leads delivered")
        peak = _peak_rss_mb()
    finally:
        runtime.stop()
    cpu = _cpu_seconds() - cpu_before
    with lock:
        finished = [delivered_at[n] for n in range(leads) if deliveries[n] and publishers[n % count] in awaited]
        latencies = [
            (delivered_at[n] - sent_at[n]) * 1000
            for n in range(leads)
            if deliveries[n] and publishers[n % count] in awaited
        ]
        per_publisher_last: dict[str, float] = {}
        per_publisher_count: dict[str, int] = {}
        for n in range(leads):
            publisher = publishers[n % count]
            if deliveries[n] and publisher in awaited:
                per_publisher_last[publisher] = max(per_publisher_last.get(publisher, 0.0), delivered_at[n])
                per_publisher_count[publisher] = per_publisher_count.get(publisher, 0) + 1
    end = max(finished, default=time.monotonic())
    elapsed = max(end - started, 1e-9)
    slowest = min(
        (per_publisher_count[p] / max(per_publisher_last[p] - started, 1e-9) for p in per_publisher_count),
        default=0.0,
    )
    logs = {p: sim.request_log(p) for p in publishers}
    crm = sum(int(log["total"]) for log in logs.values()) - crm_before
    # Accounting, per publisher: written + still in the broker + dead-lettered must be what was sent.
    written = in_broker = dead = lost = 0
    reasons: dict[str, int] = {}
    for publisher in publishers:
        offered = sum(1 for n in range(index[publisher], leads, count))
        mine_written = sim.leads(publisher) - leads_before[publisher]
        mine_pending = sum(transport.pending_count(queue, publisher) for queue in STAGE_QUEUES)
        mine_dead = 0
        for queue in STAGE_QUEUES:
            for letter in transport.dead_letters(queue, publisher_id=publisher):
                mine_dead += 1
                reason = letter.dead_letter_reason or "?"
                reasons[reason] = reasons.get(reason, 0) + 1
        written += mine_written
        in_broker += mine_pending
        dead += mine_dead
        lost += max(0, offered - mine_written - mine_pending - mine_dead)
    faulty = {
        p: {
            "requests": int(logs[p]["total"]) - int(logs_before[p]["total"]),
            "throttled": int(logs[p]["throttled"]) - int(logs_before[p]["throttled"]),
            "during_penalty": int(logs[p]["during_penalty"]) - int(logs_before[p]["during_penalty"]),
        }
        for p in publishers
        if p not in awaited
    }
    services.close()
    delivered = state["delivered"]
    return PublishersRun(
        publishers=count,
        leads=leads,
        awaited_leads=expected,
        awaited_delivered=len(finished),
        delivered=delivered,
        seconds=round(elapsed, 2),
        leads_per_second=round(len(finished) / elapsed, 1),
        latency_ms_p50=round(_percentile(latencies, 0.5), 1),
        latency_ms_p95=round(_percentile(latencies, 0.95), 1),
        latency_ms_max=round(max(latencies, default=0.0), 1),
        crm_requests_per_lead=round(crm / max(delivered, 1), 3),
        cpu_ms_per_lead=round(cpu * 1000 / max(delivered, 1), 3),
        peak_rss_mb=peak,
        written=written,
        in_broker=in_broker,
        dead_lettered=dead,
        dead_letter_reasons=reasons,
        lost=lost,
        delivered_twice=state["twice"],
        slowest_publisher_leads_per_second=round(slowest, 2),
        faulty=faulty,
    )


def _make_faulty(sim: SimulatorProcess, throttled: list[str], hung: list[str], retry_after: float) -> None:
    for org in throttled:
        sim.throttle_next(org, 1, retry_after)
    for org in hung:
        sim.faults(org, {"hang_all": {"seconds": HANG_SECONDS}})


def _faulty_summary(run: PublishersRun, throttled: list[str], hung: list[str]) -> dict[str, Any]:
    def total(orgs: list[str], key: str) -> int:
        return sum(run.faulty.get(o, {}).get(key, 0) for o in orgs)

    return {
        "throttled_orgs": len(throttled),
        "throttled_requests": total(throttled, "requests"),
        "throttled_429s": total(throttled, "throttled"),
        "throttled_during_penalty": total(throttled, "during_penalty"),
        "hung_orgs": len(hung),
        "hung_requests": total(hung, "requests"),
    }


def run_publishers(
    sim: SimulatorProcess, scenario: Scenario, tmp: Path, *, concurrency: int = 16, status: Any = None
) -> dict[str, Any]:
    """The four runs of the scenario (see the module's docstring); every figure, by run. Raises
    ValueError when the faulty publishers leave none healthy."""
    faulty_count = scenario.throttled_publishers + scenario.hung_publishers
    if faulty_count >= scenario.publishers:
        raise ValueError(
            f"{scenario.publishers} publishers leave none healthy beside {faulty_count} faulty ones; give more"
        )
    orgs = list(sim.apps)
    healthy = orgs[: scenario.publishers - faulty_count]
    first = orgs[len(healthy) : scenario.publishers]
    second = orgs[scenario.publishers :]
    per_publisher = max(1, scenario.leads // scenario.publishers)
    common: dict[str, Any] = {
        "concurrency": concurrency,
        "read_timeout": scenario.read_timeout,
        "status": status,
    }

    def say(message: str) -> None:
        if status is not None:
            status(message)

    def split(group: list[str]) -> tuple[list[str], list[str]]:
        return group[: scenario.throttled_publishers], group[scenario.throttled_publishers :]

    runs: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    if scenario.in_flight_leads > 0:
        throttled, hung = split(first)
        _make_faulty(sim, throttled, hung, scenario.throttled_retry_after)
        say(
            f"[publishers] in flight: {scenario.in_flight_leads} leads at once over {len(healthy) + len(first)} "
            f"publishers ({len(throttled)} throttled, {len(hung)} hung)"
        )
        # Faulty ones first in the round robin: their leads are at the head of the queue.
        in_flight = run_publishers_once(
            sim,
            first + healthy,
            scenario.in_flight_leads,
            awaited=set(healthy),
            data_dir=tmp / "in-flight",
            tag="m",
            **common,
        )
        runs["in_flight"] = asdict(in_flight)
        summaries["in_flight"] = _faulty_summary(in_flight, throttled, hung)
        for org in hung:
            sim.faults(org, {"clear": True})
    say(f"[publishers] calm: {per_publisher * scenario.publishers} leads over {scenario.publishers}, none faulty")
    calm = run_publishers_once(
        sim,
        second + healthy,
        per_publisher * scenario.publishers,
        awaited=set(healthy),
        data_dir=tmp / "calm",
        tag="c",
        **common,
    )
    say(f"[publishers] alone: {per_publisher * len(healthy)} leads over the {len(healthy)} healthy")
    alone = run_publishers_once(
        sim, healthy, per_publisher * len(healthy), awaited=set(healthy), data_dir=tmp / "alone", tag="a", **common
    )
    throttled, hung = split(second)
    _make_faulty(sim, throttled, hung, scenario.throttled_retry_after)
    say(
        f"[publishers] faulty: {per_publisher * scenario.publishers} leads over {scenario.publishers}, "
        f"{len(throttled)} throttled for {scenario.throttled_retry_after:.0f} s, {len(hung)} hung"
    )
    faulty = run_publishers_once(
        sim,
        second + healthy,
        per_publisher * scenario.publishers,
        awaited=set(healthy),
        data_dir=tmp / "faulty",
        tag="f",
        **common,
    )
    summaries["faulty"] = _faulty_summary(faulty, throttled, hung)
    runs.update(calm=asdict(calm), alone=asdict(alone), faulty=asdict(faulty))
    all_runs = [calm, alone, faulty] + ([in_flight] if scenario.in_flight_leads > 0 else [])
    return {
        # The figures the bench's table prints: the faulty run's, next to the calm one's.
        "leadwriter": asdict(faulty),
        "unthrottled": asdict(calm),
        "publishers": {
            "healthy": len(healthy),
            "healthy_leads_per_second": faulty.leads_per_second,
            "healthy_calm_leads_per_second": calm.leads_per_second,
            "healthy_alone_leads_per_second": alone.leads_per_second,
            "ratio_vs_calm": _ratio(faulty.leads_per_second, calm.leads_per_second),
            "ratio_vs_alone": _ratio(faulty.leads_per_second, alone.leads_per_second),
            "healthy_latency_ms_p95": {"faulty": faulty.latency_ms_p95, "calm": calm.latency_ms_p95},
            "healthy_latency_ms_max": {"faulty": faulty.latency_ms_max, "calm": calm.latency_ms_max},
            "in_flight_leads": scenario.in_flight_leads,
            "in_flight_peak_rss_mb": in_flight.peak_rss_mb if scenario.in_flight_leads > 0 else None,
            "in_flight_leads_per_second": in_flight.leads_per_second if scenario.in_flight_leads > 0 else None,
            "faulty_orgs": summaries,
            "lost": sum(r.lost for r in all_runs),
            "healthy_undelivered": sum(r.awaited_leads - r.awaited_delivered for r in all_runs),
        },
        "runs": runs,
    }



__all__ = ["PublishersRun", "run_publishers", "run_publishers_once"]

"""``leadwriter bench`` (architecture §10): Lead Writer against a naive deliverer, in the same run.

The CRM simulator runs in a child process (so its CPU is not counted as ours); Lead Writer's three
stage workers run in this process on the embedded broker and secret store. Reported, for N leads over
P publishers at a set CRM latency: leads/s, enqueue→written latency p50/p95/p99, CRM requests, token
requests and secret-store reads per lead, CPU ms per lead of this process, peak RSS — and the same
throughput for a naive deliverer (a fresh token, a solution check and a create per lead, one at a
time), as a ratio. Figures are measured, never asserted: machines are shared and noisy.

Scenarios (``leadwriter bench --scenario NAME``) set the run up for one performance target each and
report that target's figure next to it (see BENCHMARKS.md): ``throughput`` (the default run),
``nobatch``, ``limits``, ``execution``, ``overhead``, ``isolation``, ``memory``, ``endtoend`` (the real
``serve`` and ``enqueue`` processes, or serve's HTTP ingest: see bench_endtoend) and ``heal`` (a CRM down
until its leads wait for retry slots a minute or more away, then healed: "heal → last lead delivered").
Options given on the command line override the scenario's values. ``--json`` prints every figure, the
scenario and the targets, so that runs can be compared across commits.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import resource
import secrets
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, Literal

import requests
from azure.identity import ClientSecretCredential
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from shared.crm.connection import ClientSecretAuth, Connection
from shared.names import PROP_LEAD_ID, PROP_PUBLISHER_ID, QUEUE_INCOMING
from shared.pipeline.lead import lead_record_id, parse_incoming, to_dataverse_columns
from shared.pipeline.messages import envelope
from shared.pipeline.outcomes import SettleAction, Stage
from shared.pipeline.settle import Settled
from shared.pipeline.write_lead import MAX_BATCH
from shared.runtime.embedded import EmbeddedRuntime
from shared.services import Services
from shared.settings import DEFAULT_SOLUTION_NAME, Settings
from shared.transport.base import OutgoingMessage
from shared.transport.metering import MeteredTransport

console = Console(stderr=True)


@dataclass
class SimulatorInfo:
    authority_host: str
    ca_path: str
    host: str
    orgs: dict[str, dict[str, str]]  # name -> url, tenant, client id, secret


def _simulator_process(config: dict[str, Any], data_dir: str, out: multiprocessing.Queue[Any], stop: EventType) -> None:
    from shared.simulator import CrmSimulator

    for last_octet in range(30, 60):
        try:
            simulator = CrmSimulator.from_config(
                config, Path(data_dir), host=f"127.0.0.{last_octet}", authority_port=0
            ).start()
            break
        except OSError:
            continue
    else:
        out.put(None)
        return
    orgs = {org.name: {"url": org.url, "tenant": org.tenant_id} for org in simulator.orgs()}
    out.put(
        {
            "authority_host": simulator.authority_host,
            "ca_path": str(simulator.ca_path),
            "host": simulator.authority_host.split("://", 1)[1].split(":", 1)[0],
            "orgs": orgs,
        }
    )
    stop.wait()
    simulator.stop()


class SimulatorProcess:
    """The simulator in a child process, inspected through its admin API."""

    def __init__(
        self,
        publishers: int,
        latency: float,
        limits: dict[str, Any],
        data_dir: Path,
        *,
        execution: dict[str, float] | None = None,
    ) -> None:
        """Start the simulator with ``publishers`` orgs (``execution``: the orgs' execution time per
        record, as in the simulator's config); raises RuntimeError if it cannot bind."""
        self.apps = {f"bench{i:02d}": (str(uuid.uuid4()), secrets.token_urlsafe(24)) for i in range(publishers)}
        config = {
            "orgs": [
                {
                    "name": name,
                    "solutionVersion": "1.2.0.0",
                    "latency": latency,
                    "limits": limits,
                    "execution": execution or {},
                    "apps": [{"clientId": cid, "clientSecret": secret, "hasRole": True}],
                }
                for name, (cid, secret) in self.apps.items()
            ]
        }
        ctx = multiprocessing.get_context("spawn")
        self._queue: multiprocessing.Queue[Any] = ctx.Queue()
        self._stop = ctx.Event()
        self._process = ctx.Process(
            target=_simulator_process, args=(config, str(data_dir), self._queue, self._stop), daemon=True
        )
        self._process.start()
        info = self._queue.get(timeout=60)
        if info is None:
            raise RuntimeError("the simulator could not bind a loopback address")
        self.info = SimulatorInfo(**info)
        self._session = requests.Session()
        self._session.verify = self.info.ca_path

    def _get(self, path: str) -> Any:
        response = self._session.get(
            f"{self.info.authority_host}/_simulator/{path}", timeout=30, verify=self.info.ca_path
        )
        response.raise_for_status()
        return response.json()

    def crm_requests(self, org: str) -> int:
        return int(self._get(f"orgs/{org}/requests")["total"])

    def request_log(self, org: str) -> dict[str, Any]:
        return dict(self._get(f"orgs/{org}/requests"))

    def leads(self, org: str) -> int:
        return len(self._get(f"orgs/{org}/leads")["value"])

    def token_requests(self) -> int:
        return int(self._get("token-requests")["count"])

    def faults(self, org: str, body: dict[str, Any]) -> None:
        """POST ``body`` to ``org``'s fault settings (``fail_next``, ``clear`` …, see simulator.admin)."""
        response = self._session.post(
            f"{self.info.authority_host}/_simulator/orgs/{org}/faults", json=body, timeout=30, verify=self.info.ca_path
        )
        response.raise_for_status()

    def throttle_next(self, org: str, n: int, retry_after: float) -> None:
        """Make the next ``n`` CRM requests of ``org`` answer 429 with a ``retry_after`` penalty."""
        response = self._session.post(
            f"{self.info.authority_host}/_simulator/orgs/{org}/faults",
            json={"throttle_next": {"n": n, "retry_after": retry_after}},
            timeout=30,
            verify=self.info.ca_path,
        )
        response.raise_for_status()

    def connection(self, org: str) -> Connection:
        client_id, secret = self.apps[org]
        details = self.info.orgs[org]
        return Connection(
            url=details["url"],
            auth=ClientSecretAuth(tenant_id=details["tenant"], client_id=client_id, client_secret=SecretStr(secret)),
        )

    def stop(self) -> None:
        self._stop.set()
        self._process.join(10)


def _message(publisher: str, n: int, tag: str = "") -> dict[str, Any]:
    return {
        "leadId": f"{publisher}-{tag}{n:06d}",
        "publisherId": publisher,
        "lead": {
            "UserDetails": {
                "FirstName": f"Ada{n}",
                "LastName": "Lovelace",
                "Email": f"ada{n}@example.com",
                "Company": "Contoso",
                "Country": "US",
            },
            "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
            "OfferTitle": "Contoso Widget",
        },
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class RunFigures:
    """One run's figures. ``leads_per_second`` counts the awaited publishers' leads (all, unless a
    scenario leaves a throttled one out). ``leads_per_window`` (the limits scenario): leads delivered
    in each whole limit window since the start. ``in_flight_at_push_back``: requests that were already
    on their way when a 429 came back (the pacer's count; they may reach the CRM inside the penalty,
    which architecture §5 allows — every other request waits it out)."""

    leads: int
    delivered: int
    seconds: float
    leads_per_second: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    crm_requests_per_lead: float
    token_requests_per_lead: float
    secret_reads_per_lead: float
    cpu_ms_per_lead: float
    peak_rss_mb: float
    requests_during_penalty: int = 0
    throttled: int = 0
    per_publisher_leads_per_second: dict[str, float] = field(default_factory=dict)
    crm_requests: int = 0
    crm_requests_per_second: float = 0.0
    leads_per_window: list[int] = field(default_factory=list)
    in_flight_at_push_back: int = 0
    #: Server execution time the CRM charged during the run (seconds), per lead delivered (ms), and in
    #: each whole limit window since the start (seconds; with ``window``).
    execution_seconds: float = 0.0
    execution_ms_per_lead: float = 0.0
    execution_per_window: list[float] = field(default_factory=list)
    #: Service Bus operations of the run by kind (sends, schedules, received, completes, abandons,
    #: dead_letters, renewals, total; empty_receives are polls, outside the total), in all and per
    #: lead delivered: what the three stages and the producer asked of the transport.
    servicebus_operations: dict[str, int] = field(default_factory=dict)
    servicebus_operations_per_lead: dict[str, float] = field(default_factory=dict)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the peak of this process over its whole life.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_lead_writer(
    sim: SimulatorProcess,
    leads: int,
    *,
    rate: float = 0.0,
    data_dir: Path,
    concurrency: int = 16,
    publisher_concurrency: int = 8,
    max_batch: int = MAX_BATCH,
    create_multiple: bool = True,
    publishers: list[str] | None = None,
    awaited: set[str] | None = None,
    window: float | None = None,
    stop_after: float | None = None,
    tag: str = "",
    timeout: float = 600.0,
    progress: Callable[[int], None] | None = None,
) -> RunFigures:
    """Deliver ``leads`` (spread over ``publishers``, default all) through all three stages; figures
    for this process's work. The run ends when every lead of the ``awaited`` publishers (default all)
    is delivered, after ``stop_after`` seconds when given, or at ``timeout``. Raises
    ConfigurationError for a bad setting."""
    settings = Settings.from_env(
        {
            "LEADWRITER_DATA_DIR": str(data_dir),
            "LEADWRITER_CRM_ALLOWED_HOSTS": f"{sim.info.host}:*",
            "AZURE_AUTHORITY_HOST": sim.info.authority_host,
            "REQUESTS_CA_BUNDLE": sim.info.ca_path,
            "LEADWRITER_LOG_LEVEL": "WARNING",
            "LEADWRITER_MAX_BATCH": str(max_batch),
            "LEADWRITER_CREATE_MULTIPLE": "true" if create_multiple else "false",
        }
    )
    services = Services.from_settings(settings)
    publishers = publishers or list(sim.apps)
    awaited = set(publishers) if awaited is None else awaited
    for publisher in publishers:
        services.connections.put(publisher, sim.connection(publisher))
    services.connections.reads = 0
    tokens_before = sim.token_requests()
    crm_before = {p: sim.crm_requests(p) for p in publishers}
    logs_before = {p: sim.request_log(p) for p in publishers}

    messages = [_message(publishers[n % len(publishers)], n, tag) for n in range(leads)]
    expected = sum(1 for m in messages if m["publisherId"] in awaited)
    sent_at: dict[str, float] = {}
    delivered_at: dict[str, tuple[str, float]] = {}
    awaited_done = 0
    done = threading.Event()
    lock = threading.Lock()

    def observe(settled: Settled) -> None:
        nonlocal awaited_done
        if settled.stage is Stage.WRITE_LEAD and settled.action is SettleAction.DELIVERED:
            props = settled.message.application_properties
            lead_id = str(props.get(PROP_LEAD_ID))
            publisher = str(props.get(PROP_PUBLISHER_ID))
            with lock:
                if lead_id in delivered_at:
                    return
                delivered_at[lead_id] = (publisher, time.monotonic())
                if publisher in awaited:
                    awaited_done += 1
                    if awaited_done >= expected:
                        done.set()

    # Every operation of the run (the producer's sends too) is counted on its way to the broker.
    transport = MeteredTransport(services.transport)
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
        batch: list[OutgoingMessage] = []
        interval = 1.0 / rate if rate > 0 else 0.0
        for n, data in enumerate(messages):
            lead_id = str(data["leadId"])
            item = envelope(json.dumps(data).encode(), publisher_id=str(data["publisherId"]), lead_id=lead_id)
            if interval:
                due = started + n * interval
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the producer, not waiting for a result
                sent_at[lead_id] = time.monotonic()
                transport.send(QUEUE_INCOMING, [item])
            else:
                batch.append(item)
                sent_at[lead_id] = started
                if len(batch) == 500:
                    transport.send(QUEUE_INCOMING, batch)
                    batch = []
        if batch:
            transport.send(QUEUE_INCOMING, batch)
        deadline = started + (min(timeout, stop_after) if stop_after is not None else timeout)
        boundaries: list[float] = []  # the CRM's execution seconds at each whole window's end
        while True:
            now = time.monotonic()
            next_boundary = started + (len(boundaries) + 1) * window if window else now + 0.5
            if done.wait(max(0.0, min(0.5, next_boundary - now))) or time.monotonic() >= deadline:
                break
            if window and time.monotonic() >= next_boundary:
                boundaries.append(sum(float(sim.request_log(p)["execution_seconds"]) for p in publishers))
            if progress is not None:
                progress(len(delivered_at))
    finally:
        runtime.stop()
    cpu = _cpu_seconds() - cpu_before
    operations = transport.counts()
    with lock:
        deliveries = dict(delivered_at)
    awaited_times = [t for p, t in deliveries.values() if p in awaited]
    end = time.monotonic() if stop_after is not None else max(awaited_times, default=time.monotonic())
    elapsed = end - started
    latencies = [(t - sent_at[k]) * 1000 for k, (_, t) in deliveries.items() if k in sent_at]
    crm = sum(sim.crm_requests(p) - crm_before[p] for p in publishers)
    logs = {p: sim.request_log(p) for p in publishers}
    count = max(len(deliveries), 1)
    execution_before = sum(float(logs_before[p]["execution_seconds"]) for p in publishers)
    execution = sum(float(logs[p]["execution_seconds"]) for p in publishers) - execution_before
    marks = [execution_before, *boundaries]
    execution_windows = [round(b - a, 3) for a, b in itertools.pairwise(marks)]
    per_publisher: dict[str, float] = {}
    for publisher in publishers:
        times = [t for p, t in deliveries.values() if p == publisher]
        per_publisher[publisher] = round(len(times) / (max(times) - started), 1) if times else 0.0
    windows: list[int] = []
    if window:
        windows = [0] * int(elapsed // window)
        for t in awaited_times:
            index = int((t - started) // window)
            if index < len(windows):
                windows[index] += 1
    pacer = services.pipeline.pacer
    in_flight_at_push_back = (
        sum(pacer.snapshot(key).in_flight_at_push_back for key in pacer.known_keys()) if pacer is not None else 0
    )
    figures = RunFigures(
        leads=leads,
        delivered=len(deliveries),
        seconds=round(elapsed, 3),
        leads_per_second=round(len(awaited_times) / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms_p50=round(_percentile(latencies, 0.50), 1),
        latency_ms_p95=round(_percentile(latencies, 0.95), 1),
        latency_ms_p99=round(_percentile(latencies, 0.99), 1),
        crm_requests_per_lead=round(crm / count, 3),
        token_requests_per_lead=round((sim.token_requests() - tokens_before) / count, 4),
        secret_reads_per_lead=round(services.connections.reads / count, 4),
        cpu_ms_per_lead=round(cpu * 1000 / count, 3),
        peak_rss_mb=_peak_rss_mb(),
        requests_during_penalty=sum(
            int(logs[p]["during_penalty"]) - int(logs_before[p]["during_penalty"]) for p in publishers
        ),
        throttled=sum(int(logs[p]["throttled"]) - int(logs_before[p]["throttled"]) for p in publishers),
        per_publisher_leads_per_second=per_publisher,
        crm_requests=crm,
        crm_requests_per_second=round(crm / elapsed, 2) if elapsed > 0 else 0.0,
        leads_per_window=windows,
        in_flight_at_push_back=in_flight_at_push_back,
        execution_seconds=round(execution, 3),
        execution_ms_per_lead=round(execution * 1000 / count, 3),
        execution_per_window=execution_windows,
        servicebus_operations=operations.as_dict(),
        servicebus_operations_per_lead=operations.per(len(deliveries)),
    )
    services.close()
    return figures


def run_naive(sim: SimulatorProcess, leads: int) -> RunFigures:
    """The naive deliverer: per lead, a fresh token, a solution check and a create, one at a time."""
    publishers = list(sim.apps)
    session = requests.Session()
    latencies: list[float] = []
    crm_before = {p: sim.crm_requests(p) for p in publishers}
    tokens_before = sim.token_requests()
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    for n in range(leads):
        publisher = publishers[n % len(publishers)]
        connection = sim.connection(publisher)
        auth = connection.auth
        assert isinstance(auth, ClientSecretAuth)
        t0 = time.monotonic()
        credential = ClientSecretCredential(
            auth.tenant_id,
            auth.client_id,
            auth.client_secret.get_secret_value(),
            authority=sim.info.authority_host,
            disable_instance_discovery=True,
            connection_verify=sim.info.ca_path,
        )
        token = credential.get_token(f"{connection.url}/.default").token
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        }
        base = f"{connection.url}/api/data/v9.2/"
        session.get(
            base + f"solutions?$filter=uniquename eq '{DEFAULT_SOLUTION_NAME}'&$select=uniquename,version",
            headers=headers,
            timeout=30,
            verify=sim.info.ca_path,
            allow_redirects=False,
        ).raise_for_status()
        message = parse_incoming(json.dumps(_message(publisher, 10_000_000 + n, "naive")).encode())
        session.patch(
            base + f"leads({lead_record_id(message.publisher_id, message.lead_id)})",
            json=to_dataverse_columns(message),
            headers={**headers, "If-None-Match": "*"},
            timeout=30,
            verify=sim.info.ca_path,
            allow_redirects=False,
        ).raise_for_status()
        latencies.append((time.monotonic() - t0) * 1000)
    elapsed = time.monotonic() - started
    crm = sum(sim.crm_requests(p) - crm_before[p] for p in publishers)
    return RunFigures(
        leads=leads,
        delivered=leads,
        seconds=round(elapsed, 3),
        leads_per_second=round(leads / elapsed, 1),
        latency_ms_p50=round(statistics.median(latencies), 1),
        latency_ms_p95=round(_percentile(latencies, 0.95), 1),
        latency_ms_p99=round(_percentile(latencies, 0.99), 1),
        crm_requests_per_lead=round(crm / leads, 3),
        token_requests_per_lead=round((sim.token_requests() - tokens_before) / leads, 4),
        secret_reads_per_lead=1.0,
        cpu_ms_per_lead=round((_cpu_seconds() - cpu_before) * 1000 / leads, 3),
        peak_rss_mb=_peak_rss_mb(),
        crm_requests=crm,
        crm_requests_per_second=round(crm / elapsed, 2),
    )


# --- scenarios ---------------------------------------------------------------------------------------

ScenarioName = Literal[
    "throughput", "nobatch", "limits", "execution", "overhead", "isolation", "memory", "heal", "endtoend",
    "publishers",
]


@dataclass(frozen=True)
class Scenario:
    """One benchmark set-up. ``throttled_retry_after`` > 0 (isolation): the first publisher's CRM
    answers its first request 429 with that long a penalty, and the other publishers' throughput is
    compared with a run of theirs alone."""

    name: str
    summary: str
    leads: int
    publishers: int = 1
    latency: float = 0.05
    naive_leads: int = 0
    rate: float = 0.0
    requests_per_window: int = 6000
    window_seconds: float = 300.0
    max_batch: int = MAX_BATCH
    throttled_retry_after: float = 0.0
    #: heal: the CRM answers 503 until every lead waits for a slot at least this far away, then heals.
    heal_after_slot: float = 0.0
    #: The execution-time budget per window (seconds); None: Dataverse's 1,200 s per 300 s, scaled.
    execution_seconds_per_window: float | None = None
    #: Server execution time per record (ms): a create of its own, a $batch part, a CreateMultiple target.
    execution_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Several leads of a publisher go as CreateMultiple (else always $batch); the execution scenario
    #: runs both paths.
    create_multiple: bool = True
    #: publishers (shared.tools.bench_publishers): how many of ``publishers`` throttle (429 with
    #: ``throttled_retry_after``) and hang; the leads enqueued at once for the peak RSS run; the CRM
    #: read timeout (None: the setting's default).
    throttled_publishers: int = 0
    hung_publishers: int = 0
    in_flight_leads: int = 0
    read_timeout: float | None = None

    @property
    def orgs(self) -> int:
        """The simulator's orgs: the publishers, and a second set of faulty ones (publishers scenario)."""
        return self.publishers + self.throttled_publishers + self.hung_publishers

    @property
    def limits(self) -> dict[str, Any]:
        # Dataverse's execution-time budget (1,200 s per 300 s) scaled with the window, unless set.
        budget = self.execution_seconds_per_window
        return {
            "requestsPerWindow": self.requests_per_window,
            "windowSeconds": self.window_seconds,
            "executionSecondsPerWindow": 4.0 * self.window_seconds if budget is None else budget,
            "maxConcurrent": 52,
        }

    @property
    def execution(self) -> dict[str, float]:
        create, part, target = self.execution_ms
        return {"createMs": create, "batchPartMs": part, "createMultipleTargetMs": target}


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "throughput",
            "2000 leads, 1 publisher, 50 ms CRM latency; against the naive deliverer",
            2000,
            naive_leads=100,
        ),
        Scenario(
            "nobatch",
            "the throughput run with batching off (LEADWRITER_MAX_BATCH=1)",
            2000,
            naive_leads=50,
            max_batch=1,
        ),
        Scenario(
            "limits",
            "limits scaled down to 300 requests per 30 s, no batching, 3 windows with a backlog",
            1000,
            requests_per_window=300,
            window_seconds=30.0,
            max_batch=1,
        ),
        Scenario(
            "execution",
            "execution time binds: 2 s of execution per 20 s window, 10/4/1 ms per create/$batch part/"
            "CreateMultiple target, 5 ms latency, groups of 25; 3 windows with a backlog on each path",
            7000,
            latency=0.005,
            # A group's cost must be small next to the budget, as on a real org (1 s of 1,200): each
            # request in flight holds its estimated cost of the budget back until it ends.
            max_batch=25,
            window_seconds=20.0,
            execution_seconds_per_window=2.0,
            execution_ms=(10.0, 4.0, 1.0),
        ),
        Scenario(
            "overhead", "CRM latency 0, 100 leads/s offered: our own CPU and latency", 1000, latency=0.0, rate=100.0
        ),
        Scenario(
            "isolation",
            "10 publishers, one throttled for 10 min; the other nine vs a run of theirs alone",
            3000,
            publishers=10,
            throttled_retry_after=600.0,
        ),
        Scenario("memory", "10,000 leads in flight over 10 publishers: peak RSS", 10_000, publishers=10),
        Scenario(
            "endtoend",
            "3000 leads, 1 publisher, 50 ms CRM latency, through `leadwriter serve` fed by `leadwriter enqueue -`,"
            " then by POSTs to its ingest endpoint (processes); against the naive deliverer",
            3000,
            naive_leads=100,
        ),
        Scenario(
            "heal",
            "500 leads, the CRM down (503) until each waits for its 1 min slot, then healed: heal → last delivered",
            500,
            heal_after_slot=30.0,
        ),
        Scenario(
            "publishers",
            "200 publishers, 10 throttled for 10 min and 10 hung; the healthy 180 vs calm runs; "
            "50,000 leads in flight: peak RSS",
            6000,
            publishers=200,
            throttled_publishers=10,
            hung_publishers=10,
            throttled_retry_after=600.0,
            in_flight_leads=50_000,
        ),
    )
}


@dataclass(frozen=True)
class Target:
    """One performance target next to its measured figure."""

    name: str
    measured: float | None
    op: Literal[">=", "<="]
    limit: float

    @property
    def met(self) -> bool:
        if self.measured is None:
            return False
        return self.measured >= self.limit if self.op == ">=" else self.measured <= self.limit


def _targets(scenario: Scenario, result: dict[str, Any]) -> list[Target]:
    ours: dict[str, Any] = result["leadwriter"]
    name = scenario.name
    if name == "throughput":
        return [
            Target("speed-up over the naive deliverer (x)", result.get("speedup"), ">=", 20.0),
            Target("CRM requests per lead (batching)", ours["crm_requests_per_lead"], "<=", 0.2),
        ]
    if name == "nobatch":
        return [Target("CRM requests per lead (no batching)", ours["crm_requests_per_lead"], "<=", 1.05)]
    if name == "limits":
        limits = result["limits"]
        return [
            Target("sustained share of the allowed request rate", limits["sustained_share"], ">=", 0.9),
            Target("requests sent into a known penalty", limits["sent_into_known_penalty"], "<=", 0),
        ]
    if name == "execution":
        paths = result["execution"]
        batch, bulk = paths["batch"], paths["create_multiple"]
        return [
            Target("sustained share of the execution budget ($batch)", batch["sustained_share"], ">=", 0.9),
            Target(
                "CreateMultiple leads/s vs 90 % of the budget spent on $batch (x)",
                paths["create_multiple_vs_batch_at_90"],
                ">=",
                1.0,
            ),
            Target(
                "requests sent into a known penalty (both paths)",
                batch["sent_into_known_penalty"] + bulk["sent_into_known_penalty"],
                "<=",
                0,
            ),
        ]
    if name == "overhead":
        return [
            Target("CPU ms per lead (latency 0)", ours["cpu_ms_per_lead"], "<=", 2.0),
            Target("p99 enqueue-to-written ms at 100 leads/s", ours["latency_ms_p99"], "<=", 250.0),
        ]
    if name == "isolation":
        iso = result["isolation"]
        return [
            Target("nine publishers' throughput vs unthrottled", iso["ratio"], ">=", 0.9),
            Target("requests to the throttled CRM during its penalty", iso["throttled_org"]["during_penalty"], "<=", 0),
        ]
    if name == "memory":
        return [Target("peak RSS MB at 10,000 leads in flight", ours["peak_rss_mb"], "<=", 200.0)]
    if name == "endtoend":
        from shared.tools.bench_endtoend import all_stored_once

        paths = result["endtoend"]
        return [
            Target("end to end via enqueue: speed-up over naive (x)", paths["enqueue"]["speedup"], ">=", 50.0),
            Target("end to end via HTTP ingest: speed-up over naive (x)", paths["http"]["speedup"], ">=", 50.0),
            Target("end to end: each lead stored once, none left", float(all_stored_once(result)), ">=", 1.0),
        ]
    if name == "publishers":
        pubs = result["publishers"]
        faulty = pubs["faulty_orgs"]["faulty"]
        return [
            Target("healthy publishers' throughput vs all calm", pubs["ratio_vs_calm"], ">=", 0.9),
            Target("healthy publishers' throughput vs them alone", pubs["ratio_vs_alone"], ">=", 0.9),
            Target(
                f"peak RSS MB at {pubs['in_flight_leads']:,} leads in flight",
                pubs["in_flight_peak_rss_mb"],
                "<=",
                250.0,
            ),
            Target("requests to the throttled CRMs during their penalty", faulty["throttled_during_penalty"], "<=", 0),
            Target("leads lost (every run)", pubs["lost"], "<=", 0),
        ]
    if name == "heal":
        return [
            Target("heal → last lead delivered (s)", ours["heal_to_last_delivered_seconds"], "<=", 60.0),
            Target("requests to the CRM during a penalty", ours["requests_during_penalty"], "<=", 0),
        ]
    return []


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def _status(message: str) -> None:
    console.print(message)


def run_scenario(scenario: Scenario, *, concurrency: int = 16) -> dict[str, Any]:
    """Run ``scenario`` against a simulator in a child process; every figure, and its targets.

    Raises RuntimeError when the simulator cannot start.
    """
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "summary": scenario.summary,
        "config": {
            "leads": scenario.leads,
            "publishers": scenario.publishers,
            "crmLatencyMs": scenario.latency * 1000,
            "rate": scenario.rate,
            "requestsPerWindow": scenario.requests_per_window,
            "windowSeconds": scenario.window_seconds,
            "maxBatch": scenario.max_batch,
            "createMultiple": scenario.create_multiple,
            "naiveLeads": scenario.naive_leads,
            "throttledRetryAfter": scenario.throttled_retry_after,
            "executionSecondsPerWindow": scenario.limits["executionSecondsPerWindow"],
            "executionMs": scenario.execution,
        },
    }
    with tempfile.TemporaryDirectory(prefix="leadwriter-bench-") as tmp:
        sim = SimulatorProcess(
            scenario.orgs,
            scenario.latency,
            scenario.limits,
            Path(tmp) / "simulator",
            execution=scenario.execution,
        )
        try:
            common: dict[str, Any] = {
                "rate": scenario.rate,
                "max_batch": scenario.max_batch,
                "create_multiple": scenario.create_multiple,
                "concurrency": concurrency,
                "timeout": max(600.0, scenario.leads / 2),
            }
            if scenario.heal_after_slot > 0:
                _status(f"[heal] {scenario.leads} leads, the CRM down until each waits a minute, then healed")
                result["leadwriter"] = run_heal(sim, scenario, data_dir=Path(tmp) / "leadwriter")
            elif scenario.name == "publishers":
                from shared.tools.bench_publishers import run_publishers

                result.update(run_publishers(sim, scenario, Path(tmp), concurrency=concurrency, status=_status))
            elif scenario.throttled_retry_after > 0:
                result.update(_run_isolation(sim, scenario, Path(tmp), common))
            elif scenario.name == "endtoend":
                from shared.tools.bench_endtoend import run_endtoend

                result.update(run_endtoend(sim, scenario, Path(tmp)))
            elif scenario.name == "execution":
                result.update(_run_execution(sim, scenario, Path(tmp), common))
            else:
                _status(
                    f"[{scenario.name}] Lead Writer: {scenario.leads} leads, {scenario.publishers} publisher(s), "
                    f"CRM latency {scenario.latency * 1000:.0f} ms"
                )
                limited = scenario.name == "limits"
                ours = run_lead_writer(
                    sim,
                    scenario.leads,
                    data_dir=Path(tmp) / "leadwriter",
                    window=scenario.window_seconds if limited else None,
                    # Three whole windows, the backlog never empty: the first is the CRM's burst
                    # allowance, the next two show the sustained rate.
                    stop_after=3 * scenario.window_seconds + 1.0 if limited else None,
                    **common,
                )
                result["leadwriter"] = asdict(ours)
                if limited:
                    result["limits"] = _limits_figures(scenario, ours)
            naive_count = min(scenario.naive_leads, scenario.leads)
            if naive_count > 0 and "naive" not in result:  # endtoend runs its own, between its paths' figures
                _status(f"[{scenario.name}] naive deliverer: {naive_count} leads")
                naive = run_naive(sim, naive_count)
                result["naive"] = asdict(naive)
                result["speedup"] = _ratio(result["leadwriter"]["leads_per_second"], naive.leads_per_second)
        finally:
            sim.stop()
    result["targets"] = [{**asdict(t), "met": t.met} for t in _targets(scenario, result)]
    return result


def run_heal(sim: SimulatorProcess, scenario: Scenario, *, data_dir: Path, timeout: float = 900.0) -> dict[str, Any]:
    """The heal scenario: the first publisher's CRM answers 503 to everything until each of its leads
    has spent the short retries of the default schedule and waits for a slot ``heal_after_slot`` s or
    more away; then it heals and one new lead arrives. Figures: how long the CRM was down, how many
    leads waited and how far away their next slot was, and heal → last lead delivered."""
    org = next(iter(sim.apps))
    settings = Settings.from_env(
        {
            "LEADWRITER_DATA_DIR": str(data_dir),
            "LEADWRITER_CRM_ALLOWED_HOSTS": f"{sim.info.host}:*",
            "AZURE_AUTHORITY_HOST": sim.info.authority_host,
            "REQUESTS_CA_BUNDLE": sim.info.ca_path,
            "LEADWRITER_LOG_LEVEL": "WARNING",
        }
    )
    services = Services.from_settings(settings)
    services.connections.put(org, sim.connection(org))
    log_before = sim.request_log(org)
    before = sim.leads(org)
    sim.faults(org, {"fail_next": {"n": 10_000_000, "status": 503}})
    runtime = services.embedded_runtime().start()
    try:
        down_at = time.monotonic()
        messages = [_message(org, n, "heal") for n in range(scenario.leads)]
        services.transport.send(
            QUEUE_INCOMING,
            [envelope(json.dumps(m).encode(), publisher_id=org, lead_id=str(m["leadId"])) for m in messages],
        )
        deadline = down_at + timeout
        waiting, next_due = 0, None
        while time.monotonic() < deadline:
            waiting, next_due = services.transport.scheduled_of(org)
            far = next_due is not None and (next_due - datetime.now(UTC)).total_seconds() >= scenario.heal_after_slot
            if waiting == scenario.leads and far:
                break
            time.sleep(0.25)  # polling the broker for the set-up, not waiting for a result
        next_slot = (next_due - datetime.now(UTC)).total_seconds() if next_due is not None else None
        sim.faults(org, {"clear": True})
        healed_at = time.monotonic()
        fresh = _message(org, scenario.leads, "heal")
        services.transport.send(
            QUEUE_INCOMING, [envelope(json.dumps(fresh).encode(), publisher_id=org, lead_id=str(fresh["leadId"]))]
        )
        total = scenario.leads + 1
        delivered = sim.leads(org) - before
        while delivered < total and time.monotonic() < healed_at + timeout:
            time.sleep(0.1)  # polling the simulator's count
            delivered = sim.leads(org) - before
        heal_to_last = time.monotonic() - healed_at
    finally:
        runtime.stop()
    log = sim.request_log(org)
    recovery = services.recovery
    figures = {
        "leads": total,
        "delivered": delivered,
        "down_seconds": round(healed_at - down_at, 1),
        "waiting_for_retry_at_heal": waiting,
        "next_slot_seconds_at_heal": round(next_slot, 1) if next_slot is not None else None,
        "heal_to_last_delivered_seconds": round(heal_to_last, 2) if delivered >= total else None,
        "released_early": recovery.released,
        "largest_release_round": recovery.largest_round,
        "throttled": int(log["throttled"]) - int(log_before["throttled"]),
        "requests_during_penalty": int(log["during_penalty"]) - int(log_before["during_penalty"]),
    }
    services.close()
    return figures


def _limits_figures(scenario: Scenario, ours: RunFigures) -> dict[str, Any]:
    """Sustained use of a request limit: leads per whole window after the first (each lead is one
    request without batching), against the limit; and requests that reached the CRM inside a penalty
    beyond those already in flight when the 429 came back."""
    later = ours.leads_per_window[1:]
    sustained = sum(later) / len(later) if later else None
    return {
        "allowed_requests_per_window": scenario.requests_per_window,
        "leads_per_window": ours.leads_per_window,
        "sustained_requests_per_window": sustained,
        "sustained_share": _ratio(sustained, scenario.requests_per_window),
        "sustained_requests_per_second": round(sustained / scenario.window_seconds, 2) if sustained else None,
        "allowed_requests_per_second": scenario.requests_per_window / scenario.window_seconds,
        "throttled": ours.throttled,
        "requests_during_penalty": ours.requests_during_penalty,
        "in_flight_at_push_back": ours.in_flight_at_push_back,
        "sent_into_known_penalty": max(0, ours.requests_during_penalty - ours.in_flight_at_push_back),
    }


def _execution_figures(scenario: Scenario, ours: RunFigures) -> dict[str, Any]:
    """Sustained use of the execution-time budget: execution seconds the CRM charged in each whole
    window after the first (the first holds the burst before the pacer learnt the window from its
    429), against the budget; leads per second over those windows; execution time per lead; and
    requests that reached the CRM inside a penalty beyond those in flight when the 429 came back."""
    budget = float(scenario.limits["executionSecondsPerWindow"])
    later = ours.execution_per_window[1:]
    sustained = sum(later) / len(later) if later else None
    leads_later = ours.leads_per_window[1:]
    return {
        "budget_seconds_per_window": budget,
        "execution_per_window": ours.execution_per_window,
        "leads_per_window": ours.leads_per_window,
        "sustained_share": _ratio(sustained, budget),
        "sustained_leads_per_second": (
            round(sum(leads_later) / (len(leads_later) * scenario.window_seconds), 2) if leads_later else None
        ),
        "execution_ms_per_lead": ours.execution_ms_per_lead,
        "crm_requests_per_lead": ours.crm_requests_per_lead,
        "throttled": ours.throttled,
        "requests_during_penalty": ours.requests_during_penalty,
        "in_flight_at_push_back": ours.in_flight_at_push_back,
        "sent_into_known_penalty": max(0, ours.requests_during_penalty - ours.in_flight_at_push_back),
    }


def _run_execution(sim: SimulatorProcess, scenario: Scenario, tmp: Path, common: dict[str, Any]) -> dict[str, Any]:
    """The execution-bound run on each write path (CreateMultiple first, then $batch), each with a
    fresh Lead Writer; between them the CRM's window is let pass, so each starts on a full budget."""
    paths: dict[str, Any] = {}
    runs: dict[str, RunFigures] = {}
    for path, bulk in (("create_multiple", True), ("batch", False)):
        _status(
            f"[execution] Lead Writer on the {path} path: {scenario.leads} leads offered, "
            f"3 windows of {scenario.window_seconds:g} s"
        )
        figures = run_lead_writer(
            sim,
            scenario.leads,
            data_dir=tmp / path,
            **{**common, "create_multiple": bulk},
            window=scenario.window_seconds,
            stop_after=3 * scenario.window_seconds + 1.0,
            tag=path[:2],
        )
        runs[path] = figures
        paths[path] = _execution_figures(scenario, figures)
        # Let this path's execution time leave the CRM's window before the next path starts.
        time.sleep(scenario.window_seconds + 1.0)
    budget_per_second = float(scenario.limits["executionSecondsPerWindow"]) / scenario.window_seconds
    batch_ms = paths["batch"]["execution_ms_per_lead"]
    at_90 = 0.9 * budget_per_second * 1000 / batch_ms if batch_ms else None
    paths["batch_leads_per_second_at_90_percent"] = round(at_90, 2) if at_90 else None
    paths["create_multiple_vs_batch_at_90"] = _ratio(paths["create_multiple"]["sustained_leads_per_second"], at_90)
    paths["execution_per_lead_batch_vs_create_multiple"] = _ratio(
        batch_ms, paths["create_multiple"]["execution_ms_per_lead"]
    )
    return {"leadwriter": asdict(runs["create_multiple"]), "batch_path": asdict(runs["batch"]), "execution": paths}


def _run_isolation(sim: SimulatorProcess, scenario: Scenario, tmp: Path, common: dict[str, Any]) -> dict[str, Any]:
    orgs = list(sim.apps)
    throttled, others = orgs[0], orgs[1:]
    per_publisher = max(1, scenario.leads // len(orgs))
    _status(f"[isolation] the other {len(others)} publishers alone: {per_publisher * len(others)} leads")
    calm = run_lead_writer(
        sim, per_publisher * len(others), publishers=others, data_dir=tmp / "calm", tag="calm", **common
    )
    # A second reading of "their unthrottled throughput": all ten publishers, none throttled. The tenth
    # then costs CPU too (it is delivered), so this baseline is lower than the nine alone.
    _status(f"[isolation] all {len(orgs)} publishers, none throttled: {per_publisher * len(orgs)} leads")
    all_calm = run_lead_writer(
        sim,
        per_publisher * len(orgs),
        publishers=orgs,
        awaited=set(others),
        data_dir=tmp / "all-calm",
        tag="all-calm",
        **common,
    )
    before = sim.request_log(throttled)
    sim.throttle_next(throttled, 1, scenario.throttled_retry_after)
    _status(
        f"[isolation] all {len(orgs)} publishers, {throttled} throttled for "
        f"{scenario.throttled_retry_after:.0f} s: {per_publisher * len(orgs)} leads"
    )
    hard = run_lead_writer(
        sim,
        per_publisher * len(orgs),
        publishers=orgs,
        awaited=set(others),
        data_dir=tmp / "throttled",
        tag="hard",
        **common,
    )
    after = sim.request_log(throttled)
    return {
        "leadwriter": asdict(hard),
        "unthrottled": asdict(calm),
        "isolation": {
            "throttled_publisher": throttled,
            "others_leads_per_second": hard.leads_per_second,
            "others_alone_leads_per_second": calm.leads_per_second,
            "ratio": _ratio(hard.leads_per_second, calm.leads_per_second),
            "others_with_all_unthrottled_leads_per_second": all_calm.leads_per_second,
            "ratio_vs_all_unthrottled": _ratio(hard.leads_per_second, all_calm.leads_per_second),
            "throttled_org": {
                "requests": int(after["total"]) - int(before["total"]),
                "throttled": int(after["throttled"]) - int(before["throttled"]),
                "during_penalty": int(after["during_penalty"]) - int(before["during_penalty"]),
                "delivered": int(hard.per_publisher_leads_per_second.get(throttled, 0.0) > 0),
            },
        },
    }


def run_bench(
    *,
    scenario: str = "throughput",
    leads: int | None = None,
    publishers: int | None = None,
    latency: float | None = None,
    naive_leads: int | None = None,
    rate: float | None = None,
    requests_per_window: int | None = None,
    window_seconds: float | None = None,
    max_batch: int | None = None,
    as_json: bool = False,
) -> int:
    """Run a scenario (options given override its values) and print its figures and targets.

    Returns the exit status: 1 if leads went missing, 2 for an unknown scenario.
    """
    base = SCENARIOS.get(scenario)
    if base is None:
        console.print(f"unknown scenario {scenario!r}; one of: {', '.join(SCENARIOS)}")
        return 2
    overrides: dict[str, Any] = {
        "leads": leads,
        "publishers": publishers,
        "latency": latency,
        "naive_leads": naive_leads,
        "rate": rate,
        "requests_per_window": requests_per_window,
        "window_seconds": window_seconds,
        "max_batch": max_batch,
    }
    chosen = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    result = run_scenario(chosen)
    if as_json:
        print(json.dumps(result, indent=2))  # the JSON is the command's output
    else:
        _print_tables(result)
    return 0 if _all_delivered(result) else 1


def _all_delivered(result: dict[str, Any]) -> bool:
    if result["scenario"] == "endtoend" and "endtoend" in result:
        from shared.tools.bench_endtoend import all_stored_once

        return all_stored_once(result)
    if result["scenario"] == "execution" and "execution" in result:
        # Each path stops after three windows by design, with leads still queued.
        return bool(result["leadwriter"]["delivered"] > 0 and result["batch_path"]["delivered"] > 0)
    if result["scenario"] == "limits" and "limits" in result:
        # The run stops after three windows by design, with leads still queued.
        return bool(result["leadwriter"]["delivered"] > 0)
    if "publishers" in result:
        return bool(result["publishers"]["lost"] == 0 and result["publishers"]["healthy_undelivered"] == 0)
    runs = [result["leadwriter"], result.get("unthrottled")]
    if "isolation" in result:
        # The throttled publisher's leads wait out its penalty: the nine others' must all be there.
        hard, calm = result["leadwriter"], result["unthrottled"]
        nine = calm["leads"]
        return bool(hard["delivered"] >= nine and calm["delivered"] >= nine)
    return all(run["delivered"] == run["leads"] for run in runs if run is not None)


def _print_tables(result: dict[str, Any]) -> None:
    ours: dict[str, Any] = result["leadwriter"]
    other_name, other = ("naive", result.get("naive"))
    if "unthrottled" in result:
        other_name, other = ("calm" if "publishers" in result else "nine alone"), result["unthrottled"]
    second = result.get("http_path")  # endtoend: the HTTP ingest path beside the enqueue path
    title = f"leadwriter bench --scenario {result['scenario']}"
    if result.get("speedup") is not None:
        title += f" — speed-up over the naive deliverer: {result['speedup']}x"
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("Lead Writer" if second is None else "via enqueue", justify="right")
    if second is not None:
        table.add_column("via HTTP", justify="right")
    if other is not None:
        table.add_column(other_name, justify="right")
    for name, value in ours.items():
        if name in (
            "per_publisher_leads_per_second",
            "servicebus_operations",
            "servicebus_operations_per_lead",
            "faulty",
            "dead_letter_reasons",
        ):
            continue
        row = [name.replace("_", " "), str(value)]
        if second is not None:
            row.append(str(second.get(name)))
        if other is not None:
            row.append(str(other.get(name)))
        table.add_row(*row)
    out = Console()
    out.print(table)
    if ours.get("servicebus_operations_per_lead"):
        kinds = ", ".join(f"{k} {v:g}" for k, v in ours["servicebus_operations_per_lead"].items())
        out.print(f"Service Bus operations per lead: {kinds}")
    for extra in ("limits", "isolation", "execution", "endtoend", "publishers"):
        if extra in result:
            out.print(f"{extra}: {json.dumps(result[extra])}")
    targets = Table(title="targets")
    for column in ("target", "measured", "limit", "met"):
        targets.add_column(column)
    for t in result["targets"]:
        targets.add_row(t["name"], str(t["measured"]), f"{t['op']} {t['limit']:g}", "yes" if t["met"] else "NO")
    out.print(targets)


__all__ = ["SCENARIOS", "RunFigures", "Scenario", "run_bench", "run_lead_writer", "run_naive", "run_scenario"]

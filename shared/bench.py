"""``leadwriter bench`` (DESIGN §10): Lead Writer against a naive deliverer, in the same run.

The CRM simulator runs in a child process (so its CPU is not counted as ours); Lead Writer's three
stage workers run in this process on the embedded broker and secret store. Reported, for N leads over
P publishers at a set CRM latency: leads/s, enqueue→written latency p50/p95/p99, CRM requests, token
requests and secret-store reads per lead, CPU ms per lead of this process, peak RSS — and the same
throughput for a naive deliverer (a fresh token, a solution check and a create per lead, one at a
time), as a ratio. Figures are measured, never asserted: machines are shared and noisy.
"""

from __future__ import annotations

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
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import requests
from azure.identity import ClientSecretCredential
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from shared.connection import ClientSecretAuth, Connection
from shared.lead import lead_record_id, parse_incoming, to_dataverse_columns
from shared.messages import envelope
from shared.names import PROP_LEAD_ID, QUEUE_INCOMING
from shared.runtime import EmbeddedRuntime
from shared.services import Services
from shared.settings import DEFAULT_SOLUTION_NAME, Settings
from shared.settle import Settled
from shared.transport.base import OutgoingMessage

console = Console(stderr=True)


@dataclass
class SimulatorInfo:
    authority_host: str
    ca_path: str
    host: str
    orgs: dict[str, dict[str, str]]  # name -> url, tenant, client id, secret


def _simulator_process(
    config: dict[str, Any], data_dir: str, out: multiprocessing.Queue[Any], stop: EventType
) -> None:
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

    def __init__(self, publishers: int, latency: float, limits: dict[str, Any], data_dir: Path) -> None:
        self.apps = {f"bench{i:02d}": (str(uuid.uuid4()), secrets.token_urlsafe(24)) for i in range(publishers)}
        config = {
            "orgs": [
                {
                    "name": name,
                    "solutionVersion": "1.2.0.0",
                    "latency": latency,
                    "limits": limits,
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


def _message(publisher: str, n: int) -> dict[str, Any]:
    return {
        "leadId": f"{publisher}-{n:06d}",
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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_lead_writer(
    sim: SimulatorProcess,
    leads: int,
    *,
    rate: float = 0.0,
    data_dir: Path,
    concurrency: int = 16,
    timeout: float = 600.0,
    progress: Callable[[int], None] | None = None,
) -> RunFigures:
    """Deliver ``leads`` through all three stages; figures for this process's work."""
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
    publishers = list(sim.apps)
    for publisher in publishers:
        services.connections.put(publisher, sim.connection(publisher))
    services.connections.reads = 0
    tokens_before = sim.token_requests()
    crm_before = {p: sim.crm_requests(p) for p in publishers}

    sent_at: dict[str, float] = {}
    delivered_at: dict[str, float] = {}
    done = threading.Event()
    lock = threading.Lock()

    def observe(settled: Settled) -> None:
        if settled.stage == "write_lead" and settled.action == "delivered":
            lead_id = str(settled.message.application_properties.get(PROP_LEAD_ID))
            with lock:
                delivered_at[lead_id] = time.monotonic()
                if len(delivered_at) >= leads:
                    done.set()

    messages = [_message(publishers[n % len(publishers)], n) for n in range(leads)]
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    runtime = EmbeddedRuntime(
        services.transport, services.pipeline, concurrency=concurrency, publisher_concurrency=8, observer=observe
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
                    time.sleep(pause)
                sent_at[lead_id] = time.monotonic()
                services.transport.send(QUEUE_INCOMING, [item])
            else:
                batch.append(item)
                sent_at[lead_id] = started
                if len(batch) == 500:
                    services.transport.send(QUEUE_INCOMING, batch)
                    batch = []
        if batch:
            services.transport.send(QUEUE_INCOMING, batch)
        deadline = started + timeout
        while not done.wait(0.5) and time.monotonic() < deadline:
            if progress is not None:
                progress(len(delivered_at))
    finally:
        runtime.stop()
    elapsed = (max(delivered_at.values()) if delivered_at else time.monotonic()) - started
    cpu = _cpu_seconds() - cpu_before
    latencies = [(delivered_at[k] - sent_at[k]) * 1000 for k in delivered_at if k in sent_at]
    crm = sum(sim.crm_requests(p) - crm_before[p] for p in publishers)
    logs = [sim.request_log(p) for p in publishers]
    count = max(len(delivered_at), 1)
    figures = RunFigures(
        leads=leads,
        delivered=len(delivered_at),
        seconds=round(elapsed, 3),
        leads_per_second=round(len(delivered_at) / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms_p50=round(_percentile(latencies, 0.50), 1),
        latency_ms_p95=round(_percentile(latencies, 0.95), 1),
        latency_ms_p99=round(_percentile(latencies, 0.99), 1),
        crm_requests_per_lead=round(crm / count, 3),
        token_requests_per_lead=round((sim.token_requests() - tokens_before) / count, 4),
        secret_reads_per_lead=round(services.connections.reads / count, 4),
        cpu_ms_per_lead=round(cpu * 1000 / count, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        requests_during_penalty=sum(int(log["during_penalty"]) for log in logs),
        throttled=sum(int(log["throttled"]) for log in logs),
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
        message = parse_incoming(json.dumps(_message(publisher, 10_000_000 + n)).encode())
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
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def run_bench(
    *,
    leads: int = 2000,
    publishers: int = 1,
    latency: float = 0.05,
    naive_leads: int = 100,
    rate: float = 0.0,
    requests_per_window: int = 6000,
    window_seconds: float = 300.0,
    as_json: bool = False,
) -> int:
    """Run the benchmark and print its figures; returns the exit status (1 if leads went missing)."""
    limits = {"requestsPerWindow": requests_per_window, "windowSeconds": window_seconds, "maxConcurrent": 52}
    with tempfile.TemporaryDirectory(prefix="leadwriter-bench-") as tmp:
        sim = SimulatorProcess(publishers, latency, limits, Path(tmp) / "simulator")
        try:
            console.print(f"Lead Writer: {leads} leads, {publishers} publisher(s), CRM latency {latency * 1000:.0f} ms")
            ours = run_lead_writer(sim, leads, rate=rate, data_dir=Path(tmp) / "leadwriter")
            naive_count = min(naive_leads, leads)
            console.print(f"naive deliverer: {naive_count} leads")
            naive = run_naive(sim, naive_count)
        finally:
            sim.stop()
    result = {
        "config": {
            "leads": leads,
            "publishers": publishers,
            "crmLatencyMs": latency * 1000,
            "rate": rate,
            "requestsPerWindow": requests_per_window,
            "windowSeconds": window_seconds,
        },
        "leadwriter": asdict(ours),
        "naive": asdict(naive),
        "speedup": round(ours.leads_per_second / naive.leads_per_second, 1) if naive.leads_per_second else None,
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        table = Table(title=f"leadwriter bench — speed-up over the naive deliverer: {result['speedup']}x")
        table.add_column("figure")
        table.add_column("Lead Writer", justify="right")
        table.add_column("naive", justify="right")
        for name in asdict(ours):
            if name == "per_publisher_leads_per_second":
                continue
            table.add_row(name.replace("_", " "), str(getattr(ours, name)), str(getattr(naive, name)))
        Console().print(table)
    return 0 if ours.delivered == leads else 1


__all__ = ["RunFigures", "run_bench", "run_lead_writer", "run_naive"]

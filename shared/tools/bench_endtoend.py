"""The ``endtoend`` bench scenario: what a user gets from the real entry points, as processes.

``leadwriter serve`` runs as one process (the stage workers and the HTTP API, at the default log
level, its log going to a file as a user's would). The leads reach it one of two ways:

- **enqueue**: ``leadwriter enqueue -`` as a second process, its stdin fed the leads as JSON lines
  (it writes them into the broker file the serve process reads);
- **http**: ``POST /api/publishers/{publisherId}/leads`` on the API ``serve`` answers, from a few
  client threads in this process with a publisher key.

The CRM is the simulator in its own process (``SimulatorProcess``). A run is timed from the start of
the enqueue (the process start, or the first POST) to the last lead stored in the CRM, found by
polling the simulator's lead count; the naive deliverer runs against the same simulator in the same
run and gives the ratio. Figures of the serve process (CPU, peak RSS) come from ``/proc``; its
secret-store reads from ``GET /api/stats``. After each run every lead is checked to be in the CRM
exactly once and nothing to be left in a queue or dead-lettered.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

import shared
from shared.names import STAGE_QUEUES
from shared.pipeline.lead import lead_record_id
from shared.services import Services
from shared.settings import Settings
from shared.tools.bench import RunFigures, SimulatorProcess, _message, _percentile, _ratio, _status, run_naive

if TYPE_CHECKING:
    from shared.tools.bench import Scenario

#: Seconds between polls of the simulator's lead count: the resolution of "last lead stored".
POLL = 0.02
#: Client threads posting leads on the HTTP path (keep-alive connections to serve's API).
HTTP_CLIENTS = 8
#: The entry points a run takes, in the order they run.
PATHS = ("enqueue", "http")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _repo_root() -> Path:
    # The checkout whose code this process runs, so that the child processes run the same code.
    return Path(shared.__file__).resolve().parent.parent


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without Lead Writer's own settings, the checkout first on PYTHONPATH,
    plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEADWRITER_", "APPLICATIONINSIGHTS_"))}
    path = [str(_repo_root()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    # The ``leadwriter`` console script is shared.tools.cli:main; run it as a module so it works from
    # any checkout, whatever the venv's editable install points at.
    return [sys.executable, "-m", "shared.tools.cli", *args]


class ServeProcess:
    """``leadwriter serve`` in a child process, its log in ``log_path``."""

    def __init__(self, env: dict[str, str], port: int, admin_key: str, log_path: Path) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self._admin = {"Authorization": f"Bearer {admin_key}"}
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(_cli("serve"), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.ready_seconds = 0.0

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the API answers; raises RuntimeError if serve exits or does not come up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"leadwriter serve exited ({self.process.returncode}); see {self.log_path}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.base}/api/health", timeout=2).status_code == 200:
                    self.ready_seconds = time.monotonic() - self.started
                    return
            time.sleep(0.05)  # polling for start-up, not waiting for a result
        raise RuntimeError(f"leadwriter serve did not come up in {timeout:.0f} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the serve process so far (``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def peak_rss_mb(self) -> float:
        """The serve process's peak resident set (``VmHWM``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def stats(self) -> dict[str, Any]:
        response = requests.get(f"{self.base}/api/stats", headers=self._admin, timeout=30)
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> int:
        """SIGTERM, then wait for the graceful stop; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return int(self.process.returncode)


def _lines(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\n" for m in messages)


def _feed_enqueue(env: dict[str, str], messages: list[dict[str, Any]], sent_at: dict[str, float]) -> dict[str, Any]:
    """Pipe the leads into ``leadwriter enqueue -``; every lead counts as sent when the process starts."""
    started = time.monotonic()
    process = subprocess.Popen(
        _cli("enqueue", "-"), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for m in messages:
        sent_at[str(m["leadId"])] = started
    out, err = process.communicate(_lines(messages), timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"leadwriter enqueue failed ({process.returncode}): {err.decode(errors='replace')[-500:]}")
    return {"enqueue_seconds": round(time.monotonic() - started, 3), "enqueue_output": out.decode().strip()}


def _feed_http(
    serve: ServeProcess, key: str, messages: list[dict[str, Any]], sent_at: dict[str, float]
) -> dict[str, Any]:
    """POST every lead to the ingest endpoint from HTTP_CLIENTS threads; raises RuntimeError on a refusal."""
    started = time.monotonic()
    lock = threading.Lock()
    todo = iter(messages)
    errors: list[str] = []
    answers: dict[int, int] = {}

    def client() -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        while True:
            with lock:
                m = next(todo, None)
            if m is None or errors:
                return
            body = json.dumps(m).encode()
            lead_id = str(m["leadId"])
            sent = time.monotonic()
            try:
                response = session.post(
                    f"{serve.base}/api/publishers/{m['publisherId']}/leads", data=body, headers=headers, timeout=60
                )
            except requests.RequestException as exc:
                with lock:
                    errors.append(f"{lead_id}: {type(exc).__name__}")
                return
            with lock:
                sent_at[lead_id] = sent
                answers[response.status_code] = answers.get(response.status_code, 0) + 1
                if response.status_code != 202:
                    errors.append(f"{lead_id}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, name=f"bench-http-{n}") for n in range(HTTP_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"the ingest endpoint refused leads: {errors[:3]}")
    seconds = time.monotonic() - started
    return {
        "post_seconds": round(seconds, 3),
        "posts_per_second": round(len(messages) / seconds, 1) if seconds > 0 else 0.0,
        "answers": {str(k): v for k, v in sorted(answers.items())},
    }


def _poll_stored(sim: SimulatorProcess, org: str, before: int, total: int, timeout: float) -> list[tuple[float, int]]:
    """(time, leads stored since ``before``) at each change, until ``total`` are stored or ``timeout``."""
    timeline: list[tuple[float, int]] = []
    last = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        count = int(sim._get(f"orgs/{org}/leads/count")["count"]) - before
        if count != last:
            timeline.append((now, count))
            last = count
        if count >= total:
            break
        time.sleep(POLL)  # polling the simulator's count
    return timeline


def _store_times(timeline: list[tuple[float, int]], total: int) -> list[float]:
    """When the k-th lead (in write order) was first seen stored, for k < total."""
    times: list[float] = []
    for at, count in timeline:
        while len(times) < min(count, total):
            times.append(at)
    return times


def _left(stats: dict[str, Any]) -> int:
    queues = {q["queue"]: q for q in stats["queues"]}
    return sum(int(queues[q]["active"]) + int(queues[q]["scheduled"]) for q in STAGE_QUEUES)


def _settled_stats(serve: ServeProcess, timeout: float = 15.0) -> dict[str, Any]:
    """``/api/stats`` once the last messages are settled (a lead is stored before its message is
    completed), or at ``timeout``."""
    deadline = time.monotonic() + timeout
    stats = serve.stats()
    while _left(stats) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the broker's counts
        stats = serve.stats()
    return stats


def _check_once(
    sim: SimulatorProcess, org: str, before: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> dict[str, Any]:
    """The run's leads in the CRM: each exactly once, none missing; and their record ids in write order."""
    known = {str(r["leadid"]) for r in before}
    written = [str(r["leadid"]) for r in sim._get(f"orgs/{org}/leads")["value"] if str(r["leadid"]) not in known]
    expected = {str(lead_record_id(str(m["publisherId"]), str(m["leadId"]))) for m in messages}
    return {
        "written_in_order": written,
        "stored_once": len(written) == len(set(written)) and set(written) == expected,
        "missing": len(expected - set(written)),
        "unexpected": len(set(written) - expected),
    }


def run_path(
    sim: SimulatorProcess,
    scenario: Scenario,
    path: str,
    data_dir: Path,
    *,
    timeout: float = 600.0,
) -> tuple[RunFigures, dict[str, Any]]:
    """One end-to-end run through ``path`` ("enqueue" or "http"): its figures, and what only this
    scenario reports (start-up, feeding, the checks). Raises RuntimeError when a process fails."""
    publishers = list(sim.apps)
    org = publishers[0]
    if len(publishers) != 1:
        raise RuntimeError("the endtoend scenario runs one publisher")
    port = _free_port()
    admin_key = secrets.token_urlsafe(32)
    settings_env = {
        "LEADWRITER_DATA_DIR": str(data_dir),
        "LEADWRITER_CRM_ALLOWED_HOSTS": f"{sim.info.host}:*",
        "AZURE_AUTHORITY_HOST": sim.info.authority_host,
        "REQUESTS_CA_BUNDLE": sim.info.ca_path,
        "LEADWRITER_HTTP_PORT": str(port),
        "LEADWRITER_ADMIN_KEY": admin_key,
        "LEADWRITER_MAX_BATCH": str(scenario.max_batch),
        "LEADWRITER_CREATE_MULTIPLE": "true" if scenario.create_multiple else "false",
    }
    # Set up as a user would before serving: the publisher's connection, and (http) its key.
    setup = Services.from_settings(Settings.from_env(settings_env))
    try:
        setup.connections.put(org, sim.connection(org))
        key = setup.api_keys.issue(org) if path == "http" else ""
    finally:
        setup.close()
    env = child_env(settings_env)
    serve = ServeProcess(env, port, admin_key, data_dir.parent / f"serve-{path}.log")
    extra: dict[str, Any] = {"path": path}
    try:
        serve.wait_ready()
        extra["serve_ready_seconds"] = round(serve.ready_seconds, 3)
        messages = [_message(org, n, path[:2]) for n in range(scenario.leads)]
        before_leads = sim._get(f"orgs/{org}/leads")["value"]
        before = len(before_leads)
        tokens_before = sim.token_requests()
        log_before = sim.request_log(org)
        cpu_before = serve.cpu_seconds()
        sent_at: dict[str, float] = {}
        started = time.monotonic()
        poller: list[list[tuple[float, int]]] = []
        watcher = threading.Thread(
            target=lambda: poller.append(_poll_stored(sim, org, before, len(messages), timeout)),
            name="bench-poll",
        )
        watcher.start()
        if path == "enqueue":
            extra.update(_feed_enqueue(env, messages, sent_at))
        else:
            extra.update(_feed_http(serve, key, messages, sent_at))
        watcher.join()
        cpu = serve.cpu_seconds() - cpu_before
        peak_rss = serve.peak_rss_mb()
        timeline = poller[0] if poller else []
        stats = _settled_stats(serve)
    finally:
        status = serve.stop()
    extra["serve_exit_status"] = status
    log_text = serve.log_path.read_text(errors="replace")
    extra["serve_log_lines"] = log_text.count("\n")
    extra["serve_log_bytes"] = len(log_text.encode())
    log = sim.request_log(org)
    check = _check_once(sim, org, before_leads, messages)
    stored = _store_times(timeline, len(messages))
    delivered = len(stored)
    end = stored[-1] if stored else time.monotonic()
    elapsed = end - started
    by_id = {str(lead_record_id(str(m["publisherId"]), str(m["leadId"]))): str(m["leadId"]) for m in messages}
    latencies = [
        (t - sent_at[by_id[record]]) * 1000
        for record, t in zip(check.pop("written_in_order"), stored, strict=False)
        if record in by_id and by_id[record] in sent_at
    ]
    queues = {q["queue"]: q for q in stats["queues"]}
    extra["left_in_queues"] = _left(stats)
    extra["dead_lettered"] = sum(int(queues[q]["deadLettered"]) for q in STAGE_QUEUES)
    extra.update(check)
    count = max(delivered, 1)
    crm = int(log["total"]) - int(log_before["total"])
    figures = RunFigures(
        leads=len(messages),
        delivered=delivered,
        seconds=round(elapsed, 3),
        leads_per_second=round(delivered / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms_p50=round(_percentile(latencies, 0.50), 1),
        latency_ms_p95=round(_percentile(latencies, 0.95), 1),
        latency_ms_p99=round(_percentile(latencies, 0.99), 1),
        crm_requests_per_lead=round(crm / count, 3),
        token_requests_per_lead=round((sim.token_requests() - tokens_before) / count, 4),
        secret_reads_per_lead=round(int(stats.get("secretStoreReads") or 0) / count, 4),
        cpu_ms_per_lead=round(cpu * 1000 / count, 3),
        peak_rss_mb=peak_rss,
        requests_during_penalty=int(log["during_penalty"]) - int(log_before["during_penalty"]),
        throttled=int(log["throttled"]) - int(log_before["throttled"]),
        per_publisher_leads_per_second={org: round(delivered / elapsed, 1) if elapsed > 0 else 0.0},
        crm_requests=crm,
        crm_requests_per_second=round(crm / elapsed, 2) if elapsed > 0 else 0.0,
    )
    return figures, extra


def run_endtoend(sim: SimulatorProcess, scenario: Scenario, tmp: Path) -> dict[str, Any]:
    """Both entry points, then the naive deliverer, against one simulator: every figure and ratio."""
    result: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    figures: dict[str, RunFigures] = {}
    for path in PATHS:
        _status(
            f"[endtoend] leadwriter serve + {'leadwriter enqueue -' if path == 'enqueue' else 'POST …/leads'}: "
            f"{scenario.leads} leads, CRM latency {scenario.latency * 1000:.0f} ms"
        )
        (tmp / path).mkdir(parents=True, exist_ok=True)
        figures[path], paths[path] = run_path(
            sim, scenario, path, tmp / path / "data", timeout=max(600.0, scenario.leads / 2)
        )
    result["leadwriter"] = asdict(figures["enqueue"])
    result["http_path"] = asdict(figures["http"])
    naive_count = min(scenario.naive_leads, scenario.leads)
    naive = None
    if naive_count > 0:
        _status(f"[endtoend] naive deliverer: {naive_count} leads")
        naive = run_naive(sim, naive_count)
        result["naive"] = asdict(naive)
    naive_rate = naive.leads_per_second if naive is not None else None
    for path in PATHS:
        paths[path]["speedup"] = _ratio(figures[path].leads_per_second, naive_rate)
    result["speedup"] = paths["enqueue"]["speedup"]
    result["endtoend"] = paths
    return result


def all_stored_once(result: dict[str, Any]) -> bool:
    """Every lead of both paths in the CRM exactly once, nothing left queued or dead-lettered."""
    paths: dict[str, Any] = result.get("endtoend", {})
    return bool(paths) and all(
        p["stored_once"] and p["left_in_queues"] == 0 and p["dead_lettered"] == 0 for p in paths.values()
    )


__all__ = ["PATHS", "ServeProcess", "all_stored_once", "child_env", "run_endtoend", "run_path"]

"""``leadwriter crm-simulator``: run the simulator in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from shared.simulator.simulator import CrmSimulator

logger = logging.getLogger(__name__)

#: The demo org's credentials (a local simulator's, not anybody's real ones).
DEMO_ORG = "contoso"
DEMO_USERNAME = "svc@contoso.example"
DEMO_PASSWORD = "Demo-Passw0rd!"  # noqa: S105 - the local demo org's, printed on purpose
DEMO_CLIENT_ID = "6d0a8c53-2f1e-4b7a-9c3d-5e8f1a2b3c4d"
DEMO_CLIENT_SECRET = "demo~Secret.Value_0123456789"  # noqa: S105 - idem


def build(
    config: Path | None, data_dir: Path, host: str, authority_port: int
) -> tuple[CrmSimulator, list[str]]:
    """The (unstarted) simulator and the credential lines to show: the config's orgs, or the demo org.

    Raises SimulatorConfigError for an invalid config, OSError when a listener cannot bind.
    """
    if config is not None:
        simulator = CrmSimulator.from_config(config, data_dir, host=host, authority_port=authority_port)
        return simulator, ["credentials: as in " + str(config)]
    simulator = CrmSimulator(data_dir, host=host, authority_port=authority_port)
    simulator.add_org(DEMO_ORG, solution_version="1.2.0.0")
    simulator.add_user(DEMO_ORG, DEMO_USERNAME, DEMO_PASSWORD)
    simulator.add_app(DEMO_ORG, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
    return simulator, [
        f"user:   {DEMO_USERNAME} / {DEMO_PASSWORD}",
        f"app:    client id {DEMO_CLIENT_ID} / secret {DEMO_CLIENT_SECRET}",
    ]


def environment_lines(simulator: CrmSimulator) -> list[str]:
    """The ``export`` lines that point Lead Writer at the simulator."""
    return [
        f"export AZURE_AUTHORITY_HOST={simulator.authority_host}",
        f"export REQUESTS_CA_BUNDLE={simulator.ca_path}",
        f"export LEADWRITER_CRM_ALLOWED_HOSTS={simulator.host}:*",
    ]


def run(config: Path | None, data_dir: Path, host: str, authority_port: int) -> None:
    """Start the simulator, print how to use it, and block until SIGINT or SIGTERM; then stop cleanly.

    Raises SimulatorConfigError for an invalid config, OSError when an address cannot be bound
    (port 443 needs root or CAP_NET_BIND_SERVICE).
    """
    simulator, credentials = build(config, data_dir, host, authority_port)
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with simulator:
            _show(simulator, credentials)
            done.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    Console(stderr=True).print("simulator stopped")


def _show(simulator: CrmSimulator, credentials: list[str]) -> None:
    console = Console()
    console.print(f"[bold]Lead Writer CRM simulator[/bold] — authority {simulator.authority_host}")
    console.print(f"CA certificate: {simulator.ca_path}")
    table = Table("org", "CRM URL", "tenant id")
    for org in simulator.orgs():
        table.add_row(org.name, org.url, org.tenant_id)
    console.print(table)
    for line in credentials:
        console.print(line, markup=False)
    console.print(f"admin API: {simulator.authority_host}/_simulator/orgs")
    console.print("\nEnvironment for Lead Writer:")
    for line in environment_lines(simulator):
        console.print(line, markup=False, soft_wrap=True)
    console.print("\nPress Ctrl+C to stop.")

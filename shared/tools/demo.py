"""``leadwriter demo``: the main job end to end on the embedded default, with the CRM simulator.

It starts the simulator (HTTPS, its own CA), registers two publishers the way a publisher would
(connection verified live, stored in the encrypted secret store), sends a varied batch of marketplace
leads (including a malformed one and a marketplace test lead) through the three stages, and shows
them arriving in the simulated CRM and the malformed one in the dead-letter queue with its reason.
Exit status 0 only when every valid lead was written exactly once and the malformed one was
dead-lettered ``InvalidLead``.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from shared.crm.connection import ClientSecretAuth, Connection, PasswordAuth
from shared.crm.metadata import validate_mapping
from shared.crm.verify import verify_connection
from shared.errors import DeadLetterReason, InvalidLead
from shared.names import QUEUE_INCOMING, STAGE_QUEUES
from shared.ops.deadletters import DeadLetterFilter, list_dead_letters
from shared.pipeline.lead import parse_incoming
from shared.pipeline.mapping import parse_mapping
from shared.pipeline.messages import envelope
from shared.runtime.embedded import wait_until
from shared.services import Services
from shared.settings import Settings
from shared.simulator import CrmSimulator

console = Console()

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "leads.jsonl"
DEMO_DIR = Path(".leadwriter") / "demo"


def _start_simulator(data_dir: Path) -> tuple[CrmSimulator, bool]:
    """Start on a loopback address's port 443 (the password flow needs 443: azure-identity's user-realm
    lookup drops the port), trying 127.0.0.2 onwards in case one is taken (a running simulator, tests);
    without the rights for port 443, on a free port (client-secret connections only)."""
    for last_octet in range(2, 20):
        try:
            return CrmSimulator(data_dir, host=f"127.0.0.{last_octet}", authority_port=443).start(), True
        except PermissionError:
            break
        except OSError:
            continue
    return CrmSimulator(data_dir, host="127.0.0.1", authority_port=0).start(), False


def _messages(path: Path, fabrikam_count: int) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i in range(fabrikam_count):
        lines.append(
            {
                "leadId": f"fabrikam-{i:03d}",
                "publisherId": "fabrikam",
                "lead": {
                    "userDetails": {"firstName": f"Grace{i}", "lastName": "Hopper", "email": f"grace{i}@example.org"},
                    "leadSource": "AppSource-PLT|fabrikam.analytics",
                    "offerTitle": "Fabrikam Analytics",
                },
            }
        )
    return lines


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns the process exit status."""
    data_dir = DEMO_DIR.resolve()
    if data_dir.exists() and not keep:
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    console.rule("[bold]Lead Writer demo[/bold] — embedded broker, encrypted secret store, CRM simulator")
    simulator, password_flow = _start_simulator(data_dir / "simulator")
    try:
        return _run(simulator, password_flow, data_dir)
    finally:
        simulator.stop()


def _run(simulator: CrmSimulator, password_flow: bool, data_dir: Path) -> int:
    host = simulator.authority_host.split("://", 1)[1].split(":", 1)[0]
    settings = Settings.from_env(
        {
            "LEADWRITER_DATA_DIR": str(data_dir),
            "LEADWRITER_CRM_ALLOWED_HOSTS": f"{host}:*",
            "AZURE_AUTHORITY_HOST": simulator.authority_host,
            "REQUESTS_CA_BUNDLE": str(simulator.ca_path),
            "LEADWRITER_ADMIN_KEY": secrets.token_urlsafe(32),
        }
    )
    services = Services.from_settings(settings)

    contoso = simulator.add_org("contoso", solution_version="1.2.0.0")
    client_id, client_secret = str(uuid.uuid4()), secrets.token_urlsafe(24)
    simulator.add_app("contoso", client_id, client_secret)
    connections = {
        "contoso": Connection(
            url=contoso.url,
            auth=ClientSecretAuth(
                tenant_id=contoso.tenant_id, client_id=client_id, client_secret=SecretStr(client_secret)
            ),
        )
    }
    fabrikam_leads = 0
    if password_flow:
        fabrikam = simulator.add_org("fabrikam", solution_version="1.0.3.0")
        password = secrets.token_urlsafe(18)
        simulator.add_user("fabrikam", "svc-leadwriter@fabrikam.example", password)
        # No tenant given: it is discovered from the CRM's bearer challenge.
        connections["fabrikam"] = Connection(
            url=fabrikam.url,
            auth=PasswordAuth(username="svc-leadwriter@fabrikam.example", password=SecretStr(password)),
        )
        fabrikam_leads = 5

    console.print("\n[bold]1. Publishers hand over their CRM connections[/bold] (verified live, stored encrypted)")
    for publisher_id, connection in connections.items():
        report = verify_connection(services.pipeline, connection)
        verification = report.verification
        if not verification.ok:
            console.print(f"[red]verification of {publisher_id} failed: {verification.message}[/red]")
            return 1
        services.connections.put(publisher_id, connection.model_copy(update={"verification": verification}))
        console.print(
            f"  {publisher_id}: {connection.auth.kind} connection to {connection.url} — "
            f"solution {verification.solution_version}, user {verification.user_id}"
        )

    console.print("\n[bold]   contoso maps its leads[/bold] (campaign, owning team, subject, a column of its own)")
    simulator.add_column("contoso", "new_offer", "String", 100)
    mapping = validate_mapping(
        services.pipeline.client(connections["contoso"]),
        parse_mapping(
            {
                "campaignId": simulator.add_campaign("contoso", "Marketplace 2026"),
                "owner": {"type": "team", "id": simulator.add_team("contoso", "Marketplace sales")},
                "subjectTemplate": "{OfferTitle}: {Action} — {Company}",
                "columns": {"new_offer": "{OfferId}"},
            }
        ),
    )
    assert services.pipeline.mappings is not None
    services.pipeline.mappings.put("contoso", mapping)
    console.print(f"  contoso: mapping validated against the CRM's lead metadata at {mapping.validated_at:%H:%M:%S}")

    messages = _messages(SAMPLES, fabrikam_leads)
    expected: Counter[str] = Counter()
    malformed = 0
    outgoing = []
    for data in messages:
        body = json.dumps(data).encode()
        lead_id = str(data.get("leadId") or uuid.uuid4())
        try:
            parse_incoming(body, message_id=lead_id)
            expected[str(data["publisherId"])] += 1
        except InvalidLead:
            malformed += 1
        outgoing.append(envelope(body, publisher_id=str(data["publisherId"]), lead_id=lead_id))

    console.print(
        f"\n[bold]2. The marketplace sends {len(outgoing)} leads[/bold] ({malformed} malformed) to {QUEUE_INCOMING}"
    )
    services.transport.send(QUEUE_INCOMING, outgoing)

    started = time.monotonic()
    runtime = services.embedded_runtime(concurrency=8, publisher_concurrency=4).start()
    try:

        def settled() -> bool:
            written = all(len(simulator.leads(p)) >= n for p, n in expected.items())
            dead = sum(services.transport.stats(q).dead_lettered for q in STAGE_QUEUES)
            return written and dead >= malformed

        done = wait_until(settled, timeout=90)
    finally:
        runtime.stop()
    elapsed = time.monotonic() - started

    console.print(f"\n[bold]3. In the CRM[/bold] after {elapsed:.1f} s")
    table = Table()
    for column in ("publisher", "name", "company", "subject", "mapped"):
        table.add_column(column, overflow="fold")
    ok = done
    for publisher_id, count in expected.items():
        records = simulator.leads(publisher_id)
        ids = [r.get("leadid") for r in records]
        if len(records) != count or len(set(ids)) != len(ids):
            ok = False
        for record in records[:12]:
            name = " ".join(str(record.get(k) or "") for k in ("firstname", "lastname")).strip() or "-"
            mapped = ", ".join(
                label
                for label, column in (("campaign", "_campaignid_value"), ("team", "_ownerid_value"))
                if record.get(column)
            ) + (f", new_offer={record['new_offer']}" if record.get("new_offer") else "")
            table.add_row(
                publisher_id,
                name,
                str(record.get("companyname") or "-"),
                str(record.get("subject") or "-"),
                mapped if publisher_id == "contoso" else "default",
            )
        console.print(f"  {publisher_id}: {len(records)} lead(s) written (expected {count})")
    console.print(table)

    console.print("\n[bold]4. Dead letters[/bold] (what ops would see)")
    items = list_dead_letters(services.transport, DeadLetterFilter(), limit=100)
    dl_table = Table()
    for column in ("queue", "publisher", "reason", "description"):
        dl_table.add_column(column, overflow="fold")
    for item in items:
        dl_table.add_row(item.queue, item.publisher_id or "-", item.reason or "-", (item.description or "")[:160])
    console.print(dl_table)
    invalid = [i for i in items if i.reason == DeadLetterReason.INVALID_LEAD]
    if len(invalid) != malformed or len(items) != malformed:
        ok = False

    mapped_ok = all(r.get("_campaignid_value") and r.get("_ownerid_value") for r in simulator.leads("contoso"))
    if not mapped_ok:
        console.print("[red]contoso's leads did not land as its mapping says[/red]")
        ok = False

    crm_requests = sum(simulator.requests(p).total for p in expected)
    delivered = sum(expected.values())
    console.print(f"\nCRM requests: {crm_requests} for {delivered} leads; token requests: {simulator.token_requests()}")
    services.close()
    if ok:
        console.print(
            "[bold green]demo passed:[/bold green] every valid lead written exactly once, "
            "the malformed one dead-lettered InvalidLead"
        )
        return 0
    console.print("[bold red]demo failed:[/bold red] see the tables above")
    return 1

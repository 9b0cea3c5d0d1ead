"""A running pipeline for end-to-end tests: embedded backends, real stage workers, the CRM simulator.

Not a fixture module of its own: tests build a :class:`Harness` from the ``simulator`` fixture.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.connection import ClientSecretAuth, Connection, PasswordAuth
from shared.deadletters import DeadLetterFilter, DeadLetterItem, list_dead_letters
from shared.messages import envelope
from shared.names import QUEUE_INCOMING, STAGE_QUEUES
from shared.runtime import EmbeddedRuntime, wait_until
from shared.services import Services
from shared.simulator import CrmSimulator
from shared.transport.base import OutgoingMessage
from tests.fixtures.simulator import simulator_settings

#: Short retries so transient faults resolve within a test.
FAST_ENV = {
    "LEADWRITER_RETRY_SCHEDULE": "0.2,0.4,0.8,1,1,1,1,1",
    "LEADWRITER_CRM_READ_TIMEOUT": "2",
    "LEADWRITER_CRM_CONNECT_TIMEOUT": "2",
}


def lead_message(publisher_id: str, n: int, **lead: Any) -> dict[str, Any]:
    """A DESIGN §3 message with varied content."""
    details = {"FirstName": f"Ada{n}", "LastName": "Lovelace", "Email": f"ada{n}@example.com", "Company": "Contoso"}
    body: dict[str, Any] = {
        "leadId": f"{publisher_id}-{n:05d}",
        "publisherId": publisher_id,
        "lead": {
            ("UserDetails" if n % 2 else "userDetails"): details,
            "LeadSource": "AzureMarketplace-INS|contoso.widget-saas",
            "OfferTitle": "Contoso Widget",
            **lead,
        },
    }
    return body


class Harness:
    def __init__(self, simulator: CrmSimulator, data_dir: Path, **env: str) -> None:
        self.simulator = simulator
        self.settings = simulator_settings(simulator, data_dir, **{**FAST_ENV, **env})
        self.services = Services.from_settings(self.settings)
        self.runtime: EmbeddedRuntime | None = None

    # -- publishers --------------------------------------------------------------------------------

    def publisher(
        self,
        name: str | None = None,
        *,
        solution_version: str | None = "1.2.0.0",
        has_role: bool = True,
        kind: str = "clientSecret",
        store: bool = True,
        wrong_secret: bool = False,
    ) -> str:
        """A fresh org in the simulator and (unless store=False) its connection stored for a publisher
        of the same name. Returns the publisher id (= org name)."""
        name = name or f"pub{uuid.uuid4().hex[:10]}"
        org = self.simulator.add_org(name, solution_version=solution_version)
        secret = secrets.token_urlsafe(16)
        if kind == "clientSecret":
            client_id = str(uuid.uuid4())
            self.simulator.add_app(name, client_id, secret, has_role=has_role)
            auth: ClientSecretAuth | PasswordAuth = ClientSecretAuth(
                tenantId=org.tenant_id, clientId=client_id, clientSecret=secret + ("x" if wrong_secret else "")
            )
        else:
            username = f"svc@{name}.example"
            self.simulator.add_user(name, username, secret, has_role=has_role)
            auth = PasswordAuth(username=username, password=secret + ("x" if wrong_secret else ""))
        if store:
            self.services.connections.put(name, Connection(url=org.url, auth=auth))
        return name

    # -- traffic -----------------------------------------------------------------------------------

    def send(self, messages: Iterable[dict[str, Any] | bytes | OutgoingMessage]) -> None:
        batch: list[OutgoingMessage] = []
        for item in messages:
            if isinstance(item, OutgoingMessage):
                batch.append(item)
            elif isinstance(item, bytes):
                batch.append(OutgoingMessage(body=item, message_id=str(uuid.uuid4())))
            else:
                batch.append(
                    envelope(
                        json.dumps(item).encode(),
                        publisher_id=str(item.get("publisherId")),
                        lead_id=str(item["leadId"]),
                    )
                )
        self.services.transport.send(QUEUE_INCOMING, batch)

    def start(self, **kwargs: Any) -> EmbeddedRuntime:
        self.runtime = EmbeddedRuntime(
            self.services.transport, self.services.pipeline, observer=self.services.status.observe, **kwargs
        ).start()
        return self.runtime

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None

    # -- observations ------------------------------------------------------------------------------

    def written(self, publisher_id: str) -> list[dict[str, Any]]:
        return self.simulator.leads(publisher_id)

    def dead_letters(self, **filters: Any) -> list[DeadLetterItem]:
        return list_dead_letters(self.services.transport, DeadLetterFilter.build(**filters), limit=10_000)

    def pending(self) -> int:
        return sum(s.active + s.scheduled for s in (self.services.transport.stats(q) for q in STAGE_QUEUES))

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> None:
        assert wait_until(predicate, timeout), "condition not reached before the deadline"


@contextmanager
def running(simulator: CrmSimulator, data_dir: Path, **env: str) -> Iterator[Harness]:
    harness = Harness(simulator, data_dir, **env)
    try:
        yield harness
    finally:
        harness.stop()
        harness.services.close()

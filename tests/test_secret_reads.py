"""Secret-store reads are cached: an unconfigured publisher's backlog, or a burst of requests with one
key, must not become a Key Vault transaction per lead or per request."""

from __future__ import annotations

import math
import time
from pathlib import Path

from shared.ops.apikeys import ApiKeyStore
from shared.pipeline.pipeline import FRESH_READ_INTERVAL, MISSING_TTL
from shared.secretstore import make_secret_store
from shared.services import Services
from shared.settings import Settings
from shared.simulator import CrmSimulator
from tests.fixtures.harness import lead_message, running


class CountingStore:
    """Counts reads through the real embedded store."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.reads = 0

    def get(self, name: str) -> str | None:
        self.reads += 1
        return self.inner.get(name)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_an_unconfigured_publishers_backlog_reads_the_secret_store_a_handful_of_times_not_per_lead(
    simulator: CrmSimulator, tmp_path: Path
) -> None:
    with running(simulator, tmp_path) as h:
        counting = CountingStore(h.services.connections._store)
        h.services.connections._store = counting  # type: ignore[assignment]
        h.send([lead_message("nobody-configured", n) for n in range(60)])
        started = time.monotonic()
        h.start()
        h.wait_for(lambda: len(h.dead_letters(reason="CredentialsMissing")) == 60)
        elapsed = time.monotonic() - started

    # One cached read, then one "read it fresh" per interval; however many worker threads the first
    # leads met at once (the bound grows with a slow machine's run time, never with the lead count).
    allowed = 1 + math.ceil(elapsed / FRESH_READ_INTERVAL) + math.ceil(elapsed / MISSING_TTL)
    assert counting.reads <= allowed, f"{counting.reads} secret reads for 60 leads in {elapsed:.1f} s"


def test_a_burst_of_requests_with_one_key_reads_its_record_once(tmp_path: Path) -> None:
    settings = Settings.from_env({"LEADWRITER_DATA_DIR": str(tmp_path)})
    counting = CountingStore(make_secret_store(settings))
    keys = ApiKeyStore(counting)  # type: ignore[arg-type]
    key = keys.issue("contoso")

    owners = [keys.verify(key) for _ in range(50)] + [keys.verify(key.replace("_", "-", 1)) for _ in range(5)]

    assert owners == ["contoso"] * 50 + [None] * 5
    assert counting.reads == 1


def test_a_revoked_key_stops_working_at_once_on_the_instance_that_revoked_it(tmp_path: Path) -> None:
    services = Services.from_settings(Settings.from_env({"LEADWRITER_DATA_DIR": str(tmp_path)}))
    try:
        key = services.api_keys.issue("contoso")
        assert services.api_keys.verify(key) == "contoso"
        services.api_keys.revoke("contoso")
        assert services.api_keys.verify(key) is None
    finally:
        services.close()

"""429 penalties shared between instances through the secret store (Key Vault in Azure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.crm.penalties import PenaltyBook, SharedPenaltyBook
from shared.secretstore.embedded import EmbeddedSecretStore
from shared.services import penalties_for
from shared.settings import Settings

KEY = "https://contoso.crm4.dynamics.com|svc@contoso.example"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _instance(store: EmbeddedSecretStore, tmp_path: Path, name: str, clock: Clock) -> SharedPenaltyBook:
    # Each instance has its own disk (its own penalties.json), as on Azure Functions.
    local = PenaltyBook(tmp_path / name / "penalties.json", clock=clock)
    return SharedPenaltyBook(store, local, refresh=2.0, clock=clock, monotonic=clock)


def test_a_penalty_one_instance_received_keeps_the_others_away_until_it_ends(tmp_path: Path) -> None:
    clock = Clock()
    store = EmbeddedSecretStore(tmp_path / "secrets.db", key_file=tmp_path / "secret.key")
    a, b = _instance(store, tmp_path, "a", clock), _instance(store, tmp_path, "b", clock)

    a.penalise(KEY, 30.0)

    assert b.remaining(KEY) == pytest.approx(30.0)
    clock.now += 29.0
    assert 0 < b.remaining(KEY) <= 1.0
    clock.now += 2.0
    assert b.remaining(KEY) == 0.0


def test_the_store_is_read_at_most_once_per_refresh_interval(tmp_path: Path) -> None:
    clock = Clock()
    store = EmbeddedSecretStore(tmp_path / "secrets.db", key_file=tmp_path / "secret.key")
    reads: list[str] = []
    original_get = store.get

    def counting_get(name: str) -> str | None:
        reads.append(name)
        return original_get(name)

    store.get = counting_get  # type: ignore[method-assign]
    book = _instance(store, tmp_path, "a", clock)
    for _ in range(100):
        assert book.remaining(KEY) == 0.0
    assert len(reads) == 1
    clock.now += 2.5
    book.remaining(KEY)
    assert len(reads) == 2
    assert KEY not in reads[0], "the secret name is a hash, not the CRM user"


def test_a_store_that_fails_leaves_the_local_penalty_in_force(tmp_path: Path) -> None:
    class Broken:
        def get(self, name: str) -> str | None:
            raise OSError("vault unreachable")

        def put(self, name: str, value: str, **kwargs: object) -> None:
            raise OSError("vault unreachable")

    clock = Clock()
    book = SharedPenaltyBook(Broken(), PenaltyBook(None, clock=clock), clock=clock, monotonic=clock)
    book.penalise(KEY, 10.0)
    assert book.remaining(KEY) == pytest.approx(10.0)
    assert book.remaining("https://other.crm.dynamics.com|x") == 0.0


@pytest.mark.parametrize(("backend", "shared"), [("embedded", False), ("keyvault", True)])
def test_penalties_are_shared_through_the_store_only_with_key_vault(
    tmp_path: Path, backend: str, shared: bool
) -> None:
    env = {"LEADWRITER_DATA_DIR": str(tmp_path), "LEADWRITER_SECRET_BACKEND": backend}
    if backend == "keyvault":
        env["KEYVAULT_URL"] = "https://leadwriter-test.vault.azure.net"
    store = EmbeddedSecretStore(tmp_path / "secrets.db", key_file=tmp_path / "secret.key")
    book = penalties_for(Settings.from_env(env), store)
    assert isinstance(book, SharedPenaltyBook) is shared

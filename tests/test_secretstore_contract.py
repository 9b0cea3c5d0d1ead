"""The SecretStore contract, run against every adapter that can run here, then each adapter's own rules.

The embedded store runs on a real SQLite file; Key Vault runs through the real ``azure-keyvault-secrets``
SDK over HTTPS against ``tests/fixtures/keyvault_stub.py``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from pydantic import SecretStr

from shared.crm.connection import ClientSecretAuth, Connection, PasswordAuth, Verification
from shared.errors import ConfigurationError, RetryLater, SecretStoreUnavailable
from shared.secretstore import make_secret_store
from shared.secretstore.base import ConnectionStore, InvalidSecretName, SecretStore, secret_name_for
from shared.secretstore.embedded import EmbeddedSecretStore, generate_key
from shared.secretstore.keyvault import CONFLICT_ATTEMPTS, KeyVaultSecretStore
from shared.settings import Settings
from tests.fixtures.keyvault_stub import KeyVaultStub, StaticTokenCredential

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "S3cr3t-Pässword-🔑-ONLY-IN-THE-STORE"
CLIENT_SECRET = "Zx8Q~client.secret~value-never-logged"


@pytest.fixture(params=["embedded", "keyvault"])
def store(request: pytest.FixtureRequest) -> SecretStore:
    """Each adapter in turn."""
    fixture = "embedded_secret_store" if request.param == "embedded" else "keyvault_secret_store"
    value: SecretStore = request.getfixturevalue(fixture)
    return value


def _password_connection() -> Connection:
    return Connection(
        url="https://contoso.crm4.dynamics.com",
        auth=PasswordAuth(username="leadwriter@contoso.com", password=SecretStr(PASSWORD)),
        verification=Verification(ok=True, checked_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC)),
    )


def _client_secret_connection() -> Connection:
    return Connection(
        url="https://fabrikam.crm.dynamics.com",
        auth=ClientSecretAuth(
            tenant_id="f8cdef31-a31e-4b4a-93e4-5f571e91255a",
            client_id="0b0e6a55-4d6e-4f8b-9d2b-6a0a55d52a11",
            client_secret=SecretStr(CLIENT_SECRET),
        ),
    )


# -- the contract ---------------------------------------------------------------------------------


def test_getting_a_missing_secret_returns_none(store: SecretStore) -> None:
    assert store.get("conn-nobody") is None


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "ünïcødé ✓ 日本語 עברית 🔑🚀",
        # Key Vault's limit is 25 KB: a value just under it, made of multi-byte characters.
        ("ä€𝄞" * 2_800)[:8_500],
    ],
    ids=["ascii", "unicode", "25kb"],
)
def test_a_stored_value_reads_back_unchanged(store: SecretStore, value: str) -> None:
    store.put("round-trip", value)
    assert store.get("round-trip") == value


def test_the_25kb_value_is_close_to_key_vaults_limit() -> None:
    """Guards the parametrised case above from quietly shrinking."""
    assert 24_000 < len(("ä€𝄞" * 2_800)[:8_500].encode("utf-8")) <= 25 * 1024


def test_putting_again_overwrites_the_value(store: SecretStore) -> None:
    store.put("conn-contoso", "first")
    store.put("conn-contoso", "second")
    assert store.get("conn-contoso") == "second"


def test_delete_reports_whether_the_secret_existed(store: SecretStore) -> None:
    store.put("conn-contoso", "value")
    assert store.delete("conn-contoso") is True
    assert store.get("conn-contoso") is None
    assert store.delete("conn-contoso") is False


def test_a_secret_can_be_stored_again_after_it_was_deleted(store: SecretStore) -> None:
    store.put("conn-contoso", "old")
    store.delete("conn-contoso")
    store.put("conn-contoso", "new")
    assert store.get("conn-contoso") == "new"
    assert store.list_names("conn-") == ["conn-contoso"]


def test_delete_of_a_secret_that_never_existed_is_false(store: SecretStore) -> None:
    assert store.delete("conn-ghost") is False


def test_list_names_filters_by_prefix_and_skips_deleted_secrets(store: SecretStore) -> None:
    # More names than the stub's page size (3), so Key Vault's paging is followed.
    for name in ["conn-a", "conn-b", "conn-c", "conn-d", "conn-e", "key-a", "other"]:
        store.put(name, "v")
    store.delete("conn-c")
    assert store.list_names("conn-") == ["conn-a", "conn-b", "conn-d", "conn-e"]
    assert store.list_names("key-") == ["key-a"]
    assert store.list_names("none-") == []
    assert store.list_names() == ["conn-a", "conn-b", "conn-d", "conn-e", "key-a", "other"]


def test_names_are_case_insensitive_as_in_key_vault(store: SecretStore) -> None:
    store.put("Conn-Mixed", "one")
    assert store.get("conn-mixed") == "one"
    store.put("CONN-MIXED", "two")
    assert store.get("Conn-Mixed") == "two"
    assert [n.lower() for n in store.list_names("conn-")] == ["conn-mixed"]


@pytest.mark.parametrize("name", ["", "has space", "under_score", "dot.ted", "x" * 128, "ünï"])
def test_names_outside_key_vaults_rules_are_refused(store: SecretStore, name: str) -> None:
    with pytest.raises(InvalidSecretName):
        store.put(name, "v")
    with pytest.raises(InvalidSecretName):
        store.get(name)


def test_a_connection_round_trips_with_its_secret_and_redacts_it(store: SecretStore) -> None:
    connections = ConnectionStore(store)
    connections.put("contoso", _password_connection())
    connections.put("fabrikam", _client_secret_connection())

    contoso, fabrikam = connections.get("contoso"), connections.get("fabrikam")

    assert contoso == _password_connection()
    assert fabrikam == _client_secret_connection()
    assert contoso is not None
    assert fabrikam is not None
    assert contoso.secret_value() == PASSWORD
    assert fabrikam.secret_value() == CLIENT_SECRET
    for connection, secret in ((contoso, PASSWORD), (fabrikam, CLIENT_SECRET)):
        shown = json.dumps(connection.redacted()) + repr(connection) + str(connection)
        assert secret not in shown
        assert json.dumps(secret)[1:-1] not in shown


def test_connection_store_lists_publishers_and_forgets_deleted_ones(store: SecretStore) -> None:
    connections = ConnectionStore(store)
    for publisher in ["contoso", "Fabrikam.EU", "a_b-c"]:
        connections.put(publisher, _password_connection())
    store.put("key-contoso", "an api key record, not a connection")

    assert connections.publishers() == ["Fabrikam.EU", "a_b-c", "contoso"]
    assert connections.delete("a_b-c") is True
    assert connections.publishers() == ["Fabrikam.EU", "contoso"]
    assert connections.get("a_b-c") is None


def test_publishers_differing_only_in_case_get_different_secrets(store: SecretStore) -> None:
    connections = ConnectionStore(store)
    upper = _password_connection().model_copy(update={"url": "https://upper.crm.dynamics.com"})
    lower = _password_connection().model_copy(update={"url": "https://lower.crm.dynamics.com"})
    connections.put("Contoso", upper)
    connections.put("contoso", lower)

    assert connections.get("Contoso") == upper
    assert connections.get("contoso") == lower
    assert connections.publishers() == ["Contoso", "contoso"]


def test_concurrent_puts_from_threads_all_land(store: SecretStore) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def writer(worker: int) -> None:
        try:
            start.wait(timeout=10)
            for i in range(5):
                store.put(f"conn-w{worker}-{i}", f"value-{worker}-{i}")
                store.put("conn-shared", f"shared-{worker}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(store.list_names("conn-w")) == 30
    assert all(store.get(f"conn-w{w}-{i}") == f"value-{w}-{i}" for w in range(6) for i in range(5))
    assert store.get("conn-shared") in {f"shared-{w}-{i}" for w in range(6) for i in range(5)}


# -- the embedded store ---------------------------------------------------------------------------


def test_plaintext_never_reaches_the_database_files_and_the_key_file_is_private(tmp_path: Path) -> None:
    store = EmbeddedSecretStore(tmp_path / "secrets.db")
    ConnectionStore(store).put("contoso", _password_connection())
    store.put("plain-marker", "MARKER-plaintext-4f1c9e")
    assert store.get("plain-marker") == "MARKER-plaintext-4f1c9e"  # the WAL holds the writes now

    files = [tmp_path / name for name in ("secrets.db", "secrets.db-wal", "secrets.db-shm")]
    assert (tmp_path / "secrets.db-wal").stat().st_size > 0
    data = b"".join(path.read_bytes() for path in files if path.exists())
    for secret in (PASSWORD, "MARKER-plaintext-4f1c9e"):
        assert secret.encode("utf-8") not in data
        assert secret.encode("utf-16-le") not in data
    assert b"contoso" in data  # names and tags are in clear, so the search above can find text at all

    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets.db").stat().st_mode) == 0o600
    store.close()


def test_a_store_opened_with_the_wrong_key_fails_clearly(tmp_path: Path) -> None:
    with EmbeddedSecretStore(tmp_path / "secrets.db", generate_key().encode()) as store:
        store.put("conn-contoso", PASSWORD)

    wrong = generate_key()
    with pytest.raises(ConfigurationError, match="cannot be decrypted with this key") as caught:
        EmbeddedSecretStore(tmp_path / "secrets.db", wrong.encode())

    message = str(caught.value)
    assert wrong not in message
    assert PASSWORD not in message


def test_a_value_moved_to_another_name_does_not_decrypt(embedded_secret_store: EmbeddedSecretStore) -> None:
    embedded_secret_store.put("conn-victim", "victim-password")
    embedded_secret_store.put("conn-attacker", "attacker-password")
    db = sqlite3.connect(embedded_secret_store.path)
    db.execute(
        "UPDATE secrets SET value = (SELECT value FROM secrets WHERE name = 'conn-victim') "
        "WHERE name = 'conn-attacker'"
    )
    db.commit()
    db.close()

    with pytest.raises(ConfigurationError) as caught:
        embedded_secret_store.get("conn-attacker")
    assert "victim-password" not in str(caught.value)
    assert embedded_secret_store.get("conn-victim") == "victim-password"


def test_a_key_file_readable_by_others_is_refused_by_name(tmp_path: Path) -> None:
    EmbeddedSecretStore(tmp_path / "secrets.db").close()
    key_file = tmp_path / "secret.key"
    key_file.chmod(0o640)

    with pytest.raises(ConfigurationError, match=str(key_file)):
        EmbeddedSecretStore(tmp_path / "secrets.db")


def test_the_key_file_is_reused_across_opens(tmp_path: Path) -> None:
    with EmbeddedSecretStore(tmp_path / "secrets.db") as first:
        first.put("conn-contoso", "kept")
    key = (tmp_path / "secret.key").read_bytes()
    with EmbeddedSecretStore(tmp_path / "secrets.db") as second:
        assert second.get("conn-contoso") == "kept"
    assert (tmp_path / "secret.key").read_bytes() == key


def test_stores_created_at_once_agree_on_one_key_file(tmp_path: Path) -> None:
    stores: list[EmbeddedSecretStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_store(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            stores.append(EmbeddedSecretStore(tmp_path / "secrets.db"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    stores[0].put("conn-contoso", "shared")
    assert all(store.get("conn-contoso") == "shared" for store in stores)
    assert not list(tmp_path.glob(".secret.key.*"))  # no temporary key file left behind
    for store in stores:
        store.close()


def test_another_process_writes_into_the_same_store(tmp_path: Path, secret_key: str) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from shared.secretstore.embedded import EmbeddedSecretStore\n"
        "store = EmbeddedSecretStore(Path(sys.argv[1]), sys.argv[2].encode())\n"
        "for i in range(40):\n"
        "    store.put(f'conn-child-{i}', f'child-{i}')\n"
        "store.close()\n"
    )
    with EmbeddedSecretStore(tmp_path / "secrets.db", secret_key.encode()) as store:
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "secrets.db"), secret_key],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i in range(40):
            store.put(f"conn-parent-{i}", f"parent-{i}")
        assert child.wait(timeout=60) == 0

        assert len(store.list_names("conn-child-")) == 40
        assert len(store.list_names("conn-parent-")) == 40
        assert store.get("conn-child-39") == "child-39"


@pytest.mark.parametrize("bad", ["short", "not base64 at all!!", "A" * 40, "A" * 44 + "AAAA"])
def test_an_invalid_configured_key_is_refused_without_echoing_it(tmp_path: Path, bad: str) -> None:
    settings = Settings.from_env({"LEADWRITER_DATA_DIR": str(tmp_path), "LEADWRITER_SECRET_KEY": bad})
    with pytest.raises(ConfigurationError, match="LEADWRITER_SECRET_KEY") as caught:
        make_secret_store(settings)
    assert bad not in str(caught.value)


def test_make_secret_store_builds_the_embedded_store_in_the_data_dir(tmp_path: Path, secret_key: str) -> None:
    settings = Settings.from_env({"LEADWRITER_DATA_DIR": str(tmp_path), "LEADWRITER_SECRET_KEY": secret_key})
    store = make_secret_store(settings)
    assert isinstance(store, EmbeddedSecretStore)
    store.put("conn-contoso", "v")
    assert (tmp_path / "secrets.db").exists()
    assert not (tmp_path / "secret.key").exists()  # the configured key is used, no file is made
    store.close()

    with EmbeddedSecretStore(tmp_path / "secrets.db", secret_key.encode()) as reopened:
        assert reopened.get("conn-contoso") == "v"


def test_make_secret_store_builds_key_vault_from_settings() -> None:
    settings = Settings.from_env(
        {"LEADWRITER_SECRET_BACKEND": "keyvault", "KEYVAULT_URL": "https://lw-test.vault.azure.net"}
    )
    store = make_secret_store(settings)
    assert isinstance(store, KeyVaultSecretStore)
    assert store.vault_url == "https://lw-test.vault.azure.net"


# -- the Key Vault store --------------------------------------------------------------------------


@pytest.fixture
def stub(keyvault_stub: KeyVaultStub) -> Iterator[KeyVaultStub]:
    keyvault_stub.reset()
    yield keyvault_stub
    keyvault_stub.reset()


def test_key_vault_answers_the_bearer_challenge_with_the_vault_scope(tmp_path: Path) -> None:
    # A vault of its own: the SDK caches a vault's challenge per origin for the whole process.
    credential = StaticTokenCredential()
    with KeyVaultStub(tmp_path) as stub:
        stub.store(credential).put("conn-contoso", "v")

    first, second = stub.requests[0], stub.requests[1]
    assert first == ("PUT", "/secrets/conn-contoso", False)  # unauthenticated: gets the 401 challenge
    assert second == ("PUT", "/secrets/conn-contoso", True)
    assert credential.requests[0] == (("https://vault.azure.net/.default",), stub.tenant_id)


def test_key_vault_put_after_delete_purges_the_deleted_secret(stub: KeyVaultStub) -> None:
    store = stub.store()
    store.put("conn-contoso", "old")
    store.delete("conn-contoso")
    assert stub.deleted_names() == ["conn-contoso"]

    store.put("conn-contoso", "new")

    assert stub.deleted_names() == []
    assert stub.versions("conn-contoso") == 1  # the old credentials are gone, not an older version
    assert ("DELETE", "/deletedsecrets/conn-contoso", True) in stub.requests


def test_key_vault_put_after_delete_recovers_when_purge_is_not_allowed(stub: KeyVaultStub) -> None:
    stub.purge_protection = True
    store = stub.store()
    store.put("conn-contoso", "old")
    store.delete("conn-contoso")

    store.put("conn-contoso", "new")

    assert store.get("conn-contoso") == "new"
    assert stub.deleted_names() == []
    assert stub.versions("conn-contoso") == 2
    assert ("POST", "/deletedsecrets/conn-contoso/recover", True) in stub.requests


def test_key_vault_put_waits_out_a_purge_that_is_still_finishing(stub: KeyVaultStub) -> None:
    stub.purge_lag = 3
    pauses: list[float] = []
    store = stub.store(sleep=pauses.append)
    store.put("conn-contoso", "old")
    store.delete("conn-contoso")

    store.put("conn-contoso", "new")

    assert store.get("conn-contoso") == "new"
    assert len(pauses) == 3
    assert pauses == sorted(pauses)  # backing off, not hammering the vault


def test_key_vault_put_gives_up_on_a_conflict_that_never_clears(stub: KeyVaultStub) -> None:
    stub.purge_lag = 1_000
    pauses: list[float] = []
    store = stub.store(sleep=pauses.append)
    store.put("conn-contoso", "old")
    store.delete("conn-contoso")

    with pytest.raises(SecretStoreUnavailable) as caught:
        store.put("conn-contoso", PASSWORD)

    assert caught.value.status == 409
    # No pause before the first retry (right after the purge) nor after the last refusal.
    assert len(pauses) == CONFLICT_ATTEMPTS - 2
    assert "conn-contoso" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_key_vault_without_soft_delete_deletes_at_once(stub: KeyVaultStub) -> None:
    stub.soft_delete = False
    store = stub.store()
    store.put("conn-contoso", "old")
    assert store.delete("conn-contoso") is True
    store.put("conn-contoso", "new")
    assert store.get("conn-contoso") == "new"
    assert not any(path.startswith("/deletedsecrets") for _, path, _ in stub.requests)


def test_key_vault_stores_content_type_and_tags(stub: KeyVaultStub) -> None:
    ConnectionStore(stub.store()).put("Contoso", _client_secret_connection())

    secret = stub.client().get_secret(secret_name_for("Contoso"))

    assert secret.properties.content_type == "application/json"
    assert secret.properties.tags == {"publisherId": "Contoso", "kind": "clientSecret"}


def test_key_vault_disabled_and_managed_secrets_count_as_absent(stub: KeyVaultStub) -> None:
    store = stub.store()
    store.put("conn-enabled", "v")
    store.put("conn-disabled", "v")
    stub.client().update_secret_properties("conn-disabled", enabled=False)
    stub.add_managed_secret("conn-certificate", "pfx")

    assert store.list_names("conn-") == ["conn-enabled"]
    assert store.get("conn-disabled") is None


@pytest.mark.parametrize(
    ("status", "retry_after"), [(500, None), (503, 7.0), (429, 12.0), (403, None)]
)
def test_key_vault_failures_become_retry_later_without_the_value(
    stub: KeyVaultStub, status: int, retry_after: float | None
) -> None:
    store = stub.store(retry_total=0)
    store.put("conn-contoso", PASSWORD)
    stub.fail_next(status, retry_after=retry_after)

    with pytest.raises(SecretStoreUnavailable) as caught:
        store.get("conn-contoso")

    assert isinstance(caught.value, RetryLater)
    assert caught.value.status == status
    assert caught.value.retry_after == retry_after
    assert caught.value.request_id
    assert PASSWORD not in str(caught.value)
    assert stub.token not in str(caught.value)


def test_key_vault_with_an_untrusted_certificate_is_unavailable(stub: KeyVaultStub) -> None:
    store = KeyVaultSecretStore(
        stub.url, StaticTokenCredential(), verify_challenge_resource=False, retry_total=0
    )
    with pytest.raises(SecretStoreUnavailable, match="could not be reached"):
        store.get("conn-contoso")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8200", "ftp://vault", "not a url"])
def test_key_vault_url_must_be_https(url: str) -> None:
    with pytest.raises(ConfigurationError, match="KEYVAULT_URL"):
        KeyVaultSecretStore(url, StaticTokenCredential())


def test_the_stub_keeps_key_vaults_shapes(stub: KeyVaultStub) -> None:
    """The SDK itself reads the stub's answers: a missing secret is its ResourceNotFoundError."""
    client = stub.client()
    with pytest.raises(ResourceNotFoundError) as caught:
        client.get_secret("conn-missing")
    assert caught.value.error is not None
    assert caught.value.error.code == "SecretNotFound"

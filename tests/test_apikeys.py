"""Publisher API keys: issued once, stored hashed, verified in constant time, revocable."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.ops.apikeys import ApiKeyStore, StateRecords
from shared.secretstore.base import InvalidPublisherId, secret_name_for
from shared.secretstore.embedded import EmbeddedSecretStore
from shared.secretstore.keyvault import KeyVaultSecretStore
from shared.state import EmbeddedStateStore


@pytest.fixture
def keys(embedded_secret_store: EmbeddedSecretStore) -> ApiKeyStore:
    return ApiKeyStore(embedded_secret_store)


def test_an_issued_key_verifies_as_its_publisher(keys: ApiKeyStore) -> None:
    contoso, fabrikam = keys.issue("contoso"), keys.issue("Fabrikam.EU")

    assert keys.verify(contoso) == "contoso"
    assert keys.verify(fabrikam) == "Fabrikam.EU"


def test_a_key_is_recognisable_and_long(keys: ApiKeyStore) -> None:
    key = keys.issue("contoso")

    assert key.startswith("lw_contoso_")
    assert len(key) >= len("lw_contoso_") + 8 + 1 + 43
    assert keys.issue("contoso") != key


def test_the_stored_record_never_holds_the_key(
    keys: ApiKeyStore, embedded_secret_store: EmbeddedSecretStore
) -> None:
    key = keys.issue("contoso")
    random_part = key[-43:]  # secrets.token_urlsafe(32)

    stored = embedded_secret_store.get(secret_name_for("contoso", prefix="key-"))

    assert stored is not None
    assert stored != key
    assert key not in stored
    assert random_part not in stored
    assert random_part[:16] not in stored


def test_keys_are_stored_under_the_publishers_key_name(
    keys: ApiKeyStore, embedded_secret_store: EmbeddedSecretStore
) -> None:
    keys.issue("Contoso")
    keys.issue("contoso")

    assert embedded_secret_store.list_names("key-") == ["key--43ontoso", "key-contoso"]


def _variants(key: str) -> list[str]:
    return [
        "",
        "lw_",
        "garbage",
        "Bearer " + key,
        key[:-1],  # truncated
        key[:20],
        key + "x",
        key[:-1] + ("A" if key[-1] != "A" else "B"),  # one character changed
        key.replace("lw_contoso_", "lw_CONTOSO_"),  # publisher part in another case
        key.replace("lw_contoso_", "lw_fabrikam_"),  # another publisher's record
        key.replace("lw_contoso_", "lw_contoso-zz_"),  # undecodable publisher part
        key.replace("lw_", "xx_", 1),
        "lw_contoso__" + key.rsplit("_", 1)[-1],
        "lw_" + "a" * 300,
        "lw_ü_ö_ä",
        "lw_contoso_\x00_\x00",
    ]


def test_wrong_empty_garbage_or_truncated_keys_verify_as_none(keys: ApiKeyStore) -> None:
    key = keys.issue("contoso")
    keys.issue("fabrikam")

    for variant in _variants(key):
        assert keys.verify(variant) is None, variant
    assert keys.verify(None) is None  # type: ignore[arg-type]
    assert keys.verify(key) == "contoso"


def test_a_key_for_a_publisher_without_a_record_verifies_as_none(keys: ApiKeyStore) -> None:
    key = keys.issue("contoso")
    assert keys.verify(key.replace("lw_contoso_", "lw_nobody_")) is None


def test_revoking_a_key_makes_it_fail(keys: ApiKeyStore) -> None:
    key = keys.issue("contoso")

    assert keys.revoke("contoso") is True
    assert keys.verify(key) is None
    assert keys.revoke("contoso") is False


def test_reissuing_invalidates_the_old_key(keys: ApiKeyStore) -> None:
    old = keys.issue("contoso")
    new = keys.issue("contoso")

    assert keys.verify(old) is None
    assert keys.verify(new) == "contoso"


def test_one_publishers_key_does_not_open_another_publishers_record(
    keys: ApiKeyStore, embedded_secret_store: EmbeddedSecretStore
) -> None:
    contoso = keys.issue("contoso")
    fabrikam = keys.issue("fabrikam")
    # Even with fabrikam's record copied under contoso's name, fabrikam's key stays fabrikam's.
    record = embedded_secret_store.get("key-fabrikam")
    assert record is not None
    embedded_secret_store.put("key-contoso", record)

    assert keys.verify(contoso) is None
    assert keys.verify(fabrikam.replace("lw_fabrikam_", "lw_contoso_")) is None


def test_a_corrupt_record_verifies_as_none(
    keys: ApiKeyStore, embedded_secret_store: EmbeddedSecretStore
) -> None:
    key = keys.issue("contoso")
    embedded_secret_store.put("key-contoso", "{not json")
    assert keys.verify(key) is None
    embedded_secret_store.put("key-contoso", '{"v": 1, "salt": "zz", "hash": 3}')
    assert keys.verify(key) is None


@pytest.mark.parametrize("publisher_id", ["", "-leading", "has space", "x" * 41, "ünï"])
def test_issuing_for_an_invalid_publisher_id_raises(keys: ApiKeyStore, publisher_id: str) -> None:
    with pytest.raises(InvalidPublisherId):
        keys.issue(publisher_id)


def test_keys_work_on_key_vault_too(keyvault_secret_store: KeyVaultSecretStore) -> None:
    keys = ApiKeyStore(keyvault_secret_store)
    first = keys.issue("Contoso")
    second = keys.issue("contoso")

    assert keys.verify(first) == "Contoso"
    assert keys.verify(second) == "contoso"
    assert keys.revoke("Contoso") is True
    assert keys.verify(first) is None
    assert keys.verify(keys.issue("Contoso")) == "Contoso"


def test_key_records_live_in_the_state_store_and_an_older_record_in_the_secret_store_is_moved_there(
    embedded_secret_store: EmbeddedSecretStore, tmp_path: Path
) -> None:
    state = EmbeddedStateStore(tmp_path / "state.db")
    older = ApiKeyStore(embedded_secret_store).issue("northwind")
    keys = ApiKeyStore(StateRecords(state, legacy=embedded_secret_store))

    fresh = keys.issue("contoso")

    assert keys.verify(fresh) == "contoso"
    assert embedded_secret_store.get(secret_name_for("contoso", prefix="key-")) is None, "no record in the vault"
    assert keys.verify(older) == "northwind"
    assert embedded_secret_store.get(secret_name_for("northwind", prefix="key-")) is None, "moved to the state store"
    assert ApiKeyStore(StateRecords(state)).verify(older) == "northwind"
    assert keys.revoke("northwind") is True
    assert ApiKeyStore(StateRecords(state)).verify(older) is None
    state.close()


def test_a_key_is_checked_without_a_store_read_only_once_its_record_is_cached(keys: ApiKeyStore) -> None:
    key = keys.issue("contoso")
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")

    assert keys.verify_cached(key) == (False, None), "not cached yet: the caller must read the store"
    assert keys.verify(key) == "contoso"
    assert keys.verify_cached(key) == (True, "contoso")
    assert keys.verify_cached(wrong) == (True, None), "a wrong key of a cached record is refused"
    assert keys.verify_cached("garbage") == (True, None), "a malformed key needs no read"

"""Settings (architecture §8): read once into a frozen object; a bad value fails at start, naming its variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.errors import ConfigurationError
from shared.settings import (
    DEFAULT_AUTHORITY_HOST,
    DEFAULT_MIN_SOLUTION_VERSION,
    DEFAULT_SOLUTION_NAME,
    GENERATE_ADMIN_KEY,
    Settings,
    is_strong_admin_key,
    parse_version,
)

#: A key as `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'` prints one (43 characters).
STRONG_KEY = "kq3V-x8rT0bZ_mW2nLp7YcHs4uJd9FgE1aRvQoNi6tK"


def test_defaults_need_no_environment_at_all() -> None:
    settings = Settings.from_env({})

    assert settings.data_dir == Path(".leadwriter")
    assert settings.queue_backend == "embedded"
    assert settings.secret_backend == "embedded"
    assert settings.admin_key is None
    assert settings.crm_allowed_hosts == ()
    assert settings.solution_name == DEFAULT_SOLUTION_NAME == "MicrosoftMarketplacesLeadIntegrationSolution"
    assert settings.min_solution_version == DEFAULT_MIN_SOLUTION_VERSION == "1.0.0.0"
    assert settings.min_version == (1, 0, 0, 0)
    assert settings.authority_host == DEFAULT_AUTHORITY_HOST == "https://login.microsoftonline.com"
    assert settings.ca_bundle is None
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 7071)
    assert settings.worker_concurrency >= 1
    # Below Dataverse's 52 concurrent requests per user, so one process never trips that limit alone.
    assert 1 <= settings.publisher_concurrency < 52
    assert settings.log_level == "INFO"
    assert settings.runtime == "embedded"
    assert settings.state_backend == "embedded"
    assert settings.tables_url is None
    assert settings.tables_connection_string is None
    assert settings.webhook_allowed_hosts == ()


def test_values_come_from_the_named_variables() -> None:
    settings = Settings.from_env(
        {
            "LEADWRITER_DATA_DIR": "/var/lib/leadwriter",
            "LEADWRITER_QUEUE_BACKEND": "servicebus",
            "ServiceBusConnection__fullyQualifiedNamespace": "contoso-leads.servicebus.windows.net",
            "LEADWRITER_SECRET_BACKEND": "keyvault",
            "KEYVAULT_URL": "https://contoso-leads.vault.azure.net/",
            "LEADWRITER_ADMIN_KEY": STRONG_KEY,
            "LEADWRITER_SOLUTION_NAME": "OtherSolution",
            "LEADWRITER_MIN_SOLUTION_VERSION": "1.10",
            "REQUESTS_CA_BUNDLE": "/tmp/ca.pem",
            "LEADWRITER_HTTP_PORT": "8080",
            "LEADWRITER_WORKER_CONCURRENCY": "4",
            "LEADWRITER_PUBLISHER_CONCURRENCY": "50",
            "LEADWRITER_CRM_READ_TIMEOUT": "2.5",
            "LEADWRITER_LOG_LEVEL": "DEBUG",
        }
    )

    assert settings.data_dir == Path("/var/lib/leadwriter")
    assert settings.queue_backend == "servicebus"
    assert settings.servicebus_namespace == "contoso-leads.servicebus.windows.net"
    assert settings.secret_backend == "keyvault"
    assert settings.keyvault_url == "https://contoso-leads.vault.azure.net/"
    assert settings.admin_key is not None
    assert settings.admin_key.get_secret_value() == STRONG_KEY
    assert settings.solution_name == "OtherSolution"
    assert settings.min_version == (1, 10, 0, 0)
    assert settings.ca_bundle == Path("/tmp/ca.pem")
    assert settings.http_port == 8080
    assert settings.worker_concurrency == 4
    assert settings.publisher_concurrency == 50
    assert settings.crm_read_timeout == 2.5
    assert settings.log_level == "DEBUG"


def test_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADWRITER_HTTP_PORT", "9191")
    assert Settings.from_env().http_port == 9191


def test_empty_values_mean_unset() -> None:
    # The Functions host writes app settings that have no value as empty strings.
    settings = Settings.from_env({"LEADWRITER_HTTP_PORT": "", "LEADWRITER_QUEUE_BACKEND": "", "KEYVAULT_URL": ""})
    assert settings.http_port == 7071
    assert settings.queue_backend == "embedded"
    assert settings.keyvault_url is None


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"LEADWRITER_QUEUE_BACKEND": "rabbitmq"}, "LEADWRITER_QUEUE_BACKEND"),
        ({"LEADWRITER_SECRET_BACKEND": "vault"}, "LEADWRITER_SECRET_BACKEND"),
        ({"LEADWRITER_HTTP_PORT": "http"}, "LEADWRITER_HTTP_PORT"),
        ({"LEADWRITER_HTTP_PORT": "0"}, "LEADWRITER_HTTP_PORT"),
        ({"LEADWRITER_HTTP_PORT": "65536"}, "LEADWRITER_HTTP_PORT"),
        ({"LEADWRITER_MIN_SOLUTION_VERSION": "1.x"}, "LEADWRITER_MIN_SOLUTION_VERSION"),
        ({"LEADWRITER_MIN_SOLUTION_VERSION": "1"}, "LEADWRITER_MIN_SOLUTION_VERSION"),
        ({"LEADWRITER_MIN_SOLUTION_VERSION": "1.0.0.0.0"}, "LEADWRITER_MIN_SOLUTION_VERSION"),
        ({"LEADWRITER_MIN_SOLUTION_VERSION": "-1.0"}, "LEADWRITER_MIN_SOLUTION_VERSION"),
        ({"LEADWRITER_WORKER_CONCURRENCY": "0"}, "LEADWRITER_WORKER_CONCURRENCY"),
        ({"LEADWRITER_WORKER_CONCURRENCY": "many"}, "LEADWRITER_WORKER_CONCURRENCY"),
        ({"LEADWRITER_WORKER_CONCURRENCY": "1000"}, "LEADWRITER_WORKER_CONCURRENCY"),
        ({"LEADWRITER_PUBLISHER_CONCURRENCY": "52"}, "LEADWRITER_PUBLISHER_CONCURRENCY"),
        ({"LEADWRITER_PUBLISHER_CONCURRENCY": "-3"}, "LEADWRITER_PUBLISHER_CONCURRENCY"),
        ({"LEADWRITER_CRM_CONNECT_TIMEOUT": "0"}, "LEADWRITER_CRM_CONNECT_TIMEOUT"),
        ({"LEADWRITER_CRM_READ_TIMEOUT": "soon"}, "LEADWRITER_CRM_READ_TIMEOUT"),
        ({"LEADWRITER_LOG_LEVEL": "TRACE"}, "LEADWRITER_LOG_LEVEL"),
        ({"AZURE_AUTHORITY_HOST": "http://login.example.com"}, "AZURE_AUTHORITY_HOST"),
        ({"LEADWRITER_RETRY_SCHEDULE": "5,soon,60"}, "LEADWRITER_RETRY_SCHEDULE"),
        ({"LEADWRITER_RETRY_SCHEDULE": "5,-1"}, "LEADWRITER_RETRY_SCHEDULE"),
        ({"LEADWRITER_LOCK_DURATION": "0"}, "LEADWRITER_LOCK_DURATION"),
        ({"LEADWRITER_MAX_DELIVERY_COUNT": "0"}, "LEADWRITER_MAX_DELIVERY_COUNT"),
        ({"LEADWRITER_QUEUE_BACKEND": "servicebus"}, "ServiceBusConnection__fullyQualifiedNamespace"),
        ({"LEADWRITER_SECRET_BACKEND": "keyvault"}, "KEYVAULT_URL"),
        ({"LEADWRITER_RUNTIME": "azure"}, "LEADWRITER_RUNTIME"),
        ({"LEADWRITER_STATE_BACKEND": "sqlite"}, "LEADWRITER_STATE_BACKEND"),
        ({"LEADWRITER_STATE_BACKEND": "tables"}, "LEADWRITER_TABLES_URL"),
        ({"LEADWRITER_STATE_BACKEND": "tables"}, "LEADWRITER_TABLES_CONNECTION_STRING"),
        ({"LEADWRITER_TABLES_URL": "http://acct.table.core.windows.net"}, "LEADWRITER_TABLES_URL"),
        ({"LEADWRITER_TABLES_URL": "acct.table.core.windows.net"}, "LEADWRITER_TABLES_URL"),
        ({"LEADWRITER_ADMIN_KEY": "short"}, "LEADWRITER_ADMIN_KEY"),
    ],
)
def test_invalid_setting_fails_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(environ)
    assert variable in str(caught.value)


def test_error_does_not_echo_the_value() -> None:
    # A value put in the wrong variable may be a secret (a key pasted into the port, say).
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"LEADWRITER_HTTP_PORT": "s3cr3t-admin-key"})
    assert "s3cr3t" not in str(caught.value)


def test_backends_with_their_addresses_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "LEADWRITER_QUEUE_BACKEND": "servicebus",
            "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
            "LEADWRITER_SECRET_BACKEND": "keyvault",
            "KEYVAULT_URL": "https://kv.vault.azure.net",
        }
    )
    assert (settings.queue_backend, settings.secret_backend) == ("servicebus", "keyvault")


@pytest.mark.parametrize(
    ("value", "hosts"),
    [
        ("127.0.0.1:*", ("127.0.0.1:*",)),
        ("127.0.0.1:*, Localhost:8443 ,,", ("127.0.0.1:*", "localhost:8443")),
        (" , ", ()),
        ("SIM.Example:443", ("sim.example:443",)),
    ],
)
def test_allowed_crm_hosts_are_a_comma_separated_lowercase_list(value: str, hosts: tuple[str, ...]) -> None:
    assert Settings.from_env({"LEADWRITER_CRM_ALLOWED_HOSTS": value}).crm_allowed_hosts == hosts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://login.microsoftonline.com", "https://login.microsoftonline.com"),
        ("https://login.microsoftonline.us/", "https://login.microsoftonline.us"),
        ("login.chinacloudapi.cn", "https://login.chinacloudapi.cn"),
        ("  127.0.0.1:8443/ ", "https://127.0.0.1:8443"),
    ],
)
def test_authority_host_is_normalised_to_an_https_origin(value: str, expected: str) -> None:
    assert Settings.from_env({"AZURE_AUTHORITY_HOST": value}).authority_host == expected


@pytest.mark.parametrize(
    ("value", "schedule"),
    [("5,15,60", (5.0, 15.0, 60.0)), (" 0.5 , 2 ", (0.5, 2.0)), ("30", (30.0,))],
)
def test_retry_schedule_is_a_comma_separated_list_of_seconds(value: str, schedule: tuple[float, ...]) -> None:
    assert Settings.from_env({"LEADWRITER_RETRY_SCHEDULE": value}).retry_schedule == schedule


def test_settings_object_is_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(ValidationError):
        settings.http_port = 1  # type: ignore[misc]
    assert settings.http_port == 7071


def test_secrets_do_not_appear_in_repr() -> None:
    settings = Settings.from_env(
        {
            "LEADWRITER_ADMIN_KEY": STRONG_KEY,
            "LEADWRITER_SECRET_KEY": "fernet-key-value",
            "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=ikey-value",
            "LEADWRITER_TABLES_CONNECTION_STRING": "AccountName=devstoreaccount1;AccountKey=azurite-key-value",
        }
    )
    for text in (repr(settings), str(settings)):
        assert STRONG_KEY not in text
        assert "azurite-key-value" not in text
        assert "fernet-key-value" not in text
        assert "ikey-value" not in text


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("1.0", (1, 0, 0, 0)),
        ("1.0.0.0", (1, 0, 0, 0)),
        ("1.10.0.0", (1, 10, 0, 0)),
        (" 9.2.24074.177 ", (9, 2, 24074, 177)),
    ],
)
def test_versions_parse_into_numbers(text: str, version: tuple[int, ...]) -> None:
    assert parse_version(text) == version


def test_versions_compare_numerically_not_as_text() -> None:
    assert parse_version("1.10.0.0") > parse_version("1.9.0.0")
    assert parse_version("2.0") > parse_version("1.99.99.99")


@pytest.mark.parametrize("text", ["", "1", "a.b", "1..2", "1.2.3.4.5", "1.-2"])
def test_malformed_version_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="version"):
        parse_version(text)


@pytest.mark.parametrize("value", ["nan", "inf", "5,-inf", "1,nan"])
def test_a_retry_schedule_with_a_non_finite_step_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="LEADWRITER_RETRY_SCHEDULE"):
        Settings.from_env({"LEADWRITER_RETRY_SCHEDULE": value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HTTPS://Login.Example.com", "https://login.example.com"),
        ("login.example.com:8443", "https://login.example.com:8443"),
    ],
)
def test_the_authority_host_is_normalised(value: str, expected: str) -> None:
    assert Settings.from_env({"AZURE_AUTHORITY_HOST": value}).authority_host == expected


@pytest.mark.parametrize(
    "value", ["https://login.example.com/tenant", "https://user@login.example.com", "http://x.example"]
)
def test_an_authority_host_with_a_path_user_info_or_plain_http_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="AZURE_AUTHORITY_HOST"):
        Settings.from_env({"AZURE_AUTHORITY_HOST": value})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"LEADWRITER_RUNTIME": "functions"}, {"runtime": "functions"}, id="functions-runtime"),
        pytest.param(
            {"LEADWRITER_STATE_BACKEND": "tables", "LEADWRITER_TABLES_URL": "https://Acct.table.core.windows.net/"},
            {"state_backend": "tables", "tables_url": "https://acct.table.core.windows.net"},
            id="tables-with-managed-identity",
        ),
        pytest.param(
            {"LEADWRITER_TABLES_URL": "https://127.0.0.1:10002/devstoreaccount1/"},
            {"tables_url": "https://127.0.0.1:10002/devstoreaccount1"},
            id="tables-url-with-an-account-path",
        ),
        pytest.param(
            {"LEADWRITER_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1:*, Hooks.Example:8443 ,,"},
            {"webhook_allowed_hosts": ("127.0.0.1:*", "hooks.example:8443")},
            id="webhook-hosts-parse-like-crm-hosts",
        ),
    ],
)
def test_new_settings_read_their_variables(environ: dict[str, str], expected: dict[str, object]) -> None:
    settings = Settings.from_env(environ)
    assert {name: getattr(settings, name) for name in expected} == expected


def test_tables_backend_accepts_an_azurite_connection_string_instead_of_a_url() -> None:
    connection = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=azurite-key-value"
    settings = Settings.from_env(
        {"LEADWRITER_STATE_BACKEND": "tables", "LEADWRITER_TABLES_CONNECTION_STRING": connection}
    )
    assert settings.tables_connection_string is not None
    assert settings.tables_connection_string.get_secret_value() == connection
    assert settings.tables_url is None


def test_tables_backend_without_an_endpoint_names_both_variables() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"LEADWRITER_STATE_BACKEND": "tables"})
    assert "LEADWRITER_TABLES_URL" in str(caught.value)
    assert "LEADWRITER_TABLES_CONNECTION_STRING" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://acct.table.core.windows.net/?sv=2024-01-01&sig=s3cr3t-sas",
        "https://acct.table.core.windows.net#s3cr3t",
        "https://user:s3cr3t@acct.table.core.windows.net",
    ],
)
def test_a_tables_url_with_a_sas_or_user_info_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"LEADWRITER_TABLES_URL": url})
    assert "LEADWRITER_TABLES_URL" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    "variable",
    [
        "LEADWRITER_ADMIN_KEY",
        "KEYVAULT_URL",
        "LEADWRITER_TABLES_URL",
        "LEADWRITER_TABLES_CONNECTION_STRING",
        "LEADWRITER_SOLUTION_NAME",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
    ],
)
@pytest.mark.parametrize(
    "reference",
    [
        "@Microsoft.KeyVault(SecretUri=https://kv-x.vault.azure.net/secrets/leadwriter-admin-key)",
        "@Microsoft.KeyVault(VaultName=kv-x;SecretName=leadwriter-admin-key)",
        "  @microsoft.keyvault(SecretUri=https://kv-x.vault.azure.net/secrets/s/)",
    ],
)
def test_an_unresolved_key_vault_reference_fails_at_start_naming_the_variable(variable: str, reference: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({variable: reference})
    message = str(caught.value)
    assert variable in message
    assert "did not resolve" in message


def test_an_unresolved_reference_never_becomes_the_admin_key() -> None:
    # Long and varied enough to pass the strength rule: it must be refused for what it is.
    reference = "@Microsoft.KeyVault(SecretUri=https://kv-abcdefgh.vault.azure.net/secrets/leadwriter-admin-key)"
    assert is_strong_admin_key(reference)
    with pytest.raises(ConfigurationError, match="LEADWRITER_ADMIN_KEY"):
        Settings.from_env({"LEADWRITER_ADMIN_KEY": reference})


@pytest.mark.parametrize(
    ("key", "strong"),
    [
        pytest.param(STRONG_KEY, True, id="token_urlsafe-32"),
        pytest.param("lw-admin-" + "k3y-for-tests-0123456789abcdef", True, id="the-test-key-39-chars"),
        pytest.param("0f9c2b7e4a1d8c3b6e5f0a9d2c7b4e1f", True, id="openssl-rand-hex-16"),
        pytest.param("Xy7-aB3_qR9zLm2K" + "pW5nV8cT1dF4gH6", False, id="31-chars"),
        pytest.param("a" * 64, False, id="one-repeated-character"),
        pytest.param("abcdefghijkl" * 4, False, id="one-repeated-pattern"),
        pytest.param("ab" * 20, False, id="two-characters"),
        pytest.param("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaab1", False, id="nearly-one-character"),
        pytest.param("", False, id="empty"),
    ],
)
def test_admin_key_strength(key: str, strong: bool) -> None:
    assert is_strong_admin_key(key) is strong


@pytest.mark.parametrize("key", ["short-key", "a" * 64, "abcdefghijkl" * 4, "admin-key-value"])
def test_a_weak_admin_key_fails_naming_the_variable_and_how_to_generate_one(key: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"LEADWRITER_ADMIN_KEY": key})
    message = str(caught.value)
    assert "LEADWRITER_ADMIN_KEY" in message
    assert GENERATE_ADMIN_KEY in message
    assert key not in message

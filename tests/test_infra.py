"""infra/ validated offline: the real tree passes every check, and broken copies are caught.

Each broken variant copies infra/, host.json and azure.yaml into tmp_path, changes one thing the
way a careless edit would, and asserts that the check responsible reports it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import names
from shared.settings import Settings
from tests import infra_checks as checks

ROOT = checks.REPO_ROOT


@pytest.fixture(scope="module")
def deployment() -> checks.Deployment:
    return checks.load_deployment(ROOT / "infra")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A scratch copy of everything the checks read."""
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    shutil.copy(ROOT / "host.json", tmp_path / "host.json")
    shutil.copy(ROOT / "azure.yaml", tmp_path / "azure.yaml")
    shutil.copy(ROOT / ".funcignore", tmp_path / ".funcignore")
    return tmp_path


def edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert old in text, f"{relative} no longer contains {old!r}: update this test"
    path.write_text(text.replace(old, new, 1))


def test_the_real_infra_passes_every_offline_check() -> None:
    assert checks.run_all(ROOT) == []


def test_bicep_queue_names_are_the_queues_of_names_py(deployment: checks.Deployment) -> None:
    assert checks.bicep_queue_names(deployment) == names.SERVICE_BUS_QUEUES


def test_every_leadwriter_setting_bicep_sets_is_a_settings_alias(deployment: checks.Deployment) -> None:
    aliases = {field.alias for field in Settings.model_fields.values()}
    settings = checks.bicep_app_settings(deployment)
    leadwriter = {key for key in settings if key.startswith("LEADWRITER_")}
    assert leadwriter, "Bicep sets no LEADWRITER_ setting at all"
    assert leadwriter <= aliases


def test_bicep_wires_the_identity_based_service_bus_connection_the_bindings_name(
    deployment: checks.Deployment,
) -> None:
    settings = checks.bicep_app_settings(deployment)
    prefix = names.SERVICEBUS_CONNECTION
    assert settings[f"{prefix}__credential"] == "managedidentity"
    assert f"{prefix}__fullyQualifiedNamespace" in settings
    assert f"{prefix}__clientId" in settings
    assert prefix not in settings, "a bare ServiceBusConnection setting would be a connection string"


def test_admin_key_reaches_the_app_only_as_a_key_vault_reference(deployment: checks.Deployment) -> None:
    value = checks.bicep_app_settings(deployment)["LEADWRITER_ADMIN_KEY"]
    assert isinstance(value, str)
    assert value.startswith("@Microsoft.KeyVault(SecretUri=")


def test_host_json_renews_locks_for_the_whole_function_timeout(deployment: checks.Deployment) -> None:
    host = json.loads((ROOT / "host.json").read_text())
    bus = host["extensions"]["serviceBus"]
    assert bus["autoCompleteMessages"] is False
    renewal = checks._timespan(bus["maxAutoLockRenewalDuration"])
    timeout = checks._timespan(host["functionTimeout"])
    assert renewal is not None
    assert timeout is not None
    assert renewal >= timeout
    for queue in deployment.of_type(checks.QUEUE_TYPE):
        lock = checks._iso_duration(queue.properties["lockDuration"])
        assert lock is not None
        assert lock <= renewal


def test_the_app_identity_gets_receive_send_and_scale_rights_on_each_queue_and_nothing_namespace_wide(
    deployment: checks.Deployment,
) -> None:
    grants = set()
    for assignment in deployment.of_type(checks.ROLE_ASSIGNMENT_TYPE):
        role = checks.GUID.search(str(assignment.properties["roleDefinitionId"]))
        scope = assignment.config.get("scope")
        assert role is not None
        assert isinstance(scope, checks.ResourceRef)
        grants.add((role.group(0), scope.type, str(scope.name)))
    for queue in names.STAGE_QUEUES:
        assert (checks.SB_DATA_RECEIVER, checks.QUEUE_TYPE, queue) in grants
        assert (checks.SB_DATA_SENDER, checks.QUEUE_TYPE, queue) in grants
        # The scale controller reads the queue length with this identity (Manage rights).
        assert (checks.SB_DATA_OWNER, checks.QUEUE_TYPE, queue) in grants
    owner_scopes = {scope_type for role, scope_type, _ in grants if role == checks.SB_DATA_OWNER}
    assert owner_scopes == {checks.QUEUE_TYPE}
    assert all(scope_type != checks.NAMESPACE_TYPE for _, scope_type, _ in grants)


def test_the_app_identity_gets_table_data_rights_on_each_state_table_only(deployment: checks.Deployment) -> None:
    table_grants = set()
    for assignment in deployment.of_type(checks.ROLE_ASSIGNMENT_TYPE):
        role = checks.GUID.search(str(assignment.properties["roleDefinitionId"]))
        scope = assignment.config.get("scope")
        assert role is not None
        assert isinstance(scope, checks.ResourceRef)
        if role.group(0) == checks.STORAGE_TABLE_DATA_CONTRIBUTOR:
            table_grants.add((scope.type, str(scope.name)))
    assert table_grants == {(checks.TABLE_TYPE, table) for table in names.STATE_TABLES}


def test_bicep_creates_the_state_tables_of_names_py(deployment: checks.Deployment) -> None:
    assert tuple(str(t.name) for t in deployment.of_type(checks.TABLE_TYPE)) == names.STATE_TABLES


def test_the_app_uses_table_storage_through_its_identity(deployment: checks.Deployment) -> None:
    settings = checks.bicep_app_settings(deployment)
    assert settings["LEADWRITER_STATE_BACKEND"] == "tables"
    assert "primaryEndpoints.table" in str(settings["LEADWRITER_TABLES_URL"])
    assert "LEADWRITER_TABLES_CONNECTION_STRING" not in settings


def test_the_leads_ready_lock_fits_the_worst_case_write_batch(deployment: checks.Deployment) -> None:
    host = json.loads((ROOT / "host.json").read_text())
    defaults = Settings()
    one_request = checks.timedelta(seconds=defaults.crm_connect_timeout + defaults.crm_read_timeout)
    needed = checks.worst_case_write_batch(
        host["extensions"]["serviceBus"]["maxMessageBatchSize"], defaults.max_batch, one_request
    )
    # 100 leads as one $batch: 35 s, a fresh token 35 s, the retry 35 s, settling 10 s.
    assert needed == checks.timedelta(seconds=115)
    (ready,) = [q for q in deployment.of_type(checks.QUEUE_TYPE) if q.name == names.QUEUE_READY]
    lock = checks._iso_duration(ready.properties["lockDuration"])
    assert lock is not None
    assert needed <= lock <= checks.timedelta(minutes=5)


NAMESPACE_DATA_OWNER = """
resource namespaceOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(serviceBus.id, appPrincipalId, '090c5cfd-751d-490a-894a-3ce6f1109419')
  scope: serviceBus
  properties: {
    roleDefinitionId: subscriptionResourceId(
      'Microsoft.Authorization/roleDefinitions', '090c5cfd-751d-490a-894a-3ce6f1109419')
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}
"""

ACCESS_POLICIES = """enableRbacAuthorization: true
    accessPolicies: [
      {
        tenantId: subscription().tenantId
        objectId: '00000000-0000-0000-0000-000000000000'
        permissions: { secrets: ['get'] }
      }
    ]"""

Check = Callable[[checks.Deployment], list[str]]

BROKEN_VARIANTS: list[tuple[str, str, str, str, Check, str]] = [
    (
        "queue_without_dead_lettering_on_expiration",
        "infra/core/messaging/servicebus.bicep",
        "deadLetteringOnMessageExpiration: true",
        "deadLetteringOnMessageExpiration: false",
        checks.check_queues,
        "deadLetteringOnMessageExpiration",
    ),
    (
        "queue_without_duplicate_detection",
        "infra/core/messaging/servicebus.bicep",
        "requiresDuplicateDetection: true",
        "requiresDuplicateDetection: false",
        checks.check_queues,
        "requiresDuplicateDetection",
    ),
    (
        "queue_renamed_away_from_names_py",
        "infra/main.bicep",
        "{ name: 'leads-ready', lockDuration: 'PT3M' }",
        "{ name: 'leads-write', lockDuration: 'PT3M' }",
        checks.check_queues,
        "SERVICE_BUS_QUEUES",
    ),
    (
        "storage_connection_string_setting",
        "infra/app/api.bicep",
        "KEYVAULT_URL: keyVaultUri",
        "KEYVAULT_URL: keyVaultUri\n"
        "      LEGACY_STORAGE: 'DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abc'",
        checks.check_no_secrets,
        "AccountKey=",
    ),
    (
        "service_bus_connection_string_setting",
        "infra/app/api.bicep",
        "ServiceBusConnection__credential: 'managedidentity'",
        "ServiceBusConnection__credential: 'managedidentity'\n"
        "      ServiceBusConnection: serviceBusNamespaceFqdn",
        checks.check_no_secrets,
        "connection string",
    ),
    (
        "admin_key_in_plain_app_setting",
        "infra/app/api.bicep",
        "LEADWRITER_ADMIN_KEY: '@Microsoft.KeyVault(SecretUri=${adminKeySecretUri})'",
        "LEADWRITER_ADMIN_KEY: 'hunter2hunter2hunter2hunter2hunter2'",
        checks.check_no_secrets,
        "LEADWRITER_ADMIN_KEY",
    ),
    (
        "listkeys_in_an_output",
        "infra/core/storage/storage-account.bicep",
        "output name string = storage.name",
        "output name string = storage.name\noutput keys object = storage.listKeys()",
        checks.check_no_secrets,
        "listKeys(",
    ),
    (
        "secure_parameter_in_an_output",
        "infra/core/security/keyvault.bicep",
        "output name string = vault.name",
        "output name string = vault.name\noutput adminValue string = adminKey",
        checks.check_no_secrets,
        "exposes secure parameter",
    ),
    (
        "key_vault_with_access_policies",
        "infra/core/security/keyvault.bicep",
        "enableRbacAuthorization: true",
        ACCESS_POLICIES,
        checks.check_key_vault,
        "accessPolicies",
    ),
    (
        "key_vault_without_purge_protection",
        "infra/core/security/keyvault.bicep",
        "enablePurgeProtection: true",
        "enablePurgeProtection: false",
        checks.check_key_vault,
        "enablePurgeProtection",
    ),
    (
        "key_vault_with_access_policy_authorization",
        "infra/core/security/keyvault.bicep",
        "enableRbacAuthorization: true",
        "enableRbacAuthorization: false",
        checks.check_key_vault,
        "enableRbacAuthorization",
    ),
    (
        "namespace_wide_data_owner",
        "infra/app/rbac.bicep",
        "// Each stage function's trigger",
        NAMESPACE_DATA_OWNER + "\n// Each stage function's trigger",
        checks.check_rbac,
        "Azure Service Bus Data Owner",
    ),
    (
        "sender_on_the_namespace_instead_of_the_queue",
        "infra/app/rbac.bicep",
        "  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataSender)\n  scope: queues[i]",
        "  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataSender)\n  scope: serviceBus",
        checks.check_rbac,
        "Azure Service Bus Data Sender granted on the namespace",
    ),
    (
        "a_queue_left_without_a_receiver",
        "infra/main.bicep",
        "queueNames: [for queue in stageQueues: queue.name]",
        "queueNames: ['leads-incoming']",
        checks.check_rbac,
        "missing Azure Service Bus Data Receiver on queue leads-validated",
    ),
    (
        "role_assignment_named_without_guid",
        "infra/app/rbac.bicep",
        "name: guid(keyVault.id, appPrincipalId, roles.keyVaultSecretsOfficer)",
        "name: 'kv-officer'",
        checks.check_rbac,
        "guid(",
    ),
    (
        "storage_with_shared_keys",
        "infra/core/storage/storage-account.bicep",
        "allowSharedKeyAccess: false",
        "allowSharedKeyAccess: true",
        checks.check_storage,
        "allowSharedKeyAccess",
    ),
    (
        "service_bus_with_sas_keys",
        "infra/core/messaging/servicebus.bicep",
        "disableLocalAuth: true",
        "disableLocalAuth: false",
        checks.check_service_bus,
        "disableLocalAuth",
    ),
    (
        "application_insights_with_local_auth",
        "infra/core/monitor/monitoring.bicep",
        "DisableLocalAuth: true",
        "DisableLocalAuth: false",
        checks.check_monitoring,
        "DisableLocalAuth",
    ),
    (
        "python_runtime_drifts",
        "infra/app/api.bicep",
        "runtimeVersion: pythonVersion",
        "runtimeVersion: '3.10'",
        checks.check_function_app,
        "python 3.11 or 3.12",
    ),
    (
        "python_3_12_no_longer_allowed",
        "infra/core/host/functions-flexconsumption.bicep",
        "@allowed(['3.11', '3.12'])\nparam runtimeVersion",
        "@allowed(['3.11'])\nparam runtimeVersion",
        checks.check_function_app,
        "param runtimeVersion must be @allowed(['3.11', '3.12'])",
    ),
    (
        "python_default_moves_to_3_12",
        "infra/main.bicep",
        "param pythonVersion string = '3.11'",
        "param pythonVersion string = '3.12'",
        checks.check_function_app,
        "param pythonVersion must default to 3.11",
    ),
    (
        "state_tables_drift_from_names_py",
        "infra/main.bicep",
        "  'scheduledretries'\n]",
        "  'scheduled'\n]",
        checks.check_tables,
        "STATE_TABLES",
    ),
    (
        "a_state_table_left_without_a_role",
        "infra/main.bicep",
        "    tableNames: stateTables\n    applicationInsightsName",
        "    tableNames: ['leaddeliveries']\n    applicationInsightsName",
        checks.check_rbac,
        "missing Storage Table Data Contributor on table crmlimits",
    ),
    (
        "table_role_on_the_whole_account",
        "infra/app/rbac.bicep",
        "  name: guid(tables[i].id, appPrincipalId, roles.storageTableDataContributor)\n  scope: tables[i]",
        "  name: guid(tables[i].id, appPrincipalId, roles.storageTableDataContributor)\n  scope: storage",
        checks.check_rbac,
        "Storage Table Data Contributor granted on Microsoft.Storage/storageAccounts",
    ),
    (
        "state_on_the_embedded_backend_in_azure",
        "infra/app/api.bicep",
        "LEADWRITER_STATE_BACKEND: 'tables'",
        "LEADWRITER_STATE_BACKEND: 'embedded'",
        checks.check_app_settings,
        "LEADWRITER_STATE_BACKEND",
    ),
    (
        "tables_url_missing",
        "infra/app/api.bicep",
        "      LEADWRITER_TABLES_URL: tablesUrl\n",
        "",
        checks.check_app_settings,
        "app setting LEADWRITER_TABLES_URL is missing",
    ),
    (
        "tables_url_hard_coded",
        "infra/app/api.bicep",
        "LEADWRITER_TABLES_URL: tablesUrl",
        "LEADWRITER_TABLES_URL: 'https://stprod.table.core.windows.net'",
        checks.check_tables,
        "primaryEndpoints.table",
    ),
    (
        "tables_through_a_connection_string",
        "infra/app/api.bicep",
        "LEADWRITER_TABLES_URL: tablesUrl",
        "LEADWRITER_TABLES_URL: tablesUrl\n      LEADWRITER_TABLES_CONNECTION_STRING: 'UseDevelopmentStorage=true'",
        checks.check_no_secrets,
        "LEADWRITER_TABLES_CONNECTION_STRING is a connection string",
    ),
    (
        "webhook_test_receivers_allowed_in_azure",
        "infra/app/api.bicep",
        "LEADWRITER_WEBHOOK_ALLOWED_HOSTS: ''",
        "LEADWRITER_WEBHOOK_ALLOWED_HOSTS: '127.0.0.1:*'",
        checks.check_app_settings,
        "LEADWRITER_WEBHOOK_ALLOWED_HOSTS",
    ),
    (
        "scale_controller_without_manage_rights",
        "infra/app/rbac.bicep",
        "roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
        "roles.serviceBusDataOwner)",
        "roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
        "roles.serviceBusDataReceiver)",
        checks.check_rbac,
        "missing Azure Service Bus Data Owner on queue leads-incoming: the scale controller",
    ),
    (
        "data_owner_on_the_namespace",
        "infra/app/rbac.bicep",
        "  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataOwner)\n  scope: queues[i]",
        "  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataOwner)\n  scope: serviceBus",
        checks.check_rbac,
        "Azure Service Bus Data Owner granted on the namespace",
    ),
    (
        "key_vault_name_without_a_generation",
        "infra/main.bicep",
        "name: '${abbrs.keyVaultVaults}${keyVaultToken}'",
        "name: '${abbrs.keyVaultVaults}${resourceToken}'",
        checks.check_key_vault_name,
        "collides with the soft-deleted vault",
    ),
    (
        "key_vault_generation_not_settable_with_azd_env",
        "infra/main.parameters.json",
        '"value": "${LEADWRITER_KEYVAULT_GENERATION=1}"',
        '"value": "1"',
        checks.check_key_vault_name,
        "keyVaultGeneration (in the Key Vault name) must come from the azd environment",
    ),
    (
        "every_name_changes_with_the_key_vault_generation",
        "infra/main.bicep",
        "var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))",
        "var resourceToken = toLower(uniqueString(subscription().id, environmentName, location, keyVaultGeneration))",
        checks.check_key_vault_name,
        "depends on the Key Vault generation too",
    ),
    (
        "admin_key_minimum_above_what_azd_generates",
        "infra/main.bicep",
        "@minLength(15)\n@description('Admin key",
        "@minLength(16)\n@description('Admin key",
        checks.check_admin_key_generation,
        "azd's secretOrRandomPassword generates 15 characters",
    ),
    (
        "admin_key_stored_as_azd_generates_it",
        "infra/main.bicep",
        "    adminKey: adminKeyValue",
        "    adminKey: adminKey",
        checks.check_admin_key_generation,
        "shorter than the LEADWRITER_ADMIN_KEY minimum of 32",
    ),
    (
        "unknown_leadwriter_setting",
        "infra/app/api.bicep",
        "LEADWRITER_LOG_LEVEL: 'INFO'",
        "LEADWRITER_LOG_LEVEL: 'INFO'\n      LEADWRITER_QUEUE_NAME: 'leads'",
        checks.check_app_settings,
        "LEADWRITER_QUEUE_NAME",
    ),
    (
        "setting_value_the_app_refuses",
        "infra/app/api.bicep",
        "LEADWRITER_QUEUE_BACKEND: 'servicebus'",
        "LEADWRITER_QUEUE_BACKEND: 'service-bus'",
        checks.check_app_settings,
        "LEADWRITER_QUEUE_BACKEND",
    ),
    (
        "crm_simulator_hosts_allowed_in_azure",
        "infra/app/api.bicep",
        "LEADWRITER_CRM_ALLOWED_HOSTS: ''",
        "LEADWRITER_CRM_ALLOWED_HOSTS: '127.0.0.1:*'",
        checks.check_app_settings,
        "LEADWRITER_CRM_ALLOWED_HOSTS",
    ),
    (
        "nested_child_resources_pycep_cannot_see",
        "infra/core/host/appserviceplan.bicep",
        "  properties: {\n    reserved: true\n  }\n}",
        "  properties: {\n    reserved: true\n  }\n  resource a 'x' = {\n    name: 'a'\n  }\n"
        "  resource b 'y' = {\n    name: 'b'\n  }\n}",
        checks.check_parsing,
        "declared",
    ),
]


@pytest.mark.parametrize(
    ("relative", "old", "new", "check", "expected"),
    [pytest.param(*variant[1:], id=variant[0]) for variant in BROKEN_VARIANTS],
)
def test_broken_variant_is_reported_by_its_check(
    copy: Path, relative: str, old: str, new: str, check: Check, expected: str
) -> None:
    edit(copy, relative, old, new)
    problems = check(checks.load_deployment(copy / "infra"))
    assert any(expected in problem for problem in problems), problems
    assert checks.run_all(copy), "run_all must fail too"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            '"maxAutoLockRenewalDuration": "00:05:00"',
            '"maxAutoLockRenewalDuration": "00:02:00"',
            "shorter than functionTimeout",
            id="renewal_shorter_than_timeout",
        ),
        pytest.param(
            '"maxAutoLockRenewalDuration": "00:05:00"',
            '"maxAutoLockRenewalDuration": "00:00:30"',
            "exceeds host.json maxAutoLockRenewalDuration",
            id="lock_longer_than_renewal",
        ),
        pytest.param(
            '"autoCompleteMessages": false',
            '"autoCompleteMessages": true',
            "autoCompleteMessages",
            id="host_completes_messages_itself",
        ),
    ],
)
def test_host_json_out_of_step_with_the_queues_is_reported(
    copy: Path, old: str, new: str, expected: str
) -> None:
    edit(copy, "host.json", old, new)
    problems = checks.check_host_json(checks.load_deployment(copy / "infra"), copy / "host.json")
    assert any(expected in problem for problem in problems), problems


def test_a_lock_shorter_than_one_crm_request_is_reported(copy: Path) -> None:
    edit(
        copy,
        "infra/main.bicep",
        "{ name: 'leads-validated', lockDuration: 'PT1M' }",
        "{ name: 'leads-validated', lockDuration: 'PT30S' }",
    )
    problems = checks.check_host_json(checks.load_deployment(copy / "infra"), copy / "host.json")
    assert any("does not outlast one CRM request" in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("relative", "old", "new"),
    [
        pytest.param(
            "infra/main.bicep",
            "{ name: 'leads-ready', lockDuration: 'PT3M' }",
            "{ name: 'leads-ready', lockDuration: 'PT1M' }",
            id="ready_lock_back_to_one_minute",
        ),
        pytest.param(
            "host.json",
            '"maxMessageBatchSize": 100',
            '"maxMessageBatchSize": 500',
            id="host_batch_larger_than_one_crm_batch",
        ),
    ],
)
def test_a_ready_lock_too_short_for_the_write_batch_is_reported(copy: Path, relative: str, old: str, new: str) -> None:
    edit(copy, relative, old, new)
    problems = checks.check_host_json(checks.load_deployment(copy / "infra"), copy / "host.json")
    assert any("does not fit the worst-case write batch" in problem for problem in problems), problems
    assert checks.run_all(copy), "run_all must fail too"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(".leadwriter/\n", "", "'.leadwriter/' is missing", id="local_data_dir_deployed"),
        pytest.param("local.settings.json\n", "", "'local.settings.json' is missing", id="local_settings_deployed"),
        pytest.param("tests/\n", "", "'tests/' is missing", id="tests_deployed"),
        pytest.param(".venv*/\n", "", "'.venv*/' is missing", id="virtualenvs_deployed"),
        pytest.param("samples/\n", "samples/\nshared/\n", "'shared/' would leave out code", id="code_left_out"),
    ],
)
def test_a_funcignore_that_deploys_local_state_or_drops_code_is_reported(
    copy: Path, old: str, new: str, expected: str
) -> None:
    edit(copy, ".funcignore", old, new)
    problems = checks.check_funcignore(copy / ".funcignore")
    assert any(expected in problem for problem in problems), problems
    assert checks.run_all(copy), "run_all must fail too"


def test_funcignore_keeps_every_required_entry_out() -> None:
    assert checks.check_funcignore(ROOT / ".funcignore") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${LEADWRITER_KEYVAULT_GENERATION=1}", "1"),
        ("${AZURE_ENV_NAME}", checks.Unknown("azd env AZURE_ENV_NAME")),
        ("plain", "plain"),
        (4, 4),
    ],
)
def test_main_parameters_values_read_as_azd_substitutes_them(value: object, expected: object) -> None:
    assert checks._azd_value(value) == expected


def test_azure_yaml_must_deploy_api_as_a_python_function(copy: Path) -> None:
    edit(copy, "azure.yaml", "host: function", "host: appservice")
    assert checks.check_azure_yaml(copy / "azure.yaml") == [
        "azure.yaml: services.api.host must be 'function', is 'appservice'"
    ]


def test_a_checkov_suppression_without_a_reason_is_reported(copy: Path) -> None:
    edit(
        copy,
        "infra/core/host/appserviceplan.bicep",
        "resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {\n",
        "resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {\n  // checkov:skip=CKV_AZURE_211\n",
    )
    problems = checks.check_suppressions(copy / "infra")
    assert problems == ["appserviceplan.bicep:7: checkov:skip=CKV_AZURE_211 without a reason (`: why`)"]


needs_checkov = pytest.mark.skipif(
    not checks.CHECKOV.exists(), reason="checkov is not installed: `make infra-check` installs .venv-checkov"
)


@needs_checkov
def test_checkov_finds_nothing_unjustified_in_the_real_infra() -> None:
    assert checks.run_checkov(ROOT / "infra") == []


@needs_checkov
def test_checkov_reports_a_finding_once_its_justification_is_removed(copy: Path) -> None:
    path = copy / "infra/core/security/keyvault.bicep"
    path.write_text("\n".join(line for line in path.read_text().splitlines() if "CKV_AZURE_41" not in line))
    problems = checks.run_checkov(copy / "infra")
    assert [p for p in problems if p.startswith("checkov CKV_AZURE_41 ")], problems

// Lead Writer on Azure: `azd up` provisions this, then deploys the Functions app (service `api`).
// Shape follows the azd Functions templates: main.bicep wires small modules; every role assignment
// lives in app/rbac.bicep; no connection strings, shared keys or SAS anywhere (managed identity only).
// Offline checks: tests/infra_checks.py (`make infra-check`).
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds a short unique token used in every resource name.')
param environmentName string

@minLength(1)
@description('Region for all resources. Must offer the Flex Consumption plan.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the person or pipeline running azd. Gets read access to the admin key secret only, so azd can reuse it on the next provision. Empty: nobody.')
param principalId string = ''

@allowed(['User', 'ServicePrincipal'])
@description('Kind of principal in principalId (ServicePrincipal when a pipeline runs azd).')
param principalType string = 'User'

@secure()
@minLength(15)
@description('Admin key for the HTTP API, as azd supplies it: the stored key read back (secretOrRandomPassword), or on the first provision a fresh 15-character password, which is lengthened below. Written to Key Vault only; the app reads it through a Key Vault reference.')
param adminKey string

@secure()
// checkov:skip=CKV_AZURE_131: the default is newGuid(), drawn fresh by ARM on every deployment, not a hard-coded value; @secure() keeps it out of the deployment history.
@description('Entropy that lengthens a fresh 15-character azd password to the 32+ characters the app requires (LEADWRITER_ADMIN_KEY). Never pass it: each deployment draws a new one, used only when adminKey is shorter than 32.')
param adminKeyEntropy string = newGuid()

@minLength(1)
@maxLength(16)
@description('Generation of the Key Vault name. After `azd down`, the purge-protected vault keeps its name for 90 days; bump this (azd env set LEADWRITER_KEYVAULT_GENERATION 2) before the next `azd up` in the same environment so the new vault gets a new name. See docs/deploy.md.')
param keyVaultGeneration string = '1'

@minValue(1)
@maxValue(1000)
@description('Upper bound of on-demand Flex Consumption instances PER FUNCTION GROUP, not per app: each Service Bus function (validate_credentials, check_solution, write_lead) scales as its own group and the HTTP API as the `http` group, so the app may run up to 4 x this many. What this means for one CRM (52 concurrent requests per user): docs/deploy.md.')
param maximumInstanceCount int = 4

@allowed(['3.11', '3.12'])
@description('Python version of the Flex Consumption runtime.')
param pythonVersion string = '3.11'

@allowed([2048, 4096])
@description('Memory of one instance (MB).')
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(50)
@description('Requests in flight to one publisher\'s CRM per instance (LEADWRITER_PUBLISHER_CONCURRENCY).')
param publisherConcurrency int = 8

@allowed(['Enabled', 'Disabled'])
@description('Public network access to Key Vault. Disabled needs private endpoints and VNet integration, which this template does not create.')
param keyVaultPublicNetworkAccess string = 'Enabled'

@description('Unique name of the Lead Writer Dataverse solution (LEADWRITER_SOLUTION_NAME).')
param solutionName string = 'MicrosoftMarketplacesLeadIntegrationSolution'

@description('Lowest supported solution version (LEADWRITER_MIN_SOLUTION_VERSION).')
param minSolutionVersion string = '1.0.0.0'

var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
// Key Vault names stay reserved while a deleted vault is soft-deleted (90 days, purge protection on),
// so the vault alone takes its token from the generation too: a new generation, a new name.
var keyVaultToken = toLower(uniqueString(subscription().id, environmentName, location, keyVaultGeneration))
var tags = { 'azd-env-name': environmentName }
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentStorageContainerName = 'app-package-${take(functionAppName, 32)}-${take(toLower(uniqueString(functionAppName, resourceToken)), 7)}'
var adminKeySecretName = 'leadwriter-admin-key'
// azd's secretOrRandomPassword generates 15 characters (5 lower, 5 upper, 5 digits); the app refuses
// an admin key under 32. A stored key (32+) is kept as it is, so provisions do not rotate it.
var adminKeyValue = (length(adminKey) >= 32) ? adminKey : '${adminKey}${replace(adminKeyEntropy, '-', '')}'

// The queues: the stage queues in pipeline order, then the jobs queue (shared/names.py
// SERVICE_BUS_QUEUES; a test keeps them equal). Timeouts to the CRM and Entra ID: connect 5 s + read 30 s (LEADWRITER_CRM_*_TIMEOUT).
//   leads-incoming, leads-validated: single dispatch, one request per message (35 s); the host
//     renews their locks for up to maxAutoLockRenewalDuration, so one minute is enough.
//   leads-ready: write_lead takes up to maxMessageBatchSize (100) messages as one batch; host.json
//     lock renewal does NOT apply to batches, so the write stage renews the locks itself, and the
//     lock alone must outlast one $batch with its fresh-token retry: $batch 35 s + token 35 s +
//     $batch 35 s = 105 s, plus settling up to 100 messages (~10 s). PT3M leaves a minute for a
//     renewal that comes late. Service Bus allows at most PT5M. tests/infra_checks.py recomputes this
//     from host.json and the timeout defaults.
var stageQueues = [
  { name: 'leads-incoming', lockDuration: 'PT1M' } // validate_credentials: token request to Entra ID
  { name: 'leads-validated', lockDuration: 'PT1M' } // check_solution: one Dataverse query
  { name: 'leads-ready', lockDuration: 'PT3M' } // write_lead: one $batch of up to 100 leads, fresh-token retry
  // run_job: one step of a replay/purge job (at most 2000 dead letters); the host renews the lock.
  { name: 'leadwriter-jobs', lockDuration: 'PT5M' }
]

// The state port's tables (shared/names.py STATE_TABLES; a test keeps them equal). Bicep creates
// them and rbac.bicep grants the app Storage Table Data Contributor on each table, not the account.
var stateTables = [
  'leaddeliveries'
  'crmlimits'
  'apikeys'
  'publishersettings'
  'replayjobs'
  'ingestids'
  'leadjourneys'
  'deadletterarchive'
  'scheduledretries'
]

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

// One user-assigned identity for the app: used by the Functions host (storage, triggers), by the
// code (DefaultAzureCredential via AZURE_CLIENT_ID) and to resolve Key Vault references.
module identity 'core/identity/userAssignedIdentity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}api-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'core/monitor/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'core/storage/storage-account.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    containerNames: [deploymentStorageContainerName]
    tableNames: stateTables
  }
}

module serviceBus 'core/messaging/servicebus.bicep' = {
  name: 'servicebus'
  scope: rg
  params: {
    name: '${abbrs.serviceBusNamespaces}${resourceToken}'
    location: location
    tags: tags
    queues: stageQueues
  }
}

module keyVault 'core/security/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: '${abbrs.keyVaultVaults}${keyVaultToken}'
    location: location
    tags: tags
    publicNetworkAccess: keyVaultPublicNetworkAccess
    adminKeySecretName: adminKeySecretName
    adminKey: adminKeyValue
  }
}

module appServicePlan 'core/host/appserviceplan.bicep' = {
  name: 'appserviceplan'
  scope: rg
  params: {
    name: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
  }
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    location: location
    tags: tags
    appServicePlanId: appServicePlan.outputs.id
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    storageAccountName: storage.outputs.name
    deploymentStorageContainerName: deploymentStorageContainerName
    tablesUrl: storage.outputs.primaryTableEndpoint
    pythonVersion: pythonVersion
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    serviceBusNamespaceFqdn: serviceBus.outputs.fullyQualifiedNamespace
    keyVaultUri: keyVault.outputs.uri
    adminKeySecretUri: keyVault.outputs.adminKeySecretUri
    solutionName: solutionName
    minSolutionVersion: minSolutionVersion
    publisherConcurrency: publisherConcurrency
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
  }
  // The app resolves its Key Vault reference and starts its Service Bus triggers at once:
  // the roles must exist first.
  dependsOn: [rbac]
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    appPrincipalId: identity.outputs.principalId
    serviceBusNamespaceName: serviceBus.outputs.name
    queueNames: [for queue in stageQueues: queue.name]
    keyVaultName: keyVault.outputs.name
    adminKeySecretName: adminKeySecretName
    storageAccountName: storage.outputs.name
    tableNames: stateTables
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
  }
}

// Names and endpoints only: never a key, secret or connection string.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = api.outputs.uri
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_ENDPOINT string = keyVault.outputs.uri
output SERVICEBUS_FULLY_QUALIFIED_NAMESPACE string = serviceBus.outputs.fullyQualifiedNamespace
output SERVICEBUS_NAMESPACE_NAME string = serviceBus.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output LEADWRITER_TABLES_URL string = storage.outputs.primaryTableEndpoint

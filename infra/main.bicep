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
@minLength(16)
@description('Admin key for the HTTP API. Written to Key Vault only; the app reads it through a Key Vault reference. azd supplies it (secretOrRandomPassword).')
param adminKey string

@minValue(1)
@maxValue(1000)
@description('Upper bound of Flex Consumption instances. Each instance may hold LEADWRITER_PUBLISHER_CONCURRENCY requests to one CRM, and Dataverse allows 52 concurrent requests per user: see docs/deploy.md.')
param maximumInstanceCount int = 4

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
var tags = { 'azd-env-name': environmentName }
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentStorageContainerName = 'app-package-${take(functionAppName, 32)}-${take(toLower(uniqueString(functionAppName, resourceToken)), 7)}'
var adminKeySecretName = 'leadwriter-admin-key'

// The stage queues, in pipeline order. The names are shared/names.py's STAGE_QUEUES (a test keeps
// them equal). A lock of one minute outlasts one CRM or token request (connect 5 s + read 30 s by
// default); host.json renews it for up to the function timeout.
var stageQueues = [
  { name: 'leads-incoming', lockDuration: 'PT1M' } // validate_credentials: token request to Entra ID
  { name: 'leads-validated', lockDuration: 'PT1M' } // check_solution: one Dataverse query
  { name: 'leads-ready', lockDuration: 'PT1M' } // write_lead: one Dataverse write
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
    name: '${abbrs.keyVaultVaults}${resourceToken}'
    location: location
    tags: tags
    publicNetworkAccess: keyVaultPublicNetworkAccess
    adminKeySecretName: adminKeySecretName
    adminKey: adminKey
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

// The Lead Writer Functions app (azd service `api`): the three stage functions and the HTTP API.
// Every stable setting of DESIGN §8 is set here; bindings name settings, never values.
param name string
param location string = resourceGroup().location
param tags object = {}

param appServicePlanId string
param applicationInsightsName string
param storageAccountName string
param deploymentStorageContainerName string
@description('Table endpoint of the storage account (https://<account>.table.<suffix>/): LEADWRITER_TABLES_URL. No key: the app uses its identity.')
param tablesUrl string
@allowed(['3.11', '3.12'])
param pythonVersion string = '3.11'
param identityId string
param identityClientId string

@description('Host name of the Service Bus namespace (no key).')
param serviceBusNamespaceFqdn string
param keyVaultUri string
@description('Versionless URI of the admin key secret; the app gets a Key Vault reference, never the value.')
param adminKeySecretUri string

param solutionName string
param minSolutionVersion string
param publisherConcurrency int
param instanceMemoryMB int
param maximumInstanceCount int

module functions '../core/host/functions-flexconsumption.bicep' = {
  name: '${name}-functions'
  params: {
    name: name
    location: location
    tags: union(tags, { 'azd-service-name': 'api' })
    appServicePlanId: appServicePlanId
    applicationInsightsName: applicationInsightsName
    storageAccountName: storageAccountName
    deploymentStorageContainerName: deploymentStorageContainerName
    identityId: identityId
    identityClientId: identityClientId
    runtimeName: 'python'
    runtimeVersion: pythonVersion
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    appSettings: {
      // Service Bus triggers (connection="ServiceBusConnection") and the code's own sender: identity-based.
      ServiceBusConnection__fullyQualifiedNamespace: serviceBusNamespaceFqdn
      ServiceBusConnection__credential: 'managedidentity'
      ServiceBusConnection__clientId: identityClientId
      // DefaultAzureCredential in the code (Key Vault, Service Bus) picks the same identity.
      AZURE_CLIENT_ID: identityClientId
      KEYVAULT_URL: keyVaultUri
      LEADWRITER_QUEUE_BACKEND: 'servicebus'
      LEADWRITER_SECRET_BACKEND: 'keyvault'
      // State instances share (delivery status, penalties, key records, settings, replay jobs): the
      // tables of infra/core/storage, reached with AZURE_CLIENT_ID's identity; shared keys are off.
      LEADWRITER_STATE_BACKEND: 'tables'
      LEADWRITER_TABLES_URL: tablesUrl
      LEADWRITER_ADMIN_KEY: '@Microsoft.KeyVault(SecretUri=${adminKeySecretUri})'
      // Only Microsoft's CRM hosts in Azure: the local-simulator escape hatch stays closed.
      LEADWRITER_CRM_ALLOWED_HOSTS: ''
      // Likewise for alert webhooks: no local receivers in Azure.
      LEADWRITER_WEBHOOK_ALLOWED_HOSTS: ''
      LEADWRITER_SOLUTION_NAME: solutionName
      LEADWRITER_MIN_SOLUTION_VERSION: minSolutionVersion
      LEADWRITER_PUBLISHER_CONCURRENCY: string(publisherConcurrency)
      LEADWRITER_LOG_LEVEL: 'INFO'
      // Instance-local caches only (shared state is in the tables above); short-lived on Flex Consumption.
      LEADWRITER_DATA_DIR: '/tmp/leadwriter'
      // The cloud's own Entra authority (sovereign clouds included), never the CRM's challenge.
      AZURE_AUTHORITY_HOST: environment().authentication.loginEndpoint
    }
  }
}

output name string = functions.outputs.name
output uri string = functions.outputs.uri

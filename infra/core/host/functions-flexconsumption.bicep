// A Function App on the Flex Consumption plan with a user-assigned identity and identity-based
// host storage. The caller passes its own app settings; this module adds the host's.
param name string
param location string = resourceGroup().location
param tags object = {}

param appServicePlanId string
param storageAccountName string
param deploymentStorageContainerName string
param applicationInsightsName string

@description('Resource id of the user-assigned identity.')
param identityId string
@description('Client id of the same identity.')
param identityClientId string

@allowed(['python'])
param runtimeName string = 'python'
// pyproject.toml requires Python 3.11 or later; CI here runs 3.11 only, so 3.11 stays the default.
@allowed(['3.11', '3.12'])
param runtimeVersion string = '3.11'

@allowed([2048, 4096])
param instanceMemoryMB int = 2048
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 4

param appSettings object = {}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: The HTTP API must be public: the marketplace's HTTPS lead destination and publishers call it. Every route but /api/health needs a key.
  // checkov:skip=CKV_AZURE_17: The marketplace's HTTPS lead destination presents no client certificate; callers authenticate with publisher or admin keys.
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales to zero by design; Service Bus buffers leads while instances start, so always-ready instances are an optional cost.
  // checkov:skip=CKV_AZURE_213: Flex Consumption has no App Service health-check eviction; /api/health is there for an external availability test.
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: appServicePlanId
    httpsOnly: true
    // Key Vault references (LEADWRITER_ADMIN_KEY) resolve with this identity, not a system one.
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentStorageContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: runtimeName
        version: runtimeVersion
      }
    }
  }
}

resource configAppSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov:skip=CKV_AZURE_13: false positive: this is the app-settings map, not the site's auth config; the API authenticates callers with its own keys (the marketplace cannot use Entra auth).
  // checkov:skip=CKV_AZURE_63: false positive: checkov reads every sites/config resource as the `web` config; this is the app-settings map.
  // checkov:skip=CKV_AZURE_65: false positive: checkov reads every sites/config resource as the `web` config; this is the app-settings map.
  // checkov:skip=CKV_AZURE_66: false positive: checkov reads every sites/config resource as the `web` config; this is the app-settings map.
  // checkov:skip=CKV_AZURE_80: false positive: checkov reads every sites/config resource as the `web` config; this is the app-settings map.
  // checkov:skip=CKV_AZURE_88: false positive: checkov reads every sites/config resource as the `web` config; this is the app-settings map.
  // checkov:skip=CKV_AZURE_222: false positive: app-settings map; the site's public access is justified on functionApp above.
  parent: functionApp
  name: 'appsettings'
  properties: union(appSettings, {
    AzureWebJobsStorage__accountName: storage.name
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    // Not a secret: with DisableLocalAuth on the component, telemetry is accepted only with the
    // Entra token named by APPLICATIONINSIGHTS_AUTHENTICATION_STRING.
    APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  })
}

// Basic-auth publishing is off: azd deploys to Flex Consumption with an Entra token.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = functionApp.name
output id string = functionApp.id
output uri string = 'https://${functionApp.properties.defaultHostName}'

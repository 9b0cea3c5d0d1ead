// The Functions host's storage (AzureWebJobsStorage) and the Flex Consumption deployment container.
// Shared keys are off: the host and azd reach it with Entra tokens only.
param name string
param location string = resourceGroup().location
param tags object = {}
param containerNames array = []

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: No VNet in this template, so the Functions host reaches its storage over the public endpoint; every request still needs an Entra token (shared keys and anonymous access are off).
  // checkov:skip=CKV_AZURE_59: Same as CKV_AZURE_35: public endpoint without VNet, but no anonymous blob access and no shared keys.
  // checkov:skip=CKV_AZURE_206: Holds only the deployment package (re-uploaded by azd deploy) and host leases; LRS is enough, no lead data lives here.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobServices 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for containerName in containerNames: {
  parent: blobServices
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}]

output name string = storage.name
output id string = storage.id
output primaryBlobEndpoint string = storage.properties.primaryEndpoints.blob

// The Functions host's storage (AzureWebJobsStorage), the Flex Consumption deployment container and
// the state port's tables (DESIGN §2). Shared keys are off: the host, azd and the app reach it with
// Entra tokens only.
param name string
param location string = resourceGroup().location
param tags object = {}
param containerNames array = []
@description('Tables of the state port (shared/names.py STATE_TABLES). Created here, so the app needs no right to create tables.')
param tableNames array = []

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

// Lead Writer's state (LEADWRITER_STATE_BACKEND=tables): what instances must agree on (DESIGN §2),
// never secrets (those stay in Key Vault). The app never creates tables in Azure; these are all it uses.
resource tableServices 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [for tableName in tableNames: {
  parent: tableServices
  name: tableName
}]

output name string = storage.name
output id string = storage.id
output primaryBlobEndpoint string = storage.properties.primaryEndpoints.blob
// The Table endpoint for LEADWRITER_TABLES_URL (https://<account>.table.<storage suffix>/).
output primaryTableEndpoint string = storage.properties.primaryEndpoints.table
output tableNames array = [for (tableName, i) in tableNames: tables[i].name]

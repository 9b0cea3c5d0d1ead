// Key Vault: one secret per publisher connection (written by the HTTP API) and the admin key.
// Authorization is Azure RBAC only (no access policies); deleted secrets are recoverable and cannot
// be purged early.
param name string
param location string = resourceGroup().location
param tags object = {}

@allowed(['Enabled', 'Disabled'])
param publicNetworkAccess string = 'Enabled'

param adminKeySecretName string

@secure()
@description('Value of the admin key secret. Never echoed in an output.')
param adminKey string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: The firewall default follows the publicNetworkAccess parameter; without VNet integration the Flex Consumption app can only reach the public endpoint. Access is Entra RBAC only.
  // checkov:skip=CKV_AZURE_189: publicNetworkAccess is a parameter (Enabled by default for the same reason as CKV_AZURE_109); set it to Disabled together with private endpoints.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: publicNetworkAccess
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: (publicNetworkAccess == 'Enabled') ? 'Allow' : 'Deny'
    }
  }
}

resource adminKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: An expiry date would switch the admin API off on that date; the key is rotated on demand instead (docs/deploy.md).
  parent: vault
  name: adminKeySecretName
  properties: {
    value: adminKey
    contentType: 'text/plain'
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
// Versionless: the app follows rotations of the secret (see docs/deploy.md).
output adminKeySecretUri string = adminKeySecret.properties.secretUri

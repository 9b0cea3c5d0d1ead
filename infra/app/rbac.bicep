// Every role assignment of Lead Writer, each at the narrowest scope that works.
//
// One Function App hosts all four functions, so they share ONE identity and this file grants the
// union of what they need:
//
//   function              receives from                       sends to
//   validate_credentials  leads-incoming                      leads-validated; leads-incoming (reschedule)
//   check_solution        leads-validated                     leads-ready;     leads-validated (reschedule)
//   write_lead            leads-ready                         leads-ready (reschedule)
//   http_api              all three DLQs (list/replay/purge)  leads-incoming (ingest); all three (replay)
//
// So the identity holds Data Receiver and Data Sender on each stage queue: at QUEUE scope, never on
// the namespace. A dead-letter queue is a sub-queue of its queue, so the API's DLQ access needs no
// wider scope.
//
// Scaling: on Flex Consumption every Service Bus-triggered function scales as its own group, by
// target-based scaling on its queue's message count. The scale controller reads that count with the
// trigger's connection (this identity) through the Service Bus administration API, which needs
// Manage rights; with Listen (Receiver) only, it cannot read the queue length and scaling falls back
// to the slower incremental mode. The built-in role with Manage is Azure Service Bus Data Owner, so the
// identity also holds Data Owner — on each stage queue only, never the namespace: the price is that it
// could reconfigure or delete those three queues, nothing else. (Receiver and Sender stay assigned, so
// dropping Data Owner later degrades scaling only.) Sources: docs/deploy.md, "Scaling from zero".
//
// Key Vault: the stages only read connections (Secrets User would do), but the HTTP API writes and
// deletes them, and with one identity the app therefore gets Secrets Officer on the vault. For strict
// separation, deploy the API as a second Function App with its own identity (same code, HTTP
// blueprint only): give that identity Secrets Officer plus Sender on leads-incoming and
// Receiver/Sender on the queues whose DLQs it replays, and give the stage app Secrets User and only
// its own rows of the table above. docs/deploy.md walks through it.
param appPrincipalId string
param serviceBusNamespaceName string
@description('Stage queue names (shared/names.py STAGE_QUEUES).')
param queueNames array
param keyVaultName string
param adminKeySecretName string
param storageAccountName string
@description('State tables (shared/names.py STATE_TABLES), created by core/storage/storage-account.bicep.')
param tableNames array
param applicationInsightsName string

@description('The person or pipeline running azd; empty for none.')
param deployerPrincipalId string = ''
@allowed(['User', 'ServicePrincipal'])
param deployerPrincipalType string = 'User'

// Built-in role definition ids (the same in every tenant).
var roles = {
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource serviceBus 'Microsoft.ServiceBus/namespaces@2024-01-01' existing = {
  name: serviceBusNamespaceName
}

resource queues 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' existing = [for queueName in queueNames: {
  parent: serviceBus
  name: queueName
}]

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource adminKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: keyVault
  name: adminKeySecretName
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource tableServices 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = [for tableName in tableNames: {
  parent: tableServices
  name: tableName
}]

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// Each stage function's trigger, and the API's dead-letter list/replay/purge.
resource queueReceivers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (queueName, i) in queueNames: {
  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataReceiver)
  scope: queues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// Forwarding to the next stage, rescheduling a retry onto the same queue, ingest and replay.
resource queueSenders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (queueName, i) in queueNames: {
  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataSender)
  scope: queues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// The scale controller reads each queue's message count (Manage rights) for target-based scaling;
// see the note at the top. Queue scope: it cannot touch anything else in the namespace.
resource queueScaleReaders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (queueName, i) in queueNames: {
  name: guid(queues[i].id, appPrincipalId, roles.serviceBusDataOwner)
  scope: queues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// Read publisher connections (stages), write and delete them (HTTP API); see the note at the top.
resource keyVaultSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, appPrincipalId, roles.keyVaultSecretsOfficer)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The Functions host keeps leases and keys in blobs, and Flex Consumption reads the deployment
// package from a blob container. No storage queues are used (Service Bus carries leads), so no Queue
// role; the state tables get their own role below.
resource storageBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The state port (LEADWRITER_STATE_BACKEND=tables): read and write entities, on each state table
// only. The tables are created by Bicep, so no right on the account or its other tables is needed.
resource tableDataContributors 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (tableName, i) in tableNames: {
  name: guid(tables[i].id, appPrincipalId, roles.storageTableDataContributor)
  scope: tables[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// Application Insights with local auth disabled accepts telemetry only with this role.
resource monitoringMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, appPrincipalId, roles.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// azd's secretOrRandomPassword reads the admin key back on the next provision instead of rotating
// it by accident: read access to that one secret, nothing else in the vault.
resource deployerAdminKeyReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(adminKeySecret.id, deployerPrincipalId, roles.keyVaultSecretsUser)
  scope: adminKeySecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

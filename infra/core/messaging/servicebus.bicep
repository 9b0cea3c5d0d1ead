// Service Bus namespace and the stage queues. Entra ID only (disableLocalAuth): no SAS keys exist
// that could leak into a connection string.
param name string
param location string = resourceGroup().location
param tags object = {}

@description('Stage queues: objects with `name` and `lockDuration` (ISO 8601).')
param queues array

@description('Deliveries before Service Bus dead-letters a message MaxDeliveryCountExceeded. Transient failures are rescheduled as new messages, so this counts crashes and lost locks, not CRM retries.')
@minValue(1)
param maxDeliveryCount int = 10

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    // Standard: the cheapest tier with duplicate detection and scheduled messages used by retries.
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource stageQueues 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = [for queue in queues: {
  parent: namespace
  name: queue.name
  properties: {
    lockDuration: queue.lockDuration
    maxDeliveryCount: maxDeliveryCount
    // An expired lead goes to the dead-letter queue (TTLExpiredException), where ops can replay it.
    deadLetteringOnMessageExpiration: true
    // The lead id is the message id: a lead sent twice within the window is dropped silently.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    defaultMessageTimeToLive: 'P14D'
    maxSizeInMegabytes: 1024
    requiresSession: false
    enablePartitioning: false
    enableBatchedOperations: true
  }
}]

output name string = namespace.name
output id string = namespace.id
// The host name only (no key): ServiceBusConnection__fullyQualifiedNamespace.
output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
output queueNames array = [for (queue, i) in queues: stageQueues[i].name]

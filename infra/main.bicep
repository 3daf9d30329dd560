// aoai-batch-worker on Azure Container Apps: a scheduled job with a user-assigned managed identity, no keys.
//
//   azd up                      provision this template, build the image in ACR, point the job at it
//   azd provision / azd deploy  the two halves separately
//
// Everything lives in one resource group. An existing storage account or Azure OpenAI account can be reused by
// name (it must be in the same resource group); the identity then gets its roles on that account.

targetScope = 'resourceGroup'

// ---- azd ------------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('azd environment name; seeds the resource names and the azd-env-name tag.')
param environmentName string

@minLength(1)
@description('Region for every resource (Azure OpenAI can be elsewhere: openAiLocation).')
param location string = resourceGroup().location

@description('Object id of the person running azd (AZURE_PRINCIPAL_ID): gets the same data roles, for local runs.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
@description('Principal type of principalId (ServicePrincipal when azd runs in CI).')
param principalType string = 'User'

@description('Image the job runs; azd deploy sets it (SERVICE_WORKER_IMAGE_NAME). Empty: a public placeholder.')
param workerImageName string = ''

// ---- storage --------------------------------------------------------------------------------------------

@description('Reuse this storage account (same resource group) instead of creating one. Empty: create one.')
param existingStorageAccountName string = ''

@description('Blob container holding the prompt files (WORKER_SOURCE).')
param promptsContainerName string = 'prompts'

@description('Folder inside the prompts container to read from; empty = the whole container.')
param sourcePrefix string = ''

@description('Blob container receiving results, manifests and leases (WORKER_SINK).')
param resultsContainerName string = 'results'

// ---- Azure OpenAI ---------------------------------------------------------------------------------------

@description('Reuse this Azure OpenAI account (same resource group) instead of creating one. Empty: create one.')
param existingOpenAiAccountName string = ''

@description('Region of a new Azure OpenAI account (model availability differs by region). Empty: location.')
param openAiLocation string = ''

@description('Create the model deployment below. Set false when the reused account already has it.')
param createOpenAiDeployment bool = true

@description('Deployment name the worker calls (AZURE_OPENAI_DEPLOYMENT).')
param openAiDeploymentName string = 'gpt-4o-mini'

@description('Model of the deployment.')
param modelName string = 'gpt-4o-mini'

@description('Model version of the deployment.')
param modelVersion string = '2024-07-18'

@allowed([
  'Standard'
  'GlobalStandard'
  'DataZoneStandard'
])
@description('Deployment type (SKU) of the deployment.')
param modelSkuName string = 'GlobalStandard'

@minValue(1)
@description('Deployment capacity in thousands of tokens per minute.')
param modelCapacity int = 30

@description('Azure OpenAI data-plane API version the worker uses (OPENAI_API_VERSION).')
param openAiApiVersion string = '2024-10-21'

// ---- the job --------------------------------------------------------------------------------------------

@description('When the job runs: five-field cron, UTC. Overlapping executions are safe (blob leases).')
param cronExpression string = '0 * * * *'

@minValue(60)
@description('Seconds one replica may run before it gets SIGTERM (then SIGKILL 30 s later). It exits 1 with work left; the next execution resumes.')
param replicaTimeout int = 1800

@minValue(0)
@maxValue(10)
@description('Retries of a failed replica (exit code 1: work remains) within one execution.')
param replicaRetryLimit int = 1

@minValue(1)
@description('Replicas per execution; they share the work through blob leases.')
param parallelism int = 1

@minValue(1)
@description('Replicas that must succeed for the execution to succeed; normally equal to parallelism.')
param replicaCompletionCount int = parallelism

@minValue(1)
@description('Azure OpenAI requests in flight per replica (WORKER_CONCURRENCY).')
param workerConcurrency int = 32

@description('vCPU per replica, as a string (Consumption profile: 0.25 steps, memory = 2 GiB per vCPU).')
param cpu string = '0.5'

@description('Memory per replica.')
param memory string = '1Gi'

@description('Create an Application Insights component and pass APPLICATIONINSIGHTS_CONNECTION_STRING to the job.')
param enableApplicationInsights bool = false

@minValue(30)
@description('Log Analytics retention in days.')
param logRetentionInDays int = 30

// ---- names ----------------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var tags = {
  'azd-env-name': environmentName
}
var useExistingStorage = !empty(existingStorageAccountName)
var useExistingOpenAi = !empty(existingOpenAiAccountName)
var storageAccountName = useExistingStorage ? existingStorageAccountName : 'st${resourceToken}'
var openAiAccountName = useExistingOpenAi ? existingOpenAiAccountName : 'oai-${resourceToken}'
var jobName = 'caj-worker-${resourceToken}'
var placeholderImage = 'mcr.microsoft.com/k8se/quickstart-jobs:latest'

// Built-in role definition ids.
var openAiUserRoleId = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd' // Cognitive Services OpenAI User
var blobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe' // Storage Blob Data Contributor
var acrPullRoleId = '7f951dda-4ed3-4680-a7ca-43fe172d538d' // AcrPull

// ---- identity -------------------------------------------------------------------------------------------

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-worker-${resourceToken}'
  location: location
  tags: tags
}

// ---- monitoring -----------------------------------------------------------------------------------------

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${resourceToken}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = if (enableApplicationInsights) {
  name: 'appi-${resourceToken}'
  location: location
  tags: tags
  kind: 'other'
  properties: {
    Application_Type: 'other'
    WorkspaceResourceId: logAnalytics.id
  }
}

// ---- Container Apps environment -------------------------------------------------------------------------

resource containerAppsEnvironment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: 'cae-${resourceToken}'
  location: location
  tags: tags
  properties: {
    // Console output (the worker's JSON lines) lands in ContainerAppConsoleLogs_CL.
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logAnalytics.properties.customerId
        sharedKey: logAnalytics.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
  }
}

// ---- container registry ---------------------------------------------------------------------------------

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: 'cr${resourceToken}'
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  properties: {
    adminUserEnabled: false
  }
}

resource acrPullRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, identity.id, acrPullRoleId)
  scope: registry
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRoleId)
  }
}

// ---- storage: prompts in, results out -------------------------------------------------------------------

resource newStorage 'Microsoft.Storage/storageAccounts@2023-05-01' = if (!useExistingStorage) {
  name: storageAccountName
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
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
  }
}

// The account the rest of the template uses, new or reused.
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource promptsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: promptsContainerName
  properties: {
    publicAccess: 'None'
  }
  dependsOn: [
    newStorage
  ]
}

resource resultsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: resultsContainerName
  properties: {
    publicAccess: 'None'
  }
  dependsOn: [
    newStorage
  ]
}

resource storageRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, blobDataContributorRoleId)
  scope: storage
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataContributorRoleId)
  }
  dependsOn: [
    newStorage
  ]
}

resource storageRoleForUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(principalId)) {
  name: guid(storage.id, principalId, blobDataContributorRoleId)
  scope: storage
  properties: {
    principalId: principalId
    principalType: principalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataContributorRoleId)
  }
  dependsOn: [
    newStorage
  ]
}

// ---- Azure OpenAI ---------------------------------------------------------------------------------------

resource newOpenAi 'Microsoft.CognitiveServices/accounts@2024-10-01' = if (!useExistingOpenAi) {
  name: openAiAccountName
  location: empty(openAiLocation) ? location : openAiLocation
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  properties: {
    customSubDomainName: openAiAccountName
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

// The account the rest of the template uses, new or reused.
resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
}

resource modelDeployment 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = if (createOpenAiDeployment) {
  parent: openAi
  name: openAiDeploymentName
  sku: {
    name: modelSkuName
    capacity: modelCapacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
  }
  dependsOn: [
    newOpenAi
  ]
}

resource openAiRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(openAi.id, identity.id, openAiUserRoleId)
  scope: openAi
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUserRoleId)
  }
  dependsOn: [
    newOpenAi
  ]
}

resource openAiRoleForUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(principalId)) {
  name: guid(openAi.id, principalId, openAiUserRoleId)
  scope: openAi
  properties: {
    principalId: principalId
    principalType: principalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUserRoleId)
  }
  dependsOn: [
    newOpenAi
  ]
}

// ---- the scheduled job ----------------------------------------------------------------------------------

// primaryEndpoints.blob ends with '/': https://ACCOUNT.blob.core.windows.net/
var workerSource = '${storage.properties.primaryEndpoints.blob}${promptsContainerName}/${sourcePrefix}'
var workerSink = '${storage.properties.primaryEndpoints.blob}${resultsContainerName}'

var appInsightsSecrets = enableApplicationInsights ? [
  {
    name: 'appinsights-connection-string'
    value: appInsights.properties.ConnectionString
  }
] : []
var appInsightsEnv = enableApplicationInsights ? [
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    secretRef: 'appinsights-connection-string'
  }
] : []

resource job 'Microsoft.App/jobs@2024-03-01' = {
  name: jobName
  location: location
  tags: union(tags, {
    'azd-service-name': 'worker'
  })
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    environmentId: containerAppsEnvironment.id
    workloadProfileName: 'Consumption'
    configuration: {
      triggerType: 'Schedule'
      scheduleTriggerConfig: {
        cronExpression: cronExpression
        parallelism: parallelism
        replicaCompletionCount: replicaCompletionCount
      }
      replicaTimeout: replicaTimeout
      replicaRetryLimit: replicaRetryLimit
      // Pull from ACR as the job's identity (AcrPull above): no registry password.
      registries: [
        {
          server: registry.properties.loginServer
          identity: identity.id
        }
      ]
      secrets: appInsightsSecrets
    }
    template: {
      containers: [
        {
          name: 'worker'
          // The image's own ENTRYPOINT ["worker"] / CMD ["run"] apply: no command or args here.
          image: empty(workerImageName) ? placeholderImage : workerImageName
          env: concat(
            [
              {
                name: 'AZURE_CLIENT_ID'
                value: identity.properties.clientId
              }
              {
                name: 'WORKER_AUTH'
                value: 'managed-identity'
              }
              {
                name: 'WORKER_SOURCE'
                value: workerSource
              }
              {
                name: 'WORKER_SINK'
                value: workerSink
              }
              {
                name: 'AZURE_OPENAI_ENDPOINT'
                value: openAi.properties.endpoint
              }
              {
                name: 'AZURE_OPENAI_DEPLOYMENT'
                value: openAiDeploymentName
              }
              {
                name: 'OPENAI_API_VERSION'
                value: openAiApiVersion
              }
              {
                name: 'WORKER_CONCURRENCY'
                value: string(workerConcurrency)
              }
            ],
            appInsightsEnv
          )
          resources: {
            cpu: json(cpu)
            memory: memory
          }
        }
      ]
    }
  }
  // The first execution must find its roles, containers and model deployment in place.
  dependsOn: [
    acrPullRole
    storageRole
    openAiRole
    promptsContainer
    resultsContainer
    modelDeployment
  ]
}

// ---- outputs: azd stores them in .azure/<env>/.env; a local run can reuse them -------------------------

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output RESOURCE_GROUP string = resourceGroup().name
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = registry.properties.loginServer
output AZURE_CONTAINER_REGISTRY_NAME string = registry.name
output AZURE_CONTAINER_APPS_ENVIRONMENT_NAME string = containerAppsEnvironment.name
output AZURE_LOG_ANALYTICS_WORKSPACE_ID string = logAnalytics.properties.customerId
output JOB_NAME string = job.name
output AZURE_MANAGED_IDENTITY_NAME string = identity.name
output AZURE_CLIENT_ID string = identity.properties.clientId
output AZURE_OPENAI_ACCOUNT string = openAi.name
output AZURE_OPENAI_ENDPOINT string = openAi.properties.endpoint
output AZURE_OPENAI_DEPLOYMENT string = openAiDeploymentName
output OPENAI_API_VERSION string = openAiApiVersion
output AZURE_STORAGE_ACCOUNT string = storage.name
output WORKER_SOURCE string = workerSource
output WORKER_SINK string = workerSink

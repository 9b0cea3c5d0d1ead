"""Names shared by the code, host.json, function bindings and infra/: one source of truth.

A test checks that ``infra/`` and ``host.json`` agree with these.
"""

from __future__ import annotations

QUEUE_INCOMING = "leads-incoming"
QUEUE_VALIDATED = "leads-validated"
QUEUE_READY = "leads-ready"

#: Where sweep jobs (replay, purge of many dead letters) wait for the job worker / ``run_job`` trigger.
QUEUE_JOBS = "leadwriter-jobs"

#: Stage queues in pipeline order.
STAGE_QUEUES: tuple[str, ...] = (QUEUE_INCOMING, QUEUE_VALIDATED, QUEUE_READY)
#: Every Service Bus queue the deployment has: the stage queues, then the jobs queue.
SERVICE_BUS_QUEUES: tuple[str, ...] = (*STAGE_QUEUES, QUEUE_JOBS)

#: The app setting prefix the Service Bus trigger bindings use (identity-based:
#: ``ServiceBusConnection__fullyQualifiedNamespace``).
SERVICEBUS_CONNECTION = "ServiceBusConnection"

#: Application properties carried on every hop (architecture §3).
PROP_PUBLISHER_ID = "publisherId"
PROP_LEAD_ID = "leadId"
PROP_ATTEMPT = "attempt"
PROP_REPLAY_COUNT = "replayCount"
#: How often a message was put off without reaching the CRM (a penalty, pacing): no attempt spent.
PROP_DEFERRALS = "deferrals"

#: Files in the data dir (LEADWRITER_DATA_DIR), each named here only.
BROKER_FILE = "broker.db"
SECRETS_FILE = "secrets.db"
SECRET_KEY_FILE = "secret.key"  # noqa: S105 - a file name, not a secret
STATE_FILE = "state.db"

#: Azure Table Storage tables of the state port (architecture §2), in the deployment's storage account.
#: Bicep creates exactly these (a check keeps them equal) and grants the app's identity Storage Table
#: Data Contributor on each one, not on the account: the app reads and writes entities but never
#: creates or deletes tables in Azure.
TABLE_DELIVERIES = "leaddeliveries"  # delivery status per publisher
TABLE_CRM_LIMITS = "crmlimits"  # 429 penalties and learned CRM limits
TABLE_API_KEYS = "apikeys"  # publisher API key records (hashed)
TABLE_PUBLISHER_SETTINGS = "publishersettings"  # mapping and alert settings
TABLE_REPLAY_JOBS = "replayjobs"  # dead-letter replay jobs
TABLE_INGEST_IDS = "ingestids"  # lead ids the ingest endpoint accepted (duplicate answers)
TABLE_LEAD_JOURNEYS = "leadjourneys"  # every settlement of a lead (GET /api/leads/{leadId}, leadwriter trace)
TABLE_DEAD_LETTER_ARCHIVE = "deadletterarchive"  # archived (discarded) dead letters, restorable for a while
TABLE_SCHEDULED = "scheduledretries"  # scheduled retries, released early when a CRM heals
STATE_TABLES: tuple[str, ...] = (
    TABLE_DELIVERIES,
    TABLE_CRM_LIMITS,
    TABLE_API_KEYS,
    TABLE_PUBLISHER_SETTINGS,
    TABLE_REPLAY_JOBS,
    TABLE_INGEST_IDS,
    TABLE_LEAD_JOURNEYS,
    TABLE_DEAD_LETTER_ARCHIVE,
    TABLE_SCHEDULED,
)

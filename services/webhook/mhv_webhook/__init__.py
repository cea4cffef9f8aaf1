"""The webhook gateway: verified HTTPS ingest, replay protection, durable saga processing.

Layers, top to bottom:

- the edges: `_edge_http` (senders, over HTTPS) with its middleware list `_edge_middleware`
  and its listener `_edge_listener`; `_edge_admin` (operators, over gRPC);
- the domain: `_ingest` (receiving), `_saga` (processing, through `_taskclient`),
  `_deliveries` (operators' view) and `_jobs`; one module per sender scheme
  (`_scheme_github`, `_scheme_gitlab`, `_scheme_standard`, listed in `_schemes`, sharing
  `_scheme`), the task changes they map onto (`_changes`), the Standard Webhooks task
  events (`_task_events`), `_sources`, `_secrets` and `_headers`;
- the stores (SQL only): `_store_inbox` and `_store_saga`.

`_metrics` holds every metric; `app` wires them into a running service.
"""

from mhv_webhook._changes import IgnoredEvent, Kind, Missing, QualityGate, TaskChange
from mhv_webhook._deliveries import Deliveries, DeliveryPage, ListRequest
from mhv_webhook._edge_admin import WebhookAdminServicer
from mhv_webhook._edge_http import WebhookEdge
from mhv_webhook._edge_listener import HttpsListener, tls_context
from mhv_webhook._edge_middleware import Exchange, error_response, webhook_middleware
from mhv_webhook._headers import HeaderView
from mhv_webhook._ingest import Ingestor, Receipt
from mhv_webhook._jobs import DedupPurger, DeliveryPurger, InboxGauges
from mhv_webhook._saga import SagaWorker
from mhv_webhook._scheme import (
    BodyFormat,
    FreshnessWindow,
    Scheme,
    Verified,
    Verifier,
    decode_payload,
)
from mhv_webhook._schemes import SCHEMES, interpret
from mhv_webhook._secrets import Secret, parse_secrets
from mhv_webhook._sources import Source, build_sources
from mhv_webhook._store_inbox import STATES, AcceptResult, DeliveryRow, Inbox, InboxStats
from mhv_webhook._store_saga import (
    Claimed,
    IssueBusy,
    IssueLink,
    LeaseLost,
    SagaRow,
    Sagas,
    SagaStep,
)
from mhv_webhook._task_events import SCHEMA as TASK_EVENTS_SCHEMA
from mhv_webhook._taskclient import (
    PermanentError,
    TaskClient,
    TaskServiceError,
    TaskSnapshot,
    TaskStatus,
    TransientError,
)

__all__ = [
    "SCHEMES",
    "STATES",
    "TASK_EVENTS_SCHEMA",
    "AcceptResult",
    "BodyFormat",
    "Claimed",
    "DedupPurger",
    "Deliveries",
    "DeliveryPage",
    "DeliveryPurger",
    "DeliveryRow",
    "Exchange",
    "FreshnessWindow",
    "HeaderView",
    "HttpsListener",
    "IgnoredEvent",
    "Inbox",
    "InboxGauges",
    "InboxStats",
    "Ingestor",
    "IssueBusy",
    "IssueLink",
    "Kind",
    "LeaseLost",
    "ListRequest",
    "Missing",
    "PermanentError",
    "QualityGate",
    "Receipt",
    "SagaRow",
    "SagaStep",
    "SagaWorker",
    "Sagas",
    "Scheme",
    "Secret",
    "Source",
    "TaskChange",
    "TaskClient",
    "TaskServiceError",
    "TaskSnapshot",
    "TaskStatus",
    "TransientError",
    "Verified",
    "Verifier",
    "WebhookAdminServicer",
    "WebhookEdge",
    "build_sources",
    "decode_payload",
    "error_response",
    "interpret",
    "parse_secrets",
    "tls_context",
    "webhook_middleware",
]

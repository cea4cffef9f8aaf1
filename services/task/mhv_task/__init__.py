"""The task service: users, tasks, their lifecycle, search, and the audit outbox.

Layers, top to bottom: `_edge` (gRPC, with `_edge_codec` translating protobuf to the typed
requests of `_models` and back), the domain (`_tasks`, `_users`, `_lifecycle`, `_authz`,
`_events`, and the outbox `_relay`, the shared `mhv_common.outbox` relay), and `_store`
(SQL; `_store_embeddings` for the vectors). Semantic search is `_semantic`, with the
embedding providers (`_embedding*`) and the `_embedding_worker`. `_metrics` holds every metric
of the service; `app` wires it all into a running service.
"""

from mhv_common.outbox import PendingEvent
from mhv_task._authz import ActiveUsers, Actor
from mhv_task._edge import TaskServicer, UserServicer
from mhv_task._embedding import (
    Embedder,
    EmbeddingError,
    Embeddings,
    EmbeddingSettings,
    FallbackEmbedder,
    build_embedder,
)
from mhv_task._embedding_worker import EmbeddingMonitor, EmbeddingWorker
from mhv_task._events import EventType, OutboxEvent
from mhv_task._lifecycle import Action, Status, Transition
from mhv_task._metrics import RequestMetrics
from mhv_task._models import (
    UPDATABLE_FIELDS,
    FTSSearchQuery,
    Page,
    QualityCheck,
    QualityGate,
    SearchHit,
    SearchMode,
    SearchPage,
    Task,
    TaskAssignRequest,
    TaskChanges,
    TaskCreateRequest,
    TaskListRequest,
    TaskRef,
    TaskTransitionRequest,
    TaskUpdateRequest,
    UpdateMask,
    User,
    UserCreateRequest,
    UserListRequest,
    UserLookup,
    UserRef,
    validate,
)
from mhv_task._relay import OutboxMonitor, OutboxRelay
from mhv_task._semantic import SemanticSearch
from mhv_task._tasks import Tasks
from mhv_task._users import Users

__all__ = [
    "UPDATABLE_FIELDS",
    "Action",
    "ActiveUsers",
    "Actor",
    "Embedder",
    "EmbeddingError",
    "EmbeddingMonitor",
    "EmbeddingSettings",
    "EmbeddingWorker",
    "Embeddings",
    "EventType",
    "FTSSearchQuery",
    "FallbackEmbedder",
    "OutboxEvent",
    "OutboxMonitor",
    "OutboxRelay",
    "Page",
    "PendingEvent",
    "QualityCheck",
    "QualityGate",
    "RequestMetrics",
    "SearchHit",
    "SearchMode",
    "SearchPage",
    "SemanticSearch",
    "Status",
    "Task",
    "TaskAssignRequest",
    "TaskChanges",
    "TaskCreateRequest",
    "TaskListRequest",
    "TaskRef",
    "TaskServicer",
    "TaskTransitionRequest",
    "TaskUpdateRequest",
    "Tasks",
    "Transition",
    "UpdateMask",
    "User",
    "UserCreateRequest",
    "UserListRequest",
    "UserLookup",
    "UserRef",
    "UserServicer",
    "Users",
    "build_embedder",
    "validate",
]

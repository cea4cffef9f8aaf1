"""The public surface of mhv_task is what its __all__ says, and nothing goes missing."""

from __future__ import annotations

import ast
from pathlib import Path

import mhv_task

EXPECTED = {
    "UPDATABLE_FIELDS",
    "Action",
    "ActiveUsers",
    "Actor",
    "EventType",
    "FTSSearchQuery",
    "OutboxEvent",
    "OutboxMonitor",
    "OutboxRelay",
    "Page",
    "PendingEvent",
    "QualityCheck",
    "QualityGate",
    "RequestMetrics",
    "SearchHit",
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
    "EmbeddingError",
    "EmbeddingMonitor",
    "EmbeddingSettings",
    "EmbeddingWorker",
    "Embeddings",
    "Embedder",
    "FallbackEmbedder",
    "SearchMode",
    "SearchPage",
    "SemanticSearch",
    "build_embedder",
    "validate",
}
PACKAGE = Path(mhv_task.__file__).parent
# Only the edges speak gRPC and protobuf, and only `_metrics` speaks Prometheus.
EDGE_MODULES = {"_edge.py", "_edge_codec.py", "_metrics.py", "app.py"}
FORBIDDEN_IN_DOMAIN = ("grpc", "google.protobuf", "mahavishnu", "prometheus_client")


def test_exports() -> None:
    assert set(mhv_task.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(mhv_task, name) is not None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_domain_imports_neither_grpc_nor_prometheus() -> None:
    domain = [p for p in PACKAGE.glob("_*.py") if p.name not in EDGE_MODULES]
    assert {p.name for p in domain} >= {"_tasks.py", "_users.py", "_lifecycle.py", "_relay.py"}
    for path in domain:
        leaks = {
            name
            for name in _imports(path)
            if any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN_IN_DOMAIN)
        }
        assert not leaks, f"{path.name} imports {sorted(leaks)}"

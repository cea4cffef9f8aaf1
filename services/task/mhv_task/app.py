"""Wiring of the task service: settings, pool, domain, servicers, policies, workers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role, ServiceCredentials
from mhv_common.config import TaskSettings, load_repositories, load_settings
from mhv_common.db import Database
from mhv_common.interceptors import MethodPolicy
from mhv_common.outbox import AuditClient
from mhv_common.server import ServiceDefinition, Worker, run_service
from mhv_common.tls import peer
from mhv_task._authz import ActiveUsers
from mhv_task._edge import TaskServicer, UserServicer
from mhv_task._embedding import EmbeddingSettings
from mhv_task._embedding_worker import EmbeddingMonitor, EmbeddingWorker
from mhv_task._metrics import RequestMetrics
from mhv_task._relay import OutboxMonitor, OutboxRelay
from mhv_task._semantic import SemanticSearch
from mhv_task._tasks import Tasks
from mhv_task._users import Users

TASKS = task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name
USERS = task_pb2.DESCRIPTOR.services_by_name["UserService"].full_name

_READ = frozenset({Role.ADMIN, Role.MEMBER, Role.VIEWER, Role.SERVICE})
_WRITE = frozenset({Role.ADMIN, Role.MEMBER, Role.SERVICE})
_ADMIN = frozenset({Role.ADMIN})

POLICIES: dict[str, MethodPolicy] = {
    f"/{TASKS}/CreateTask": MethodPolicy(_WRITE, rate_class="create"),
    f"/{TASKS}/GetTask": MethodPolicy(_READ),
    f"/{TASKS}/ListTasks": MethodPolicy(_READ),
    f"/{TASKS}/UpdateTask": MethodPolicy(_WRITE),
    f"/{TASKS}/DeleteTask": MethodPolicy(_ADMIN),
    f"/{TASKS}/SearchTasks": MethodPolicy(_READ, rate_class="search", max_deadline=5.0),
    f"/{TASKS}/AssignTask": MethodPolicy(_WRITE),
    f"/{TASKS}/StartTask": MethodPolicy(_WRITE),
    f"/{TASKS}/CompleteTask": MethodPolicy(_WRITE),
    f"/{TASKS}/CancelTask": MethodPolicy(_WRITE),
    f"/{TASKS}/BlockTask": MethodPolicy(_WRITE),
    f"/{TASKS}/UnblockTask": MethodPolicy(_WRITE),
    f"/{USERS}/CreateUser": MethodPolicy(frozenset({Role.ADMIN, Role.SERVICE})),
    f"/{USERS}/GetUser": MethodPolicy(_READ),
    f"/{USERS}/ListUsers": MethodPolicy(_READ),
    f"/{USERS}/DeactivateUser": MethodPolicy(_ADMIN),
    f"/{USERS}/DeleteUser": MethodPolicy(_ADMIN),
}


async def _start(db: Database, semantic: SemanticSearch) -> None:
    await db.open()
    # Before the first call: whether semantic search is available decides unspecified modes.
    await semantic.start()


async def _stop(db: Database, semantic: SemanticSearch) -> None:
    await semantic.close()
    await db.close()


def build(settings: TaskSettings) -> ServiceDefinition:
    """Assemble the task service."""
    db = Database.for_service(settings, dsn=settings.task_database_url, name="task")
    repositories = load_repositories(settings.repos_file)
    active = ActiveUsers(db)
    embedding = load_settings(EmbeddingSettings)
    semantic = SemanticSearch(db, embedding)
    tasks = Tasks(db, repositories, active, semantic)
    users = Users(db, active)
    metrics = RequestMetrics(repositories.names())
    workers: list[Worker] = [
        OutboxMonitor(db),
        EmbeddingMonitor(db, semantic),
        EmbeddingWorker(
            db,
            semantic,
            batch_size=embedding.worker_batch_size,
            lease_seconds=embedding.worker_lease_seconds,
            poll_interval=embedding.worker_poll_seconds,
        ),
    ]
    if settings.relay_enabled:
        # The relay authenticates to the audit service as the "task" service.
        audit = peer(settings, settings.audit_target, settings.audit_tls_name)
        credentials = ServiceCredentials.from_settings(settings, service_name="task")
        workers.append(
            OutboxRelay(
                db,
                connect=partial(AuditClient.connect, audit, credentials),
                batch_size=settings.relay_batch_size,
                poll_interval=settings.relay_poll_interval_seconds,
                rpc_timeout=settings.relay_rpc_timeout_seconds,
                crash_after_send=settings.relay_crash_after_send,
            )
        )

    def register(server: aio.Server) -> Sequence[str]:
        task_pb2_grpc.add_TaskServiceServicer_to_server(
            TaskServicer(tasks, repositories=repositories, metrics=metrics), server
        )
        task_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(users), server)
        return [TASKS, USERS]

    return ServiceDefinition(
        name="task",
        grpc_port=settings.task_grpc_port,
        metrics_port=settings.task_metrics_port,
        register=register,
        policies=POLICIES,
        revocation=active.revocation,
        startup=partial(_start, db, semantic),
        cleanup=partial(_stop, db, semantic),
        workers=workers,
        processes=settings.task_processes,
        databases=[db],
    )


def main() -> None:
    """Run the task service until SIGTERM/SIGINT; exit 1 on a configuration error."""
    run_service("task", TaskSettings, build)

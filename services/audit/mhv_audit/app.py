"""Wiring of the audit service: settings, database pool, servicer, policies, workers."""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_audit._edge import AuditServicer
from mhv_audit._log import AuditLog
from mhv_audit._metrics import SchemaSizeSampler
from mhv_audit._schedule import ScheduledVerification
from mhv_audit._store import AuditStore
from mhv_common.auth import Role, ServiceCredentials
from mhv_common.config import AuditSettings
from mhv_common.db import Database
from mhv_common.interceptors import MethodPolicy
from mhv_common.revocation import Revocation, TaskUserDirectory
from mhv_common.server import ServiceDefinition, Worker, run_service
from mhv_common.tls import peer

SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
_READERS = frozenset({Role.ADMIN, Role.AUDITOR})

POLICIES: dict[str, MethodPolicy] = {
    # The services' outbox relays write (each only about its own subjects, `_edge`), and an
    # administrator's `mhv keys` / `mhv secrets` record credential changes as themselves.
    # Batches wait in the outbox while the audit service is slow, so a generous deadline
    # costs no task RPC anything.
    f"/{SERVICE}/RecordEvents": MethodPolicy(
        frozenset({Role.SERVICE, Role.ADMIN}), max_deadline=30.0
    ),
    f"/{SERVICE}/ListAuditEvents": MethodPolicy(_READERS, max_deadline=10.0),
    # Hashes every row of the range: about ten seconds per million rows.
    f"/{SERVICE}/VerifyAuditChain": MethodPolicy(_READERS, max_deadline=300.0),
}


def build(settings: AuditSettings) -> ServiceDefinition:
    """Assemble the audit service."""
    db = Database.for_service(settings, dsn=settings.audit_database_url, name="audit")
    # People's tokens are checked against the task service's users, as the "audit" service.
    users = TaskUserDirectory(
        peer(settings, settings.task_target, settings.task_tls_name),
        ServiceCredentials.from_settings(settings, service_name="audit"),
    )
    store = AuditStore(db)
    log = AuditLog(store)

    workers: list[Worker] = [SchemaSizeSampler(store)]
    if settings.audit_verify_interval_seconds > 0:
        workers.append(ScheduledVerification(log, interval=settings.audit_verify_interval_seconds))

    async def cleanup() -> None:
        await users.close()
        await db.close()

    def register(server: aio.Server) -> Sequence[str]:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(
            AuditServicer(log, writers=settings.audit_writers), server
        )
        return [SERVICE]

    return ServiceDefinition(
        name="audit",
        grpc_port=settings.audit_grpc_port,
        metrics_port=settings.audit_metrics_port,
        register=register,
        policies=POLICIES,
        revocation=Revocation(users.state),
        startup=db.open,
        cleanup=cleanup,
        workers=workers,
        processes=settings.audit_processes,
        databases=[db],
    )


def main() -> None:
    """Run the audit service until SIGTERM/SIGINT; exit 1 on a configuration error."""
    run_service("audit", AuditSettings, build)

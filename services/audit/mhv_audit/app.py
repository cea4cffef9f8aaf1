"""Wiring of the audit service: settings, database pool, servicer, policies."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_common.auth import Role
from mhv_common.config import AuditSettings, load_settings
from mhv_common.db import Database
from mhv_common.interceptors import MethodPolicy
from mhv_common.server import ServiceDefinition, serve_forever

SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
_READERS = frozenset({Role.ADMIN, Role.AUDITOR})

POLICIES: dict[str, MethodPolicy] = {
    f"/{SERVICE}/RecordEvents": MethodPolicy(frozenset({Role.SERVICE}), max_deadline=30.0),
    f"/{SERVICE}/ListAuditEvents": MethodPolicy(_READERS),
    f"/{SERVICE}/VerifyAuditChain": MethodPolicy(_READERS, max_deadline=120.0),
}


def build(settings: AuditSettings) -> ServiceDefinition:
    """Assemble the audit service."""
    db = Database.for_service(settings, dsn=settings.audit_database_url, name="audit")

    def register(server: aio.Server) -> Sequence[str]:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(
            audit_pb2_grpc.AuditServiceServicer(), server
        )
        return [SERVICE]

    return ServiceDefinition(
        name="audit",
        grpc_port=settings.audit_grpc_port,
        metrics_port=settings.audit_metrics_port,
        register=register,
        policies=POLICIES,
        startup=db.open,
        cleanup=db.close,
    )


def main() -> None:
    """Run the audit service until SIGTERM/SIGINT."""
    settings = load_settings(AuditSettings)
    asyncio.run(serve_forever(build(settings), settings))

"""Wiring of the webhook gateway: settings, database pool, admin servicer, policies."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc import aio

from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.auth import Role
from mhv_common.config import WebhookSettings, load_settings
from mhv_common.db import Database
from mhv_common.interceptors import MethodPolicy
from mhv_common.server import ServiceDefinition, serve_forever

SERVICE = webhook_pb2.DESCRIPTOR.services_by_name["WebhookAdminService"].full_name
_ADMIN = frozenset({Role.ADMIN})

POLICIES: dict[str, MethodPolicy] = {
    f"/{SERVICE}/ListDeliveries": MethodPolicy(_ADMIN),
    f"/{SERVICE}/GetDelivery": MethodPolicy(_ADMIN),
    f"/{SERVICE}/RetryDelivery": MethodPolicy(_ADMIN),
}


def build(settings: WebhookSettings) -> ServiceDefinition:
    """Assemble the webhook gateway's gRPC side."""
    db = Database.for_service(settings, dsn=settings.webhook_database_url, name="webhook")

    def register(server: aio.Server) -> Sequence[str]:
        webhook_pb2_grpc.add_WebhookAdminServiceServicer_to_server(
            webhook_pb2_grpc.WebhookAdminServiceServicer(), server
        )
        return [SERVICE]

    return ServiceDefinition(
        name="webhook",
        grpc_port=settings.webhook_admin_grpc_port,
        metrics_port=settings.webhook_metrics_port,
        register=register,
        policies=POLICIES,
        startup=db.open,
        cleanup=db.close,
    )


def main() -> None:
    """Run the webhook gateway until SIGTERM/SIGINT."""
    settings = load_settings(WebhookSettings)
    asyncio.run(serve_forever(build(settings), settings))

"""Wiring of the webhook gateway: settings, sources, stores, HTTPS edge, admin servicer, jobs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from grpc import aio

from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.admission import Admission
from mhv_common.auth import Role, ServiceCredentials
from mhv_common.config import (
    WebhookSettings,
    load_repositories,
    load_webhook_sources,
)
from mhv_common.db import Database
from mhv_common.interceptors import MethodPolicy
from mhv_common.outbox import AuditClient, OutboxRelay
from mhv_common.ratelimit import RateLimiter
from mhv_common.revocation import Revocation, TaskUserDirectory
from mhv_common.server import ServiceDefinition, Worker, run_service
from mhv_common.tls import peer
from mhv_webhook import _metrics as metrics
from mhv_webhook._deliveries import Deliveries
from mhv_webhook._edge_admin import WebhookAdminServicer
from mhv_webhook._edge_http import WebhookEdge
from mhv_webhook._edge_listener import HttpsListener, tls_context
from mhv_webhook._ingest import Ingestor
from mhv_webhook._jobs import DedupPurger, DeliveryPurger, InboxGauges
from mhv_webhook._saga import SagaWorker
from mhv_webhook._scheme import Clock
from mhv_webhook._sources import Source, build_sources
from mhv_webhook._store_inbox import Inbox
from mhv_webhook._store_saga import Sagas
from mhv_webhook._taskclient import TaskClient

logger = logging.getLogger(__name__)

SERVICE = webhook_pb2.DESCRIPTOR.services_by_name["WebhookAdminService"].full_name
_ADMIN = frozenset({Role.ADMIN})

# Deliveries and their bodies are operators' business only.
POLICIES: dict[str, MethodPolicy] = {
    f"/{SERVICE}/ListDeliveries": MethodPolicy(_ADMIN),
    f"/{SERVICE}/GetDelivery": MethodPolicy(_ADMIN),
    f"/{SERVICE}/RetryDelivery": MethodPolicy(_ADMIN),
}


@dataclass
class Gateway:
    """The assembled gateway: the gRPC side for the runtime and the HTTPS side beside it."""

    definition: ServiceDefinition
    listener: HttpsListener
    edge: WebhookEdge
    inbox: Inbox
    db: Database
    sources: Mapping[str, Source]


def build(
    settings: WebhookSettings,
    *,
    environ: Mapping[str, str] | None = None,
    clock: Clock = time.time,
) -> Gateway:
    """Assemble the gateway. Configuration is checked here, before anything starts.

    Raises:
        ConfigurationError: A declared source lacks a usable secret or verifier, or the TLS
            certificate cannot be loaded (fail closed).

    """
    sources = build_sources(
        load_webhook_sources(settings.webhooks_file),
        settings,
        os.environ if environ is None else environ,
        now=clock(),
    )
    metrics.initialise({name: s.verifier.key_labels() for name, s in sources.items()})
    tls = tls_context(settings.webhook_tls_cert_file, settings.webhook_tls_key_file)
    # The gateway never changes session state, so connections skip asyncpg's reset query on
    # release: one round trip per acknowledgement instead of two.
    db = Database.for_service(settings, dsn=settings.webhook_database_url, name="webhook")
    inbox = Inbox(db)
    repositories = load_repositories(settings.repos_file)
    door = Admission(service="webhook", listener="https", max_in_flight=settings.max_in_flight)
    edge = WebhookEdge(
        sources,
        Ingestor(inbox, repositories=repositories, clock=clock),
        addresses=RateLimiter(
            settings.effective_rate_limits(),
            storage_uri=settings.rate_limit_storage_uri,
            service="webhook-addresses",
            fail_closed=settings.rate_limit_fail_closed,
        ),
        admission=door,
        ack_deadline_seconds=settings.default_deadline_seconds,
        body_timeout_seconds=settings.webhook_body_timeout_seconds,
    )
    listener = HttpsListener(
        edge.app,
        host=settings.bind_host,
        port=settings.webhook_https_port,
        tls=tls,
        reuse_port=settings.reuse_port,
        max_concurrency=settings.webhook_max_concurrency,
        head_timeout_seconds=settings.webhook_head_timeout_seconds,
        handshake_timeout_seconds=settings.webhook_tls_handshake_timeout_seconds,
        max_connections_per_address=settings.webhook_max_connections_per_address,
        admission=door,
        drain_seconds=settings.shutdown_grace_seconds,
    )

    relay: list[Worker] = []
    if settings.relay_enabled:
        # The gateway's admin actions reach the audit log through its own outbox, relayed as
        # the "webhook" service, which the audit service lets record delivery events only.
        relay.append(
            OutboxRelay(
                db,
                connect=partial(
                    AuditClient.connect,
                    peer(settings, settings.audit_target, settings.audit_tls_name),
                    ServiceCredentials.from_settings(settings, service_name="webhook"),
                ),
                batch_size=settings.relay_batch_size,
                # Operators' retries are rare: looking once a second keeps the gateway's pool
                # for the deliveries it must acknowledge, and audits a retry within a second.
                poll_interval=max(settings.relay_poll_interval_seconds, 1.0),
                rpc_timeout=settings.relay_rpc_timeout_seconds,
                on_delivered=metrics.OUTBOX_DELIVERED.inc,
                on_failed=metrics.OUTBOX_FAILURES.inc,
            )
        )

    def register(server: aio.Server) -> Sequence[str]:
        webhook_pb2_grpc.add_WebhookAdminServiceServicer_to_server(
            WebhookAdminServicer(Deliveries(inbox)), server
        )
        return [SERVICE]

    sagas = Sagas(db)
    # Saga workers call the task service as the "webhook" service principal; the admin edge
    # asks it whether a person's user is still active (mhv_common.revocation).
    task = peer(settings, settings.task_target, settings.task_tls_name)
    credentials = ServiceCredentials.from_settings(settings, service_name="webhook")
    users = TaskUserDirectory(task, credentials)
    client: TaskClient | None = None
    saga_workers: list[SagaWorker] = []
    if settings.webhook_workers > 0:
        client = TaskClient(task, credentials)
        schemes = {name: source.scheme for name, source in sources.items()}
        saga_workers = [
            SagaWorker(
                sagas,
                client,
                repositories,
                schemes,
                index=i,
                lease_seconds=settings.webhook_saga_lease_seconds,
                max_attempts=settings.webhook_saga_max_attempts,
                dead_letter_after_seconds=settings.webhook_saga_dead_letter_after_seconds,
                retry_base_seconds=settings.webhook_saga_retry_base_seconds,
                poll_seconds=settings.webhook_saga_poll_seconds,
                crash_after=settings.webhook_saga_crash_after,
            )
            for i in range(settings.webhook_workers)
        ]

    async def startup() -> None:
        await db.open()
        if client is not None:
            await client.open()
        # Bound before health turns SERVING: a port we cannot have stops the start.
        listener.bind()

    async def cleanup() -> None:
        if client is not None:
            await client.close()
        await users.close()
        await db.close()

    return Gateway(
        definition=ServiceDefinition(
            name="webhook",
            grpc_port=settings.webhook_admin_grpc_port,
            metrics_port=settings.webhook_metrics_port,
            register=register,
            policies=POLICIES,
            revocation=Revocation(users.state),
            startup=startup,
            cleanup=cleanup,
            workers=[
                *saga_workers,
                *relay,
                DedupPurger(
                    inbox,
                    retention_seconds=settings.webhook_dedup_retention_seconds,
                    interval=settings.webhook_dedup_purge_interval_seconds,
                ),
                DeliveryPurger(
                    sagas,
                    retention_seconds=settings.webhook_delivery_retention_seconds,
                    interval=settings.webhook_dedup_purge_interval_seconds,
                ),
                InboxGauges(inbox, interval=settings.webhook_gauge_interval_seconds),
            ],
            processes=settings.webhook_processes,
            databases=[db],
        ),
        listener=listener,
        edge=edge,
        inbox=inbox,
        db=db,
        sources=sources,
    )


def main() -> None:
    """Run the webhook gateway until SIGTERM/SIGINT; exit 1 on a configuration error."""

    def definition(settings: WebhookSettings) -> ServiceDefinition:
        gateway = build(settings)
        return replace(gateway.definition, listeners=[gateway.listener.serve])

    run_service("webhook", WebhookSettings, definition)

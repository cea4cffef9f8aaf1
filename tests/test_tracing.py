"""One trace links a webhook delivery, the task change it causes, and the audit record of it.

The three services run in this process (over real sockets, on their own throw-away database)
so that an in-memory span exporter sees every span. A GitHub delivery arrives over HTTPS with a
W3C ``traceparent``; the gateway's saga calls the task service; the task change's outbox event
carries the trace to the audit service. Every hop must land in the sender's trace.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mhv_audit.app import build as build_audit
from mhv_cli.pgcluster import free_port
from mhv_common import tracing
from mhv_common.config import AuditSettings, TaskSettings, WebhookSettings
from mhv_common.server import RunningService
from mhv_task.app import build as build_task
from mhv_webhook.app import build as build_gateway
from tests.harness import KEY_ID, Cluster, Deployment, Keys, webhook_env
from tests.webhook.signing import github_headers

pytestmark = pytest.mark.slow


async def test_webhook_task_and_audit_share_one_trace(
    cluster: Cluster, keys: Keys, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    tracing.configure("mahavishnu-tests").add_span_processor(SimpleSpanProcessor(exporter))
    deployment = await Deployment.create(cluster)
    hooks = webhook_env(tmp_path / "state")
    ports = {name: free_port() for name in ("task", "audit", "webhook", "https")}
    common = {
        "auth_jwks_file": keys.jwks,
        "auth_signing_key_file": keys.signing_key,
        "auth_signing_key_id": KEY_ID,
        "rate_limits": {"general": "100000/minute", "create": "100000/minute"},
        "shutdown_grace_seconds": 2,
    }
    audit_settings = AuditSettings(
        audit_database_url=deployment.role_url("audit"),
        task_target=f"127.0.0.1:{ports['task']}",
        audit_grpc_port=ports["audit"],
        audit_metrics_port=free_port(),
        **common,
    )
    task_settings = TaskSettings(
        task_database_url=deployment.role_url("task"),
        task_grpc_port=ports["task"],
        task_metrics_port=free_port(),
        audit_target=f"127.0.0.1:{ports['audit']}",
        relay_poll_interval_seconds=0.02,
        **common,
    )
    gateway_settings = WebhookSettings(
        webhook_database_url=deployment.role_url("webhook"),
        webhook_admin_grpc_port=ports["webhook"],
        webhook_metrics_port=free_port(),
        webhook_https_port=ports["https"],
        task_target=f"127.0.0.1:{ports['task']}",
        webhook_tls_cert_file=Path(hooks["MHV_WEBHOOK_TLS_CERT_FILE"]),
        webhook_tls_key_file=Path(hooks["MHV_WEBHOOK_TLS_KEY_FILE"]),
        webhook_workers=1,
        webhook_saga_poll_seconds=0.02,
        **common,
    )
    audit = RunningService(build_audit(audit_settings), audit_settings)
    task = RunningService(build_task(task_settings), task_settings)
    gateway = build_gateway(gateway_settings, environ=hooks)
    webhook = RunningService(gateway.definition, gateway_settings)
    stop = asyncio.Event()
    listener = None
    try:
        for service in (audit, task, webhook):
            await service.start()
        listener = asyncio.create_task(gateway.listener.serve(stop))

        trace_id = uuid.uuid4().hex
        number = int(time.time() * 1000) % 10**9
        body = json.dumps(
            {
                "action": "opened",
                "issue": {
                    "number": number,
                    "title": "Traced issue",
                    "body": "from a webhook",
                    "user": {"login": "octocat"},
                },
                "repository": {"full_name": "example/demo"},
                "sender": {"login": "octocat"},
            }
        ).encode()
        headers = github_headers(
            hooks["MHV_WEBHOOK_SECRETS_GITHUB"], body, delivery=str(uuid.uuid4())
        )
        headers["traceparent"] = f"00-{trace_id}-{'1' * 16}-01"
        trust = ssl.create_default_context(cafile=hooks["MHV_WEBHOOK_TLS_CERT_FILE"])
        async with httpx.AsyncClient(verify=trust) as client:
            reply = await client.post(
                f"https://127.0.0.1:{ports['https']}/webhooks/github",
                content=body,
                headers=headers,
            )
        assert reply.status_code == 202, reply.text

        # Wait for the audit row of the task the saga created.
        conn = await asyncpg.connect(deployment.admin_url)
        try:
            deadline = time.monotonic() + 30
            while True:
                row = await conn.fetchrow(
                    "SELECT a.trace_id, a.task_id FROM audit.task_audit_log a"
                    " JOIN task.tasks t ON t.id = a.task_id WHERE t.title = 'Traced issue'"
                    " AND a.event_type = 'task_created'"
                )
                if row is not None:
                    break
                assert time.monotonic() < deadline, "no audit row"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        assert row["trace_id"] == trace_id

        await asyncio.sleep(0.2)
        spans = [
            s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
        ]
        kinds = {(s.name, s.kind.name) for s in spans}
        # The gateway's HTTP span and saga, both sides of the gRPC hop to the task service,
        # and the audit record: all in the sender's trace.
        assert {
            ("POST /webhooks/{source}", "SERVER"),
            ("webhook.saga", "INTERNAL"),
            ("/mahavishnu.task.v1.TaskService/CreateTask", "CLIENT"),
            ("/mahavishnu.task.v1.TaskService/CreateTask", "SERVER"),
            ("audit.record_event", "INTERNAL"),
        } <= kinds, sorted(kinds)
        by_id = {s.context.span_id: s for s in spans}
        # Each hop is the child of the one before it.
        records = [s for s in spans if s.name == "audit.record_event"]
        # The sender's registration as a user is audited in the same trace as its task.
        assert {r.attributes["audit.subject_kind"] for r in records} == {"user", "task"}
        (record,) = [r for r in records if r.attributes["task.id"] == row["task_id"]]
        server = by_id[record.parent.span_id]
        assert (server.name, server.kind.name) == (
            "/mahavishnu.task.v1.TaskService/CreateTask",
            "SERVER",
        )
        client = by_id[server.parent.span_id]
        saga = by_id[client.parent.span_id]
        assert saga.name == "webhook.saga"
        assert by_id[saga.parent.span_id].name == "POST /webhooks/{source}"
    finally:
        stop.set()
        if listener is not None:
            await listener
        for service in (webhook, task, audit):
            await service.stop()
        await deployment.drop()

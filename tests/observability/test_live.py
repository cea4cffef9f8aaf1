"""A real Prometheus scrapes the three running services; every dashboard panel has data.

The session's task, audit and webhook processes serve real traffic driven here (tasks created,
moved, searched and refused; a webhook accepted and one refused; audit reads), while a real
Prometheus scrapes their /metrics every second and evaluates the generated rules. Every panel
query of the three dashboards must parse and return data, every rule must evaluate cleanly, and
no target-down alert may fire.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from mhv_tools.gen_dashboards import load_dashboards, panel_queries
from mhv_tools.gen_rules import JOBS
from tests.conftest import Services
from tests.harness import Deployment, Keys, bearer, grpc_channel
from tests.observability.prometheus import RULE_FILES, Prometheus, scrape_config
from tests.observability.test_dashboards import recorded_names
from tests.webhook.signing import github_headers

pytestmark = pytest.mark.slow


async def _traffic(services: Services, deployment: Deployment, keys: Keys) -> None:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        name = f"live-{uuid.uuid4().hex[:8]}"
        user = str(
            await conn.fetchval(
                "INSERT INTO task.users (username, email) VALUES ($1, $2) RETURNING id",
                name,
                f"{name}@example.test",
            )
        )
    finally:
        await conn.close()
    member = bearer(keys.token(Role.MEMBER, subject=user))
    async with grpc_channel(services.task.target, services.ca_file) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        for i in range(6):
            task = await tasks.CreateTask(
                task_pb2.CreateTaskRequest(title=f"live {i}", repository="demo"), metadata=member
            )
            await tasks.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=member)
            if i % 2:
                await tasks.CompleteTask(task_pb2.CompleteTaskRequest(id=task.id), metadata=member)
        await tasks.SearchTasks(task_pb2.SearchTasksRequest(query="live"), metadata=member)
        for bad in (
            tasks.CreateTask(
                task_pb2.CreateTaskRequest(title="", repository="demo"), metadata=member
            ),
            tasks.GetTask(task_pb2.GetTaskRequest(id=10**15), metadata=member),
            tasks.SearchTasks(task_pb2.SearchTasksRequest(query="a;b"), metadata=member),
        ):
            with pytest.raises(aio.AioRpcError):
                await bad
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        auditor = bearer(keys.token(Role.AUDITOR))
        await audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=5), metadata=auditor)
        await audit.VerifyAuditChain(audit_pb2.VerifyAuditChainRequest(), metadata=auditor)
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    secret = services.env["MHV_WEBHOOK_SECRETS_GITHUB"].split(",")[0].split(";")[0]
    url = f"https://127.0.0.1:{services.ports['webhook_https']}/webhooks/github"
    trust = ssl.create_default_context(cafile=services.env["MHV_WEBHOOK_TLS_CERT_FILE"])
    async with httpx.AsyncClient(verify=trust) as client:
        ok = await client.post(
            url,
            content=body,
            headers=github_headers(secret, body, delivery=str(uuid.uuid4()), event="ping"),
        )
        assert ok.status_code == 202, ok.text
        refused = await client.post(
            url,
            content=body,
            headers={
                "X-Hub-Signature-256": "sha256=" + "0" * 64,
                "X-GitHub-Event": "ping",
                "X-GitHub-Delivery": str(uuid.uuid4()),
            },
        )
        assert refused.status_code == 401


async def test_every_panel_has_data_from_the_running_services(
    services: Services, deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    targets = {
        JOBS["task"]: [f"127.0.0.1:{services.task.metrics_port}"],
        JOBS["audit"]: [f"127.0.0.1:{services.audit.metrics_port}"],
        JOBS["webhook"]: [f"127.0.0.1:{services.webhook.metrics_port}"],
    }
    with Prometheus(scrape_config(targets), RULE_FILES, tmp_path / "prometheus") as prometheus:
        prometheus.wait_for_targets(set(targets))
        # Traffic after the first scrape, so that rates see it as an increase.
        await asyncio.sleep(1.5)
        await _traffic(services, deployment, keys)
        recorded = recorded_names()
        await asyncio.to_thread(
            prometheus.wait_until,
            'count by (__name__) ({__name__=~"slo:.+|slo_.+|task_availability"})',
            lambda result: {r["metric"]["__name__"] for r in result} >= recorded,
        )
        broken = [
            f"{rule['name']}: {rule.get('lastError')}"
            for group in prometheus.rule_groups()
            for rule in group["rules"]
            if rule["health"] != "ok"
        ]
        assert not broken, broken
        queries = [q for board in load_dashboards().values() for q in panel_queries(board)]
        empty = await asyncio.to_thread(prometheus.panels_without_data, queries)
        assert not empty, "panels without data:\n" + "\n".join(empty)
        # The traffic is visible as what it was.
        created = prometheus.query('sum(task_creation_total{status="success"})')
        assert float(created[0]["value"][1]) >= 6
        assert prometheus.query('webhook_requests_total{source="github",code="401"} > 0')
        assert not prometheus.query('ALERTS{alertname=~"Target.*"}')

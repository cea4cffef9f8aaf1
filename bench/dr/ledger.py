"""Steady load with a client ledger: every write the system acknowledged, and when.

CreateTask clients (gRPC over TLS, each call with a fresh request id) and webhook senders
(GitHub-signed ``issues`` deliveries over HTTPS) run until told to stop. A write counts as
acknowledged only when its answer arrived: a task with its id, a delivery with 202. Every
failure is counted by status, never retried: a disaster must not be hidden by retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import grpc
import httpx

from bench.dr.site import Site
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from tests.harness import bearer


@dataclass
class Ledger:
    """Acknowledged writes, with the wall-clock time of each acknowledgement."""

    tasks: dict[int, tuple[str, float]] = field(default_factory=dict)
    deliveries: dict[str, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def acknowledged(self) -> int:
        """All acknowledged writes."""
        return len(self.tasks) + len(self.deliveries)

    async def missing(self, url: str) -> tuple[dict[int, float], dict[str, float]]:
        """Acknowledged tasks and deliveries the database at `url` does not hold."""
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT id, title FROM task.tasks WHERE id = ANY($1::bigint[])", list(self.tasks)
            )
            found = {r["id"]: r["title"] for r in rows}
            lost_tasks = {
                task_id: at
                for task_id, (title, at) in self.tasks.items()
                if found.get(task_id) != title
            }
            rows = await conn.fetch(
                "SELECT delivery_id FROM webhook.deliveries WHERE source = 'github'"
                " AND delivery_id = ANY($1::text[])",
                list(self.deliveries),
            )
            present = {r["delivery_id"] for r in rows}
            lost_deliveries = {d: at for d, at in self.deliveries.items() if d not in present}
            return lost_tasks, lost_deliveries
        finally:
            await conn.close()


async def _create_tasks(site: Site, ledger: Ledger, stop: asyncio.Event, client: int) -> None:
    token = site.token()
    async with site.task_channel() as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            title = f"Drill client {client} task {n} {uuid.uuid4().hex[:8]}"
            try:
                reply = await stub.CreateTask(
                    task_pb2.CreateTaskRequest(
                        title=title, repository="demo", request_id=str(uuid.uuid4())
                    ),
                    metadata=bearer(token),
                    timeout=5,
                )
            except grpc.RpcError as exc:
                ledger.errors[f"create_task {exc.code().name}"] += 1
                await asyncio.sleep(0.05)
                continue
            ledger.tasks[reply.id] = (title, time.time())


async def _send_webhooks(site: Site, ledger: Ledger, stop: asyncio.Event, sender: int) -> None:
    url = f"https://127.0.0.1:{site.ports['webhook_https']}/webhooks/github"
    cert = site.root / "webhook" / "tls" / "cert.pem"
    async with httpx.AsyncClient(verify=str(cert), timeout=5) as http:
        n = 0
        while not stop.is_set():
            n += 1
            delivery = str(uuid.uuid4())
            body = json.dumps(
                {
                    "action": "opened",
                    "issue": {"number": sender * 1_000_000 + n, "title": f"Drill issue {n}"},
                    "repository": {"full_name": "example/demo"},
                    "sender": {"login": "drill"},
                    # GitHub's signature covers the body only, so the gateway also
                    # deduplicates on it: every delivery of the drill is a new body.
                    "nonce": uuid.uuid4().hex,
                }
            ).encode()
            digest = hmac.new(site.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers = {
                "X-Hub-Signature-256": f"sha256={digest}",
                "X-GitHub-Delivery": delivery,
                "X-GitHub-Event": "issues",
                "Content-Type": "application/json",
            }
            try:
                response = await http.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                ledger.errors[f"webhook {type(exc).__name__}"] += 1
                await asyncio.sleep(0.05)
                continue
            if response.status_code == 202:
                ledger.deliveries[delivery] = time.time()
            else:
                ledger.errors[f"webhook {response.status_code}"] += 1
                await asyncio.sleep(0.05)


def start_load(
    site: Site, ledger: Ledger, stop: asyncio.Event, *, clients: int, senders: int
) -> list[asyncio.Task[None]]:
    """Start `clients` CreateTask loops and `senders` webhook loops."""
    tasks = [
        asyncio.create_task(_create_tasks(site, ledger, stop, i), name=f"create-{i}")
        for i in range(clients)
    ]
    tasks += [
        asyncio.create_task(_send_webhooks(site, ledger, stop, i), name=f"webhook-{i}")
        for i in range(senders)
    ]
    return tasks

"""The failover drill: steady load on the cluster, one host taken away and brought back, a ledger.

Clients keep what the system acknowledged in a ledger, and the drill then checks the database
and the audit service against it:

- every acknowledged CreateTask exists exactly once (clients retry a failed call with the same
  request id, which the task service answers with the first result);
- every committed task change (an outbox event) is in the audit log exactly once, and the hash
  chain verifies;
- every webhook delivery answered 2xx was processed exactly once: one inbox row, completed, and
  one task made from it;
- a principal's rate limit holds across replicas (one budget in Redis, not one per replica).

`tests/cluster/test_failover.py` runs it briefly and asserts the ledger;
`bench/cluster_failover.py` runs it longer and prints the figures.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
import grpc
import httpx
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.client import service_channel
from tests.cluster.network import Host
from tests.cluster.system import System
from tests.harness import bearer
from tests.webhook.signing import github_headers

Mode = Literal["kill", "cut"]

# What a client retries, with the same request id or delivery: the call may not have happened,
# or happened without the answer reaching the client.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
CALL_TIMEOUT = 5.0
# How long a client keeps retrying one request before it counts it as not acknowledged.
RETRY_BUDGET = 30.0


@dataclass(frozen=True)
class Call:
    """One attempt by a client."""

    kind: str  # "CreateTask" or "webhook"
    started: float
    ended: float
    outcome: str  # "OK", a gRPC status name, "HTTP 503", "connection error"


@dataclass
class Ledger:
    """What clients sent and what the system acknowledged."""

    calls: list[Call] = field(default_factory=list)
    # title -> task id, for every CreateTask the service acknowledged
    creates: dict[str, int] = field(default_factory=dict)
    # delivery ids the gateway answered 2xx
    deliveries: set[str] = field(default_factory=set)
    # requests given up on after RETRY_BUDGET, and answers no retry could change
    unacknowledged: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


class Load:
    """CreateTask from several clients and webhook deliveries, until `stop` is set.

    Args:
        system: The cluster.
        ledger: Where the clients record what happened.
        clients: CreateTask clients, each with its own round-robin channel.
        senders: Webhook senders, each alternating between the gateways.
        pause: Seconds each client waits between two requests.
    """

    def __init__(
        self, system: System, ledger: Ledger, *, clients: int, senders: int, pause: float
    ) -> None:
        self._system = system
        self._ledger = ledger
        self._clients = clients
        self._senders = senders
        self._pause = pause
        self._issue = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Generate load until `stop`; requests already started are seen through."""
        await asyncio.gather(
            *(self._create_tasks(stop) for _ in range(self._clients)),
            *(self._send_deliveries(stop, first=i) for i in range(self._senders)),
        )

    def _record(self, kind: str, started: float, outcome: str) -> None:
        self._ledger.calls.append(Call(kind, started, time.monotonic(), outcome))

    async def _create_tasks(self, stop: asyncio.Event) -> None:
        metadata = bearer(self._system.token("admin"))
        async with service_channel(self._system.peer("task")) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            while not stop.is_set():
                request_id = str(uuid.uuid4())
                request = task_pb2.CreateTaskRequest(
                    title=f"cluster create {request_id}", repository="demo", request_id=request_id
                )
                await self._create(stub, request, metadata)
                await asyncio.sleep(self._pause)

    async def _create(
        self,
        stub: task_pb2_grpc.TaskServiceStub,
        request: task_pb2.CreateTaskRequest,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        give_up = time.monotonic() + RETRY_BUDGET
        while True:
            started = time.monotonic()
            try:
                task = await stub.CreateTask(request, metadata=metadata, timeout=CALL_TIMEOUT)
            except aio.AioRpcError as exc:
                self._record("CreateTask", started, exc.code().name)
                if exc.code() not in RETRYABLE:
                    self._ledger.rejected.append(f"{request.title}: {exc.code().name}")
                    return
                if time.monotonic() > give_up:
                    self._ledger.unacknowledged.append(request.title)
                    return
                await asyncio.sleep(0.1)
                continue
            self._record("CreateTask", started, "OK")
            self._ledger.creates[request.title] = task.id
            return

    async def _send_deliveries(self, stop: asyncio.Event, *, first: int) -> None:
        secret = self._system.hooks["MHV_WEBHOOK_SECRETS_GITHUB"]
        context = ssl.create_default_context(cafile=self._system.hooks["MHV_WEBHOOK_TLS_CERT_FILE"])
        urls = self._system.https_urls()
        turn = first
        async with httpx.AsyncClient(verify=context, timeout=CALL_TIMEOUT) as client:
            while not stop.is_set():
                self._issue += 1
                delivery = str(uuid.uuid4())
                body = json.dumps(
                    {
                        "action": "opened",
                        "issue": {"number": self._issue, "title": f"cluster hook {delivery}"},
                        "repository": {"full_name": "example/demo"},
                        "sender": {"login": "cluster-sender"},
                    }
                ).encode()
                headers = github_headers(secret, body, delivery=delivery)
                give_up = time.monotonic() + RETRY_BUDGET
                while True:
                    # Client-side balancing: each attempt goes to the next gateway in turn.
                    url = urls[turn % len(urls)]
                    turn += 1
                    started = time.monotonic()
                    try:
                        response = await client.post(
                            url,
                            content=body,
                            headers=headers,
                            # The gateway's certificate names localhost, not the host address.
                            extensions={"sni_hostname": "localhost"},
                        )
                    except httpx.HTTPError:
                        outcome, status = "connection error", 0
                    else:
                        status = response.status_code
                        outcome = "OK" if status in (200, 202) else f"HTTP {status}"
                    self._record("webhook", started, outcome)
                    if status in (200, 202):
                        self._ledger.deliveries.add(delivery)
                        break
                    if status not in (0, 429) and status < 500:
                        self._ledger.rejected.append(f"delivery {delivery}: {outcome}")
                        break
                    if time.monotonic() > give_up:
                        self._ledger.unacknowledged.append(f"delivery {delivery}")
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(self._pause)


@dataclass(frozen=True)
class RateProbe:
    """A member's CreateTask calls over both task replicas, against one shared budget."""

    attempts: int
    allowed: int
    refusals_per_replica: list[float]


async def probe_rate_limit(system: System, *, attempts: int = 12) -> RateProbe:
    """Send `attempts` CreateTask calls of one member, in turn to each task replica."""
    replicas = system.replicas_of("task")
    refusals = "rate_limit_rejections_total"
    before = [await r.metric(refusals, method_class="create") for r in replicas]
    metadata = bearer(system.token("member"))
    allowed = 0
    async with service_channel(system.peer("task")) as channel:
        # Connected to both replicas first, so that the calls alternate between them.
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
        await asyncio.sleep(1.0)
        stub = task_pb2_grpc.TaskServiceStub(channel)
        for _ in range(attempts):
            request_id = str(uuid.uuid4())
            try:
                await stub.CreateTask(
                    task_pb2.CreateTaskRequest(
                        title=f"cluster probe {request_id}",
                        repository="demo",
                        request_id=request_id,
                    ),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT,
                )
                allowed += 1
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
    after = [await r.metric(refusals, method_class="create") for r in replicas]
    return RateProbe(attempts, allowed, [a - b for a, b in zip(after, before, strict=True)])


@dataclass(frozen=True)
class Count:
    """One ledger line: how many were acknowledged, lost and duplicated."""

    acknowledged: int
    lost: int
    duplicated: int


@dataclass(frozen=True)
class Verdict:
    """The system's state checked against the ledger."""

    creates: Count
    deliveries: Count
    audit: Count
    chain_ok: bool
    chain_rows: int
    drained: bool


async def _webhook_deliveries(system: System) -> list[webhook_pb2.Delivery]:
    rows: list[webhook_pb2.Delivery] = []
    metadata = bearer(system.token("admin"))
    async with service_channel(system.peer("webhook")) as channel:
        stub = webhook_pb2_grpc.WebhookAdminServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListDeliveries(
                webhook_pb2.ListDeliveriesRequest(source="github", page_size=100, page_token=token),
                metadata=metadata,
                timeout=10,
                wait_for_ready=True,
            )
            rows.extend(page.deliveries)
            token = page.next_page_token
            if not token:
                return rows


async def wait_drained(system: System, ledger: Ledger, *, timeout: float = 90.0) -> bool:
    """Wait until every acknowledged delivery was processed and the outbox is empty."""
    deadline = time.monotonic() + timeout
    done = (webhook_pb2.DELIVERY_STATE_COMPLETED,)
    while time.monotonic() < deadline:
        finished = {d.delivery_id for d in await _webhook_deliveries(system) if d.state in done}
        conn = await asyncpg.connect(system.admin_url)
        try:
            pending = await conn.fetchval(
                "SELECT count(*) FROM task.outbox WHERE delivered_at IS NULL"
            )
        finally:
            await conn.close()
        if ledger.deliveries <= finished and pending == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def verify(system: System, ledger: Ledger) -> Verdict:
    """Check the database and the audit service against the ledger."""
    drained = await wait_drained(system, ledger)
    conn = await asyncpg.connect(system.admin_url)
    try:
        titles = collections.Counter(
            {
                r["title"]: r["n"]
                for r in await conn.fetch(
                    "SELECT title, count(*) AS n FROM task.tasks"
                    " WHERE title LIKE 'cluster %' GROUP BY title"
                )
            }
        )
        ids = {
            r["title"]: r["id"]
            for r in await conn.fetch(
                "SELECT title, id FROM task.tasks WHERE title LIKE 'cluster %'"
            )
        }
        outbox = [r["event_id"] for r in await conn.fetch("SELECT event_id FROM task.outbox")]
        audited = [
            r["event_id"] for r in await conn.fetch("SELECT event_id FROM audit.task_audit_log")
        ]
    finally:
        await conn.close()

    # A create is lost when its acknowledged task is not there under the id the client got.
    creates = Count(
        len(ledger.creates),
        sum(1 for title, task_id in ledger.creates.items() if ids.get(title) != task_id),
        sum(1 for title in ledger.creates if titles[title] > 1),
    )
    inbox = await _webhook_deliveries(system)
    rows = collections.Counter(d.delivery_id for d in inbox)
    state = {d.delivery_id: d.state for d in inbox}
    deliveries = Count(
        len(ledger.deliveries),
        sum(
            1
            for d in ledger.deliveries
            if state.get(d) != webhook_pb2.DELIVERY_STATE_COMPLETED
            or titles[f"cluster hook {d}"] == 0
        ),
        sum(1 for d in ledger.deliveries if rows[d] > 1 or titles[f"cluster hook {d}"] > 1),
    )
    in_audit = collections.Counter(audited)
    audit = Count(
        len(outbox),
        len(set(outbox) - set(in_audit)),
        sum(n - 1 for n in in_audit.values() if n > 1) + len(set(in_audit) - set(outbox)),
    )
    async with service_channel(system.peer("audit")) as channel:
        chain = await audit_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(),
            metadata=bearer(system.token("auditor")),
            timeout=60,
            wait_for_ready=True,
        )
    return Verdict(creates, deliveries, audit, chain.ok, chain.rows_checked, drained)


@dataclass(frozen=True)
class Report:
    """What a drill measured and found."""

    mode: Mode
    duration: float
    outage: float  # host away: from the kill/cut to the restart/restore
    calls_during_outage: int  # attempts started from the kill/cut until the host served again
    errors: dict[str, int]  # failed attempts by "kind outcome", whole run
    errors_during_outage: dict[str, int]
    # by kind of call: from the kill/cut to the end of the last failed attempt after it
    disruption: dict[str, float]
    recovery: float  # from the restart/restore until every replica on the host took traffic
    restart_floor: float  # restart to SERVING of the host's processes (0 when cut)
    calls: int
    rate: RateProbe
    verdict: Verdict
    unacknowledged: list[str]
    rejected: list[str]


# What shows that a replica serves again: a call of each kind it handles.
TRAFFIC = {
    "task": ("grpc_server_handled_total", {"grpc_method": "CreateTask", "grpc_code": "OK"}),
    "audit": ("grpc_server_handled_total", {"grpc_method": "RecordEvents", "grpc_code": "OK"}),
    "webhook": ("webhook_requests_total", {"code": "202"}),
}


async def _traffic(system: System, host: Host) -> dict[str, float]:
    seen = {}
    for replica in system.on(host):
        name, labels = TRAFFIC[replica.service]
        try:
            seen[replica.service] = await replica.metric(name, **labels)
        except httpx.HTTPError:
            seen[replica.service] = 0.0
    return seen


async def wait_for_traffic(
    system: System, host: Host, before: dict[str, float], *, timeout: float = 60.0
) -> bool:
    """Wait until every replica on `host` has handled calls since `before` was read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = await _traffic(system, host)
        if all(now[s] > before.get(s, 0.0) for s in now):
            return True
        await asyncio.sleep(0.1)
    return False


async def run_drill(
    system: System,
    *,
    mode: Mode = "kill",
    warmup: float = 3.0,
    outage: float = 3.0,
    settle: float = 3.0,
    clients: int = 3,
    senders: int = 1,
    pause: float = 0.05,
) -> Report:
    """Load the cluster, take the first host away for `outage` seconds, bring it back, check."""
    ledger = Ledger()
    stop = asyncio.Event()
    load = Load(system, ledger, clients=clients, senders=senders, pause=pause)
    began = time.monotonic()
    running = asyncio.create_task(load.run(stop))
    try:
        await asyncio.sleep(warmup)
        rate = await probe_rate_limit(system)
        host = system.hosts[0]
        before = await _traffic(system, host)
        away = time.monotonic()
        if mode == "kill":
            system.kill_host(host)
            before = {}
        else:
            host.cut()
        await asyncio.sleep(outage)
        back = time.monotonic()
        if mode == "kill":
            await system.restart_host(host)
        else:
            host.restore()
        serving = time.monotonic()
        if not await wait_for_traffic(system, host, before):
            raise AssertionError(f"the replicas on {host.name} took no traffic after coming back")
        recovered = time.monotonic()
        await asyncio.sleep(settle)
    finally:
        stop.set()
        await running
    ended = time.monotonic()
    verdict = await verify(system, ledger)
    failed = [c for c in ledger.calls if c.outcome != "OK"]
    during = [c for c in ledger.calls if away <= c.started <= recovered]
    disruption = {
        kind: max([c.ended - away for c in failed if c.kind == kind and c.ended >= away] or [0.0])
        for kind in ("CreateTask", "webhook")
    }
    return Report(
        mode=mode,
        duration=ended - began,
        outage=back - away,
        calls_during_outage=len(during),
        errors=dict(collections.Counter(f"{c.kind} {c.outcome}" for c in failed)),
        errors_during_outage=dict(
            collections.Counter(f"{c.kind} {c.outcome}" for c in during if c.outcome != "OK")
        ),
        disruption=disruption,
        recovery=recovered - back,
        restart_floor=(serving - back) if mode == "kill" else 0.0,
        calls=len(ledger.calls),
        rate=rate,
        verdict=verdict,
        unacknowledged=ledger.unacknowledged,
        rejected=ledger.rejected,
    )

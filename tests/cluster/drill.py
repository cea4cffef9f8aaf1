"""Drills: steady load on the system, a fault injected and repaired, a ledger.

The failover drill takes one host of the cluster away and brings it back (`run_drill`); the
fault drills of tests/faults restart PostgreSQL, terminate its backends, SIGKILL one service or
keep the audit service down (`run_fault` with a `Fault`).

Clients keep what the system acknowledged in a ledger, and the drill then checks the database
and the audit service against it:

- every acknowledged CreateTask exists exactly once (clients retry a failed call with the same
  request id, which the task service answers with the first result);
- every committed task change (an outbox event) is in the audit log exactly once, in the order
  of its task's changes, and the hash chain verifies;
- every acknowledged StartTask (when the load starts the tasks it creates) left its task started,
  with one ``task_started`` change;
- every webhook delivery answered 2xx was processed exactly once: one inbox row, completed, and
  one task made from it;
- a principal's rate limit holds across replicas (one budget in Redis, not one per replica).

`tests/cluster/test_failover.py` and tests/faults run drills briefly and assert the ledger;
`bench/cluster_failover.py` and `bench/fault_drills.py` run them longer and print the figures.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
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
from tests.cluster.system import Replica, System
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
# A StartTask retried after its first attempt's answer was lost: refused, the task started.
ALREADY_STARTED = "FAILED_PRECONDITION (already started)"
CALL_TIMEOUT = 5.0
# How long a client keeps retrying one request before it counts it as not acknowledged.
RETRY_BUDGET = 30.0


@dataclass(frozen=True)
class Call:
    """One attempt by a client."""

    kind: str  # "CreateTask", "StartTask" or "webhook"
    started: float
    ended: float
    outcome: str  # "OK", a gRPC status name, "HTTP 503", "connection error"


@dataclass
class Ledger:
    """What clients sent and what the system acknowledged."""

    calls: list[Call] = field(default_factory=list)
    # title -> task id, for every CreateTask the service acknowledged
    creates: dict[str, int] = field(default_factory=dict)
    # task ids whose StartTask the service acknowledged (or found already applied)
    starts: set[int] = field(default_factory=set)
    # delivery ids the gateway answered 2xx
    deliveries: set[str] = field(default_factory=set)
    # requests given up on after RETRY_BUDGET, and answers no retry could change
    unacknowledged: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def issue_opened(secret: str, issue: int, delivery: str) -> tuple[bytes, dict[str, str]]:
    """A signed GitHub "issue opened" delivery: its body and headers."""
    body = json.dumps(
        {
            "action": "opened",
            "issue": {"number": issue, "title": f"cluster hook {delivery}"},
            "repository": {"full_name": "example/demo"},
            "sender": {"login": "cluster-sender"},
        }
    ).encode()
    return body, github_headers(secret, body, delivery=delivery)


class Load:
    """CreateTask from several clients and webhook deliveries, until `stop` is set.

    Args:
        system: The cluster.
        ledger: Where the clients record what happened.
        clients: CreateTask clients, each with its own round-robin channel.
        senders: Webhook senders, each alternating between the gateways.
        pause: Seconds each client waits between two requests.
        start_tasks: Each client starts the task it created (a second change of the same
            task, whose order the audit log must keep).
    """

    def __init__(
        self,
        system: System,
        ledger: Ledger,
        *,
        clients: int,
        senders: int,
        pause: float,
        start_tasks: bool = False,
    ) -> None:
        self._system = system
        self._ledger = ledger
        self._clients = clients
        self._senders = senders
        self._pause = pause
        self._start_tasks = start_tasks
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
                task_id = await self._create(stub, request, metadata)
                if task_id is not None and self._start_tasks:
                    await self._start(stub, task_id, metadata)
                await asyncio.sleep(self._pause)

    async def _create(
        self,
        stub: task_pb2_grpc.TaskServiceStub,
        request: task_pb2.CreateTaskRequest,
        metadata: tuple[tuple[str, str], ...],
    ) -> int | None:
        give_up = time.monotonic() + RETRY_BUDGET
        while True:
            started = time.monotonic()
            try:
                task = await stub.CreateTask(request, metadata=metadata, timeout=CALL_TIMEOUT)
            except aio.AioRpcError as exc:
                self._record("CreateTask", started, exc.code().name)
                if exc.code() not in RETRYABLE:
                    self._ledger.rejected.append(f"{request.title}: {exc.code().name}")
                    return None
                if time.monotonic() > give_up:
                    self._ledger.unacknowledged.append(request.title)
                    return None
                await asyncio.sleep(0.1)
                continue
            self._record("CreateTask", started, "OK")
            self._ledger.creates[request.title] = task.id
            return int(task.id)

    async def _start(
        self,
        stub: task_pb2_grpc.TaskServiceStub,
        task_id: int,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        # StartTask has no request id: after an attempt whose answer was lost, the task may be
        # started already, which the next attempt is refused for; reading the task tells.
        give_up = time.monotonic() + RETRY_BUDGET
        retried = False
        while True:
            started = time.monotonic()
            try:
                await stub.StartTask(
                    task_pb2.StartTaskRequest(id=task_id), metadata=metadata, timeout=CALL_TIMEOUT
                )
            except aio.AioRpcError as exc:
                if retried and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    task = await stub.GetTask(
                        task_pb2.GetTaskRequest(id=task_id),
                        metadata=metadata,
                        timeout=CALL_TIMEOUT,
                        wait_for_ready=True,
                    )
                    if task.status == task_pb2.TASK_STATUS_IN_PROGRESS:
                        self._record("StartTask", started, ALREADY_STARTED)
                        self._ledger.starts.add(task_id)
                        return
                self._record("StartTask", started, exc.code().name)
                if exc.code() not in RETRYABLE:
                    self._ledger.rejected.append(f"start {task_id}: {exc.code().name}")
                    return
                if time.monotonic() > give_up:
                    self._ledger.unacknowledged.append(f"start {task_id}")
                    return
                retried = True
                await asyncio.sleep(0.1)
                continue
            self._record("StartTask", started, "OK")
            self._ledger.starts.add(task_id)
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
                body, headers = issue_opened(secret, self._issue, delivery)
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
    starts: Count
    # tasks whose changes the audit log holds in another order than they were committed
    out_of_order: int
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
        committed = await conn.fetch(
            "SELECT event_id, task_id, event_type FROM task.outbox ORDER BY id"
        )
        outbox = [r["event_id"] for r in committed]
        audited = [
            r["event_id"]
            for r in await conn.fetch("SELECT event_id FROM audit.task_audit_log ORDER BY id")
        ]
        status = {
            r["id"]: r["status"]
            for r in await conn.fetch(
                "SELECT id, status FROM task.tasks WHERE id = ANY($1::bigint[])",
                list(ledger.starts),
            )
        }
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
    starts_seen = collections.Counter(
        r["task_id"] for r in committed if r["event_type"] == "task_started"
    )
    starts = Count(
        len(ledger.starts),
        sum(1 for t in ledger.starts if status.get(t) != "in_progress" or not starts_seen[t]),
        sum(1 for t in ledger.starts if starts_seen[t] > 1),
    )
    # Per task, the audit log's order of its changes is the outbox's (commit) order.
    position = {event: k for k, event in enumerate(audited)}
    by_task: dict[int, list[uuid.UUID]] = collections.defaultdict(list)
    for r in committed:
        by_task[r["task_id"]].append(r["event_id"])
    out_of_order = 0
    for events in by_task.values():
        places = [position[e] for e in events if e in position]
        out_of_order += places != sorted(places)
    async with service_channel(system.peer("audit")) as channel:
        chain = await audit_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(),
            metadata=bearer(system.token("auditor")),
            timeout=60,
            wait_for_ready=True,
        )
    return Verdict(
        creates, deliveries, audit, starts, out_of_order, chain.ok, chain.rows_checked, drained
    )


@dataclass(frozen=True)
class Report:
    """What a drill measured and found."""

    mode: str  # the fault: "kill", "cut", or a `Fault`'s name
    duration: float
    outage: float  # from the fault's injection to the start of its repair
    calls_during_outage: int  # attempts started from the injection until full recovery
    errors: dict[str, int]  # failed attempts by "kind outcome", whole run
    errors_during_outage: dict[str, int]
    # by kind of call: from the injection to the end of the last failed attempt after it
    disruption: dict[str, float]
    recovery: float  # from the start of the repair until the system took traffic again
    restart_floor: float  # the repair alone: restart to SERVING, or to accepting connections
    calls: int
    rate: RateProbe | None
    verdict: Verdict
    unacknowledged: list[str]
    rejected: list[str]
    ledger: Ledger = field(repr=False)


# What shows that a replica serves again: a call of each kind it handles.
TRAFFIC = {
    "task": ("grpc_server_handled_total", {"grpc_method": "CreateTask", "grpc_code": "OK"}),
    "audit": ("grpc_server_handled_total", {"grpc_method": "RecordEvents", "grpc_code": "OK"}),
    "webhook": ("webhook_requests_total", {"code": "202"}),
}


async def traffic(replicas: list[Replica]) -> dict[str, float]:
    """How many calls of its kind each replica has handled (0 for one that does not answer)."""
    seen = {}
    for replica in replicas:
        name, labels = TRAFFIC[replica.service]
        try:
            seen[replica.target] = await replica.metric(name, **labels)
        except httpx.HTTPError:
            seen[replica.target] = 0.0
    return seen


async def wait_for_traffic(
    replicas: list[Replica], before: dict[str, float], *, timeout: float = 60.0
) -> bool:
    """Wait until every one of `replicas` has handled calls since `before` was read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = await traffic(replicas)
        if all(now[t] > before.get(t, 0.0) for t in now):
            return True
        await asyncio.sleep(0.1)
    return False


@dataclass(frozen=True)
class Fault:
    """A fault a drill injects under load, and its repair.

    Attributes:
        name: What it is, for the report.
        inject: Causes the fault.
        repair: Ends it; returns when the repaired part alone is back (a process SERVING,
            PostgreSQL accepting connections): the floor recovery is compared with.
        replicas: Those that must take traffic again before the system counts as recovered.
        during: Run right after `inject`, beside the outage (observations of the outage);
            the repair waits for it.
        after_repair: Waited for after `repair`, besides traffic, before the system counts as
            recovered (e.g. readiness SERVING everywhere).
    """

    name: str
    inject: Callable[[], Awaitable[None]]
    repair: Callable[[], Awaitable[None]]
    replicas: list[Replica]
    during: Callable[[], Awaitable[None]] | None = None
    after_repair: Callable[[], Awaitable[None]] | None = None


async def run_fault(
    system: System,
    fault: Fault,
    *,
    warmup: float = 3.0,
    outage: float = 3.0,
    settle: float = 3.0,
    clients: int = 3,
    senders: int = 1,
    pause: float = 0.05,
    start_tasks: bool = False,
    probe_rate: bool = False,
) -> Report:
    """Load the system, inject `fault` for `outage` seconds, repair it, check the ledger."""
    ledger = Ledger()
    stop = asyncio.Event()
    load = Load(
        system, ledger, clients=clients, senders=senders, pause=pause, start_tasks=start_tasks
    )
    began = time.monotonic()
    running = asyncio.create_task(load.run(stop))
    try:
        await asyncio.sleep(warmup)
        rate = await probe_rate_limit(system) if probe_rate else None
        away = time.monotonic()
        await fault.inject()
        waits = [asyncio.sleep(outage)]
        if fault.during is not None:
            waits.append(fault.during())
        await asyncio.gather(*waits)
        before = await traffic(fault.replicas)
        back = time.monotonic()
        await fault.repair()
        serving = time.monotonic()
        if not await wait_for_traffic(fault.replicas, before):
            names = ", ".join(f"{r.service} on {r.host.name}" for r in fault.replicas)
            raise AssertionError(f"{names} took no traffic after {fault.name}")
        if fault.after_repair is not None:
            await fault.after_repair()
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
        for kind in ("CreateTask", "StartTask", "webhook")
    }
    return Report(
        mode=fault.name,
        duration=ended - began,
        outage=back - away,
        calls_during_outage=len(during),
        errors=dict(collections.Counter(f"{c.kind} {c.outcome}" for c in failed)),
        errors_during_outage=dict(
            collections.Counter(f"{c.kind} {c.outcome}" for c in during if c.outcome != "OK")
        ),
        disruption=disruption,
        recovery=recovered - back,
        restart_floor=serving - back,
        calls=len(ledger.calls),
        rate=rate,
        verdict=verdict,
        unacknowledged=ledger.unacknowledged,
        rejected=ledger.rejected,
        ledger=ledger,
    )


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
    host = system.hosts[0]

    async def take_away() -> None:
        if mode == "kill":
            system.kill_host(host)
        else:
            host.cut()

    async def bring_back() -> None:
        if mode == "kill":
            await system.restart_host(host)
        else:
            host.restore()

    fault = Fault(mode, take_away, bring_back, system.on(host))
    return await run_fault(
        system,
        fault,
        warmup=warmup,
        outage=outage,
        settle=settle,
        clients=clients,
        senders=senders,
        pause=pause,
        probe_rate=True,
    )

"""Processing: deliveries become task changes through the saga, against a real task service.

The module runs its own deployment (database, task service, gateways) because it stops the
task service and kills gateways.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from grpc import aio
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    bearer,
    grpc_channel,
    make_person,
    service_env,
)
from tests.webhook.conftest import (
    GatewayProcess,
    Secrets,
    Tls,
    gateway_env,
    running_gateway,
)
from tests.webhook.signing import github_headers, gitlab_token_headers, standard_headers

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

SAGA_SETTINGS = {
    "MHV_WEBHOOK_WORKERS": "2",
    # Long enough for a slow CI machine's steps (each gets half), short enough that the crash
    # tests' resumption does not take long.
    "MHV_WEBHOOK_SAGA_LEASE_SECONDS": "4",
    "MHV_WEBHOOK_SAGA_POLL_SECONDS": "0.05",
    "MHV_WEBHOOK_SAGA_RETRY_BASE_SECONDS": "0.2",
    "MHV_WEBHOOK_SAGA_MAX_ATTEMPTS": "5",
}


@dataclass
class SagaSystem:
    deployment: Deployment
    keys: Keys
    tls: Tls
    secrets: Secrets
    folder: Path
    task: ServiceProcess
    gateway_env: dict[str, str]

    def gateway(self, **extra: str) -> Any:
        env = self._env(extra)
        return running_gateway(env, self._log())

    def gateway_process(self, **extra: str) -> ServiceProcess:
        """A gateway process not yet started, for a test that starts it itself."""
        env = self._env(extra)
        return ServiceProcess(
            "mhv_webhook",
            env,
            int(env["MHV_WEBHOOK_ADMIN_GRPC_PORT"]),
            int(env["MHV_WEBHOOK_METRICS_PORT"]),
            self._log(),
        )

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {
            **self.gateway_env,
            **extra,
            "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(free_port()),
            "MHV_WEBHOOK_METRICS_PORT": str(free_port()),
            "MHV_WEBHOOK_HTTPS_PORT": str(free_port()),
        }

    def _log(self) -> Path:
        return self.folder / f"gateway-{uuid.uuid4().hex[:6]}.log"


@pytest.fixture(scope="module")
async def system(
    cluster: Cluster,
    keys: Keys,
    tls: Tls,
    hook_secrets: Secrets,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SagaSystem]:
    folder = Path(tmp_path_factory.mktemp("saga"))
    deployment = await Deployment.create(cluster)
    # The saga calls the task service as in production: over TLS, checking its certificate.
    grpc_tls = DevState(folder / "grpc-tls")
    grpc_tls.ensure_grpc_tls(("task",))
    task_port, task_metrics = free_port(), free_port()
    task_env = service_env(
        deployment,
        keys,
        {
            "MHV_TASK_GRPC_PORT": str(task_port),
            "MHV_TASK_METRICS_PORT": str(task_metrics),
            "MHV_RELAY_ENABLED": "false",
            "MHV_GRPC_TLS_CERT_FILE": str(grpc_tls.grpc_cert("task")),
            "MHV_GRPC_TLS_KEY_FILE": str(grpc_tls.grpc_key("task")),
        },
    )
    task = ServiceProcess(
        "mhv_task", task_env, task_port, task_metrics, folder / "task.log", ca_file=grpc_tls.grpc_ca
    )
    await task.start()
    env = gateway_env(
        deployment,
        keys,
        tls,
        hook_secrets,
        folder,
        MHV_TASK_TARGET=task.target,
        MHV_GRPC_TLS_CA_FILE=str(grpc_tls.grpc_ca),
        **SAGA_SETTINGS,
    )
    yield SagaSystem(deployment, keys, tls, hook_secrets, folder, task, env)
    try:
        task.stop()
    finally:
        await deployment.drop()


@pytest.fixture
async def gateway(system: SagaSystem) -> AsyncIterator[GatewayProcess]:
    # One per test: every gateway of the deployment claims from the same inbox, so a test
    # that needs a particular gateway to do the work must be the only one running.
    async with system.gateway() as running:
        yield running


def issue_event(action: str, number: int, **fields: Any) -> bytes:
    issue = {
        "number": number,
        "title": fields.get("title", f"Issue {number}"),
        "body": fields.get("body", "Steps to reproduce: ..."),
        "state": "closed" if action == "closed" else "open",
        "state_reason": fields.get("state_reason"),
        "user": {"login": "reporter"},
    }
    payload: dict[str, Any] = {
        "action": action,
        "issue": issue,
        "repository": {"full_name": fields.get("repo", "example/demo")},
        "sender": {"login": fields.get("sender", "octocat")},
    }
    if "assignee" in fields:
        payload["assignee"] = {"login": fields["assignee"]}
    return json.dumps(payload).encode()


async def send_github(
    system: SagaSystem, gateway: GatewayProcess, body: bytes, *, event: str = "issues"
) -> str:
    delivery = str(uuid.uuid4())
    async with httpx.AsyncClient(verify=system.tls.client_context()) as client:
        reply = await client.post(
            f"{gateway.url}/webhooks/github",
            content=body,
            headers=github_headers(system.secrets.github, body, delivery=delivery, event=event),
        )
    assert reply.status_code == 202, reply.text
    return delivery


async def delivery_state(system: SagaSystem, delivery: str) -> asyncpg.Record:
    conn = await asyncpg.connect(system.deployment.admin_url)
    try:
        row = await conn.fetchrow(
            "SELECT d.id, d.state, d.attempts, d.last_error, s.step, s.state AS saga_state,"
            " s.task_id FROM webhook.deliveries d LEFT JOIN webhook.saga_log s"
            " ON s.delivery_id = d.id WHERE d.delivery_id = $1",
            delivery,
        )
        assert row is not None
        return row
    finally:
        await conn.close()


async def wait_state(
    system: SagaSystem, delivery: str, *states: str, timeout: float = 30
) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    while True:
        row = await delivery_state(system, delivery)
        if row["state"] in states:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery stuck in {dict(row)}")
        await asyncio.sleep(0.05)


async def task(system: SagaSystem, task_id: int) -> task_pb2.Task:
    async with grpc_channel(system.task.target, system.task.ca_file) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        return await stub.GetTask(
            task_pb2.GetTaskRequest(id=task_id), metadata=bearer(system.keys.token(Role.SERVICE))
        )


async def tasks_titled(system: SagaSystem, title: str) -> list[int]:
    conn = await asyncpg.connect(system.deployment.admin_url)
    try:
        rows = await conn.fetch("SELECT id FROM task.tasks WHERE title = $1 ORDER BY id", title)
        return [r["id"] for r in rows]
    finally:
        await conn.close()


async def deactivated_user(system: SagaSystem, username: str) -> None:
    """A deactivated user: assigning a task to it can never succeed."""
    conn = await asyncpg.connect(system.deployment.admin_url)
    try:
        await conn.execute(
            "INSERT INTO task.users (username, email, is_active) VALUES ($1, $2, false)"
            " ON CONFLICT DO NOTHING",
            username,
            f"{username}@example.test",
        )
    finally:
        await conn.close()


def unique() -> int:
    return int(uuid.uuid4().int % 10**9)


async def test_issue_lifecycle_maps_to_task_changes(
    system: SagaSystem, gateway: GatewayProcess
) -> None:
    number = unique()
    opened = await wait_state(
        system,
        await send_github(
            system,
            gateway,
            issue_event("opened", number, title="Crash on save", body="It crashes."),
        ),
        "completed",
    )
    assert (opened["step"], opened["saga_state"]) == ("change", "completed")
    created = await task(system, opened["task_id"])
    assert (created.title, created.description, created.repository) == (
        "Crash on save",
        "It crashes.",
        "demo",
    )
    assert created.status == task_pb2.TASK_STATUS_PENDING

    edited = await wait_state(
        system,
        await send_github(
            system, gateway, issue_event("edited", number, title="Crash on save (Windows)")
        ),
        "completed",
    )
    assert edited["task_id"] == opened["task_id"]
    assert (await task(system, opened["task_id"])).title == "Crash on save (Windows)"

    await wait_state(
        system,
        await send_github(system, gateway, issue_event("assigned", number, assignee="hubot")),
        "completed",
    )
    assigned = await task(system, opened["task_id"])
    async with grpc_channel(system.task.target, system.task.ca_file) as channel:
        user = await task_pb2_grpc.UserServiceStub(channel).GetUser(
            task_pb2.GetUserRequest(username="github.hubot"),
            metadata=bearer(system.keys.token(Role.SERVICE)),
        )
    assert assigned.assigned_to == user.id

    await wait_state(
        system, await send_github(system, gateway, issue_event("closed", number)), "completed"
    )
    assert (await task(system, opened["task_id"])).status == task_pb2.TASK_STATUS_COMPLETED

    reopened = await wait_state(
        system,
        await send_github(
            system, gateway, issue_event("reopened", number, title="Crash on save (again)")
        ),
        "completed",
    )
    assert reopened["task_id"] != opened["task_id"]
    assert (await task(system, reopened["task_id"])).status == task_pb2.TASK_STATUS_PENDING

    cancelled = await wait_state(
        system,
        await send_github(
            system, gateway, issue_event("closed", number, state_reason="not_planned")
        ),
        "completed",
    )
    assert cancelled["task_id"] == reopened["task_id"]
    assert (await task(system, reopened["task_id"])).status == task_pb2.TASK_STATUS_CANCELLED


async def test_the_sender_becomes_the_tasks_author(
    system: SagaSystem, gateway: GatewayProcess
) -> None:
    row = await wait_state(
        system,
        await send_github(system, gateway, issue_event("opened", unique(), sender="mona")),
        "completed",
    )
    made = await task(system, row["task_id"])
    async with grpc_channel(system.task.target, system.task.ca_file) as channel:
        mona = await task_pb2_grpc.UserServiceStub(channel).GetUser(
            task_pb2.GetUserRequest(username="github.mona"),
            metadata=bearer(system.keys.token(Role.SERVICE)),
        )
    assert made.created_by == mona.id


async def test_other_events_are_stored_and_ignored(
    system: SagaSystem, gateway: GatewayProcess
) -> None:
    push = await wait_state(
        system,
        await send_github(system, gateway, b'{"ref": "refs/heads/main"}', event="push"),
        "ignored",
    )
    assert "push" in push["last_error"]
    unknown = await wait_state(
        system,
        await send_github(system, gateway, issue_event("opened", unique(), repo="someone/else")),
        "ignored",
    )
    assert "not configured" in unknown["last_error"]
    pinned = await wait_state(
        system, await send_github(system, gateway, issue_event("pinned", unique())), "ignored"
    )
    assert pinned["task_id"] is None
    assert "pinning changes where GitHub lists the issue" in pinned["last_error"]


async def test_gitlab_issue_events(system: SagaSystem, gateway: GatewayProcess) -> None:
    iid = unique()
    payload = {
        "object_kind": "issue",
        "user": {"username": "gitlab-user"},
        "project": {"path_with_namespace": "example/demo"},
        "object_attributes": {
            "iid": iid,
            "title": "From GitLab",
            "description": "d",
            "action": "open",
        },
    }
    body = json.dumps(payload).encode()
    event_uuid = str(uuid.uuid4())
    async with httpx.AsyncClient(verify=system.tls.client_context()) as client:
        reply = await client.post(
            f"{gateway.url}/webhooks/gitlab",
            content=body,
            headers=gitlab_token_headers(system.secrets.gitlab_token, event_uuid=event_uuid),
        )
    assert reply.status_code == 202, reply.text
    row = await wait_state(system, event_uuid, "completed")
    assert (await task(system, row["task_id"])).title == "From GitLab"


async def test_task_service_outage_delays_but_loses_nothing(system: SagaSystem) -> None:
    # More failed attempts than MHV_WEBHOOK_SAGA_MAX_ATTEMPTS, but within the dead-letter
    # horizon (a day by default): the delivery keeps waiting instead of being parked.
    async with system.gateway(MHV_WEBHOOK_SAGA_MAX_ATTEMPTS="2") as gateway:
        system.task.stop()
        try:
            title = f"During outage {uuid.uuid4().hex[:8]}"
            delivery = await send_github(
                system, gateway, issue_event("opened", unique(), title=title)
            )
            deadline = time.monotonic() + 40
            while (row := await delivery_state(system, delivery))["attempts"] < 3:
                assert time.monotonic() < deadline, dict(row)
                assert row["state"] != "dead_letter", dict(row)
                await asyncio.sleep(0.05)
            assert row["state"] in ("pending", "processing")
            # The calls waited for the task service until their deadline, then gave up.
            assert "task service answered" in row["last_error"]
        finally:
            await system.task.start()
        await wait_state(system, delivery, "completed", timeout=30)
        assert len(await tasks_titled(system, title)) == 1


async def test_dead_letter_then_operator_retry(system: SagaSystem) -> None:
    # Two attempts, and no horizon: the delivery is parked at once.
    async with system.gateway(
        MHV_WEBHOOK_SAGA_MAX_ATTEMPTS="2", MHV_WEBHOOK_SAGA_DEAD_LETTER_AFTER_SECONDS="0"
    ) as gateway:
        system.task.stop()
        try:
            title = f"Dead letter {uuid.uuid4().hex[:8]}"
            delivery = await send_github(
                system, gateway, issue_event("opened", unique(), title=title)
            )
            row = await wait_state(system, delivery, "dead_letter", timeout=30)
            assert row["saga_state"] == "failed"
        finally:
            await system.task.start()
        async with aio.insecure_channel(gateway.process.target) as channel:
            admin = webhook_pb2_grpc.WebhookAdminServiceStub(channel)
            await admin.RetryDelivery(
                webhook_pb2.RetryDeliveryRequest(id=str(row["id"])),
                metadata=bearer(
                    system.keys.token(
                        Role.ADMIN, subject=await make_person(system.deployment, "admin")
                    )
                ),
            )
        await wait_state(system, delivery, "completed", timeout=30)
        assert len(await tasks_titled(system, title)) == 1


async def test_concurrent_deliveries_about_one_issue_make_one_task(
    system: SagaSystem, gateway: GatewayProcess
) -> None:
    # GitHub sends "opened" and "assigned" together for an issue created with an assignee;
    # two workers pick them up at once.
    title = f"Opened and assigned {uuid.uuid4().hex[:8]}"
    number = unique()
    deliveries = await asyncio.gather(
        send_github(system, gateway, issue_event("opened", number, title=title)),
        send_github(
            system, gateway, issue_event("assigned", number, title=title, assignee="hubot")
        ),
        send_github(system, gateway, issue_event("edited", number, title=title)),
    )
    rows = [await wait_state(system, d, "completed") for d in deliveries]
    assert len({r["task_id"] for r in rows}) == 1
    assert len(await tasks_titled(system, title)) == 1


async def test_a_failed_change_never_cancels_a_task_it_did_not_create(
    system: SagaSystem, gateway: GatewayProcess
) -> None:
    await deactivated_user(system, "github.gone")
    number = unique()
    title = f"Kept {uuid.uuid4().hex[:8]}"
    opened = await wait_state(
        system,
        await send_github(system, gateway, issue_event("opened", number, title=title)),
        "completed",
    )
    failed = await wait_state(
        system,
        await send_github(
            system, gateway, issue_event("assigned", number, title=title, assignee="gone")
        ),
        "compensated",
    )
    assert "MHV-112" in failed["last_error"]
    assert (await task(system, opened["task_id"])).status == task_pb2.TASK_STATUS_PENDING


async def test_thousand_identical_deliveries_make_one_task(
    system: SagaSystem, gateway: GatewayProcess, tmp_path: Path
) -> None:
    title = f"Delivered a thousand times {uuid.uuid4().hex[:8]}"
    body = issue_event("opened", unique(), title=title)
    delivery = str(uuid.uuid4())
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "headers": github_headers(system.secrets.github, body, delivery=delivery),
                "body_hex": body.hex(),
            }
        )
    )
    senders = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.webhook.sender",
            f"{gateway.url}/webhooks/github",
            str(system.tls.cert),
            str(request),
            "250",
            "50",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    statuses: list[int] = []
    for sender in senders:
        out, _ = await sender.communicate()
        assert sender.returncode == 0
        statuses += json.loads(out)
    assert len(statuses) == 1000
    assert all(s in (200, 202) for s in statuses), sorted(set(statuses))
    await wait_state(system, delivery, "completed")
    assert len(await tasks_titled(system, title)) == 1


async def test_permanent_failure_is_compensated(
    system: SagaSystem, gateway: GatewayProcess
) -> None:
    await deactivated_user(system, "github.gone")
    title = f"Compensated {uuid.uuid4().hex[:8]}"
    # The first event about this issue is the assignment: the saga creates its task, then
    # fails to assign, and undoes the creation by cancelling the task.
    row = await wait_state(
        system,
        await send_github(
            system, gateway, issue_event("assigned", unique(), title=title, assignee="gone")
        ),
        "compensated",
    )
    assert row["saga_state"] == "compensated"
    assert "MHV-112" in row["last_error"]
    [task_id] = await tasks_titled(system, title)
    assert (await task(system, task_id)).status == task_pb2.TASK_STATUS_CANCELLED


async def killed_by_failpoint(gateway: GatewayProcess | ServiceProcess) -> None:
    service = gateway.process if isinstance(gateway, GatewayProcess) else gateway
    process = service.process
    assert process is not None
    deadline = time.monotonic() + 30
    while process.poll() is None:
        assert time.monotonic() < deadline, "the failpoint never fired"
        await asyncio.sleep(0.02)
    assert process.returncode == -9  # SIGKILL


@pytest.mark.parametrize("step", ["actor", "claim", "task", "change", "done"])
async def test_gateway_killed_at_each_step_boundary(system: SagaSystem, step: str) -> None:
    title = f"Crash after {step} {uuid.uuid4().hex[:8]}"
    number = unique()
    async with system.gateway(MHV_WEBHOOK_WORKERS="1", MHV_WEBHOOK_SAGA_CRASH_AFTER=step) as doomed:
        # A close of an issue never seen before: every step has work to do.
        delivery = await send_github(system, doomed, issue_event("closed", number, title=title))
        await killed_by_failpoint(doomed)
    row = await delivery_state(system, delivery)
    if step == "done":
        assert row["state"] == "completed"
    else:
        assert row["state"] == "processing" and row["step"] == step
    # Another gateway resumes the saga once the dead one's lease runs out.
    async with system.gateway():
        finished = await wait_state(system, delivery, "completed", timeout=30)
    assert finished["saga_state"] == "completed"
    ids = await tasks_titled(system, title)
    assert len(ids) == 1, f"{len(ids)} tasks for one delivery"
    assert (await task(system, ids[0])).status == task_pb2.TASK_STATUS_COMPLETED


async def assert_issue_is_free(system: SagaSystem, gateway: GatewayProcess, number: int) -> None:
    """A new delivery about issue `number` is not held up by an earlier one: it makes the task."""
    title = f"Issue freed {uuid.uuid4().hex[:8]}"
    edited = await wait_state(
        system,
        await send_github(system, gateway, issue_event("edited", number, title=title)),
        "completed",
        "dead_letter",
        timeout=60,
    )
    assert edited["state"] == "completed", dict(edited)
    assert await tasks_titled(system, title) == [edited["task_id"]]


async def test_a_poison_delivery_is_dead_lettered_and_frees_its_issue(system: SagaSystem) -> None:
    # The milestone number is a JSON integer no protobuf Struct can hold: building the
    # CreateTask request raises (OverflowError) after the saga has claimed the issue. The
    # dead-letter horizon is left at its default (a day): a failure that repeats on every
    # attempt is parked after the configured attempts all the same.
    async with system.gateway(MHV_WEBHOOK_SAGA_MAX_ATTEMPTS="3") as gateway:
        number = unique()
        poison = json.loads(issue_event("opened", number, title="Poison"))
        poison["issue"]["milestone"] = {"title": "v1", "number": 10**400}
        poisoned = await send_github(system, gateway, json.dumps(poison).encode())
        dead = await wait_state(system, poisoned, "dead_letter", timeout=60)
        assert dead["attempts"] == 3
        assert dead["saga_state"] == "failed"
        assert "OverflowError" in dead["last_error"]
        # The claim on the issue went with it: the next delivery about it makes its task.
        await assert_issue_is_free(system, gateway, number)
        # Parked means parked: the workers, busy meanwhile, made no further attempt.
        assert (await delivery_state(system, poisoned))["attempts"] == 3


async def test_a_delivery_that_stops_every_worker_is_parked_at_its_last_attempt(
    system: SagaSystem,
) -> None:
    number = unique()
    doomed = {
        "MHV_WEBHOOK_WORKERS": "1",
        "MHV_WEBHOOK_SAGA_CRASH_AFTER": "claim",
        "MHV_WEBHOOK_SAGA_MAX_ATTEMPTS": "2",
    }
    # Two attempts, each ending with its worker killed after the issue was claimed.
    async with system.gateway(**doomed) as first:
        delivery = await send_github(system, first, issue_event("opened", number))
        await killed_by_failpoint(first)
    # The second may claim it (and die) before it reports healthy: its workers start first.
    second = system.gateway_process(**doomed)
    second.launch()
    try:
        await killed_by_failpoint(second)
    finally:
        second.kill()
    assert (await delivery_state(system, delivery))["attempts"] == 2
    # The next worker parks it instead of making a third attempt, and frees the issue.
    async with system.gateway(MHV_WEBHOOK_SAGA_MAX_ATTEMPTS="2") as gateway:
        parked = await wait_state(system, delivery, "dead_letter", "completed", timeout=60)
        assert parked["state"] == "dead_letter", dict(parked)
        assert parked["attempts"] == 2
        assert parked["saga_state"] == "failed"
        assert "stopped or stalled" in parked["last_error"]
        await assert_issue_is_free(system, gateway, number)


# --- Any payload content ends the delivery -------------------------------------------------

# Where a stored delivery may end. `compensated`: the task service refused a change for good
# and the saga undid what it had done (see test_permanent_failure_is_compensated).
ENDED = ("completed", "ignored", "dead_letter", "compensated")
POISON_ATTEMPTS = 3

Path_ = tuple[str, ...]
Overrides = dict[Path_, Any]

# Text with what encoders choke on: NUL, lone UTF-16 surrogates, any code point.
_TEXT = st.text(
    st.characters(codec=None, exclude_categories=())
    | st.characters(categories=["Cs"])
    | st.just("\x00"),
    max_size=20,
) | st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "a\udfffb",
        "x" * 6000,
        "example/demo",
        "demo",
        "opened",
        "closed",
        "not_planned",
        "critical",
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+14:00",
        "2020-02-30T25:61:61Z",
    ]
)
_NUMBERS = (
    st.integers()
    | st.sampled_from([2**31, 2**63, -(2**63) - 1, 2**64, 10**400, -(10**400)])
    | st.floats()  # NaN and the infinities too: json.dumps writes them, json.loads reads them
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | _NUMBERS | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)

# Every field each scheme's interpretation reads (mhv_webhook._scheme_github, _scheme_gitlab,
# _task_events), as paths into its payload.
GITHUB_FIELDS: list[Path_] = [
    ("action",),
    ("issue",),
    ("issue", "number"),
    ("issue", "title"),
    ("issue", "body"),
    ("issue", "state_reason"),
    ("issue", "updated_at"),
    ("issue", "html_url"),
    ("issue", "user"),
    ("issue", "user", "login"),
    ("issue", "assignees"),
    ("issue", "type"),
    ("issue", "type", "name"),
    ("issue", "labels"),
    ("issue", "milestone"),
    ("issue", "milestone", "title"),
    ("issue", "milestone", "number"),
    ("repository",),
    ("repository", "full_name"),
    ("sender",),
    ("sender", "login"),
    ("sender", "username"),
    ("assignee",),
    ("assignee", "login"),
    ("changes",),
    ("changes", "old_repository", "full_name"),
    ("changes", "old_issue", "number"),
    ("changes", "new_repository", "full_name"),
    ("changes", "new_issue"),
    ("changes", "new_issue", "number"),
]
GITLAB_FIELDS: list[Path_] = [
    ("object_kind",),
    ("user",),
    ("user", "username"),
    ("project",),
    ("project", "path_with_namespace"),
    ("object_attributes",),
    ("object_attributes", "iid"),
    ("object_attributes", "action"),
    ("object_attributes", "title"),
    ("object_attributes", "description"),
    ("object_attributes", "url"),
    ("object_attributes", "type"),
    ("object_attributes", "labels"),
    ("object_attributes", "milestone_id"),
    ("object_attributes", "updated_at"),
    ("object_attributes", "moved_to_id"),
    ("object_attributes", "duplicated_to_id"),
    ("object_attributes", "assignee_ids"),
    ("labels",),
    ("assignees",),
    ("changes",),
    ("changes", "assignees", "current"),
]
STANDARD_FIELDS: list[Path_] = [
    ("type",),
    ("timestamp",),
    ("data",),
    ("data", "external_id"),
    ("data", "title"),
    ("data", "description"),
    ("data", "repository"),
    ("data", "priority"),
    ("data", "deadline"),
    ("data", "actor"),
    ("data", "assignee"),
    ("data", "reason"),
    ("data", "quality_gate"),
    ("data", "quality_gate", "passed"),
    ("data", "quality_gate", "checks_run"),
    ("data", "quality_gate", "checks"),
    ("data", "quality_gate", "checks", "0", "name"),
    ("data", "quality_gate", "checks", "0", "detail"),
]
GITHUB_ACTIONS = ["opened", "reopened", "edited", "assigned", "labeled", "closed", "deleted"]
GITHUB_ACTIONS += ["transferred", "pinned"]
GITLAB_ACTIONS = ["open", "reopen", "update", "close"]
STANDARD_TYPES = ["task.create", "task.update", "task.assign", "task.complete", "task.cancel"]


def _overrides(fields: list[Path_]) -> st.SearchStrategy[Overrides]:
    return st.dictionaries(st.sampled_from(fields), JSON_VALUES, min_size=1, max_size=3)


def _put(node: Any, path: Path_, value: Any) -> Any:
    """`node` with `value` at `path`, making the containers on the way (a digit: list index)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if key.isdigit():
        items = list(node) if isinstance(node, list) else []
        while len(items) <= int(key):
            items.append({})
        items[int(key)] = _put(items[int(key)], rest, value)
        return items
    mapping = dict(node) if isinstance(node, dict) else {}
    mapping[key] = _put(mapping.get(key), rest, value)
    return mapping


def _with(base: dict[str, Any], overrides: Overrides) -> Any:
    payload: Any = base
    for path, value in overrides.items():
        payload = _put(payload, path, value)
    return payload


def github_issue(action: str, number: int) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(issue_event(action, number, assignee="hubot"))
    payload["issue"].update(
        {
            "html_url": f"https://github.example/example/demo/issues/{number}",
            "type": {"name": "Bug"},
            "labels": [{"name": "bug"}],
            "milestone": {"title": "v1", "number": 1},
            "assignees": [{"login": "hubot"}],
            "updated_at": dt.datetime.now(dt.UTC).isoformat(),
        }
    )
    if action == "transferred":
        payload["changes"] = {
            "new_repository": {"full_name": "mahavishnu/mahavishnu"},
            "new_issue": {"number": number, "title": "Moved"},
        }
    return payload


def gitlab_issue(action: str, iid: int) -> dict[str, Any]:
    return {
        "object_kind": "issue",
        "user": {"username": "gitlab-user"},
        "project": {"path_with_namespace": "example/demo"},
        "labels": [{"title": "bug"}],
        "assignees": [{"username": "gitlab-assignee"}],
        "object_attributes": {
            "iid": iid,
            "action": action,
            "title": "From GitLab",
            "description": "d",
            "url": f"https://gitlab.example/example/demo/-/issues/{iid}",
            "type": "ISSUE",
            "milestone_id": 7,
            "updated_at": "2026-01-01 10:00:00 UTC",
        },
    }


def task_event(kind: str, external_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {"external_id": external_id, "actor": "ci-bot"}
    if kind == "task.create":
        data.update(title="From CI", repository="demo", description="d", priority="low")
        data["deadline"] = (dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).isoformat()
    elif kind == "task.update":
        data.update(title="Updated by CI", priority="high")
    elif kind == "task.assign":
        data["assignee"] = "someone"
    elif kind == "task.complete":
        data["quality_gate"] = {
            "passed": True,
            "checks_run": 1,
            "checks": [{"name": "unit", "passed": True, "detail": "ok"}],
        }
    else:
        data["reason"] = "no longer needed"
    return {"type": kind, "timestamp": dt.datetime.now(dt.UTC).isoformat(), "data": data}


@dataclass(frozen=True)
class Sent:
    delivery: str
    status: int


async def _send(
    system: SagaSystem, client: httpx.AsyncClient, gateway: GatewayProcess, how: str, body: Any
) -> Sent:
    delivery = str(uuid.uuid4())
    text = json.dumps(body)  # ASCII: surrogates and NUL travel as \u escapes, as senders send
    secrets = system.secrets
    if how == "github-form":
        raw = urllib.parse.urlencode({"payload": text}).encode()
        headers = github_headers(secrets.github, raw, delivery=delivery)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        path = "github"
    elif how == "github":
        raw = text.encode()
        headers, path = github_headers(secrets.github, raw, delivery=delivery), "github"
    elif how == "gitlab":
        raw = text.encode()
        headers, path = gitlab_token_headers(secrets.gitlab_token, event_uuid=delivery), "gitlab"
    else:
        raw, delivery = text.encode(), f"msg_{uuid.uuid4().hex}"
        headers = standard_headers(
            secrets.generic, raw, msg_id=delivery, timestamp=int(time.time())
        )
        path = "generic"
    reply = await client.post(f"{gateway.url}/webhooks/{path}", content=raw, headers=headers)
    return Sent(delivery, reply.status_code)


async def wait_ended(
    conn: asyncpg.Connection, deliveries: Sequence[str], *, timeout: float = 45
) -> list[asyncpg.Record]:
    """The deliveries' rows once every one has ended (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await conn.fetch(
            "SELECT delivery_id, state, attempts, last_error FROM webhook.deliveries"
            " WHERE delivery_id = ANY($1::text[])",
            list(deliveries),
        )
        if len(rows) == len(deliveries) and all(r["state"] in ENDED for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"not ended: {[dict(r) for r in rows if r['state'] not in ENDED]}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def poison_gateway(system: SagaSystem) -> AsyncIterator[GatewayProcess]:
    # Everything ends quickly: failures that wait for a task not created yet included.
    async with system.gateway(
        MHV_WEBHOOK_SAGA_MAX_ATTEMPTS=str(POISON_ATTEMPTS),
        MHV_WEBHOOK_SAGA_DEAD_LETTER_AFTER_SECONDS="0",
        MHV_WEBHOOK_SAGA_RETRY_BASE_SECONDS="0.05",
    ) as running:
        yield running


@pytest.fixture
async def admin_db(system: SagaSystem) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(system.deployment.admin_url)
    yield conn
    await conn.close()


@settings(
    max_examples=50,
    deadline=None,
    # A failing example is reported as drawn: shrinking would wait out the bound once per try.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    github_action=st.sampled_from(GITHUB_ACTIONS),
    github=_overrides(GITHUB_FIELDS),
    form=_overrides(GITHUB_FIELDS),
    gitlab_action=st.sampled_from(GITLAB_ACTIONS),
    gitlab=_overrides(GITLAB_FIELDS),
    standard_type=st.sampled_from(STANDARD_TYPES),
    standard=_overrides(STANDARD_FIELDS),
)
@example(
    github_action="opened",
    github={("issue", "title"): "\ud800"},
    form={("issue", "milestone", "number"): 10**400},
    gitlab_action="open",
    gitlab={("object_attributes", "title"): "a\x00b", ("user", "username"): "\udfff"},
    standard_type="task.create",
    standard={("data", "description"): "\ud800\x00"},
).via("the poisons known to jam processing before")
@example(
    github_action="edited",
    github={("issue", "labels"): [{"name": "\ud800"}], ("issue", "number"): 2**64},
    form={("issue", "milestone", "number"): float("nan")},
    gitlab_action="update",
    gitlab={("object_attributes", "milestone_id"): 10**30},
    standard_type="task.complete",
    standard={("data", "quality_gate", "checks", "0", "detail"): "\udfff"},
).via("values out of range")
@example(
    github_action="closed",
    github={("issue", "updated_at"): "9999-12-31T23:59:59-14:00"},
    form={("issue", "updated_at"): "0001-01-01T00:00:00+14:00"},
    gitlab_action="close",
    gitlab={("object_attributes", "updated_at"): "0001-01-01 00:00:00 UTC"},
    standard_type="task.update",
    standard={("data", "deadline"): "9999-12-31T23:59:59-14:00"},
).via("dates at and beyond the ends of the calendar")
async def test_any_payload_content_ends_the_delivery(
    system: SagaSystem,
    poison_gateway: GatewayProcess,
    admin_db: asyncpg.Connection,
    github_action: str,
    github: Overrides,
    form: Overrides,
    gitlab_action: str,
    gitlab: Overrides,
    standard_type: str,
    standard: Overrides,
) -> None:
    external_id = f"ci-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(verify=system.tls.client_context(), timeout=30) as client:
        if standard_type != "task.create":
            # The task the event changes exists, so the event reaches the task service.
            created = await _send(
                system, client, poison_gateway, "standard", task_event("task.create", external_id)
            )
            assert created.status == 202
            await wait_ended(admin_db, [created.delivery])
        sent = await asyncio.gather(
            _send(
                system,
                client,
                poison_gateway,
                "github",
                _with(github_issue(github_action, unique()), github),
            ),
            _send(
                system,
                client,
                poison_gateway,
                "github-form",
                _with(github_issue(github_action, unique()), form),
            ),
            _send(
                system,
                client,
                poison_gateway,
                "gitlab",
                _with(gitlab_issue(gitlab_action, unique()), gitlab),
            ),
            _send(
                system,
                client,
                poison_gateway,
                "standard",
                _with(task_event(standard_type, external_id), standard),
            ),
        )
    # The edge refuses what it may (4xx, nothing stored) and never fails (5xx).
    assert all(s.status < 500 for s in sent), sent
    stored = [s.delivery for s in sent if s.status == 202]
    for row in await wait_ended(admin_db, stored):
        assert row["attempts"] <= POISON_ATTEMPTS, dict(row)
        if row["state"] == "dead_letter":
            assert row["last_error"], dict(row)

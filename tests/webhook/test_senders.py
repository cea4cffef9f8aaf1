"""Real senders end to end: payloads shaped as GitHub, GitLab and Standard Webhooks senders
document them, sent over HTTPS to the gateway process, through the saga to the task service,
and into the audit log.

The module runs its own deployment: audit, task (with its outbox relay) and gateway processes,
a repository list with several senders' names per repository (mirrors, a second GitLab
project), and the payload fixtures of tests/webhook/payloads/.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
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
    service_env,
    stop_all,
)
from tests.webhook.conftest import GatewayProcess, Secrets, Tls, gateway_env, running_gateway
from tests.webhook.fixtures import body, form_body, github_issue, gitlab_issue, task_event
from tests.webhook.signing import github_headers, gitlab_token_headers, standard_headers
from tests.webhook.support import assert_error

pytestmark = pytest.mark.slow

REPOS = """
repositories:
  - name: demo
    github: [example/demo, example/demo-mirror]
    gitlab: [example/demo, mirrors/demo]
  - name: archive
    github: example/demo-archive
"""
FINAL = ("completed", "ignored", "compensated", "dead_letter")
# Sender times: an hour ago, a second apart per step, so that state changes have an order.
EPOCH = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)


def at(second: int) -> str:
    return (EPOCH + dt.timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%SZ")


def unique() -> int:
    return int(uuid.uuid4().int % 10**9)


@dataclass
class Senders:
    deployment: Deployment
    keys: Keys
    tls: Tls
    secrets: Secrets
    tasks: ServiceProcess
    gateway: GatewayProcess

    # --- sending ---------------------------------------------------------------------------

    async def post(self, source: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(verify=self.tls.client_context(), timeout=30) as client:
            return await client.post(
                f"{self.gateway.url}/webhooks/{source}", content=content, headers=headers
            )

    async def github(self, payload: dict[str, Any], *, form: bool = False) -> str:
        delivery = str(uuid.uuid4())
        raw = form_body(payload) if form else body(payload)
        headers = github_headers(self.secrets.github, raw, delivery=delivery)
        if form:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        reply = await self.post("github", raw, headers)
        assert reply.status_code == 202, reply.text
        return delivery

    async def gitlab(self, payload: dict[str, Any], *, event: str = "Issue Hook") -> str:
        delivery = str(uuid.uuid4())
        headers = gitlab_token_headers(self.secrets.gitlab_token, event_uuid=delivery, event=event)
        reply = await self.post("gitlab", body(payload), headers)
        assert reply.status_code == 202, reply.text
        return delivery

    async def standard(
        self, payload: dict[str, Any], *, prefix: str = "webhook", msg_id: str = ""
    ) -> httpx.Response:
        raw = body(payload)
        headers = standard_headers(
            self.secrets.generic,
            raw,
            msg_id=msg_id or f"msg_{uuid.uuid4().hex}",
            timestamp=int(time.time()),
            prefix=prefix,
        )
        return await self.post("generic", raw, headers)

    # --- looking ---------------------------------------------------------------------------

    async def settled(self, delivery: str, timeout: float = 45) -> asyncpg.Record:
        """The delivery once its saga has ended."""
        deadline = time.monotonic() + timeout
        conn = await asyncpg.connect(self.deployment.admin_url)
        try:
            while True:
                row = await conn.fetchrow(
                    "SELECT d.state, d.last_error, d.content_type, s.task_id"
                    " FROM webhook.deliveries d LEFT JOIN webhook.saga_log s"
                    " ON s.delivery_id = d.id WHERE d.delivery_id = $1",
                    delivery,
                )
                if row is not None and row["state"] in FINAL:
                    return row
                assert time.monotonic() < deadline, f"delivery {delivery} stuck: {row}"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def done(self, delivery: str) -> int:
        """The task id of a delivery whose saga completed."""
        row = await self.settled(delivery)
        assert row["state"] == "completed", dict(row)
        return int(row["task_id"])

    async def ignored(self, delivery: str) -> str:
        """Why a delivery was ignored."""
        row = await self.settled(delivery)
        assert row["state"] == "ignored", dict(row)
        return str(row["last_error"])

    async def task(self, task_id: int) -> task_pb2.Task:
        async with grpc_channel(self.tasks.target, self.tasks.ca_file) as channel:
            return await task_pb2_grpc.TaskServiceStub(channel).GetTask(
                task_pb2.GetTaskRequest(id=task_id),
                metadata=bearer(self.keys.token(Role.SERVICE)),
            )

    async def user_id(self, username: str) -> str:
        async with grpc_channel(self.tasks.target, self.tasks.ca_file) as channel:
            user = await task_pb2_grpc.UserServiceStub(channel).GetUser(
                task_pb2.GetUserRequest(username=username),
                metadata=bearer(self.keys.token(Role.SERVICE)),
            )
        return user.id

    async def completed_without_gate(self, task_id: int) -> list[str]:
        """The kinds of the task's audit records, once it is completed with no gate run."""
        task = await self.task(task_id)
        assert task.status == task_pb2.TASK_STATUS_COMPLETED
        assert task.quality_gate == task_pb2.QualityGateResult(not_run=True)
        events = await self.audit(task_id, until="task_completed")
        # Neither a pass nor a failure is invented: the record says that no gate ran.
        assert events[-1][1] == {
            "status": {"old": "in_progress", "new": "completed"},
            "quality_gate": "not_run",
        }
        return [kind for kind, _ in events]

    async def audit(self, task_id: int, *, until: str, timeout: float = 30) -> list[Any]:
        """(event type, details) of the task's audit records, once one is of type `until`."""
        deadline = time.monotonic() + timeout
        conn = await asyncpg.connect(self.deployment.admin_url)
        try:
            while True:
                rows = await conn.fetch(
                    "SELECT event_type, details FROM audit.task_audit_log"
                    " WHERE task_id = $1 ORDER BY id",
                    task_id,
                )
                if any(r["event_type"] == until for r in rows):
                    return [(r["event_type"], _json(r["details"])) for r in rows]
                assert time.monotonic() < deadline, f"no {until} for task {task_id}: {rows}"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


def metadata(task: task_pb2.Task) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(task.metadata)


@pytest.fixture(scope="module")
async def senders(
    cluster: Cluster,
    keys: Keys,
    tls: Tls,
    hook_secrets: Secrets,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Senders]:
    folder = Path(tmp_path_factory.mktemp("senders"))
    deployment = await Deployment.create(cluster)
    repos = folder / "repos.yaml"
    repos.write_text(REPOS)
    grpc_tls = DevState(folder / "grpc-tls")
    grpc_tls.ensure_grpc_tls(("task", "audit"))
    ports = {name: free_port() for name in ("task", "task_m", "audit", "audit_m")}
    env = service_env(
        deployment,
        keys,
        {
            "MHV_REPOS_FILE": str(repos),
            "MHV_TASK_GRPC_PORT": str(ports["task"]),
            "MHV_TASK_METRICS_PORT": str(ports["task_m"]),
            "MHV_AUDIT_GRPC_PORT": str(ports["audit"]),
            "MHV_AUDIT_METRICS_PORT": str(ports["audit_m"]),
            "MHV_AUDIT_TARGET": f"127.0.0.1:{ports['audit']}",
            "MHV_RELAY_POLL_INTERVAL_SECONDS": "0.05",
            "MHV_GRPC_TLS_CA_FILE": str(grpc_tls.grpc_ca),
            "MHV_LOG_LEVEL": "WARNING",
        },
    )

    def process(service: str, grpc_port: int, metrics_port: int) -> ServiceProcess:
        own = {
            **env,
            "MHV_GRPC_TLS_CERT_FILE": str(grpc_tls.grpc_cert(service)),
            "MHV_GRPC_TLS_KEY_FILE": str(grpc_tls.grpc_key(service)),
        }
        log = folder / f"{service}.log"
        return ServiceProcess(
            f"mhv_{service}", own, grpc_port, metrics_port, log, ca_file=grpc_tls.grpc_ca
        )

    audit = process("audit", ports["audit"], ports["audit_m"])
    task = process("task", ports["task"], ports["task_m"])
    await audit.start()
    await task.start()
    gateway = gateway_env(
        deployment,
        keys,
        tls,
        hook_secrets,
        folder,
        MHV_REPOS_FILE=str(repos),
        MHV_TASK_TARGET=task.target,
        MHV_GRPC_TLS_CA_FILE=str(grpc_tls.grpc_ca),
        MHV_WEBHOOK_WORKERS="4",
        MHV_WEBHOOK_SAGA_LEASE_SECONDS="4",
        MHV_WEBHOOK_SAGA_POLL_SECONDS="0.05",
        MHV_WEBHOOK_SAGA_RETRY_BASE_SECONDS="0.2",
    )
    try:
        async with running_gateway(gateway, folder / "gateway.log") as running:
            yield Senders(deployment, keys, tls, hook_secrets, task, running)
    finally:
        try:
            stop_all([task, audit])
        finally:
            await deployment.drop()


def stamped(payload: dict[str, Any], second: int) -> dict[str, Any]:
    """A payload whose issue changed at sender time `second` (GitHub or GitLab)."""
    if "issue" in payload:
        payload["issue"]["updated_at"] = at(second)
    else:
        payload["object_attributes"]["updated_at"] = at(second)
    return payload


class GitHubIssue:
    """One issue's deliveries, as GitHub sends them: each carries the whole issue as it is.

    Each fixture shows one action on its own; here an action changes only the fields it is
    about (taken from its fixture), and every delivery carries what the issue holds by then.
    """

    CHANGES = {
        "labeled": ("labels",),
        "unlabeled": ("labels",),
        "assigned": ("assignee", "assignees"),
        "unassigned": ("assignee", "assignees"),
        "milestoned": ("milestone",),
        "demilestoned": ("milestone",),
        "typed": ("type",),
        "untyped": ("type",),
        "edited": ("title", "body"),
    }

    def __init__(self, number: int) -> None:
        self.number = number
        opened = github_issue("opened", number)["issue"]
        self.fields = {k: opened[k] for k in ("title", "body", "labels", "assignee", "assignees")}
        self.fields["milestone"] = opened["milestone"]

    def event(self, action: str, second: int) -> dict[str, Any]:
        payload = github_issue(action, self.number)
        for name in self.CHANGES.get(action, ()):
            self.fields[name] = payload["issue"].get(name)
        payload["issue"].update(self.fields)
        return stamped(payload, second)


class GitLabIssue:
    """One issue's Issue Hook deliveries, each with the whole issue as it is (see GitHubIssue)."""

    CHANGES = {
        "update.labels": ("labels",),
        "update.assignees": ("assignees",),
        "update.unassigned": ("assignees",),
        "update.title": ("title",),
        "update.milestone": ("milestone_id",),
    }

    def __init__(self, iid: int) -> None:
        self.iid = iid
        opened = gitlab_issue("open", iid)
        attributes = opened["object_attributes"]
        self.fields = {
            "labels": opened["labels"],
            "assignees": opened.get("assignees", []),
            "title": attributes["title"],
            "milestone_id": attributes["milestone_id"],
        }

    def event(self, case: str, second: int) -> dict[str, Any]:
        payload = gitlab_issue(case, self.iid)
        attributes = payload["object_attributes"]
        for name in self.CHANGES.get(case, ()):
            source = payload if name in ("labels", "assignees") else attributes
            self.fields[name] = source.get(name, [])
        payload["labels"] = attributes["labels"] = self.fields["labels"]
        assignees = self.fields["assignees"]
        attributes["assignee_ids"] = [a.get("id", 0) for a in assignees]
        if assignees:
            payload["assignees"] = assignees
        else:
            # GitLab leaves the list out when nobody is assigned.
            payload.pop("assignees", None)
        attributes["title"] = self.fields["title"]
        attributes["milestone_id"] = self.fields["milestone_id"]
        return stamped(payload, second)


# --- GitHub -------------------------------------------------------------------------------


async def test_github_issue_actions_change_the_task_and_the_audit_log(senders: Senders) -> None:
    tracked = GitHubIssue(unique())
    issue, number = tracked.event, tracked.number

    # A hook configured for form-encoded deliveries: verified on the form, decoded after.
    opened = await senders.github(issue("opened", 0), form=True)
    assert (await senders.settled(opened))["content_type"] == "application/x-www-form-urlencoded"
    first = await senders.done(opened)
    task = await senders.task(first)
    hubot = await senders.user_id("github.hubot")
    assert (task.title, task.repository, task.assigned_to) == (
        "Saving a draft loses the attachments",
        "demo",
        hubot,
    )
    assert metadata(task) == {
        "origin": {
            "source": "github",
            "key": f"example/demo#{number}",
            "url": f"https://github.com/example/demo/issues/{number}",
        },
        "labels": ["bug"],
        "milestone": {"title": "v1.0", "number": 1.0},
    }

    # Labels, assignees, milestone, type and text follow the issue.
    for second, action in enumerate(("labeled", "unassigned"), start=1):
        assert await senders.done(await senders.github(issue(action, second))) == first
    task = await senders.task(first)
    assert (metadata(task)["labels"], task.assigned_to) == (["bug", "ui"], "")
    for second, action in enumerate(("assigned", "demilestoned", "typed", "edited"), start=3):
        assert await senders.done(await senders.github(issue(action, second))) == first
    task = await senders.task(first)
    assert task.assigned_to == hubot
    assert "milestone" not in metadata(task)
    assert metadata(task)["origin"]["type"] == "Bug"
    assert task.title == "Saving a draft loses attachments over 1 MB"

    # Pinning and locking change nothing a task holds: ignored, with the reason.
    for action in ("pinned", "locked"):
        reason = await senders.ignored(await senders.github(issue(action, 7)))
        assert f"GitHub issues action {action!r}:" in reason

    # Closing completes the task; no quality gate ran, and the audit log says so.
    assert await senders.done(await senders.github(issue("closed", 8))) == first
    assert await senders.completed_without_gate(first) == [
        "task_created",
        "task_assigned",
        "task_updated",
        "task_assigned",
        "task_assigned",
        "task_updated",
        "task_updated",
        "task_updated",
        "task_started",
        "task_completed",
    ]

    # Opened again after its task was completed: a new task (completed tasks are final).
    second = await senders.done(await senders.github(issue("reopened", 9)))
    assert second != first
    assert (await senders.task(second)).status == task_pb2.TASK_STATUS_PENDING
    assert (await senders.task(first)).status == task_pb2.TASK_STATUS_COMPLETED
    # A close that happened before that reopening, arriving late, undoes nothing.
    late = issue("closed", 8)
    late["issue"]["title"] = "late"
    reason = await senders.ignored(await senders.github(late))
    assert "is older than the state change applied already" in reason
    assert (await senders.task(second)).status == task_pb2.TASK_STATUS_PENDING
    # Closed as not planned: cancelled, with the reason in the audit log.
    not_planned = issue("closed", 10)
    not_planned["issue"]["state_reason"] = "not_planned"
    assert await senders.done(await senders.github(not_planned)) == second
    assert (await senders.task(second)).cancel_reason == "issue closed as not planned"
    cancelled = await senders.audit(second, until="task_cancelled")
    assert cancelled[-1][1]["reason"] == "issue closed as not planned"


async def test_a_second_opened_after_close_is_a_new_task_on_both_senders(
    senders: Senders,
) -> None:
    number, iid = unique(), unique()
    github_first = await senders.done(
        await senders.github(stamped(github_issue("opened", number), 0))
    )
    gitlab_first = await senders.done(await senders.gitlab(stamped(gitlab_issue("open", iid), 0)))
    await senders.done(await senders.github(stamped(github_issue("closed", number), 1)))
    await senders.done(await senders.gitlab(stamped(gitlab_issue("close", iid), 1)))
    again_github = stamped(github_issue("opened", number), 2)
    again_github["issue"]["title"] = "Opened again"
    again_gitlab = stamped(gitlab_issue("open", iid), 2)
    again_gitlab["object_attributes"]["title"] = "Opened again"
    github_second = await senders.done(await senders.github(again_github))
    gitlab_second = await senders.done(await senders.gitlab(again_gitlab))
    for first, second in ((github_first, github_second), (gitlab_first, gitlab_second)):
        assert second != first
        assert (await senders.task(first)).status == task_pb2.TASK_STATUS_COMPLETED
        assert (await senders.task(second)).title == "Opened again"
    # The original opened, redelivered late: older than the close, so no third task.
    stale = stamped(github_issue("opened", number), 0)
    stale["issue"]["body"] = "redelivered"
    assert "older than" in await senders.ignored(await senders.github(stale))


async def test_deleted_transferred_and_mirrored_issues(senders: Senders) -> None:
    # Deleted: the task is cancelled; a deleted issue never seen makes no task.
    number = unique()
    doomed = await senders.done(await senders.github(stamped(github_issue("opened", number), 0)))
    assert (
        await senders.done(await senders.github(stamped(github_issue("deleted", number), 1)))
        == doomed
    )
    assert (await senders.task(doomed)).cancel_reason == "issue deleted on GitHub"
    unseen = github_issue("deleted", unique())
    assert "has no task" in await senders.ignored(await senders.github(unseen))

    # Transferred to a configured repository: the task moves with the issue, whichever of the
    # two deliveries arrives first, and the destination's "opened" makes no second task.
    old, new = unique(), unique()
    opened = github_issue("opened", old, repository="example/demo-archive")
    moved = await senders.done(await senders.github(opened))
    assert (await senders.task(moved)).repository == "archive"
    transferred = github_issue("transferred", old, repository="example/demo-archive")
    transferred["changes"]["new_issue"]["number"] = new
    assert await senders.done(await senders.github(transferred)) == moved
    task = await senders.task(moved)
    assert task.repository == "demo"
    assert metadata(task)["origin"]["key"] == f"example/demo#{new}"
    arrived = github_issue("opened.transferred", new)
    arrived["changes"]["old_issue"]["number"] = old
    assert await senders.done(await senders.github(arrived)) == moved
    edited = github_issue("edited", new)
    assert await senders.done(await senders.github(edited)) == moved

    # Transferred somewhere not configured here: cancelled, saying where it went.
    away_number = unique()
    away = await senders.done(
        await senders.github(github_issue("opened", away_number, repository="example/demo-archive"))
    )
    gone = github_issue("transferred", away_number, repository="example/demo-archive")
    gone["changes"]["new_repository"]["full_name"] = "someone/else"
    await senders.done(await senders.github(gone))
    assert (await senders.task(away)).cancel_reason == (
        f"issue transferred to someone/else#{gone['changes']['new_issue']['number']}, "
        "which is not configured here"
    )

    # One repository, several senders' names: a mirror on GitHub and a second GitLab project.
    mirror = await senders.done(
        await senders.github(github_issue("opened", unique(), repository="example/demo-mirror"))
    )
    project = await senders.done(
        await senders.gitlab(gitlab_issue("open", unique(), project="mirrors/demo"))
    )
    assert {(await senders.task(t)).repository for t in (mirror, project)} == {"demo"}


# --- GitLab -------------------------------------------------------------------------------


async def test_gitlab_issue_actions_change_the_task_and_the_audit_log(senders: Senders) -> None:
    issue = GitLabIssue(unique()).event

    first = await senders.done(await senders.gitlab(issue("open", 0)))
    task = await senders.task(first)
    bob = await senders.user_id("gitlab.bob")
    assert (task.title, task.repository, task.assigned_to) == (
        "Saving a draft loses the attachments",
        "demo",
        bob,
    )
    assert metadata(task)["labels"] == ["bug"]
    assert metadata(task)["milestone"] == {"id": 4.0}
    for second, case in enumerate(("update.labels", "update.unassigned"), start=1):
        assert await senders.done(await senders.gitlab(issue(case, second))) == first
    task = await senders.task(first)
    assert (metadata(task)["labels"], task.assigned_to) == (["bug", "ui"], "")
    for second, case in enumerate(("update.assignees", "update.title"), start=3):
        assert await senders.done(await senders.gitlab(issue(case, second))) == first
    task = await senders.task(first)
    assert (task.assigned_to, task.title) == (bob, "Saving a draft loses attachments over 1 MB")
    # A change to a field tasks do not hold: the task stays as it is, nothing is recorded.
    assert await senders.done(await senders.gitlab(issue("update.weight", 5))) == first
    # A confidential issue's events come as "Confidential Issue Hook", handled alike.
    closed = await senders.gitlab(issue("close", 6), event="Confidential Issue Hook")
    assert await senders.done(closed) == first
    assert await senders.completed_without_gate(first) == [
        "task_created",
        "task_assigned",
        "task_updated",
        "task_assigned",
        "task_assigned",
        "task_updated",
        "task_started",
        "task_completed",
    ]
    # Reopened: a new task; closed as a duplicate: cancelled, saying of what.
    second = await senders.done(await senders.gitlab(issue("reopen", 7)))
    assert second != first
    assert await senders.done(await senders.gitlab(issue("close.duplicate", 8))) == second
    assert (await senders.task(second)).cancel_reason == (
        "issue closed as a duplicate (of GitLab issue id 9011)"
    )


# --- Standard Webhooks task events -----------------------------------------------------------


async def test_task_events_drive_a_task_exactly_once(senders: Senders) -> None:
    external = f"ops-{uuid.uuid4().hex[:12]}"
    # An update that arrives before the creation waits for it instead of being lost.
    update = await senders.standard(task_event("update", external))
    assert update.status_code == 202, update.text
    await asyncio.sleep(0.5)
    create_id = f"msg_{uuid.uuid4().hex}"
    # Svix's own header names: the same scheme as webhook-*.
    created = await senders.standard(
        task_event("create", external), prefix="svix", msg_id=create_id
    )
    assert created.status_code == 202, created.text
    # The same message again, under either header family: acknowledged, not processed again.
    for prefix in ("svix", "webhook"):
        again = await senders.standard(
            task_event("create", external), prefix=prefix, msg_id=create_id
        )
        assert_error(again, 200, "MHV-301")
    task_id = await senders.done(create_id)
    assert await senders.done(update.json()["delivery_id"]) == task_id
    task = await senders.task(task_id)
    assert (task.title, task.priority, task.repository) == (
        "Rotate the staging and test database passwords",
        task_pb2.PRIORITY_CRITICAL,
        "demo",
    )
    assert task.deadline.ToDatetime(dt.UTC) == dt.datetime(2031, 4, 1, 17, tzinfo=dt.UTC)
    assign = await senders.standard(task_event("assign", external))
    assert await senders.done(assign.json()["delivery_id"]) == task_id
    assert (await senders.task(task_id)).assigned_to == await senders.user_id("generic.dana")
    complete = await senders.standard(task_event("complete", external))
    assert await senders.done(complete.json()["delivery_id"]) == task_id
    completed = (await senders.audit(task_id, until="task_completed"))[-1][1]
    assert (completed["quality_gate_passed"], completed["checks_run"]) == (True, 2)

    # Cancelled with the sender's reason; completed without a gate: recorded as not run.
    cancelled_id, plain_id = f"ops-{uuid.uuid4().hex[:12]}", f"ops-{uuid.uuid4().hex[:12]}"
    for external_id in (cancelled_id, plain_id):
        made = await senders.standard(task_event("create", external_id))
        await senders.done(made.json()["delivery_id"])
    cancel = await senders.standard(task_event("cancel", cancelled_id))
    cancelled = await senders.task(await senders.done(cancel.json()["delivery_id"]))
    assert cancelled.cancel_reason == "Superseded by ops-ticket-1050"
    without_gate = task_event("complete", plain_id)
    del without_gate["data"]["quality_gate"]
    ungated = await senders.standard(without_gate)
    ungated_task = await senders.done(ungated.json()["delivery_id"])
    assert (await senders.completed_without_gate(ungated_task))[-2:] == [
        "task_started",
        "task_completed",
    ]


async def test_task_events_the_sender_must_correct_are_refused_and_others_ignored(
    senders: Senders,
) -> None:
    broken = task_event("create", "ops-broken", title="", repository="nowhere")
    refused = assert_error(await senders.standard(broken), 400, "MHV-003")
    assert refused["field_violations"] == [
        {"field": "data.title", "description": "must not be empty"},
        {
            "field": "data.repository",
            "description": "'nowhere' is not configured; configured: demo, archive",
        },
    ]
    conn = await asyncpg.connect(senders.deployment.admin_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM webhook.deliveries WHERE source = 'generic'"
            " AND body::text LIKE '%ops-broken%'"
        )
    finally:
        await conn.close()
    assert stored == 0
    other = await senders.standard(
        {"type": "invoice.paid", "timestamp": at(0), "data": {"id": "in_1"}}
    )
    assert other.status_code == 202, other.text
    reason = await senders.ignored(other.json()["delivery_id"])
    assert reason == "'invoice.paid' is not a task event: no task mapping"

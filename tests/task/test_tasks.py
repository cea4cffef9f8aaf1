"""TaskService through real gRPC against the real task-service process and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from tests.harness import mhv_code, rpc_error, violations
from tests.task.conftest import People, new_task

FUTURE = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()

ROUND_TRIP_TITLES = [
    "'; DROP TABLE tasks; --",
    "' OR '1'='1",
    "1' UNION SELECT * FROM users--",
    "'; EXEC xp_cmdshell('format c:'); --",
    "<script>alert('x')</script>",
    "Robert'); DROP TABLE students;--",
    "🚀 Ship it 👩‍💻🏳️‍🌈",
    "\u200fإصلاح الخلل في الواجهة\u200f",  # noqa: RUF001 - Arabic, with right-to-left marks
    "תקן את הבאג",
    "修复登录页面",
    "tab\there and\nnewline",
    "%s %d {0} ${x} $1 \\x00",
]


async def test_create_with_defaults(tasks: task_pb2_grpc.TaskServiceStub, people: People) -> None:
    task = await new_task(tasks, people.alice, title="Write the docs")
    assert task.id > 0
    assert task.title == "Write the docs"
    assert task.priority == task_pb2.PRIORITY_MEDIUM
    assert task.status == task_pb2.TASK_STATUS_PENDING
    assert task.created_by == people.alice.id
    assert task.etag
    assert task.create_time.ToDatetime() <= dt.datetime.now(dt.UTC).replace(tzinfo=None)
    fetched = await tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.viewer.md())
    assert fetched == task


@pytest.mark.parametrize("title", ROUND_TRIP_TITLES)
async def test_hostile_and_unicode_titles_round_trip_byte_for_byte(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection, title: str
) -> None:
    task = await new_task(tasks, people.alice, title=title, description=title)
    fetched = await tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.alice.md())
    assert fetched.title.encode() == title.encode()
    assert fetched.description.encode() == title.encode()
    stored = await db.fetchval("SELECT title FROM task.tasks WHERE id = $1", task.id)
    assert stored == title
    # The table survived, with everything in it.
    assert await db.fetchval("SELECT to_regclass('task.tasks') IS NOT NULL")
    assert await db.fetchval("SELECT count(*) FROM task.users") >= 5


async def test_control_characters_are_removed_and_ends_trimmed(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice, title="  \x00Fi\x07x\x1b it\x7f\x85  ")
    assert task.title == "Fix it"


async def test_every_violation_comes_back_at_once(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    before = await db.fetchval("SELECT count(*) FROM task.tasks")
    error = await rpc_error(
        tasks.CreateTask(
            task_pb2.CreateTaskRequest(
                title="\x00 \x01",
                repository="not a repo!",
                description="d" * 5001,
                deadline="2001-01-01T00:00:00Z",
                priority=99,
            ),
            metadata=people.alice.md(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mhv_code(error) == "MHV-003"
    assert set(violations(error)) == {"title", "repository", "description", "deadline", "priority"}
    assert "future" in violations(error)["deadline"]
    assert await db.fetchval("SELECT count(*) FROM task.tasks") == before


@pytest.mark.parametrize(
    ("deadline", "words"),
    [("tomorrow", "ISO 8601"), ("2030-13-45T00:00:00", "ISO 8601"), ("2000-01-01", "future")],
)
async def test_deadline_rules(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, deadline: str, words: str
) -> None:
    error = await rpc_error(new_task(tasks, people.alice, deadline=deadline))
    assert words in violations(error)["deadline"]


async def test_deadline_without_offset_is_utc(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice, deadline="2031-02-03T04:05:06")
    assert task.deadline.ToDatetime() == dt.datetime(2031, 2, 3, 4, 5, 6)


async def test_unconfigured_repository_is_mhv200_with_recovery(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    error = await rpc_error(new_task(tasks, people.alice, repository="not-configured"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert mhv_code(error) == "MHV-200"
    assert "settings/repos.yaml" in violations(error)["repository"]


async def test_request_id_makes_create_idempotent_under_concurrency(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    request_id = str(uuid.uuid4())
    request = task_pb2.CreateTaskRequest(
        title="Once only", repository="demo", request_id=request_id
    )
    results = await asyncio.gather(
        *(tasks.CreateTask(request, metadata=people.alice.md()) for _ in range(20))
    )
    assert len({t.id for t in results}) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM task.tasks WHERE request_key = $1",
            # Caller, then the user it acts for (the same for a person), then the id.
            f"{people.alice.id}:{people.alice.id}:{request_id}",
        )
        == 1
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM task.outbox WHERE task_id = $1 AND event_type = 'task_created'",
            results[0].id,
        )
        == 1
    )
    # A later retry still answers with the first result...
    again = await tasks.CreateTask(request, metadata=people.alice.md())
    assert again == results[0]
    # ...but reusing the id for a different request is refused.
    different = task_pb2.CreateTaskRequest(title="Other", repository="demo", request_id=request_id)
    error = await rpc_error(tasks.CreateTask(different, metadata=people.alice.md()))
    # Retrying cannot help, so not ABORTED: the caller must choose a new id.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mhv_code(error) == "MHV-003"
    assert violations(error) == {"request_id": "already used for a different request"}
    # Request ids are scoped to the caller: Bob's same id is his own.
    bobs = await tasks.CreateTask(request, metadata=people.bob.md())
    assert bobs.id != results[0].id


async def test_update_with_field_mask(tasks: task_pb2_grpc.TaskServiceStub, people: People) -> None:
    task = await new_task(
        tasks, people.alice, description="old text", priority=task_pb2.PRIORITY_LOW
    )
    meta = struct_pb2.Struct()
    meta.update({"labels": ["infra"], "points": 3})
    change = task_pb2.Task(
        id=task.id,
        title="New title",
        description="",
        priority=task_pb2.PRIORITY_HIGH,
        metadata=meta,
        etag=task.etag,
    )
    updated = await tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=change,
            update_mask=field_mask_pb2.FieldMask(paths=["title", "description", "metadata"]),
        ),
        metadata=people.alice.md(),
    )
    assert updated.title == "New title"
    assert updated.description == ""
    assert updated.priority == task_pb2.PRIORITY_LOW  # not in the mask: unchanged
    assert dict(updated.metadata) == {"labels": ["infra"], "points": 3.0}
    assert updated.etag != task.etag


async def test_update_mask_errors(tasks: task_pb2_grpc.TaskServiceStub, people: People) -> None:
    task = await new_task(tasks, people.alice)
    for paths, field in (
        (["status"], "update_mask.paths[0]"),
        ([], "update_mask"),
        (["title"], "task.title"),
    ):
        error = await rpc_error(
            tasks.UpdateTask(
                task_pb2.UpdateTaskRequest(
                    task=task_pb2.Task(id=task.id, title=""),
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                ),
                metadata=people.alice.md(),
            )
        )
        assert mhv_code(error) == "MHV-003"
        assert field in violations(error)


async def test_update_moves_a_task_to_another_configured_repository(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice)
    assert task.repository == "demo"

    def move(to: str) -> task_pb2.UpdateTaskRequest:
        return task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, repository=to),
            update_mask=field_mask_pb2.FieldMask(paths=["repository"]),
        )

    moved = await tasks.UpdateTask(move("mahavishnu"), metadata=people.alice.md())
    assert moved.repository == "mahavishnu"
    error = await rpc_error(tasks.UpdateTask(move("elsewhere"), metadata=people.alice.md()))
    assert mhv_code(error) == "MHV-200"
    assert "task.repository" in violations(error)
    again = await tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.alice.md())
    assert again.repository == "mahavishnu"


async def test_concurrent_updates_with_the_same_etag_one_wins(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    task = await new_task(tasks, people.alice)

    def update(title: str) -> task_pb2.UpdateTaskRequest:
        return task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, title=title, etag=task.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        )

    results = await asyncio.gather(
        tasks.UpdateTask(update("first"), metadata=people.alice.md()),
        tasks.UpdateTask(update("second"), metadata=people.alice.md()),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, task_pb2.Task)]
    losses = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].code() == grpc.StatusCode.ABORTED
    assert mhv_code(losses[0]) == "MHV-102"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM task.outbox WHERE task_id = $1 AND event_type = 'task_updated'",
            task.id,
        )
        == 1
    )


async def test_get_missing_task_is_not_found(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    error = await rpc_error(
        tasks.GetTask(task_pb2.GetTaskRequest(id=10**15), metadata=people.viewer.md())
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert mhv_code(error) == "MHV-100"


async def test_delete(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    task = await new_task(tasks, people.alice, description="private notes")
    stale = await rpc_error(
        tasks.DeleteTask(
            task_pb2.DeleteTaskRequest(id=task.id, etag="stale"), metadata=people.admin.md()
        )
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    await tasks.DeleteTask(
        task_pb2.DeleteTaskRequest(id=task.id, etag=task.etag), metadata=people.admin.md()
    )
    gone = await rpc_error(
        tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.admin.md())
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    details = await db.fetchval(
        "SELECT details FROM task.outbox WHERE task_id = $1 AND event_type = 'task_deleted'",
        task.id,
    )
    assert '"description": "[REDACTED (13 characters)]"' in details


async def test_assign_rules(
    tasks: task_pb2_grpc.TaskServiceStub, users: task_pb2_grpc.UserServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice)
    assigned = await tasks.AssignTask(
        task_pb2.AssignTaskRequest(id=task.id, assigned_to=people.bob.id),
        metadata=people.alice.md(),
    )
    assert assigned.assigned_to == people.bob.id
    # Bob may now change it; the assignee is one of the people allowed to.
    started = await tasks.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=people.bob.md())
    assert started.status == task_pb2.TASK_STATUS_IN_PROGRESS
    unassigned = await tasks.AssignTask(
        task_pb2.AssignTaskRequest(id=task.id), metadata=people.alice.md()
    )
    assert unassigned.assigned_to == ""
    nobody = await rpc_error(
        tasks.AssignTask(
            task_pb2.AssignTaskRequest(id=task.id, assigned_to=str(uuid.uuid4())),
            metadata=people.alice.md(),
        )
    )
    assert (nobody.code(), mhv_code(nobody)) == (grpc.StatusCode.NOT_FOUND, "MHV-110")
    bad = await rpc_error(
        tasks.AssignTask(
            task_pb2.AssignTaskRequest(id=task.id, assigned_to="not-a-uuid"),
            metadata=people.alice.md(),
        )
    )
    assert "assigned_to" in violations(bad)


async def test_list_filters(tasks: task_pb2_grpc.TaskServiceStub, people: People) -> None:
    marker = uuid.uuid4().hex
    high = await new_task(
        tasks,
        people.alice,
        title=f"{marker} high",
        repository="mahavishnu",
        priority=task_pb2.PRIORITY_CRITICAL,
        assigned_to=people.bob.id,
    )
    await new_task(tasks, people.alice, title=f"{marker} low", repository="mahavishnu")
    page = await tasks.ListTasks(
        task_pb2.ListTasksRequest(
            repository="mahavishnu",
            priority=task_pb2.PRIORITY_CRITICAL,
            assigned_to=people.bob.id,
            status=task_pb2.TASK_STATUS_PENDING,
        ),
        metadata=people.viewer.md(),
    )
    assert high.id in [t.id for t in page.tasks]
    assert all(t.priority == task_pb2.PRIORITY_CRITICAL for t in page.tasks)
    assert all(t.assigned_to == people.bob.id for t in page.tasks)


async def test_page_walk_while_inserting_skips_and_repeats_nothing(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    repository = "demo"
    existing: set[int] = set()
    for i in range(17):
        existing.add((await new_task(tasks, people.alice, title=f"walk {i}")).id)
    seen: list[int] = []
    token = ""
    filters = {"repository": repository, "status": task_pb2.TASK_STATUS_PENDING}
    inserted: list[int] = []
    while True:
        page = await tasks.ListTasks(
            task_pb2.ListTasksRequest(page_size=4, page_token=token, **filters),
            metadata=people.viewer.md(),
        )
        seen.extend(t.id for t in page.tasks)
        # New tasks arrive between pages.
        inserted.append((await new_task(tasks, people.alice, title="arrived mid-walk")).id)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)), "a task was repeated"
    assert existing <= set(seen), "a task was skipped"
    assert not set(inserted) & set(seen), (
        "tasks newer than the walk's start appear only on a new walk"
    )


async def test_changed_filter_with_old_token_is_invalid(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    for _ in range(3):
        await new_task(tasks, people.alice)
    page = await tasks.ListTasks(
        task_pb2.ListTasksRequest(page_size=1, repository="demo"), metadata=people.viewer.md()
    )
    assert page.next_page_token
    for request in (
        task_pb2.ListTasksRequest(
            page_size=1, repository="mahavishnu", page_token=page.next_page_token
        ),
        task_pb2.ListTasksRequest(page_size=1, repository="demo", page_token="garbage!"),
    ):
        error = await rpc_error(tasks.ListTasks(request, metadata=people.viewer.md()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert mhv_code(error) == "MHV-011"


async def test_page_size_bounds(tasks: task_pb2_grpc.TaskServiceStub, people: People) -> None:
    error = await rpc_error(
        tasks.ListTasks(task_pb2.ListTasksRequest(page_size=-1), metadata=people.viewer.md())
    )
    assert "page_size" in violations(error)
    page = await tasks.ListTasks(
        task_pb2.ListTasksRequest(page_size=10_000), metadata=people.viewer.md()
    )
    assert len(page.tasks) <= 100


async def test_forged_page_tokens_and_nul_reasons_are_client_errors(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    import base64
    import hashlib
    import json as _json

    def forged(position: dict) -> str:
        # The same encoding the server uses, with the filter digest of "no filters".
        filters = {"repository": None, "status": None, "priority": None, "assigned_to": None}
        digest = hashlib.sha256(
            _json.dumps(filters, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:16]
        body = _json.dumps({"f": digest, "p": position}, separators=(",", ":"))
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    for position in ({"before_id": "x"}, {"before_id": 2**70}, {"before_id": None}, {}):
        error = await rpc_error(
            tasks.ListTasks(
                task_pb2.ListTasksRequest(page_token=forged(position)), metadata=people.viewer.md()
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, position
        assert mhv_code(error) == "MHV-011"
    task = await new_task(tasks, people.alice)
    blocked = await tasks.BlockTask(
        task_pb2.BlockTaskRequest(id=task.id, reason="wait\x00ing"), metadata=people.alice.md()
    )
    assert blocked.blocked_reason == "waiting"

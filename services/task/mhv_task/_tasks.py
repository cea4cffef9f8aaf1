"""The task domain: creation, reads, updates, lifecycle, search, each change with its event.

Every mutation writes its audit event to the outbox in the same transaction (often the same
statement), so an event exists exactly once per committed change and never for a rolled-back
one.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import grpc
from prometheus_client import Counter, Histogram

from mhv_common import context, paging
from mhv_common.config import RepositoryCatalog
from mhv_common.db import Database
from mhv_common.errors import (
    FieldViolation,
    MahavishnuError,
    RepositoryNotFoundError,
    TaskCreationFailedError,
    TaskNotFoundError,
    TaskUpdateFailedError,
    UserInactiveError,
    UserNotFoundError,
    ValidationError,
)
from mhv_common.redaction import redact_details
from mhv_common.tracing import current_traceparent
from mhv_task import _store as store
from mhv_task._authz import ActiveUsers, Actor, actor_for_change, ensure_can_change
from mhv_task._lifecycle import Action, Status, check, target
from mhv_task._models import (
    UPDATABLE_FIELDS,
    FTSSearchQuery,
    TaskChanges,
    TaskCreateRequest,
    validate,
)

TASK_CREATION_TOTAL = Counter(
    "task_creation_total", "CreateTask calls by outcome.", ["repository", "status"]
)
TASK_CREATION_DURATION = Histogram(
    "task_creation_duration_seconds",
    "CreateTask latency, from validation to commit.",
    ["repository"],
    buckets=(0.05, 0.1, 0.5, 1.0, 5.0),
)
SEMANTIC_SEARCH_TOTAL = Counter(
    "semantic_search_total", "SearchTasks calls by outcome.", ["status"]
)
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
UNKNOWN_REPOSITORY_LABEL = "_unknown"


def outcome(exc: BaseException | None) -> str:
    """``success``, ``rejected`` (the caller's fault) or ``error`` (ours), for metrics."""
    if exc is None:
        return "success"
    if isinstance(exc, MahavishnuError) and exc.grpc_status not in _SERVER_FAULTS:
        return "rejected"
    return "error"


def etag_of(row: Mapping[str, Any]) -> str:
    """The opaque etag of a task version."""
    raw = f"{row['id']}/{row['version']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _check_etag(row: Mapping[str, Any], etag: str) -> None:
    if etag and etag != etag_of(row):
        raise TaskUpdateFailedError(f"Task {row['id']} changed since you read it (stale etag).")


def _snapshot(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "title": row["title"],
        "description": row["description"],
        "repository": row["repository"],
        "priority": row["priority"],
        "status": row["status"],
        "deadline": row["deadline"].isoformat() if row["deadline"] else None,
        "created_by": str(row["created_by"]),
        "assigned_to": str(row["assigned_to"]) if row["assigned_to"] else None,
        "metadata": row["metadata"],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _request_context() -> tuple[str, str]:
    ctx = context.current()
    return (ctx.request_id if ctx else ""), current_traceparent()


class Tasks:
    """Task operations for the edge to call.

    Args:
        db: The task service's pool.
        repositories: Repositories tasks may be filed against.
    """

    def __init__(self, db: Database, repositories: RepositoryCatalog, active: ActiveUsers) -> None:
        self._db = db
        self._repos = repositories
        self._active = active
        # Every known label combination at zero (docs/sre/metrics.md).
        for repository in [*repositories.names(), UNKNOWN_REPOSITORY_LABEL]:
            TASK_CREATION_DURATION.labels(repository)
            for status in ("success", "rejected", "error"):
                TASK_CREATION_TOTAL.labels(repository, status)
        for status in ("success", "rejected", "error"):
            SEMANTIC_SEARCH_TOTAL.labels(status)

    # --- create -------------------------------------------------------------------------

    async def create(self, data: Mapping[str, Any]) -> asyncpg.Record:
        """Validate and create a task (idempotent by request_id, AIP-155)."""
        started = time.perf_counter()
        label = UNKNOWN_REPOSITORY_LABEL
        if self._repos.get(str(data.get("repository", ""))) is not None:
            label = str(data["repository"])
        error: BaseException | None = None
        try:
            return await self._create(data)
        except BaseException as exc:
            error = exc
            raise
        finally:
            TASK_CREATION_TOTAL.labels(label, outcome(error)).inc()
            TASK_CREATION_DURATION.labels(label).observe(time.perf_counter() - started)

    def _validate_create(self, data: Mapping[str, Any]) -> TaskCreateRequest:
        repository = str(data.get("repository", ""))
        unknown = self._repos.get(repository) is None
        try:
            request = validate(TaskCreateRequest, dict(data))
        except ValidationError as exc:
            violations = list(exc.violations)
            if unknown and not any(v.field == "repository" for v in violations):
                violations.append(FieldViolation("repository", self._unknown_repo(repository)))
            raise ValidationError(violations=violations) from None
        if unknown:
            raise RepositoryNotFoundError(
                f"Repository {repository!r} is not configured.",
                violations=[FieldViolation("repository", self._unknown_repo(repository))],
            )
        return request

    def _unknown_repo(self, name: str) -> str:
        known = ", ".join(self._repos.names()[:10])
        return f"{name!r} is not in settings/repos.yaml (configured: {known})"

    async def _create(self, data: Mapping[str, Any]) -> asyncpg.Record:
        request = self._validate_create(data)
        actor = actor_for_change()
        key = fingerprint = None
        if request.request_id:
            # Per caller and, for a service, per user it acts for: the gateway's request ids
            # for two people never collide into one task.
            key = f"{actor.principal.subject}:{actor.user_id}:{request.request_id}"
            body = request.model_dump(mode="json", exclude={"request_id"})
            fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        request_id, traceparent = _request_context()
        details = redact_details(
            {
                "title": request.title,
                "description": request.description,
                "repository": request.repository,
                "priority": request.priority,
                "status": Status.PENDING.value,
                "deadline": request.deadline.isoformat() if request.deadline else None,
                "assigned_to": str(request.assigned_to) if request.assigned_to else None,
                "metadata": request.metadata,
            }
        )
        async with self._db.connection() as conn:
            row = await store.insert_task(
                conn,
                created_by=actor.user_id,
                assigned_to=request.assigned_to,
                title=request.title,
                description=request.description,
                repository=request.repository,
                priority=request.priority,
                deadline=request.deadline,
                metadata=request.metadata,
                request_key=key,
                request_fingerprint=fingerprint,
                event_details=details,
                request_id=request_id,
                traceparent=traceparent,
            )
            if row is not None:
                return row
            # Nothing inserted: find out why, most likely first.
            if key is not None:
                existing = await store.task_by_request_key(conn, key)
                if existing is not None:
                    if existing["request_fingerprint"] != fingerprint:
                        # Retrying cannot help (AIP-155): the caller must pick a new id.
                        raise ValidationError(
                            f"request_id {request.request_id!r} was already used for a "
                            "different request; use a new request_id for a new task.",
                            violations=[
                                FieldViolation("request_id", "already used for a different request")
                            ],
                        )
                    return existing
            await _ensure_active(conn, actor.user_id, field="caller")
            if request.assigned_to is not None:
                await _ensure_active(conn, request.assigned_to, field="assigned_to")
        # The author and assignee were fine a moment ago: a concurrent change raced us.
        raise TaskCreationFailedError("The task could not be created; retry the request.")

    # --- reads --------------------------------------------------------------------------

    async def get(self, task_id: int) -> asyncpg.Record:
        """One task."""
        await self._active.ensure_caller_active()
        async with self._db.connection() as conn:
            row = await store.get_task(conn, task_id)
        if row is None:
            raise TaskNotFoundError(f"Task {task_id} does not exist.")
        return row

    async def list(
        self, filters: Mapping[str, Any], *, page_size: int, page_token: str
    ) -> tuple[Sequence[asyncpg.Record], str]:
        """A page of tasks, newest first, and the next page's token ("" on the last page)."""
        await self._active.ensure_caller_active()
        size = paging.page_size(page_size)
        position = paging.decode_token(page_token, filters=filters, fields={"before_id": int})
        before = int(position["before_id"]) if position else None
        async with self._db.connection() as conn:
            rows = await store.list_tasks(conn, filters=filters, before_id=before, limit=size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = paging.encode_token({"before_id": rows[-1]["id"]}, filters=filters)
        return rows, token

    async def search(
        self, query: str, filters: Mapping[str, Any], *, page_size: int, page_token: str
    ) -> tuple[Sequence[asyncpg.Record], str]:
        """Ranked full-text matches and the next page's token."""
        error: BaseException | None = None
        try:
            await self._active.ensure_caller_active()
            q = validate(FTSSearchQuery, {"query": query})
            size = paging.page_size(page_size)
            scope = {**filters, "query": q.query}
            position = paging.decode_token(
                page_token, filters=scope, fields={"rank": float, "id": int}
            )
            after = (float(position["rank"]), int(position["id"])) if position else None
            async with self._db.connection() as conn:
                rows = await store.search_tasks(
                    conn, query=q.query, filters=filters, after=after, limit=size + 1
                )
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                last = rows[-1]
                token = paging.encode_token(
                    {"rank": float(last["rank"]), "id": last["id"]}, filters=scope
                )
            return rows, token
        except BaseException as exc:
            error = exc
            raise
        finally:
            SEMANTIC_SEARCH_TOTAL.labels(outcome(error)).inc()

    # --- changes ------------------------------------------------------------------------

    async def update(
        self, task_id: int, *, etag: str, paths: Sequence[str], values: Mapping[str, Any]
    ) -> asyncpg.Record:
        """Change the fields named in `paths` (the field mask) to `values`."""
        violations = [
            FieldViolation(
                f"update_mask.paths[{i}]",
                f"{p!r} cannot be updated; updatable: {', '.join(UPDATABLE_FIELDS)}",
            )
            for i, p in enumerate(paths)
            if p not in UPDATABLE_FIELDS
        ]
        if not paths:
            violations.append(FieldViolation("update_mask", "must name at least one field"))
        if violations:
            raise ValidationError(violations=violations)
        changes = validate(TaskChanges, {p: values.get(p) for p in paths}, prefix="task.")
        new_values = {p: getattr(changes, p) for p in paths}
        if "priority" in new_values and new_values["priority"] is None:
            new_values["priority"] = "medium"
        if "metadata" in new_values and new_values["metadata"] is None:
            new_values["metadata"] = {}
        if "title" in new_values and new_values["title"] is None:
            raise ValidationError(violations=[FieldViolation("task.title", "must not be empty")])

        def plan(row: Mapping[str, Any]) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
            check(Action.UPDATE, Status(row["status"]))
            diff = {
                p: {"old": _jsonable(row[p]), "new": _jsonable(v)}
                for p, v in new_values.items()
                if row[p] != v
            }
            if not diff:
                # Nothing changes: no new version (the etag stays valid) and no event.
                return {}, None, {}
            return new_values, "task_updated", diff

        return await self._change(task_id, etag, plan)

    async def assign(
        self, task_id: int, *, etag: str, assignee: uuid.UUID | None
    ) -> asyncpg.Record:
        """Assign the task to an active user, or unassign it (None)."""

        def plan(row: Mapping[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
            check(Action.ASSIGN, Status(row["status"]))
            previous = row["assigned_to"]
            return (
                {"assigned_to": assignee},
                "task_assigned",
                {"assigned_to": _jsonable(assignee), "previous": _jsonable(previous)},
            )

        return await self._change(task_id, etag, plan, assignee=assignee)

    async def transition(
        self,
        action: Action,
        task_id: int,
        *,
        etag: str,
        reason: str = "",
        quality_gate: Mapping[str, Any] | None = None,
    ) -> asyncpg.Record:
        """Move the task through its lifecycle (start, complete, cancel, block, unblock)."""

        def plan(row: Mapping[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
            current = Status(row["status"])
            check(action, current)
            before = Status(row["status_before_block"]) if row["status_before_block"] else None
            new = target(action, current, before)
            now = dt.datetime.now(dt.UTC)
            changes: dict[str, Any] = {"status": new.value}
            details: dict[str, Any] = {"status": {"old": current.value, "new": new.value}}
            if action == Action.START:
                changes["started_at"] = now
            elif action == Action.COMPLETE:
                gate = dict(quality_gate or {"passed": False, "checks_run": 0, "checks": []})
                changes.update(completed_at=now, quality_gate=gate)
                details.update(
                    quality_gate_passed=bool(gate.get("passed")),
                    checks_run=int(gate.get("checks_run", 0)),
                )
            elif action == Action.CANCEL:
                changes.update(
                    cancel_reason=reason or None, status_before_block=None, blocked_reason=None
                )
                details["reason"] = reason
            elif action == Action.BLOCK:
                changes.update(blocked_reason=reason or None, status_before_block=current.value)
                details["reason"] = reason
            elif action == Action.UNBLOCK:
                changes.update(blocked_reason=None, status_before_block=None)
            return changes, f"task_{_PAST[action]}", details

        return await self._change(task_id, etag, plan)

    async def delete(self, task_id: int, *, etag: str) -> None:
        """Delete a task (administrators only, by method policy)."""
        actor = actor_for_change()
        request_id, traceparent = _request_context()
        async with self._db.transaction() as conn:
            row = await store.get_task(conn, task_id, for_update=True)
            if row is None:
                raise TaskNotFoundError(f"Task {task_id} does not exist.")
            _check_etag(row, etag)
            await _ensure_active(conn, actor.user_id, field="caller")
            details = redact_details(_snapshot(row))
            await store.delete_task(
                conn, task_id, event=(actor.user_id, details, request_id, traceparent)
            )

    async def _change(
        self,
        task_id: int,
        etag: str,
        plan: Any,
        *,
        assignee: uuid.UUID | None = None,
    ) -> asyncpg.Record:
        actor: Actor = actor_for_change()
        request_id, traceparent = _request_context()
        async with self._db.transaction() as conn:
            row = await store.get_task(conn, task_id, for_update=True)
            if row is None:
                raise TaskNotFoundError(f"Task {task_id} does not exist.")
            ensure_can_change(actor, created_by=row["created_by"], assigned_to=row["assigned_to"])
            _check_etag(row, etag)
            changes, event_type, details = plan(row)
            await _ensure_active(conn, actor.user_id, field="caller")
            if event_type is None:
                return row
            if assignee is not None:
                # Locked: a deactivation or deletion of the assignee waits for this commit.
                await _ensure_active(conn, assignee, field="assigned_to", lock=True)
            return await store.update_task(
                conn,
                task_id,
                changes,
                event=(event_type, actor.user_id, redact_details(details), request_id, traceparent),
            )


_PAST = {
    Action.START: "started",
    Action.COMPLETE: "completed",
    Action.CANCEL: "cancelled",
    Action.BLOCK: "blocked",
    Action.UNBLOCK: "unblocked",
}


async def _ensure_active(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, field: str, lock: bool = False
) -> None:
    state = await store.user_state(conn, user_id, lock=lock)
    who = "Your user" if field == "caller" else f"User {user_id}"
    if state is None:
        raise UserNotFoundError(
            f"{who} does not exist.",
            violations=[] if field == "caller" else [FieldViolation(field, "no such user")],
        )
    if not state:
        raise UserInactiveError(
            f"{who} is deactivated.",
            violations=[] if field == "caller" else [FieldViolation(field, "user is deactivated")],
        )


def parse_task_id(value: int) -> int:
    """Check a task id from a request."""
    if value <= 0:
        raise ValidationError(violations=[FieldViolation("id", "must be a positive task id")])
    return value

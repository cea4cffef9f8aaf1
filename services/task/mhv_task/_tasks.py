"""The task domain: creation, reads, updates, lifecycle, search, each change with its event.

Every method takes a validated request (`mhv_task._models`) and returns domain objects, or
raises a catalog error. Every mutation writes its audit event (`mhv_task._events`) to the outbox
in the same transaction (often the same statement), so an event exists exactly once per
committed change and never for a rolled-back one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from mhv_common import paging
from mhv_common.config import RepositoryCatalog
from mhv_common.context import time_left
from mhv_common.db import Database
from mhv_common.errors import (
    FieldViolation,
    RepositoryNotFoundError,
    TaskCreationFailedError,
    TaskNotFoundError,
    TaskUpdateFailedError,
    ValidationError,
)
from mhv_task import _events as events
from mhv_task import _lifecycle as lifecycle
from mhv_task import _store as store
from mhv_task._authz import (
    ActiveUsers,
    Actor,
    actor_for_change,
    ensure_can_change,
    ensure_user_active,
)
from mhv_task._events import OutboxEvent
from mhv_task._lifecycle import Action
from mhv_task._models import (
    FTSSearchQuery,
    Page,
    SearchHit,
    SearchMode,
    SearchPage,
    Task,
    TaskAssignRequest,
    TaskCreateRequest,
    TaskListRequest,
    TaskRef,
    TaskTransitionRequest,
    TaskUpdateRequest,
    unknown_repository,
)
from mhv_task._semantic import SemanticSearch

# What a change writes, given the locked task: columns -> new values, and its event (None:
# nothing changes, so nothing is written and the version stays).
Plan = Callable[[Task, Actor], tuple[dict[str, Any], OutboxEvent | None]]


def _check_etag(task: Task, etag: str) -> None:
    if etag and etag != task.etag:
        raise TaskUpdateFailedError(f"Task {task.id} changed since you read it (stale etag).")


def _not_found(task_id: int) -> TaskNotFoundError:
    return TaskNotFoundError(f"Task {task_id} does not exist.")


class Tasks:
    """Task operations for the edge to call.

    Whether a person's user is still active is checked by the edge for every call
    (`mhv_common.revocation`), and again, in the change's transaction, for every change.

    Args:
        db: The task service's pool.
        repositories: Repositories tasks may be filed against.
        active: The cache of callers known to be active users.
        semantic: Semantic and hybrid search.
    """

    def __init__(
        self,
        db: Database,
        repositories: RepositoryCatalog,
        active: ActiveUsers,
        semantic: SemanticSearch,
    ) -> None:
        self._db = db
        self._repos = repositories
        self._active = active
        self._semantic = semantic

    def _check_configured(self, name: str, *, field: str) -> None:
        if self._repos.get(name) is None:
            raise RepositoryNotFoundError(
                f"Repository {name!r} is not configured.",
                violations=[FieldViolation(field, unknown_repository(self._repos, name))],
            )

    # --- create -------------------------------------------------------------------------

    async def create(self, request: TaskCreateRequest) -> Task:
        """Create a task (idempotent by request_id, AIP-155).

        Raises:
            RepositoryNotFoundError: The repository is not configured (MHV-200).
            ValidationError: The request_id was used for a different request, or a service
                named no user to act for (MHV-003).
            UserNotFoundError, UserInactiveError: The author or assignee cannot take the task.
        """
        self._check_configured(request.repository, field="repository")
        actor = actor_for_change()
        key = fingerprint = None
        if request.request_id:
            # Per caller and, for a service, per user it acts for: the gateway's request ids
            # for two people never collide into one task.
            key = f"{actor.principal.subject}:{actor.user_id}:{request.request_id}"
            fingerprint = request.fingerprint()
        event = events.task_created(actor.user_id, request)
        async with self._db.connection() as conn:
            task = await store.insert_task(
                conn,
                request,
                event=event,
                request_key=key,
                request_fingerprint=fingerprint,
                timeout=time_left(),
            )
            if task is not None:
                return task
            # Nothing inserted: find out why, most likely first.
            if key is not None:
                existing = await store.task_by_request_key(conn, key, timeout=time_left())
                if existing is not None:
                    if existing[1] != fingerprint:
                        # Retrying cannot help (AIP-155): the caller must pick a new id.
                        raise ValidationError(
                            f"request_id {request.request_id!r} was already used for a "
                            "different request; use a new request_id for a new task.",
                            violations=[
                                FieldViolation("request_id", "already used for a different request")
                            ],
                        )
                    return existing[0]
            await ensure_user_active(conn, actor.user_id, field="caller")
            if request.assigned_to is not None:
                await ensure_user_active(conn, request.assigned_to, field="assigned_to")
        # The author and assignee were fine a moment ago: a concurrent change raced us.
        raise TaskCreationFailedError("The task could not be created; retry the request.")

    # --- reads --------------------------------------------------------------------------

    async def get(self, request: TaskRef) -> Task:
        """One task."""
        async with self._db.connection() as conn:
            task = await store.get_task(conn, request.id, timeout=time_left())
        if task is None:
            raise _not_found(request.id)
        return task

    async def list(self, request: TaskListRequest) -> Page[Task]:
        """A page of tasks, newest first, and the next page's token ("" on the last page)."""
        filters = request.filters()
        size = paging.page_size(request.page_size)
        position = paging.decode_token(
            request.page_token, filters=filters, fields={"before_id": int}
        )
        before = int(position["before_id"]) if position else None
        async with self._db.connection() as conn:
            tasks = await store.list_tasks(
                conn, filters=filters, before_id=before, limit=size + 1, timeout=time_left()
            )
        token = ""
        if len(tasks) > size:
            tasks = tasks[:size]
            token = paging.encode_token({"before_id": tasks[-1].id}, filters=filters)
        return Page(tasks, token)

    def resolve_search_mode(self, mode: SearchMode | int | None) -> SearchMode | None:
        """The mode a search asking for `mode` runs in (None: an unknown mode, refused later)."""
        if isinstance(mode, int) and not isinstance(mode, SearchMode):
            return None
        return self._semantic.resolve(mode)

    async def search(self, request: FTSSearchQuery) -> SearchPage:
        """A page of results in the requested mode (unspecified: hybrid where available).

        Raises:
            SemanticSearchUnavailableError: Semantic or hybrid without pgvector (MHV-118).
            QueryEmbeddingFailedError: The query could not be embedded (MHV-119).
        """
        await self._active.ensure_caller_active()
        mode = self._semantic.resolve(request.mode)
        if mode is not SearchMode.KEYWORD:
            return await self._semantic.search(request, mode)
        filters = request.filters()
        size = paging.page_size(request.page_size)
        scope = {**filters, "query": request.query}
        position = paging.decode_token(
            request.page_token, filters=scope, fields={"rank": float, "id": int}
        )
        after = (float(position["rank"]), int(position["id"])) if position else None
        async with self._db.connection() as conn:
            found = await store.search_tasks(
                conn,
                query=request.query,
                filters=filters,
                after=after,
                limit=size + 1,
                timeout=time_left(),
            )
        token = ""
        if len(found) > size:
            found = found[:size]
            last, rank = found[-1]
            token = paging.encode_token({"rank": rank, "id": last.id}, filters=scope)
        hits = [
            SearchHit(task, rank, score=rank, matched=(SearchMode.KEYWORD,)) for task, rank in found
        ]
        return SearchPage(hits, token, SearchMode.KEYWORD)

    # --- changes ------------------------------------------------------------------------

    async def update(self, ref: TaskRef, decode: Callable[[], TaskUpdateRequest]) -> Task:
        """Change the fields the mask names; a change to nothing writes nothing.

        `decode` validates the caller's content; it runs only once the caller may change the
        task, so a caller without rights is refused whatever the body holds.

        Raises:
            RepositoryNotFoundError: A new repository is not configured (MHV-200).
        """

        def plan(task: Task, actor: Actor) -> tuple[dict[str, Any], OutboxEvent | None]:
            values = decode().changes()
            if "repository" in values:
                self._check_configured(values["repository"], field="task.repository")
            lifecycle.check(Action.UPDATE, task.status)
            diff = events.field_changes(task, values)
            if not diff:
                # Nothing changes: no new version (the etag stays valid) and no event.
                return {}, None
            return values, events.task_updated(actor.user_id, diff)

        return await self._change(ref, plan)

    async def assign(self, ref: TaskRef, decode: Callable[[], TaskAssignRequest]) -> Task:
        """Assign the task to an active user, or unassign it (None)."""

        def plan(task: Task, actor: Actor) -> tuple[dict[str, Any], OutboxEvent | None]:
            assignee = decode().assigned_to
            lifecycle.check(Action.ASSIGN, task.status)
            event = events.task_assigned(
                actor.user_id, assigned_to=assignee, previous=task.assigned_to
            )
            return {"assigned_to": assignee}, event

        return await self._change(ref, plan)

    async def transition(
        self, action: Action, ref: TaskRef, decode: Callable[[], TaskTransitionRequest]
    ) -> Task:
        """Move the task through its lifecycle (start, complete, cancel, block, unblock)."""

        def plan(task: Task, actor: Actor) -> tuple[dict[str, Any], OutboxEvent | None]:
            request = decode()
            gate = request.quality_gate.stored() if request.quality_gate is not None else None
            change = lifecycle.plan(
                action,
                task.status,
                before_block=task.status_before_block,
                now=dt.datetime.now(dt.UTC),
                reason=request.reason,
                quality_gate=gate,
            )
            return change.changes, events.task_transitioned(action, actor.user_id, change.details)

        return await self._change(ref, plan)

    async def delete(self, request: TaskRef) -> None:
        """Delete a task (administrators only, by method policy)."""
        actor = actor_for_change()
        async with self._db.transaction() as conn:
            task = await store.get_task(conn, request.id, for_update=True, timeout=time_left())
            if task is None:
                raise _not_found(request.id)
            _check_etag(task, request.etag)
            await ensure_user_active(conn, actor.user_id, field="caller")
            await store.delete_task(
                conn,
                request.id,
                event=events.task_deleted(actor.user_id, task),
                timeout=time_left(),
            )

    async def _change(self, ref: TaskRef, plan: Plan) -> Task:
        # Authorization first, on the locked task; only then does `plan` decode the caller's
        # content, so what a caller without rights sends is never looked at.
        actor = actor_for_change()
        async with self._db.transaction() as conn:
            task = await store.get_task(conn, ref.id, for_update=True, timeout=time_left())
            if task is None:
                raise _not_found(ref.id)
            ensure_can_change(actor, created_by=task.created_by, assigned_to=task.assigned_to)
            _check_etag(task, ref.etag)
            changes, event = plan(task, actor)
            await ensure_user_active(conn, actor.user_id, field="caller")
            if event is None:
                return task
            assignee = changes.get("assigned_to")
            if assignee is not None:
                # Locked: a deactivation or deletion of the assignee waits for this commit.
                await ensure_user_active(conn, assignee, field="assigned_to", lock=True)
            return await store.update_task(conn, ref.id, changes, event=event, timeout=time_left())

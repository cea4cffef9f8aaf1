"""The user directory: people who create, own and work on tasks."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from mhv_common import context, paging
from mhv_common.db import Database
from mhv_common.errors import (
    FieldViolation,
    UserAlreadyExistsError,
    UserHasTasksError,
    UserNotFoundError,
    ValidationError,
)
from mhv_common.redaction import redact_details
from mhv_common.tracing import current_traceparent
from mhv_task import _store as store
from mhv_task._authz import ActiveUsers, actor_for_change
from mhv_task._models import UserCreateRequest, is_username, validate


class Users:
    """User operations for the edge to call."""

    def __init__(self, db: Database, active: ActiveUsers) -> None:
        self._db = db
        self._active = active

    async def create(self, data: Mapping[str, Any]) -> asyncpg.Record:
        """Create a user; a taken username or email is MHV-111."""
        await self._active.ensure_caller_active(fresh=True)
        request = validate(UserCreateRequest, dict(data))
        try:
            async with self._db.connection() as conn:
                return await store.insert_user(
                    conn,
                    username=request.username,
                    email=request.email,
                    display_name=request.display_name,
                    metadata=request.metadata,
                )
        except store.Taken as exc:
            raise UserAlreadyExistsError(
                f"A user with that {exc.field} already exists.",
                violations=[FieldViolation(exc.field, "already taken")],
            ) from None

    async def get(self, *, user_id: str = "", username: str = "") -> asyncpg.Record:
        """One user by id or username."""
        await self._active.ensure_caller_active()
        if not user_id and not username:
            raise ValidationError(
                violations=[FieldViolation("lookup", "give either id or username")]
            )
        async with self._db.connection() as conn:
            if user_id:
                row = await store.get_user(conn, user_id=parse_user_id(user_id, field="id"))
            elif is_username(username):
                row = await store.get_user(conn, username=username)
            else:
                row = None  # no user can have that name
        if row is None:
            raise UserNotFoundError(f"No user {user_id or username!r}.")
        return row

    async def list(
        self, *, page_size: int, page_token: str, include_inactive: bool
    ) -> tuple[Sequence[asyncpg.Record], str]:
        """A page of users by username, and the next page's token."""
        await self._active.ensure_caller_active()
        size = paging.page_size(page_size)
        filters = {"include_inactive": include_inactive}
        position = paging.decode_token(page_token, filters=filters, fields={"after": str})
        after = str(position["after"]) if position else None
        async with self._db.connection() as conn:
            rows = await store.list_users(
                conn, after_username=after, include_inactive=include_inactive, limit=size + 1
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = paging.encode_token({"after": rows[-1]["username"]}, filters=filters)
        return rows, token

    async def deactivate(self, user_id: str) -> asyncpg.Record:
        """Deactivate a user: they keep their tasks but can no longer be assigned."""
        await self._active.ensure_caller_active(fresh=True)
        uid = parse_user_id(user_id, field="id")
        async with self._db.connection() as conn:
            row = await store.deactivate_user(conn, uid)
        if row is None:
            raise UserNotFoundError(f"No user {user_id!r}.")
        return row

    async def delete(self, user_id: str) -> None:
        """Delete a user who created no tasks; tasks assigned to them are unassigned first.

        The unassignments are ordinary task changes with their own audit events, rather than
        the silent ``ON DELETE SET NULL`` of the foreign key, which stays only as a backstop.
        """
        await self._active.ensure_caller_active(fresh=True)
        uid = parse_user_id(user_id, field="id")
        actor = actor_for_change()
        ctx = context.current()
        request_id = ctx.request_id if ctx else ""
        refusal = UserHasTasksError(
            "This user created tasks and cannot be deleted; deactivate them instead."
        )
        try:
            async with self._db.transaction() as conn:
                # Locked first: an assignment of this user in flight finishes before we look.
                if await store.get_user(conn, user_id=uid, for_update=True) is None:
                    raise UserNotFoundError(f"No user {user_id!r}.")
                if await store.tasks_created_by(conn, uid):
                    raise refusal
                for task in await store.tasks_assigned_to(conn, uid):
                    await store.update_task(
                        conn,
                        task["id"],
                        {"assigned_to": None},
                        event=(
                            "task_assigned",
                            actor.user_id,
                            redact_details(
                                {
                                    "assigned_to": None,
                                    "previous": str(uid),
                                    "reason": "user deleted",
                                }
                            ),
                            request_id,
                            current_traceparent(),
                        ),
                    )
                await store.delete_user(conn, uid)
        except store.StillReferenced:
            # A task by this user was created after our check: the RESTRICT key caught it.
            raise refusal from None


def parse_user_id(value: str, *, field: str) -> uuid.UUID:
    """Check a user id from a request."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError(
            violations=[FieldViolation(field, "is not a user id (UUID)")]
        ) from None

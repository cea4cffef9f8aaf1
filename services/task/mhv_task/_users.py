"""The user directory: people who create, own and work on tasks."""

from __future__ import annotations

import uuid

from mhv_common import context, paging
from mhv_common.context import time_left
from mhv_common.db import Database
from mhv_common.errors import (
    FieldViolation,
    UserAlreadyExistsError,
    UserHasTasksError,
    UserNotFoundError,
    ValidationError,
)
from mhv_task import _events as events
from mhv_task import _store as store
from mhv_task._authz import ActiveUsers, actor_for_change, current_principal
from mhv_task._models import (
    Page,
    User,
    UserCreateRequest,
    UserListRequest,
    UserLookup,
    UserRef,
    is_username,
)


class Users:
    """User operations for the edge to call."""

    def __init__(self, db: Database, active: ActiveUsers) -> None:
        self._db = db
        self._active = active

    async def create(self, request: UserCreateRequest) -> User:
        """Create a user, with its audit event; a taken username or email is MHV-111."""
        await self._active.ensure_caller_active(fresh=True)
        user_id = uuid.uuid4()
        principal = current_principal()
        if principal.is_service and not self._acts_for_someone():
            # The gateway registering a webhook sender: the new user is the actor of their own
            # creation, and the event names the service that did it.
            actor, via = user_id, principal.subject
        else:
            actor, via = actor_for_change().user_id, None
        try:
            async with self._db.transaction() as conn:
                user = await store.insert_user(
                    conn,
                    user_id=user_id,
                    username=request.username,
                    email=request.email,
                    display_name=request.display_name,
                    metadata=request.metadata,
                    timeout=time_left(),
                )
                await store.insert_user_event(
                    conn,
                    events.user_created(actor, user_id, request, via=via),
                    timeout=time_left(),
                )
                return user
        except store.Taken as exc:
            raise UserAlreadyExistsError(
                f"A user with that {exc.field} already exists.",
                violations=[FieldViolation(exc.field, "already taken")],
            ) from None

    @staticmethod
    def _acts_for_someone() -> bool:
        ctx = context.current()
        return bool(ctx and ctx.extra.get("on_behalf_of"))

    async def get(self, request: UserLookup) -> User:
        """One user by id or username."""
        if request.id is None and not request.username:
            raise ValidationError(
                violations=[FieldViolation("lookup", "give either id or username")]
            )
        async with self._db.connection() as conn:
            if request.id is not None:
                user = await store.get_user(conn, user_id=request.id, timeout=time_left())
            elif is_username(request.username):
                user = await store.get_user(conn, username=request.username, timeout=time_left())
            else:
                user = None  # no user can have that name
        if user is None:
            raise UserNotFoundError(f"No user {str(request.id or request.username)!r}.")
        return user

    async def list(self, request: UserListRequest) -> Page[User]:
        """A page of users by username, and the next page's token."""
        size = paging.page_size(request.page_size)
        filters = {"include_inactive": request.include_inactive}
        position = paging.decode_token(request.page_token, filters=filters, fields={"after": str})
        after = str(position["after"]) if position else None
        async with self._db.connection() as conn:
            users = await store.list_users(
                conn,
                after_username=after,
                include_inactive=request.include_inactive,
                limit=size + 1,
                timeout=time_left(),
            )
        token = ""
        if len(users) > size:
            users = users[:size]
            token = paging.encode_token({"after": users[-1].username}, filters=filters)
        return Page(users, token)

    async def deactivate(self, request: UserRef) -> User:
        """Deactivate a user: they keep their tasks but can no longer be assigned."""
        await self._active.ensure_caller_active(fresh=True)
        actor = actor_for_change()
        async with self._db.transaction() as conn:
            before = await store.get_user(
                conn, user_id=request.id, for_update=True, timeout=time_left()
            )
            if before is None:
                raise UserNotFoundError(f"No user {str(request.id)!r}.")
            user = await store.deactivate_user(conn, request.id, timeout=time_left())
            assert user is not None  # locked above
            await store.insert_user_event(
                conn, events.user_deactivated(actor.user_id, before), timeout=time_left()
            )
        return user

    async def delete(self, request: UserRef) -> None:
        """Delete a user who created no tasks; tasks assigned to them are unassigned first.

        The unassignments are ordinary task changes with their own audit events, rather than
        the silent ``ON DELETE SET NULL`` of the foreign key, which stays only as a backstop.
        """
        await self._active.ensure_caller_active(fresh=True)
        uid = request.id
        actor = actor_for_change()
        refusal = UserHasTasksError(
            "This user created tasks and cannot be deleted; deactivate them instead."
        )
        try:
            async with self._db.transaction() as conn:
                # Locked first: an assignment of this user in flight finishes before we look.
                user = await store.get_user(conn, user_id=uid, for_update=True, timeout=time_left())
                if user is None:
                    raise UserNotFoundError(f"No user {str(uid)!r}.")
                if await store.tasks_created_by(conn, uid, timeout=time_left()):
                    raise refusal
                assigned = await store.tasks_assigned_to(conn, uid, timeout=time_left())
                for task_id in assigned:
                    await store.update_task(
                        conn,
                        task_id,
                        {"assigned_to": None},
                        event=events.task_assigned(
                            actor.user_id, assigned_to=None, previous=uid, reason="user deleted"
                        ),
                        timeout=time_left(),
                    )
                await store.delete_user(conn, uid, timeout=time_left())
                await store.insert_user_event(
                    conn,
                    events.user_deleted(actor.user_id, user, unassigned=len(assigned)),
                    timeout=time_left(),
                )
        except store.StillReferenced:
            # A task by this user was created after our check: the RESTRICT key caught it.
            raise refusal from None

"""Who may do what to which task.

- ``viewer`` reads.
- ``member`` reads, creates tasks, and changes tasks it created or is assigned to.
- ``admin`` does everything, including users and DeleteTask.
- ``service`` (the webhook gateway) creates and changes tasks on behalf of a user it names in
  the ``x-mhv-on-behalf-of`` metadata; that user is recorded as the actor.

Anything else is PERMISSION_DENIED (MHV-005). The edge's method policies already refuse roles
that may never call a method; this module adds the per-task rules.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from mhv_common import context
from mhv_common.auth import Principal, Role
from mhv_common.db import Database
from mhv_common.edge import ON_BEHALF_OF_KEY
from mhv_common.errors import (
    AuthenticationError,
    AuthorizationError,
    FieldViolation,
    UserInactiveError,
    UserNotFoundError,
)
from mhv_common.ids import parse_uuid, uuid_or_none
from mhv_common.revocation import REVOCATION_SECONDS, Revocation
from mhv_task import _store as store


@dataclass(frozen=True, slots=True)
class Actor:
    """The user a change is attributed to, and the principal that asked for it."""

    user_id: uuid.UUID
    principal: Principal

    @property
    def is_admin(self) -> bool:
        """Whether the caller holds the admin role."""
        return self.principal.has(Role.ADMIN)

    @property
    def is_service(self) -> bool:
        """Whether the caller is a service acting for `user_id`."""
        return self.principal.is_service


def current_principal() -> Principal:
    """The authenticated caller of the current request."""
    ctx = context.current()
    if ctx is None or ctx.principal is None:
        raise AuthenticationError()
    return ctx.principal


def actor_for_change() -> Actor:
    """The actor of a mutation: the caller, or for services the user they name.

    Raises:
        ValidationError: A service did not name a valid user to act for.
        AuthenticationError: A person's token does not name a user id.
    """
    principal = current_principal()
    ctx = context.current()
    if principal.is_service:
        named = ctx.extra.get("on_behalf_of") if ctx else None
        user = parse_uuid(
            named or "",
            field=ON_BEHALF_OF_KEY,
            description="must be the id (UUID) of an existing user",
            message="Service callers must name the user they act for.",
        )
        return Actor(user, principal)
    return Actor(_subject_id(principal), principal)


def _subject_id(principal: Principal) -> uuid.UUID:
    user = uuid_or_none(principal.subject)
    if user is None:
        raise AuthenticationError("The token's subject is not a user id.")
    return user


def ensure_can_change(
    actor: Actor, *, created_by: uuid.UUID, assigned_to: uuid.UUID | None
) -> None:
    """Refuse a member changing a task it neither created nor is assigned to."""
    if actor.is_admin or actor.is_service:
        return
    if actor.principal.has(Role.MEMBER) and actor.user_id in (created_by, assigned_to):
        return
    raise AuthorizationError("Members may change only tasks they created or are assigned to.")


class ActiveUsers:
    """The task service's side of `mhv_common.revocation`: users' state from its database.

    Every call of a person is checked by the edge (`revocation`, answers cached for
    `REVOCATION_SECONDS`); user management asks afresh, so it takes effect at once. Service
    principals act for users named per call and are checked there.
    """

    def __init__(self, db: Database, *, ttl: float = REVOCATION_SECONDS) -> None:
        self._db = db
        self.revocation = Revocation(self.state, ttl=ttl)

    async def state(self, user: uuid.UUID) -> bool | None:
        """True for an active user, False for a deactivated one, None for no such user."""
        async with self._db.connection() as conn:
            return await store.user_state(conn, user, timeout=context.time_left())

    async def ensure_caller_active(self, *, fresh: bool = False) -> None:
        """Refuse a caller whose user is gone (MHV-004) or deactivated (MHV-112).

        `fresh` skips the cache: user management takes effect at once, not within seconds.
        """
        await self.revocation.ensure_active(current_principal(), fresh=fresh)


async def ensure_user_active(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, field: str, lock: bool = False
) -> None:
    """Refuse a change by or for a user who is gone (MHV-110) or deactivated (MHV-112).

    Args:
        conn: The change's connection.
        user_id: The user.
        field: ``caller`` for the actor, else the request field that named the user.
        lock: Hold the answer until the transaction ends (see `_store.user_state`).
    """
    state = await store.user_state(conn, user_id, lock=lock, timeout=context.time_left())
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

"""Revocation: a person's token works only while its user exists and is active.

Tokens are not revoked one by one: they live a day at most (`mhv_common.auth`), and every
service checks, on every call, that the user a person's token names is still an active user
of the task service. The answer is cached for `REVOCATION_SECONDS`, so a deactivated or
deleted user loses access to every service within that many seconds of the change (the task
service's own user management takes effect at once: it asks with ``fresh=True``).

The task service answers from its database; the others ask it over gRPC
(`TaskUserDirectory`, ``UserService.GetUser`` with their own service token). Services act for
users named per call and are checked where they name them. When the task service cannot be
asked, the call is refused as unavailable: revocation fails closed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from mahavishnu.task.v1 import task_pb2
from mhv_common.auth import Principal, ServiceCredentials
from mhv_common.client import Peer, service_channel
from mhv_common.errors import AuthenticationError, ServiceUnavailableError, UserInactiveError
from mhv_common.ids import uuid_or_none

REVOCATION_SECONDS = 5.0
"""Longest time a deactivated or deleted user's token keeps working, on any service."""

UserState = Callable[[uuid.UUID], Awaitable[bool | None]]
"""True for an active user, False for a deactivated one, None for no such user."""

_CACHE_LIMIT = 10_000
_GET_USER = "/mahavishnu.task.v1.UserService/GetUser"


class Revocation:
    """Refuses people whose user is gone or deactivated, asking `state` at most every `ttl` s.

    Args:
        state: How this service learns a user's state.
        ttl: How long an active answer is trusted.
    """

    def __init__(self, state: UserState, *, ttl: float = REVOCATION_SECONDS) -> None:
        self._state = state
        self._ttl = ttl
        self._active_until: dict[uuid.UUID, float] = {}

    async def ensure_active(self, principal: Principal, *, fresh: bool = False) -> None:
        """Refuse a person whose user is gone (MHV-004) or deactivated (MHV-112).

        Args:
            principal: The authenticated caller; services pass.
            fresh: Ask even when a recent answer is cached.
        """
        if principal.is_service:
            return
        user = uuid_or_none(principal.subject)
        if user is None:
            raise AuthenticationError("The token's subject is not a user id.")
        now = time.monotonic()
        if not fresh and self._active_until.get(user, 0.0) > now:
            return
        state = await self._state(user)
        if state is None:
            self._active_until.pop(user, None)
            raise AuthenticationError("The token's user no longer exists.")
        if not state:
            self._active_until.pop(user, None)
            raise UserInactiveError("Your user is deactivated.")
        if len(self._active_until) >= _CACHE_LIMIT:
            self._active_until.clear()
        self._active_until[user] = now + self._ttl


class TaskUserDirectory:
    """A user's state, asked of the task service (``UserService.GetUser``) as a service.

    Args:
        task: Where the task service listens.
        credentials: This service's own token.
        timeout: Longest wait for an answer, in seconds.
    """

    def __init__(
        self, task: Peer, credentials: ServiceCredentials, *, timeout: float = 2.0
    ) -> None:
        self._peer = task
        self._credentials = credentials
        self._timeout = timeout
        self._channel: aio.Channel | None = None

    async def state(self, user: uuid.UUID) -> bool | None:
        """Whether `user` is active (None: no such user).

        Raises:
            ServiceUnavailableError: The task service did not answer (MHV-009).
        """
        if self._channel is None:
            self._channel = service_channel(self._peer)
        get_user = self._channel.unary_unary(
            _GET_USER,
            request_serializer=task_pb2.GetUserRequest.SerializeToString,
            response_deserializer=task_pb2.User.FromString,
        )
        try:
            reply = await get_user(
                task_pb2.GetUserRequest(id=str(user)),
                metadata=self._credentials.metadata(),
                timeout=self._timeout,
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ServiceUnavailableError(
                "Your access cannot be checked right now; retry shortly.", retry_after=1.0
            ) from exc
        return bool(reply.active)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


__all__ = ["REVOCATION_SECONDS", "Revocation", "TaskUserDirectory", "UserState"]

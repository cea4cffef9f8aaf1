"""asyncpg pool with deadline-aware acquire and transactions.

Every acquire and every transaction is bounded by the current request deadline
(`mhv_common.context`), so a slow or locked database turns into DEADLINE_EXCEEDED for the
caller and a rolled-back transaction in the database, never a half-written change. A pool that
cannot hand out a connection is reported as UNAVAILABLE (MHV-002), with a retry delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import asyncpg
from prometheus_client import Gauge

from mhv_common import context
from mhv_common.config import CommonSettings
from mhv_common.errors import (
    DatabaseConnectionError,
    DeadlineExceededError,
    FieldViolation,
    MahavishnuError,
    ValidationError,
)

logger = logging.getLogger(__name__)

Isolation = Literal["read_committed", "repeatable_read", "serializable"]

# multiprocess_mode: how the gauges of several processes of one service combine into the one
# value its /metrics shows (mhv_common.processes): pools add up; every process samples the same
# schema size, and the newest sample of a live process is the truth.
DATABASE_CONNECTIONS = Gauge(
    "database_connections",
    "Connections of this process's pool that are checked out.",
    ["database", "pool"],
    multiprocess_mode="livesum",
)
DATABASE_SIZE_BYTES = Gauge(
    "database_size_bytes",
    "Bytes used by a service's schema (tables and indexes), refreshed periodically.",
    ["schema"],
    multiprocess_mode="livemostrecent",
)
DATABASE_POOL_SIZE = Gauge(
    "database_pool_size",
    "Maximum connections of this process's pool.",
    ["database", "pool"],
    multiprocess_mode="livesum",
)

# Errors that mean "no usable connection", as opposed to an error in the statement itself. A
# restart (fast or immediate), a terminated backend or a refused connection surfaces as any of
# these, depending on the moment: the socket (OSError, ConnectionResetError), SQLSTATE class 08
# (PostgresConnectionError and its subclasses), class 57P (shutdown, crash, starting up), class
# 53300 (no slot), asyncpg's own "connection is closed" (InterfaceError), and its protocol state
# machine caught mid-operation by the loss ("cannot switch to state 12", InternalClientError).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.IdleSessionTimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# How long a rollback after a failure may take before the connection is discarded instead.
_ROLLBACK_TIMEOUT_SECONDS = 5.0


class Database:
    """One service's connection pool.

    Args:
        dsn: PostgreSQL URL for the service's own login role.
        name: Pool name for metrics (the service name).
        min_size: Connections kept open.
        max_size: Upper bound on connections.
        acquire_timeout: Longest wait for a free connection when no deadline is tighter.
        statement_timeout: Server-side backstop for any single statement, in seconds.
        reset_sessions: Run asyncpg's session reset (``RESET ALL``, ``UNLISTEN *``, advisory
            unlock, ...) each time a connection returns to the pool. That is one more round
            trip per checkout. Off by default: our services never change session state (no
            ``SET`` without ``LOCAL``, no ``LISTEN``, no session advisory locks); code that does
            must turn it on. Open transactions are rolled back on release either way.
    """

    def __init__(
        self,
        dsn: str,
        *,
        name: str,
        min_size: int = 2,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        reset_sessions: bool = False,
    ) -> None:
        self._dsn = dsn
        self._reset_sessions = reset_sessions
        self._name = name
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout = acquire_timeout
        self._statement_timeout = statement_timeout
        self._pool: asyncpg.Pool | None = None
        self._in_use = DATABASE_CONNECTIONS.labels(database="postgresql", pool=name)
        DATABASE_POOL_SIZE.labels(database="postgresql", pool=name).set(max_size)

    @classmethod
    def for_service(
        cls, settings: CommonSettings, *, dsn: str, name: str, reset_sessions: bool = False
    ) -> Database:
        """A pool sized and bounded by the service's settings."""
        return cls(
            dsn,
            name=name,
            reset_sessions=reset_sessions,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            acquire_timeout=settings.db_acquire_timeout_seconds,
            statement_timeout=settings.db_statement_timeout_seconds,
        )

    @property
    def pool(self) -> asyncpg.Pool:
        """The underlying asyncpg pool (opened)."""
        if self._pool is None:
            raise DatabaseConnectionError("The database pool is not open.")
        return self._pool

    async def open(self, *, timeout: float = 10.0) -> None:
        """Open the pool, failing with MHV-002 if the database cannot be reached."""
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=timeout,
                command_timeout=self._statement_timeout,
                init=_init_connection,
                reset=None if self._reset_sessions else _keep_session,
                server_settings={
                    "application_name": f"mahavishnu-{self._name}",
                    "statement_timeout": str(int(self._statement_timeout * 1000)),
                    # A transaction left open by a stuck client must not hold locks forever.
                    "idle_in_transaction_session_timeout": str(int(self._statement_timeout * 2000)),
                },
            )
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            logger.error("database pool open failed", extra={"error": repr(exc)})
            raise DatabaseConnectionError(retry_after=1.0) from exc

    async def close(self, *, timeout: float = 10.0) -> None:
        """Close the pool, waiting up to `timeout` for checked-out connections."""
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), timeout)
        except TimeoutError:
            self._pool.terminate()
        self._pool = None

    async def _acquire(self, timeout: float | None) -> asyncpg.Connection:
        left = context.time_left(None, cap=timeout)
        deadline_bound = left is not None and left < self._acquire_timeout
        wait = left if deadline_bound and left is not None else self._acquire_timeout
        try:
            # asyncio.timeout rather than acquire(timeout=): asyncpg bounds that with
            # wait_for, one more task per checkout.
            async with asyncio.timeout(wait):
                conn = await self.pool.acquire()
        except TimeoutError as exc:
            if deadline_bound:
                raise DeadlineExceededError() from exc
            raise DatabaseConnectionError(
                "No database connection became free in time.", retry_after=1.0
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise DatabaseConnectionError(retry_after=1.0) from exc
        self._in_use.inc()
        return conn

    async def _release(self, conn: asyncpg.Connection) -> None:
        self._in_use.dec()
        try:
            await self.pool.release(conn)
        except asyncpg.exceptions.InternalClientError:
            # A connection lost while checked out is handed back to the pool by asyncpg itself
            # (the holder's close callback), which can run between our release call and its
            # check; the pool has it back, and the caller's outcome stands.
            if not _gone(conn):
                raise

    async def reachable(self, *, timeout: float) -> bool:
        """Whether the database answers now: the readiness of a service that needs it.

        A pool whose every connection is busy is reachable (its connections are alive); only a
        failure to connect or to run ``SELECT 1`` within `timeout` is not.
        """
        if self._pool is None:
            return False
        if self._pool.get_size() >= self._max_size and self._pool.get_idle_size() == 0:
            # Every connection is checked out and alive: load, not an outage. Not queueing
            # behind the requests keeps the probe from taking a connection they wait for.
            return True
        acquired = False
        try:
            async with asyncio.timeout(timeout):
                conn = await self._pool.acquire()
                acquired = True
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    await self._pool.release(conn)
        except TimeoutError:
            # Waiting for a connection while every one is checked out is load, not an outage;
            # a statement the server does not answer is.
            busy: bool = self._pool.get_size() > 0 and self._pool.get_idle_size() == 0
            return busy and not acquired
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
            return False
        return True

    @asynccontextmanager
    async def connection(
        self, *, timeout: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """Check out a connection for the enclosed block.

        The wait for a free connection is bounded by `timeout`, the request deadline and the
        pool's acquire timeout, whichever is tightest.

        Raises:
            DatabaseConnectionError: No connection could be had in time (MHV-002).
            DeadlineExceededError: The request deadline passed while waiting (MHV-007).
        """
        conn = await self._acquire(timeout)
        try:
            yield conn
        except BaseException as exc:
            # Judged before the release: a connection asyncpg has taken back is gone.
            lost = isinstance(exc, Exception) and _lost(conn, exc)
            # asyncpg cancels a statement interrupted by cancellation and waits for the server
            # to confirm before the connection is reused; after a failure (cancellation
            # included) the release is shielded for that, even if this task is cancelled
            # again. A block that ended normally left no statement running, and
            # asyncpg's own release still finishes if we are cancelled during it.
            await asyncio.shield(self._release(conn))
            if isinstance(exc, asyncpg.exceptions.DataError):
                raise _bad_value(exc) from exc
            if lost:
                raise DatabaseConnectionError(retry_after=1.0) from exc
            raise
        await self._release(conn)

    @asynccontextmanager
    async def transaction(
        self,
        *,
        isolation: Isolation = "read_committed",
        readonly: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[asyncpg.Connection]:
        """Run the enclosed block in one transaction on one connection.

        The whole block, commit included, must finish before the request deadline. On any
        exception (including cancellation and the deadline) the transaction is rolled back; if
        the rollback itself cannot complete promptly the connection is terminated, which makes
        the server roll back.

        Raises:
            DeadlineExceededError: The request deadline passed (MHV-007). Before COMMIT was
                sent nothing is committed; during it, the outcome is unknown to us too.
            DatabaseConnectionError: The connection failed (MHV-002). Before COMMIT was sent
                nothing is committed; a connection lost during it leaves the outcome unknown.
        """
        conn = await self._acquire(timeout)
        tx = conn.transaction(isolation=isolation, readonly=readonly)
        try:
            async with context.asyncio_timeout():
                await tx.start()
                yield conn
                await tx.commit()
        except BaseException as exc:
            # Judged before the cleanup, which may itself close the connection.
            lost = isinstance(exc, Exception) and _lost(conn, exc)
            # The rollback runs in its own task: if this one is cancelled again while we wait
            # (the RPC ended, shutdown), the rollback still finishes and the connection still
            # returns to the pool; it is never abandoned mid-transaction.
            cleanup = asyncio.ensure_future(self._rollback_and_release(conn, tx))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceededError() from exc
            if lost:
                raise DatabaseConnectionError(retry_after=1.0) from exc
            if isinstance(exc, asyncpg.exceptions.DataError):
                raise _bad_value(exc) from exc
            raise
        else:
            # Committed: nothing runs on the connection, the release needs no shield.
            await self._release(conn)

    async def _rollback_and_release(
        self, conn: asyncpg.Connection, tx: asyncpg.transaction.Transaction
    ) -> None:
        try:
            if not _gone(conn):
                # asyncpg first waits for the server to confirm the cancellation of an
                # interrupted statement, then sends ROLLBACK.
                await asyncio.wait_for(tx.rollback(), _ROLLBACK_TIMEOUT_SECONDS)
        except Exception:
            # The rollback failed or timed out, or the transaction never fully started or
            # already half-committed: we don't know whether the connection is safe for
            # re-use, hence we terminate it; the server rolls back what is open when the
            # session ends. A connection already lost is the pool's again: nothing to end.
            if not _gone(conn):
                conn.terminate()
        finally:
            await self._release(conn)


def _lost(conn: asyncpg.Connection, exc: Exception) -> bool:
    """Whether `exc`, raised in a block using `conn`, comes from losing the connection.

    Decided by the connection's state as well as the exception's class: whatever asyncpg raises
    from a statement on a connection that is gone (a restart, a terminated backend), the caller
    gets MHV-002 and retries, never an INTERNAL. Our own errors keep their code, and a statement
    that ran out of its timeout on a live connection is a missed deadline, not a lost
    connection (asyncpg raises the builtin TimeoutError, which Python makes an OSError).
    """
    if isinstance(exc, MahavishnuError):
        return False
    if isinstance(exc, TimeoutError):
        return _gone(conn)
    return isinstance(exc, _CONNECTION_ERRORS) or _gone(conn)


def _gone(conn: asyncpg.Connection) -> bool:
    """Whether `conn` is closed, or was lost and already taken back by the pool.

    asyncpg hands a connection that closed while checked out back to its pool by itself; the
    proxy we hold is then detached, and any method on it (``is_closed`` too) raises.
    """
    try:
        closed: bool = conn.is_closed()
    except asyncpg.exceptions.InterfaceError:
        return True
    return closed


def _bad_value(exc: asyncpg.exceptions.DataError) -> MahavishnuError:
    """A value PostgreSQL refused (class 22), as the caller's MHV-003 rather than INTERNAL.

    Validation should have caught it first (NUL in text or JSON, a date out of
    range): the warning says which statement let it through, without the value.
    """
    logger.warning(
        "database refused a value the request carried",
        extra={"sqlstate": exc.sqlstate, "error": type(exc).__name__},
    )
    return ValidationError(
        "A value in the request cannot be stored: text must not contain NUL characters "
        "(\\u0000) and dates must lie between the years 1 and 9999.",
        violations=[FieldViolation("request", "holds a value the database cannot store")],
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset hook that leaves the session as it is (see ``reset_sessions``)."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb columns come back as Python values and take them as parameters.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            encoder=lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")),
            decoder=json.loads,
            schema="pg_catalog",
        )


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached (as opposed to a bad statement)."""
    return isinstance(exc, _CONNECTION_ERRORS)


_SCHEMA_SIZE = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'm')
"""


async def schema_size(
    conn: asyncpg.Connection, schema: str, *, timeout: float | None = None
) -> int:
    """Bytes on disk of every table of `schema`, with its indexes and TOAST.

    One catalog query: it reads file sizes, never table contents, so it is cheap at any table
    size. The value for the ``database_size_bytes`` gauge.
    """
    size: int = await conn.fetchval(_SCHEMA_SIZE, schema, timeout=timeout)
    return size

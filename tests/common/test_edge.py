"""The common gRPC edge, over a real socket against a real PostgreSQL.

A small probe service (raw-bytes methods registered through a generic handler) exercises the
library directly: authentication, role gates, rate limits, error mapping, deadlines and
cancellation with the transaction they interrupt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mhv_common.auth import (
    MAX_PERSON_TOKEN_SECONDS,
    MAX_SERVICE_TOKEN_SECONDS,
    Role,
    TokenIssuer,
    generate_signing_key,
)
from mhv_common.config import CommonSettings
from mhv_common.db import Database
from mhv_common.edge import classify
from mhv_common.errors import FieldViolation, MahavishnuError, ValidationError
from mhv_common.interceptors import MethodPolicy
from mhv_common.server import RunningService, ServiceDefinition
from tests.harness import ROOT, Deployment, Keys, anyone_active, bearer, detail, rich_status
from tests.waiting import wait_until

PROBE = "mhvtest.Probe"
ANY_ROLE = frozenset({Role.ADMIN, Role.MEMBER, Role.VIEWER, Role.SERVICE, Role.AUDITOR})
SLOW_SQL_SECONDS = 5


class Probe:
    """Methods that succeed, fail in each way, or hold a transaction open."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # HoldConnection sets `holding` once it has its connection, and keeps it until the
        # test sets `release`: the test decides how long a call is in flight, not a timer.
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def echo(self, request: bytes, _ctx: Any) -> bytes:
        return request

    async def boom(self, _request: bytes, _ctx: Any) -> bytes:
        raise RuntimeError("secret internal detail: password=hunter2 at /srv/app/db.py:42")

    async def invalid(self, _request: bytes, _ctx: Any) -> bytes:
        raise ValidationError(
            violations=[
                FieldViolation("title", "must not be empty"),
                FieldViolation("repository", "is not configured"),
            ]
        )

    async def slow_write(self, request: bytes, _ctx: Any) -> bytes:
        # Writes a row, then runs a statement longer than any deadline in these tests.
        async with self.db.transaction() as conn:
            await conn.execute("INSERT INTO task.edge_probe (marker) VALUES ($1)", request.decode())
            await conn.execute(f"SELECT pg_sleep({SLOW_SQL_SECONDS})")
        return b"committed"

    async def hold_connection(self, _request: bytes, _ctx: Any) -> bytes:
        async with self.db.connection() as conn:
            await conn.execute("SELECT 1")
            self.holding.set()
            await self.release.wait()
        return b"done"

    async def use_connection(self, _request: bytes, _ctx: Any) -> bytes:
        async with self.db.connection() as conn:
            await conn.fetchval("SELECT 1")
        return b"done"

    async def struct_keys(self, request: struct_pb2.Struct, _ctx: Any) -> struct_pb2.Struct:
        reply = struct_pb2.Struct()
        reply.update({"keys": sorted(request.fields)})
        return reply

    def register(self, server: aio.Server) -> Sequence[str]:
        handlers = {
            "Echo": self.echo,
            "Lifetime": self.echo,
            # Served, but left out of POLICIES on purpose: the edge must refuse it.
            "Unlisted": self.echo,
            "Boom": self.boom,
            "Invalid": self.invalid,
            "SlowWrite": self.slow_write,
            "TightDeadline": self.slow_write,
            "HoldConnection": self.hold_connection,
            "UseConnection": self.use_connection,
        }
        methods = {k: grpc.unary_unary_rpc_method_handler(v) for k, v in handlers.items()}
        # One typed method, decoded by protobuf as the services' methods are.
        methods["Keys"] = grpc.unary_unary_rpc_method_handler(
            self.struct_keys,
            request_deserializer=struct_pb2.Struct.FromString,
            response_serializer=struct_pb2.Struct.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, methods),))
        return [PROBE]


POLICIES = {
    f"/{PROBE}/{name}": MethodPolicy(ANY_ROLE)
    for name in ("Boom", "Invalid", "SlowWrite", "HoldConnection", "UseConnection")
}
POLICIES[f"/{PROBE}/Echo"] = MethodPolicy(frozenset({Role.ADMIN, Role.MEMBER}))
POLICIES[f"/{PROBE}/Lifetime"] = MethodPolicy(frozenset({Role.MEMBER, Role.SERVICE}))
POLICIES[f"/{PROBE}/Keys"] = MethodPolicy(ANY_ROLE)
POLICIES[f"/{PROBE}/TightDeadline"] = MethodPolicy(ANY_ROLE, max_deadline=0.5)


@pytest.fixture(scope="module")
async def probe_table(deployment: Deployment) -> AsyncIterator[str]:
    conn = await asyncpg.connect(deployment.role_url("task"))
    await conn.execute("CREATE TABLE task.edge_probe (marker text PRIMARY KEY)")
    await conn.close()
    yield "task.edge_probe"
    conn = await asyncpg.connect(deployment.role_url("task"))
    await conn.execute("DROP TABLE task.edge_probe")
    await conn.close()


async def _start(
    deployment: Deployment,
    keys: Keys,
    *,
    limits: dict[str, str] | None = None,
    pool: int = 4,
    token_lifetime: float = MAX_PERSON_TOKEN_SECONDS,
) -> tuple[RunningService, Probe]:
    settings = CommonSettings(
        auth_jwks_file=keys.jwks,
        rate_limits=limits or {"general": "100000/minute"},
        shutdown_grace_seconds=2,
        auth_max_token_lifetime_seconds=token_lifetime,
    )
    db = Database(
        deployment.role_url("task"), name="probe", min_size=1, max_size=pool, acquire_timeout=0.3
    )
    probe = Probe(db)
    running = RunningService(
        ServiceDefinition(
            name="probe",
            grpc_port=0,
            metrics_port=None,
            register=probe.register,
            policies=POLICIES,
            revocation=anyone_active(),
            startup=db.open,
            cleanup=db.close,
        ),
        settings,
    )
    await running.start()
    return running, probe


@pytest.fixture(scope="module")
async def probe(
    deployment: Deployment, keys: Keys, probe_table: str
) -> AsyncIterator[RunningService]:
    running, _probe = await _start(deployment, keys)
    yield running
    await running.stop()


@pytest.fixture
async def channel(probe: RunningService) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{probe.grpc_port}") as ch:
        yield ch


def _method(channel: aio.Channel, name: str) -> Callable[..., Any]:
    return channel.unary_unary(f"/{PROBE}/{name}")


async def _call_error(call: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    return info.value


async def test_success_passes_through(channel: aio.Channel, keys: Keys) -> None:
    reply = await _method(channel, "Echo")(b"hello", metadata=bearer(keys.token(Role.MEMBER)))
    assert reply == b"hello"


async def test_missing_token_is_unauthenticated_mhv004(channel: aio.Channel) -> None:
    error = await _call_error(_method(channel, "Echo")(b"x"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details().startswith("[MHV-004]")
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, info.metadata["error_code"]) == (
        "AUTHENTICATION_ERROR",
        "mahavishnu",
        "MHV-004",
    )
    help_ = detail(rich_status(error), error_details_pb2.Help)
    assert (ROOT / help_.links[0].url).is_file(), help_.links[0].url


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(
            lambda k: k.issuer.issue(
                subject="u", roles=["admin"], ttl_seconds=1, now=time.time() - 3600
            ),
            id="expired",
        ),
        pytest.param(
            lambda k: TokenIssuer(generate_signing_key()[0], key_id="test-1").issue(
                subject="u", roles=["admin"]
            ),
            id="wrong-key-same-kid",
        ),
        pytest.param(
            lambda k: TokenIssuer(generate_signing_key()[0], key_id="other").issue(
                subject="u", roles=["admin"]
            ),
            id="unknown-kid",
        ),
        pytest.param(
            lambda k: TokenIssuer(
                k.signing_key.read_bytes(), key_id="test-1", audience="someone-else"
            ).issue(subject="u", roles=["admin"]),
            id="wrong-audience",
        ),
        pytest.param(
            lambda k: TokenIssuer(k.signing_key.read_bytes(), key_id="test-1", issuer="evil").issue(
                subject="u", roles=["admin"]
            ),
            id="wrong-issuer",
        ),
        pytest.param(
            lambda k: k.token(Role.ADMIN, ttl_seconds=10 * 365 * 24 * 3600), id="ten-year-person"
        ),
        pytest.param(
            lambda k: k.token(Role.MEMBER, ttl_seconds=MAX_PERSON_TOKEN_SECONDS + 1),
            id="person-over-a-day",
        ),
        pytest.param(
            lambda k: k.token(Role.SERVICE, subject="service:webhook", ttl_seconds=3600),
            id="hour-long-service",
        ),
        pytest.param(lambda k: k.token(Role.ADMIN)[:-4] + "AAAA", id="tampered-signature"),
        pytest.param(lambda k: "not-a-jwt", id="garbage"),
    ],
)
async def test_bad_tokens_are_unauthenticated(
    channel: aio.Channel, keys: Keys, make_token: Callable[[Keys], str]
) -> None:
    error = await _call_error(_method(channel, "Echo")(b"x", metadata=bearer(make_token(keys))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details().startswith("[MHV-004]")


@pytest.mark.parametrize(
    ("role", "ttl"),
    [(Role.MEMBER, MAX_PERSON_TOKEN_SECONDS), (Role.SERVICE, MAX_SERVICE_TOKEN_SECONDS)],
    ids=["person-a-day", "service-fifteen-minutes"],
)
async def test_tokens_within_their_kinds_lifetime_pass(
    channel: aio.Channel, keys: Keys, role: Role, ttl: int
) -> None:
    token = keys.token(
        role, subject="service:webhook" if role == Role.SERVICE else "", ttl_seconds=ttl
    )
    reply = await _method(channel, "Lifetime")(b"ok", metadata=bearer(token))
    assert reply == b"ok"


async def test_peoples_token_lifetime_is_configurable(deployment: Deployment, keys: Keys) -> None:
    running, _db = await _start(deployment, keys, token_lifetime=300)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
            echo = _method(ch, "Echo")
            assert await echo(b"1", metadata=bearer(keys.token(Role.MEMBER, ttl_seconds=300)))
            error = await _call_error(
                echo(b"2", metadata=bearer(keys.token(Role.MEMBER, ttl_seconds=301)))
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "lives longer than a person's token may (300 s)" in error.details()
    finally:
        await running.stop()


async def test_role_gate_is_permission_denied_mhv005(channel: aio.Channel, keys: Keys) -> None:
    error = await _call_error(
        _method(channel, "Echo")(b"x", metadata=bearer(keys.token(Role.VIEWER)))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith("[MHV-005]")


async def test_method_without_policy_is_refused(channel: aio.Channel, keys: Keys) -> None:
    # Registered, but nobody wrote a policy for it: fail closed.
    # The probe serves Unlisted (it echoes), so only the missing policy can refuse it.
    error = await _call_error(
        _method(channel, "Unlisted")(b"x", metadata=bearer(keys.token(Role.ADMIN)))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "[MHV-005] No access policy covers this method."


async def test_on_behalf_of_only_for_services(channel: aio.Channel, keys: Keys) -> None:
    metadata = (*bearer(keys.token(Role.ADMIN)), ("x-mhv-on-behalf-of", str(uuid.uuid4())))
    error = await _call_error(_method(channel, "Echo")(b"x", metadata=metadata))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unexpected_exception_is_internal_without_its_text(
    channel: aio.Channel, keys: Keys
) -> None:
    error = await _call_error(
        _method(channel, "Boom")(b"x", metadata=bearer(keys.token(Role.ADMIN)))
    )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details().startswith("[MHV-008]")
    everything = error.details() + str(error.trailing_metadata()) + str(error.debug_error_string())
    for leaked in ("hunter2", "secret internal", "/srv/app", "RuntimeError", "Traceback"):
        assert leaked not in everything
    request_ids = [v for k, v in error.trailing_metadata() if k == "x-request-id"]
    assert request_ids and len(request_ids[0]) >= 16


async def test_validation_error_carries_every_field_violation(
    channel: aio.Channel, keys: Keys
) -> None:
    error = await _call_error(
        _method(channel, "Invalid")(b"x", metadata=bearer(keys.token(Role.ADMIN)))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail(rich_status(error), error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("title", "must not be empty"),
        ("repository", "is not configured"),
    ]
    assert detail(rich_status(error), error_details_pb2.RetryInfo) is None


async def _row_exists(deployment: Deployment, marker: str) -> bool:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        return bool(
            await conn.fetchval("SELECT count(*) FROM task.edge_probe WHERE marker = $1", marker)
        )
    finally:
        await conn.close()


async def _probe_sleeps(deployment: Deployment) -> int:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mahavishnu-probe'"
                " AND state = 'active' AND query LIKE 'SELECT pg_sleep%'"
            )
        )
    finally:
        await conn.close()


async def _eventually_zero_sleeps(deployment: Deployment) -> None:
    async def none_left() -> bool:
        return await _probe_sleeps(deployment) == 0

    # Well within the statement's own 5 s: the cancellation, not its end, stopped it.
    await wait_until(none_left, what="the abandoned statement is cancelled", timeout=3)


async def test_client_deadline_shorter_than_db_call_rolls_back(
    channel: aio.Channel, keys: Keys, deployment: Deployment
) -> None:
    marker = uuid.uuid4().hex
    started = time.monotonic()
    error = await _call_error(
        _method(channel, "SlowWrite")(
            marker.encode(), metadata=bearer(keys.token(Role.ADMIN)), timeout=0.5
        )
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < SLOW_SQL_SECONDS
    # The statement was cancelled in the database too, well before its 5 s would be up...
    await _eventually_zero_sleeps(deployment)
    # ...and the INSERT before it never became visible.
    assert not await _row_exists(deployment, marker)


async def test_server_deadline_maximum_applies_without_client_deadline(
    channel: aio.Channel, keys: Keys, deployment: Deployment
) -> None:
    marker = uuid.uuid4().hex
    error = await _call_error(
        _method(channel, "TightDeadline")(marker.encode(), metadata=bearer(keys.token("admin")))
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details().startswith("[MHV-007]")
    assert detail(rich_status(error), error_details_pb2.RetryInfo) is not None
    await _eventually_zero_sleeps(deployment)
    assert not await _row_exists(deployment, marker)


async def test_cancellation_mid_transaction_rolls_back(
    channel: aio.Channel, keys: Keys, deployment: Deployment
) -> None:
    marker = uuid.uuid4().hex
    call = _method(channel, "SlowWrite")(marker.encode(), metadata=bearer(keys.token("admin")))

    async def inside_the_transaction() -> bool:
        return await _probe_sleeps(deployment) > 0

    await wait_until(inside_the_transaction, what="the slow statement runs")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _eventually_zero_sleeps(deployment)
    assert not await _row_exists(deployment, marker)


async def test_exhausted_pool_is_unavailable_mhv002(deployment: Deployment, keys: Keys) -> None:
    running, probe = await _start(deployment, keys, pool=1)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
            token = bearer(keys.token(Role.ADMIN))
            holder = asyncio.ensure_future(_method(ch, "HoldConnection")(b"", metadata=token))
            await wait_until(probe.holding.is_set, what="a call holds the only connection")
            error = await _call_error(_method(ch, "UseConnection")(b"", metadata=token))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details().startswith("[MHV-002]")
            retry = detail(rich_status(error), error_details_pb2.RetryInfo)
            assert retry.retry_delay.ToNanoseconds() > 0
            probe.release.set()
            assert await holder == b"done"
    finally:
        await running.stop()


async def test_rate_limit_is_resource_exhausted_with_retry_info(
    deployment: Deployment, keys: Keys
) -> None:
    running, _db = await _start(deployment, keys, limits={"general": "2/minute"})
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
            token = bearer(keys.token(Role.MEMBER, subject=str(uuid.uuid4())))
            other = bearer(keys.token(Role.MEMBER, subject=str(uuid.uuid4())))
            assert await _method(ch, "Echo")(b"1", metadata=token) == b"1"
            assert await _method(ch, "Echo")(b"2", metadata=token) == b"2"
            error = await _call_error(_method(ch, "Echo")(b"3", metadata=token))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details().startswith("[MHV-006]")
            delay = detail(rich_status(error), error_details_pb2.RetryInfo).retry_delay
            assert 0 < delay.ToNanoseconds() <= 60 * 10**9
            # Budgets are per caller: someone else is unaffected.
            assert await _method(ch, "Echo")(b"4", metadata=other) == b"4"
    finally:
        await running.stop()


async def test_undecodable_requests_without_a_token_are_limited_per_peer(
    deployment: Deployment, keys: Keys
) -> None:
    running, _db = await _start(deployment, keys, limits={"general": "2/minute"})
    corrupt = b"\x0a\xff\xff\xff\x0f"
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
            keys_of = ch.unary_unary(f"/{PROBE}/Keys")
            for _ in range(2):
                error = await _call_error(keys_of(corrupt))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error.details().startswith("[MHV-003]")
                bad = detail(rich_status(error), error_details_pb2.BadRequest)
                assert "google.protobuf.Struct" in bad.field_violations[0].description
            error = await _call_error(keys_of(corrupt))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details().startswith("[MHV-006]")
            # A caller with a token has its own budget, and its good requests decode.
            token = bearer(keys.token(Role.MEMBER))
            good = struct_pb2.Struct()
            good.update({"b": 1, "a": 2})
            reply = struct_pb2.Struct.FromString(
                await keys_of(good.SerializeToString(), metadata=token)
            )
            assert list(reply["keys"]) == ["a", "b"]
            # A token that does not verify is refused as such, whatever the bytes hold.
            error = await _call_error(keys_of(corrupt, metadata=bearer("not-a-jwt")))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop()


async def test_health_and_reflection_need_no_token_and_are_not_limited(
    deployment: Deployment, keys: Keys
) -> None:
    running, _db = await _start(deployment, keys, limits={"general": "1/minute"})
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(5):
                reply = await health.Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            for _ in range(3):
                responses = [
                    r
                    async for r in stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                    )
                ]
                names = {s.name for s in responses[0].list_services_response.service}
                assert {PROBE, "grpc.health.v1.Health"} <= names
    finally:
        await running.stop()


async def test_graceful_shutdown_flips_health_and_finishes_inflight(
    deployment: Deployment, keys: Keys
) -> None:
    running, probe = await _start(deployment, keys)
    async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
        token = bearer(keys.token(Role.ADMIN))
        inflight = asyncio.ensure_future(_method(ch, "HoldConnection")(b"", metadata=token))
        await wait_until(probe.holding.is_set, what="the call is in flight")
        stopping = asyncio.ensure_future(running.stop())

        async def not_serving() -> bool:
            status = await running.health.Check(health_pb2.HealthCheckRequest(), None)
            return bool(status.status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await wait_until(not_serving, what="health says NOT_SERVING")
        # Health turned first, while the call was still running; the call then finishes.
        assert not inflight.done()
        probe.release.set()
        assert await inflight == b"done"
        await stopping


async def test_made_up_method_names_are_not_remembered(
    probe: RunningService, channel: aio.Channel
) -> None:
    for _ in range(50):
        name = f"/x{uuid.uuid4().hex}.Y/{'z' * 200}"
        error = await _call_error(channel.unary_unary(name)(b""))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    for interceptor in probe.interceptors:
        cached = getattr(interceptor, "_handlers", {})
        assert not [m for m in cached if m.startswith("/x")], type(interceptor).__name__


# --- classify: the one mapping both edges use (mhv_common.edge) --------------------------------


def _rpc_error(code: grpc.StatusCode) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details="downstream said so")


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (ValidationError(), "MHV-003"),
        (TimeoutError(), "MHV-007"),
        (asyncpg.exceptions.QueryCanceledError(), "MHV-007"),
        (asyncio.CancelledError(), "MHV-012"),
        (NotImplementedError("password=hunter2"), "MHV-010"),
        (ConnectionRefusedError("password=hunter2"), "MHV-002"),
        (_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), "MHV-007"),
        (_rpc_error(grpc.StatusCode.UNAVAILABLE), "MHV-009"),
        (_rpc_error(grpc.StatusCode.PERMISSION_DENIED), "MHV-008"),
        (RuntimeError("password=hunter2"), "MHV-008"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_classify_maps_any_exception_to_a_catalog_error_without_its_text(
    raised: BaseException, code: str
) -> None:
    error = classify(raised)
    assert error.code == code
    if not isinstance(raised, MahavishnuError):
        assert "hunter2" not in repr(error) and "downstream" not in error.message

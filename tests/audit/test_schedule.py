"""The audit service verifies its chain by itself, and a break shows without anyone asking."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio

from tests.audit.support import events, metric, private_audit, random_task_id, record, stub
from tests.conftest import Services
from tests.harness import Cluster, Keys, task_users_env
from tests.loglines import log_records, matches


async def _eventually(predicate: Callable[[], Awaitable[bool]], *, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the scheduled verification never reported")


async def test_scheduled_verification_counts_runs_and_reports_a_break(
    cluster: Cluster, keys: Keys, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = Path(tmp_path_factory.mktemp("scheduled"))
    users = task_users_env(services.task.target, services.ca_file)
    async with private_audit(cluster, keys, logs, task_users=users, verify_interval=0.2) as audit:
        port = audit.process.metrics_port
        async with aio.insecure_channel(audit.target) as channel:
            await record(stub(channel), keys, events(random_task_id(), 5))

        async def ok_runs() -> bool:
            return await metric(port, "audit_chain_verifications_total", {"result": "ok"}) >= 3

        await _eventually(ok_runs)
        verified_at = await metric(port, "audit_chain_last_verified_timestamp_seconds", {})
        assert abs(verified_at - time.time()) < 60
        await audit.tamper("DELETE FROM audit.task_audit_log WHERE id = 3")

        def broken_runs(at_least: float) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                labels = {"result": "broken"}
                return await metric(port, "audit_chain_verifications_total", labels) >= at_least

            return check

        await _eventually(broken_runs(1))
        # A broken chain is not "verified": the time of the last intact run stays put (and
        # AuditChainVerificationStale fires once it is old enough).
        stuck = await metric(port, "audit_chain_last_verified_timestamp_seconds", {})
        runs = await metric(port, "audit_chain_verifications_total", {"result": "broken"})
        await _eventually(broken_runs(runs + 2))
        assert await metric(port, "audit_chain_last_verified_timestamp_seconds", {}) == stuck
        lines = [r for r in log_records(audit.process.logs()) if "chain broken" in r.get("msg", "")]
        assert lines and matches(lines[0], error_code="MHV-400", kind="missing"), lines

"""The audit service down for a while under load: task writes go on, the outbox grows, and
after the audit service returns everything is delivered exactly once, in order.

``MHV_TEST_AUDIT_OUTAGE_SECONDS`` sets how long it stays down (default 20 s: long enough for the
backlog to build and the relay to back off to its longest pause; a drill of minutes is
``python -m bench.fault_drills --audit-outage 300``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.drill import run_fault
from tests.cluster.system import System
from tests.faults.faults import all_alive, killed
from tests.faults.test_postgres import assert_ledger_clean

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OUTAGE = float(os.environ.get("MHV_TEST_AUDIT_OUTAGE_SECONDS", "20"))


def backlog_alert_expr() -> str:
    """The expression of the TaskOutboxBacklog alert."""
    groups = yaml.safe_load((ROOT / "deploy/prometheus/rules/platform_alerts.yml").read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "TaskOutboxBacklog":
                return str(rule["expr"])
    raise AssertionError("no TaskOutboxBacklog alert")


async def test_audit_down_for_a_while_under_load(system: System) -> None:
    (task,) = system.replicas_of("task")
    backlog: list[tuple[float, float]] = []  # (depth, lag seconds) as the task service reports

    async def watch_the_outbox() -> None:
        # The gauges the backlog alert reads, sampled over the outage.
        ends = time.monotonic() + OUTAGE
        while time.monotonic() < ends:
            depth = await task.metric("task_outbox_depth")
            lag = await task.metric("task_outbox_lag_seconds")
            backlog.append((depth, lag))
            await asyncio.sleep(1.0)

    fault = dataclasses.replace(killed(system, "audit"), during=watch_the_outbox)
    report = await run_fault(system, fault, warmup=2.0, outage=OUTAGE, settle=1.0, start_tasks=True)

    assert set(all_alive(system).values()) == {None}, report
    # Task writes went on as if nothing happened.
    assert report.errors == {}, report
    assert report.calls_during_outage > 0, report
    # The outbox grew, and its oldest event aged: what TaskOutboxBacklog watches.
    assert "task_outbox_lag_seconds" in backlog_alert_expr()
    depths = [d for d, _ in backlog]
    lags = [lag for _, lag in backlog]
    assert depths[-1] > depths[0] and max(depths) > 10, backlog
    assert lags[-1] > lags[0], backlog
    # Once back, every change delivered once, in each task's order; the chain verifies.
    assert_ledger_clean(report)

"""The audit service down for a while under load: task writes go on, the outbox grows, and
after the audit service returns everything is delivered exactly once, in order.

``MHV_TEST_AUDIT_OUTAGE_SECONDS`` sets how long it stays down (default 20 s: long enough for the
backlog to build and the relay to back off to its longest pause; a drill of minutes is
``python -m bench.fault_drills --audit-outage 300``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.cluster.drill import run_fault
from tests.cluster.system import System
from tests.faults.faults import Backlog, all_alive, audit_down
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
    backlog = Backlog()
    report = await run_fault(
        system,
        audit_down(system, backlog, seconds=OUTAGE),
        warmup=2.0,
        outage=OUTAGE,
        settle=1.0,
        start_tasks=True,
    )

    assert set(all_alive(system).values()) == {None}, report
    # Task writes never wait for the audit service: no client saw it gone (the one failure
    # allowed is a call slower than its 5 s deadline on a busy machine, retried like any).
    assert {e.split(" ", 1)[1] for e in report.errors} <= {"DEADLINE_EXCEEDED"}, report
    assert report.calls_during_outage > 0, report
    # The outbox grew, and its oldest event aged: what TaskOutboxBacklog watches.
    assert "task_outbox_lag_seconds" in backlog_alert_expr()
    (first_depth, first_lag), (last_depth, last_lag) = backlog.samples[0], backlog.samples[-1]
    assert last_depth > first_depth and last_depth > 10, backlog
    assert last_lag > first_lag, backlog
    # Past its first failed send (the RPC timeout, 5 s), the relay waited for the audit
    # service holding no transaction: no pool connection, no row locks pinned by the outage.
    later = [held for at, held in backlog.held if at > 8.0]
    assert later and not any(later), backlog
    # Once back, every change delivered once, in each task's order; the chain verifies.
    assert_ledger_clean(report)

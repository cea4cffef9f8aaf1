"""PostgreSQL restarts and terminated backends under CreateTask, webhook and relay load.

Through the real services, with a client ledger: no service exits, readiness follows the
database, callers see only retryable answers (UNAVAILABLE with MHV-002 and a retry delay, never
INTERNAL), every acknowledged write is there exactly once, and the relay and the saga workers
carry on by themselves.
"""

from __future__ import annotations

import pytest

from tests.cluster.drill import ALREADY_STARTED, Report, run_fault
from tests.cluster.system import System
from tests.faults.faults import Outage, all_alive, backends_terminated, postgres_restart

pytestmark = pytest.mark.slow

# What clients may see from a service whose database went away: retryable, never INTERNAL
# (and a StartTask retried after its answer was lost, refused since the task is started).
RETRYABLE_OUTCOMES = {"UNAVAILABLE", "HTTP 503", ALREADY_STARTED}


def assert_ledger_clean(report: Report) -> None:
    """Every acknowledged write there once, every change audited once and in order."""
    verdict = report.verdict
    assert verdict.drained, report
    assert report.unacknowledged == [] and report.rejected == [], report
    for count in (verdict.creates, verdict.deliveries, verdict.starts):
        assert count.acknowledged > 0, report
        assert (count.lost, count.duplicated) == (0, 0), report
    assert (verdict.audit.lost, verdict.audit.duplicated) == (0, 0), report
    assert verdict.out_of_order == 0, report
    assert verdict.chain_ok and verdict.chain_rows == verdict.audit.acknowledged, report


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarted_under_load(system: System, mode: str) -> None:
    seen = Outage()
    report = await run_fault(
        system,
        postgres_restart(system, mode=mode, seen=seen),
        warmup=2.0,
        outage=2.0,
        settle=1.0,
        start_tasks=True,
    )

    # Nobody exited; readiness said NOT_SERVING while the database was away.
    assert set(all_alive(system).values()) == {None}, report
    assert len(seen.not_serving) == len(system.replicas), seen
    # A CreateTask meanwhile: UNAVAILABLE, MHV-002, told when to retry.
    ((status, code, delay),) = seen.answers
    assert (status, code) == ("UNAVAILABLE", "MHV-002"), seen
    assert delay is not None and delay > 0, seen
    # A webhook delivery meanwhile: 503, MHV-002, Retry-After, for the sender to try again.
    ((http_status, http_code, retry_after),) = seen.deliveries
    assert (http_status, http_code) == (503, "MHV-002"), seen
    assert retry_after is not None and int(retry_after) > 0, seen
    # The load saw nothing else, before, during or after.
    assert report.calls_during_outage > 0, report
    assert {e.split(" ", 1)[1] for e in report.errors} <= RETRYABLE_OUTCOMES, report
    assert_ledger_clean(report)


async def test_backends_terminated_under_load(system: System) -> None:
    report = await run_fault(
        system,
        backends_terminated(system, rounds=5, every=0.4),
        warmup=2.0,
        outage=0.0,
        settle=1.0,
        start_tasks=True,
    )

    assert set(all_alive(system).values()) == {None}, report
    assert {e.split(" ", 1)[1] for e in report.errors} <= RETRYABLE_OUTCOMES, report
    assert_ledger_clean(report)

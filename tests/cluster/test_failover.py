"""Two replicas of every service on two hosts: one host dies under load and comes back, and the
ledger shows nothing lost, nothing twice, one rate limit for the whole cluster."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster.drill import run_drill
from tests.cluster.network import namespaces_available
from tests.cluster.system import MEMBER_CREATE_LIMIT, System

pytestmark = pytest.mark.slow

# Retried by the clients, never an answer to the request itself.
TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "connection error", "HTTP 503"}


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """The cluster: network namespaces as root (CI), loopback addresses otherwise.

    MHV_TEST_CLUSTER_HOSTS=loopback forces the loopback variant.
    """
    namespaces = namespaces_available() and os.environ.get("MHV_TEST_CLUSTER_HOSTS") != "loopback"
    started = await System.start(Path(tmp_path_factory.mktemp("cluster")), namespaces=namespaces)
    yield started
    await started.close()


async def test_a_host_killed_under_load_and_restarted_loses_and_repeats_nothing(
    system: System,
) -> None:
    # Hosts that are namespaces resolve the services by name, one address per replica.
    assert system.names_resolve == system.network.namespaces
    report = await run_drill(system, mode="kill", warmup=2.0, outage=2.0, settle=1.0)
    verdict = report.verdict
    assert verdict.drained, report

    # Every acknowledged CreateTask is there once, under the id the client was given.
    assert verdict.creates.acknowledged > 0, report
    assert (verdict.creates.lost, verdict.creates.duplicated) == (0, 0), report
    # Every delivery answered 2xx was processed once, into one task.
    assert verdict.deliveries.acknowledged > 0, report
    assert (verdict.deliveries.lost, verdict.deliveries.duplicated) == (0, 0), report
    # Every committed task change is in the audit log once, and the chain holds.
    assert verdict.audit.acknowledged >= (
        verdict.creates.acknowledged + verdict.deliveries.acknowledged
    ), report
    assert (verdict.audit.lost, verdict.audit.duplicated) == (0, 0), report
    assert verdict.chain_ok, report
    assert verdict.chain_rows == verdict.audit.acknowledged, report

    # The clients saw only transient failures, all of them retried to success.
    assert report.rejected == [], report
    assert report.unacknowledged == [], report
    assert {e.split(" ", 1)[1] for e in report.errors} <= TRANSIENT, report
    assert report.calls_during_outage > 0, report

    # One member, one budget, wherever the calls land: both replicas refused its excess.
    assert report.rate is not None
    assert report.rate.allowed == MEMBER_CREATE_LIMIT, report
    assert all(refused > 0 for refused in report.rate.refusals_per_replica), report

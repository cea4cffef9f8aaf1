"""One small system for the fault drills: a replica of every service, a private PostgreSQL.

Its PostgreSQL is started here, whatever the rest of the suite uses, because the drills stop
and restart it. Each drill leaves the system whole again (every process running, the database
up), so the drills share it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster.system import System


@pytest.fixture(scope="package")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """Task, audit and webhook on one loopback host, with their own PostgreSQL and Redis."""
    started = await System.start(Path(tmp_path_factory.mktemp("faults")), namespaces=False, hosts=1)
    yield started
    await started.close()

#!/usr/bin/env python3
"""Disaster-recovery drills, end to end on this machine; prints one JSON object.

    .venv/bin/python scripts/test-dr.py                    # quick: 2,000 tasks, seconds of load
    .venv/bin/python scripts/test-dr.py --tasks 1000000 --load-seconds 20   # the full drill

Scenarios (each with rto_seconds, rpo_seconds, lost_acknowledged_writes): primary_lost,
operator_error, audit_integrity. See bench/dr/drill.py and docs/runbooks/disaster-recovery.md;
the full drill's figures are in docs/dr/drill-results.md. Exits 1 when a check fails.
"""

import os
import sys
from pathlib import Path

# The drill starts processes (services, mhv, PostgreSQL) while its own gRPC channels run; gRPC's
# fork handlers would then run in the child between fork and exec, where they can deadlock on a
# lock another thread held, and log a line for every process started.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# The drill drives the services with the test suite's harness (tests/harness.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dr.drill import main

if __name__ == "__main__":
    raise SystemExit(main())

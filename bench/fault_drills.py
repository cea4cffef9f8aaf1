"""Fault drills: PostgreSQL restarts, terminated backends, SIGKILL of a service, under load.

    python -m bench.fault_drills                          # every drill, 10 s faults
    python -m bench.fault_drills --only pg-fast --outage 30
    python -m bench.fault_drills --audit-outage 300       # also the audit service down 5 min

Starts one replica of every service on a loopback host with a private PostgreSQL and Redis
(tests/cluster/system.py), runs CreateTask clients (each starting the task it made) and a
webhook sender against them, injects each fault in turn (tests/faults/faults.py) and prints
what the clients saw and what the ledger found (tests/cluster/drill.py). The floor each
recovery is compared with is measured in the same run: PostgreSQL's own start until it accepts
connections, or the killed process's start until it reports SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.cluster_failover import add_load_arguments, count_line, errors_line
from tests.cluster.drill import Fault, Report, run_fault
from tests.cluster.system import System
from tests.faults.faults import (
    Backlog,
    Outage,
    all_alive,
    audit_down,
    backends_terminated,
    killed,
    postgres_restart,
)

KINDS = ("CreateTask", "StartTask", "webhook")
FLOORS = {
    "pg-fast": "PostgreSQL's start until it accepted connections",
    "pg-immediate": "PostgreSQL's start (with crash recovery) until it accepted connections",
    "terminate": "none (nothing to restart)",
    "kill-task": "the task process's start until it reported SERVING",
    "kill-audit": "the audit process's start until it reported SERVING",
    "audit-down": "the audit process's start until it reported SERVING; recovery runs until "
    "the outbox caught up (its oldest event under 2 s old)",
}


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def show(
    key: str,
    report: Report,
    seen: Outage | None,
    alive: dict[str, int | None],
    backlog: Backlog | None,
) -> None:
    verdict = report.verdict
    print(f"\n{report.mode} [{key}] (load average {_loadavg()})")
    print(
        f"  load          : {report.calls} attempts in {report.duration:.1f} s "
        f"({report.calls / report.duration:.0f}/s)"
    )
    print(
        f"  fault         : {report.outage:.1f} s until the repair began; "
        f"{report.calls_during_outage} attempts started from the fault until full recovery"
    )
    for kind in KINDS:
        during, whole = (
            errors_line(report.errors_during_outage, kind),
            errors_line(report.errors, kind),
        )
        print(
            f"  {kind + ' errors':<17}: during the fault {during}; whole run {whole}; "
            f"last failure {report.disruption[kind]:.1f} s after the fault"
        )
    if seen is not None:
        answers = ", ".join(f"{s} {c} retry in {d} s" for s, c, d in seen.answers)
        hooks = ", ".join(f"HTTP {s} {c} Retry-After {r}" for s, c, r in seen.deliveries)
        print(
            f"  while down    : {len(seen.not_serving)} replicas NOT_SERVING; "
            f"a CreateTask got {answers}; a webhook delivery {hooks}"
        )
    if backlog is not None and backlog.samples:
        depth, lag = backlog.peak()
        print(
            f"  outbox        : grew to {depth:.0f} events, the oldest {lag:.0f} s old "
            "(task_outbox_depth, task_outbox_lag_seconds: what TaskOutboxBacklog watches)"
        )
    floor = report.restart_floor
    if floor > 0.01:
        ratio = f"{report.recovery / floor:.2f}x"
        print(
            f"  recovery      : {report.recovery:.2f} s from the repair until full recovery; "
            f"floor {floor:.2f} s ({FLOORS[key]}): {ratio}"
        )
    else:
        print(f"  recovery      : {report.recovery:.2f} s until every service took traffic")
    print(
        f"  ledger        : {count_line('CreateTask', verdict.creates)}; "
        f"{count_line('StartTask', verdict.starts)}; "
        f"{count_line('webhook deliveries', verdict.deliveries)}; "
        f"{count_line('audit events', verdict.audit)}"
    )
    print(
        f"  audit         : chain {'verified' if verdict.chain_ok else 'BROKEN'} "
        f"({verdict.chain_rows} rows); tasks out of order {verdict.out_of_order}; "
        f"drained {verdict.drained}; unacknowledged {len(report.unacknowledged)}; "
        f"refused outright {len(report.rejected)}"
    )
    exited = {name: code for name, code in alive.items() if code is not None}
    print(f"  processes     : {'all running' if not exited else f'EXITED {exited}'}")


def drills(
    system: System, args: argparse.Namespace, backlog: Backlog
) -> dict[str, Callable[[], tuple[Fault, Outage | None, float]]]:
    """Each drill: its fault, what it observes while down, and how long the fault lasts."""

    def pg(mode: str) -> tuple[Fault, Outage | None, float]:
        seen = Outage()
        return postgres_restart(system, mode=mode, seen=seen), seen, args.outage

    return {
        "pg-fast": lambda: pg("fast"),
        "pg-immediate": lambda: pg("immediate"),
        "terminate": lambda: (
            backends_terminated(system, rounds=max(1, int(args.outage / 0.5)), every=0.5),
            None,
            0.0,
        ),
        "kill-task": lambda: (killed(system, "task"), None, args.outage),
        "kill-audit": lambda: (killed(system, "audit"), None, args.outage),
        "audit-down": lambda: (
            audit_down(system, backlog, seconds=args.audit_outage),
            None,
            args.audit_outage,
        ),
    }


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="mhv-faults-"))
    print(f"load average before: {_loadavg()} on {os.cpu_count()} CPUs")
    system = await System.start(root, namespaces=False, hosts=1)
    try:
        backlog = Backlog()
        table = drills(system, args, backlog)
        keys = args.only or [k for k in table if k != "audit-down" or args.audit_outage > 0]
        for key in keys:
            fault, seen, outage = table[key]()
            report = await run_fault(
                system,
                fault,
                warmup=args.warmup,
                outage=outage,
                settle=args.settle,
                clients=args.clients,
                senders=args.senders,
                pause=args.pause,
                start_tasks=True,
            )
            show(key, report, seen, all_alive(system), backlog if key == "audit-down" else None)
    finally:
        await system.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["pg-fast", "pg-immediate", "terminate", "kill-task", "kill-audit", "audit-down"],
    )
    parser.add_argument(
        "--audit-outage", type=float, default=0.0, help="seconds the audit service stays down"
    )
    add_load_arguments(parser, settle=3.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

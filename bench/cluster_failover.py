"""Failover drill: two replicas of every service on two hosts, one host taken away under load.

    python -m bench.cluster_failover                 # SIGKILL a host, then the link cut
    python -m bench.cluster_failover --mode kill --outage 20

Starts the cluster of tests/cluster (network namespaces as root, else loopback addresses; a
private PostgreSQL and Redis), runs CreateTask clients and webhook senders against it, takes the
first host away (``kill``: SIGKILL every process on it, then start them again; ``cut``: its link
down, then up, processes untouched), and prints what the clients saw and what the ledger found.
The reference figure is measured in the same run: after a kill, recovery cannot be faster than
starting the host's processes until they report SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from tests.cluster.drill import Count, Report, run_drill
from tests.cluster.network import namespaces_available
from tests.cluster.system import MEMBER_CREATE_LIMIT, System


def count_line(name: str, count: Count) -> str:
    """One ledger line: acknowledged, lost, duplicated."""
    return (
        f"{name} {count.acknowledged} acknowledged, lost {count.lost}, "
        f"duplicated {count.duplicated}"
    )


def errors_line(errors: dict[str, int], kind: str) -> str:
    """The failed attempts of one kind of call, by outcome."""
    mine = {k.split(" ", 1)[1]: n for k, n in errors.items() if k.startswith(kind + " ")}
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(mine.items())) or "none"


def show(report: Report, *, clients: int, senders: int, hosts: str) -> None:
    verdict = report.verdict
    away = {
        "kill": "SIGKILL of every process on host h0, then a restart",
        "cut": "link of host h0 down, then up (processes keep running)",
    }[report.mode]
    print(f"\nFailover drill, {report.mode}: {away}; 2 hosts ({hosts}) x task, audit, webhook")
    print(
        f"  load          : {clients} CreateTask clients, {senders} webhook sender(s); "
        f"{report.calls} attempts in {report.duration:.1f} s "
        f"({report.calls / report.duration:.0f}/s)"
    )
    print(
        f"  outage        : host away {report.outage:.1f} s; {report.calls_during_outage} attempts "
        "started from then until it served again"
    )
    for kind in ("CreateTask", "webhook"):
        during, whole = (
            errors_line(report.errors_during_outage, kind),
            errors_line(report.errors, kind),
        )
        print(
            f"  {kind + ' errors':<14}: during the outage {during}; whole run {whole}; "
            f"last failure {report.disruption[kind]:.1f} s after the host went"
        )
    if report.mode == "kill":
        ratio = report.recovery / report.restart_floor if report.restart_floor else float("nan")
        print(
            f"  recovery      : {report.recovery:.1f} s from the restart until every replica on "
            f"the host took traffic; its processes took {report.restart_floor:.1f} s to report "
            f"SERVING (the floor): {ratio:.2f}x"
        )
    else:
        print(
            f"  recovery      : {report.recovery:.1f} s from the link's return until every replica"
            " on the host took traffic (clients reconnect with a backoff of at most 5 s)"
        )
    print(
        f"  ledger        : {count_line('CreateTask', verdict.creates)}; "
        f"{count_line('webhook deliveries', verdict.deliveries)}; "
        f"{count_line('audit events', verdict.audit)}"
    )
    print(
        f"  audit chain   : {'verified' if verdict.chain_ok else 'BROKEN'} "
        f"({verdict.chain_rows} rows); drained: {verdict.drained}; unacknowledged: "
        f"{len(report.unacknowledged)}; refused outright: {len(report.rejected)}"
    )
    assert report.rate is not None
    refused = " + ".join(f"{n:.0f}" for n in report.rate.refusals_per_replica)
    print(
        f"  rate limit    : member {MEMBER_CREATE_LIMIT}/hour for CreateTask: "
        f"{report.rate.allowed} of {report.rate.attempts} allowed across "
        f"{len(report.rate.refusals_per_replica)} replicas (refused {refused})"
    )


async def run(args: argparse.Namespace) -> None:
    namespaces = args.hosts == "namespaces" or (args.hosts == "auto" and namespaces_available())
    hosts = "network namespaces" if namespaces else "loopback addresses"
    modes = ["kill", "cut"] if args.mode == "both" else [args.mode]
    if "cut" in modes and not namespaces:
        print("cut needs network namespaces (root): running kill only")
        modes = ["kill"]
    for mode in modes:
        root = Path(tempfile.mkdtemp(prefix="mhv-failover-"))
        system = await System.start(root, namespaces=namespaces)
        try:
            report = await run_drill(
                system,
                mode=mode,  # type: ignore[arg-type]
                warmup=args.warmup,
                outage=args.outage,
                settle=args.settle,
                clients=args.clients,
                senders=args.senders,
                pause=args.pause,
            )
        finally:
            await system.close()
        show(report, clients=args.clients, senders=args.senders, hosts=hosts)
        shutil.rmtree(root, ignore_errors=True)


def add_load_arguments(parser: argparse.ArgumentParser, *, settle: float) -> None:
    """The drill's timing (--warmup, --outage, --settle) and load (--clients, ...) options."""
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--outage", type=float, default=10.0, help="seconds each fault lasts")
    parser.add_argument("--settle", type=float, default=settle)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["kill", "cut", "both"], default="both")
    parser.add_argument("--hosts", choices=["auto", "namespaces", "loopback"], default="auto")
    add_load_arguments(parser, settle=5.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Memory of a task service process with the local embedding model loaded.

    python -m bench.service_memory [--database-url URL]

Starts the real task service (its own process, TLS, relay off) twice on throw-away migrated
databases of a server with pgvector (a private PostgreSQL from the pgserver build unless
--database-url names an administrator URL): once as migrated, where semantic search is
available and the model is loaded at start-up, and once with the task slice migrated below
the pgvector migrations, where it is not. Prints each process's resident memory (VmRSS) once
it reports healthy and after 50 semantic searches (or keyword searches without pgvector), and
the difference: what the model costs each process of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from mhv_cli.migrate import migrate_down
from tests.harness import Cluster, Deployment, Keys
from tests.task.semantic import HYBRID, KEYWORD, embedding_env, semantic_service


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(
    cluster: Cluster, keys: Keys, folder: Path, *, semantic: bool
) -> tuple[float, float]:
    deployment = await Deployment.create(cluster)
    try:
        if not semantic:
            await migrate_down(
                deployment.admin_url,
                slice_name="task",
                to_version=2,
                roles=deployment.roles,
                allow_data_loss=True,
            )
        async with semantic_service(deployment, keys, folder, extra=embedding_env(None)) as service:
            assert service.process.process is not None
            pid = service.process.process.pid
            started = _rss_mib(pid)
            await service.create("Fix authentication failure in WebKit browsers")
            for _ in range(50):
                await service.search(
                    "login page crashes on Safari", HYBRID if semantic else KEYWORD
                )
            return started, _rss_mib(pid)
    finally:
        await deployment.drop()


async def run(args: argparse.Namespace) -> None:
    print(f"load average: {_loadavg()}")
    cluster = Cluster(args.database_url) if args.database_url else await Cluster.start_private()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            keys = Keys.create(folder)
            with_model = await measure(cluster, keys, folder, semantic=True)
            without = await measure(cluster, keys, folder, semantic=False)
    finally:
        await cluster.close()
    print("task service process, VmRSS at start / after 50 searches:")
    print(
        f"  semantic search available (model loaded): {with_model[0]:.0f} / {with_model[1]:.0f} MiB"
    )
    print(f"  without pgvector (no model):             {without[0]:.0f} / {without[1]:.0f} MiB")
    print(f"  the model and its runtime cost {with_model[1] - without[1]:.0f} MiB per process")
    print(f"load average: {_loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="administrator URL of a server with pgvector")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

"""SearchTasks (keyword) latency at scale, beside the statement alone on the same database.

    python -m bench.keyword_search [--tasks 1000000] [--rounds 2] [--against REV ...]

Loads `--tasks` tasks into a throw-away database migrated like production. Their titles (5
words) and descriptions (20 words) are drawn from the evaluation corpus's vocabulary
(bench/data/search_eval.json), so every word of a query matches a share of the tasks the way
a real backlog's words do; the full-text index is built once after the load, as a restore
would. Then, in each round and one query at a time:

- the statement alone: the task store's `search_tasks` (websearch_to_tsquery, the weighted
  tsvector, ts_rank_cd, first page of 20) over asyncpg from this process: what PostgreSQL
  itself needs, the physical floor of the call;
- SearchTasks over gRPC against the task service of this tree, and with `--against REV`
  (repeatable) the service as of that revision beside it, on the same data.

Queries: the single keywords of the load test and the evaluation set's queries (several words,
all of which must match). Prints p50/p95/p99 per variant, the ratio of each service's p95 to
the statement's, and the goal (issue 17): p95 <= 20 ms at a million tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from grpc import aio

from bench._env import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    admin_execute,
    service_env,
    start_order_ports,
    summary,
)
from bench.create_task import _checkout, _load, _source_paths
from bench.load_test import WORDS
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from mhv_task._store import search_tasks
from tests.harness import RELAXED_LIMITS

EVAL_SET = Path(__file__).resolve().parent / "data" / "search_eval.json"
GOAL_P95_MS = 20.0
PAGE = 20
CHUNK = 50_000


def _vocabulary(data: dict[str, Any]) -> list[str]:
    words: set[str] = set()
    for t in data["tasks"]:
        for w in f"{t['title']} {t['description']}".split():
            w = w.strip(".,:;()'\"!?").lower()
            if w.isalpha() and len(w) > 2:
                words.add(w)
    return sorted(words | set(WORDS))


async def load_tasks(url: str, user_id: str, n: int, vocabulary: list[str]) -> float:
    """Insert `n` tasks by COPY, then build the full-text index; returns the seconds taken."""
    rng = np.random.default_rng(17)
    vocab = np.array(vocabulary, dtype=object)
    started = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET search_path = task")
        # Triggers (the embedding queue) off for the load; the index built once afterwards.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("DROP INDEX idx_tasks_search")
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            titles = vocab[rng.integers(0, len(vocab), (size, 5))]
            descriptions = vocab[rng.integers(0, len(vocab), (size, 20))]
            records = [
                (" ".join(t), " ".join(d), "demo", user_id)
                for t, d in zip(titles, descriptions, strict=True)
            ]
            await conn.copy_records_to_table(
                "tasks",
                records=records,
                columns=["title", "description", "repository", "created_by"],
            )
        await conn.execute("CREATE INDEX idx_tasks_search ON tasks USING gin (search_vector)")
        await conn.execute("ANALYZE tasks")
    finally:
        await conn.close()
    return time.monotonic() - started


async def statement_latencies(url: str, queries: list[str]) -> list[float]:
    out = []
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET search_path = task")
        for q in queries:
            t0 = time.perf_counter()
            await search_tasks(conn, query=q, filters={}, after=None, limit=PAGE, timeout=30)
            out.append(time.perf_counter() - t0)
    finally:
        await conn.close()
    return out


async def rpc_latencies(target: str, token: str, queries: list[str]) -> list[float]:
    metadata = (("authorization", f"Bearer {token}"),)
    out = []
    async with aio.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        for q in queries:
            t0 = time.perf_counter()
            await stub.SearchTasks(
                # Keyword mode by name: unspecified means hybrid where semantic search is on.
                # Revisions from before search modes ignore the field and search by keyword.
                task_pb2.SearchTasksRequest(
                    query=q, page_size=PAGE, mode=task_pb2.SEARCH_MODE_KEYWORD
                ),
                metadata=metadata,
            )
            out.append(time.perf_counter() - t0)
    return out


async def run(args: argparse.Namespace) -> None:
    data = json.loads(EVAL_SET.read_text())
    queries = list(WORDS) + [q["query"] for q in data["queries"]]
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    tmp = Path(tempfile.mkdtemp(prefix="mhv-keyword-"))
    keys = Keys.create(tmp / "keys")
    services: list[ServiceProcess] = []
    try:
        user_id = str(
            await admin_execute(
                deployment.admin_url,
                "INSERT INTO task.users (username, email) VALUES ('kw', 'kw@example.test')"
                " RETURNING id",
            )
        )
        print(f"loading {args.tasks:,} tasks (load average {_load()})", flush=True)
        seconds = await load_tasks(deployment.admin_url, user_id, args.tasks, _vocabulary(data))
        print(f"  loaded and indexed in {seconds:.0f} s", flush=True)
        variants: dict[str, ServiceProcess] = {}
        sources: dict[str, Path | None] = {"this tree": None}
        for i, revision in enumerate(args.against):
            sources[revision] = _checkout(revision, tmp / f"against-{i}")
        for name, source in sources.items():
            ports = start_order_ports()
            extra: dict[str, str] = (
                {"PYTHONPATH": os.pathsep.join(_source_paths(source))} if source else {}
            )
            env = service_env(
                deployment,
                keys,
                {
                    "MHV_TASK_GRPC_PORT": str(ports["task_grpc"]),
                    "MHV_TASK_METRICS_PORT": str(ports["task_metrics"]),
                    "MHV_RELAY_ENABLED": "false",
                    "MHV_RATE_LIMITS": RELAXED_LIMITS,
                    **extra,
                },
            )
            service = ServiceProcess(
                "mhv_task",
                env,
                ports["task_grpc"],
                ports["task_metrics"],
                tmp / f"task-{len(services)}.log",
            )
            services.append(service)
            await service.start()
            variants[name] = service
        token = keys.token(Role.MEMBER, subject=user_id)
        samples: dict[str, list[float]] = {"statement": []}
        load_before = _load()
        # Warm-up: the index's pages into the cache, the services' connections and statements.
        await statement_latencies(deployment.admin_url, queries)
        for service in variants.values():
            await rpc_latencies(service.target, token, queries)
        for _ in range(args.rounds):
            samples["statement"] += await statement_latencies(deployment.admin_url, queries)
            for name, service in variants.items():
                got = await rpc_latencies(service.target, token, queries)
                samples.setdefault(name, []).extend(got)
        single = len(WORDS)  # the first queries of every pass are the single keywords
        print(
            f"SearchTasks (keyword) at {args.tasks:,} tasks, {len(queries)} queries x "
            f"{args.rounds} rounds, one at a time; load average {load_before} before, "
            f"{_load()} after"
        )
        floor = summary(samples["statement"])
        for name, values in samples.items():
            s = summary(values)
            words = summary([v for i, v in enumerate(values) if i % len(queries) < single])
            ratio = (
                ""
                if name == "statement"
                else f"; p95 {s['p95'] / floor['p95']:.2f}x the statement's"
            )
            print(
                f"  {name:<12}: p50 {s['p50']:6.1f} ms  p95 {s['p95']:6.1f} ms  "
                f"p99 {s['p99']:6.1f} ms{ratio}; single keywords alone p95 {words['p95']:.1f} ms"
            )
        after = summary(samples["this tree"])
        met = "met" if after["p95"] <= GOAL_P95_MS else "not met"
        print(f"  goal p95 <= {GOAL_P95_MS:.0f} ms through the service: {met}")
    finally:
        for service in services:
            service.stop()
        await deployment.drop()
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        help="also run the task service as of this git revision (may be repeated)",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

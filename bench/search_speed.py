"""Speed of semantic search: the local model, and pgvector's HNSW index at scale.

    python -m bench.search_speed [--tasks 100000] [--database-url URL]

Local model (in this process): load time, resident memory before and after loading, latency
of one query (p50/p95 over the evaluation queries, one at a time) and throughput over task
texts.

pgvector (a private PostgreSQL from the pgserver build unless --database-url names a server
with pgvector): `--tasks` tasks with synthetic vectors around the evaluation corpus's real ones
(each a real task vector plus Gaussian noise, normalised, so the data has the clustered shape
of real embeddings), loaded by COPY, then the model's HNSW index built as the migration defines
it (m = 16, ef_construction = 64; timed). Queries are the evaluation queries' real vectors:

- semantic search through the index (ef_search = 40, the default), p50/p95 of the statement,
  and of query embedding plus statement;
- the same statement without the index (every vector read and compared), p50: the work the
  index saves, printed as a ratio;
- the index's recall@10 against that exact answer.

Then SearchTasks as the service runs it, through the task store's own functions and fusion
(`search_semantic` with its ef_search, `search_tasks`, `fuse`): semantic, hybrid, hybrid in one
repository (half the tasks), and keyword for comparison, each including the query's embedding
by the local model; and the backfill: the embedding worker's own rounds (claim 32, embed with
the local model, store, finish) over the backlog the inserts filled, for --backfill-seconds,
with the time 100k tasks would take at that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import time
from pathlib import Path

import asyncpg
import numpy as np

from bench._env import percentile, pgvector_task_connection
from mhv_task._embedding_local import LocalEmbedder
from mhv_task._semantic import DEPTH, fuse
from mhv_task._store import search_tasks
from mhv_task._store_embeddings import (
    claim_backlog,
    search_semantic,
    semantic_statement,
    store_claimed,
)

EVAL_SET = Path(__file__).resolve().parent / "data" / "search_eval.json"
INDEX = "task_embeddings_hnsw_all_minilm_l6_v2"


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _encode_vector(vector: np.ndarray) -> bytes:
    # pgvector's binary form: dimensions, an unused int16, then big-endian float4s.
    return struct.pack(">HH", len(vector), 0) + np.asarray(vector, dtype=">f4").tobytes()


def _decode_vector(data: bytes) -> np.ndarray:
    (dims, _) = struct.unpack_from(">HH", data)
    return np.frombuffer(data, dtype=">f4", count=dims, offset=4).astype(np.float32)


async def measure_model(embedder_factory: type[LocalEmbedder], data: dict) -> LocalEmbedder:
    before = _rss_mib()
    started = time.perf_counter()
    embedder = embedder_factory.load()
    load_s = time.perf_counter() - started
    after = _rss_mib()
    queries = [q["query"] for q in data["queries"]]
    corpus = [f"{t['title']}\n{t['description']}" for t in data["tasks"]]
    await embedder.embed(corpus[:8])
    latencies = []
    for q in queries:
        t = time.perf_counter()
        await embedder.embed([q])
        latencies.append(time.perf_counter() - t)
    texts = (corpus * 3)[:512]
    wall, cpu = time.perf_counter(), time.process_time()
    await embedder.embed(texts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"local model {embedder.model}")
    print(
        f"  load {load_s:.2f} s; RSS {before:.0f} MiB before, {after:.0f} MiB with the model "
        f"(+{after - before:.0f} MiB), {_rss_mib():.0f} MiB after the runs"
    )
    print(
        f"  one query: p50 {1000 * percentile(latencies, 50):.1f} ms, "
        f"p95 {1000 * percentile(latencies, 95):.1f} ms ({len(latencies)} queries)"
    )
    print(
        f"  throughput: {len(texts) / wall:.1f} task texts/s "
        f"({len(texts) / cpu:.1f} per CPU second) over {len(texts)} texts"
    )
    return embedder


async def measure_service_search(
    conn: asyncpg.Connection, embedder: LocalEmbedder, data: dict
) -> dict[str, list[float]]:
    """Latency of semantic and hybrid SearchTasks through the service's own store and fusion."""
    results: dict[str, list[float]] = {
        "semantic": [],
        "hybrid": [],
        "hybrid, one repository": [],
        "keyword (for comparison)": [],
    }
    sql, args, _ = semantic_statement(
        vector=(await embedder.embed(["probe"])).vectors[0],
        model=embedder.model,
        filters={},
        limit=DEPTH,
    )
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    if INDEX not in plan:
        raise SystemExit(f"the service's statement does not use the HNSW index:\n{plan}")
    sql, args, _ = semantic_statement(
        vector=(await embedder.embed(["probe"])).vectors[0],
        model=embedder.model,
        filters={"repository": "bench-b"},
        limit=DEPTH,
    )
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    print(
        "  the service's statement for one repository (half the tasks) "
        + ("uses the HNSW index" if INDEX in plan else "filters first, then sorts exactly")
    )
    results["semantic statement only"] = []
    for query in data["queries"][:120]:
        text = query["query"]
        vector = (await embedder.embed([text])).vectors[0]
        started = time.perf_counter()
        await search_semantic(
            conn, vector=vector, model=embedder.model, filters={}, limit=DEPTH, timeout=None
        )
        results["semantic statement only"].append(time.perf_counter() - started)
        for name, latencies in results.items():
            if name == "semantic statement only":
                continue
            filters = {"repository": "bench-b"} if "repository" in name else {}
            started = time.perf_counter()
            if name.startswith("keyword"):
                await search_tasks(
                    conn, query=text, filters=filters, after=None, limit=DEPTH, timeout=None
                )
            else:
                vector = (await embedder.embed([text])).vectors[0]
                nearest = await search_semantic(
                    conn,
                    vector=vector,
                    model=embedder.model,
                    filters=filters,
                    limit=DEPTH,
                    timeout=None,
                )
                keyword = await search_tasks(
                    conn,
                    query=text,
                    filters=filters,
                    after=None,
                    limit=DEPTH,
                    timeout=None,
                    not_embedded_by=embedder.model if name == "semantic" else None,
                )
                fuse(keyword, nearest)
            latencies.append(time.perf_counter() - started)
    return results


async def measure_backfill(
    conn: asyncpg.Connection, embedder: LocalEmbedder, *, seconds: float
) -> tuple[int, float, float]:
    """The embedding worker's rounds over the backlog the inserts filled, for `seconds`."""
    done = 0
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        claimed = await claim_backlog(conn, limit=32, lease_seconds=120, timeout=None)
        if not claimed:
            break
        embedded = await embedder.embed([text for _, _, text in claimed])
        await store_claimed(
            conn, claimed=claimed, vectors=embedded.vectors, model=embedded.model, timeout=None
        )
        done += len(claimed)
    return done, time.perf_counter() - started, time.process_time() - cpu


async def measure_pgvector(
    conn: asyncpg.Connection,
    embedder: LocalEmbedder,
    data: dict,
    n: int,
    *,
    backfill_seconds: float = 60.0,
) -> None:
    await conn.set_type_codec(
        "vector", schema="task", encoder=_encode_vector, decoder=_decode_vector, format="binary"
    )
    rng = np.random.default_rng(16)
    centres = (
        await embedder.embed([f"{t['title']}\n{t['description']}" for t in data["tasks"]])
    ).vectors
    queries = (await embedder.embed([q["query"] for q in data["queries"]])).vectors
    user = await conn.fetchval(
        "INSERT INTO users (username, email) VALUES ('speed', 'speed@example.com') RETURNING id"
    )
    started = time.perf_counter()
    # Task g has the text of corpus task g mod 221 (numbered), so keyword search has real
    # text to match; every other one is in a second repository, for the filtered searches.
    titles = [t["title"] for t in data["tasks"]]
    descriptions = [t["description"] for t in data["tasks"]]
    first = await conn.fetchval(
        "WITH t AS (INSERT INTO tasks (title, description, repository, created_by)"
        " SELECT ($3::text[])[1 + g % cardinality($3::text[])] || ' #' || g,"
        " ($4::text[])[1 + g % cardinality($3::text[])],"
        " CASE WHEN g % 2 = 0 THEN 'bench' ELSE 'bench-b' END, $2"
        " FROM generate_series(0, $1 - 1) AS g ORDER BY g"
        " RETURNING id) SELECT min(id) FROM t",
        n,
        user,
        titles,
        descriptions,
    )
    await conn.execute(f"DROP INDEX {INDEX}")
    digest = bytes(32)
    batch = 20_000
    for start in range(0, n, batch):
        count = min(batch, n - start)
        # The vector of the task's own corpus text, plus noise.
        picks = centres[(np.arange(start, start + count)) % len(centres)]
        noisy = picks + rng.normal(0, 0.03, picks.shape).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        await conn.copy_records_to_table(
            "task_embeddings",
            columns=["task_id", "model", "dimensions", "embedding", "content_sha256"],
            records=[
                (first + start + i, embedder.model, embedder.dimensions, v, digest)
                for i, v in enumerate(noisy)
            ],
        )
    load_s = time.perf_counter() - started
    # pgvector builds fast only while the graph fits in maintenance_work_mem (about 2.5 kB per
    # 384-dimension vector); past it, it goes on far slower on disk.
    await conn.execute(f"SET maintenance_work_mem = '{max(1024, n * 3 // 1024)}MB'")
    started = time.perf_counter()
    await conn.execute(
        f"CREATE INDEX {INDEX} ON task_embeddings"
        f" USING hnsw ((embedding::vector({embedder.dimensions})) vector_cosine_ops)"
        f" WHERE model = '{embedder.model}'"
    )
    build_s = time.perf_counter() - started
    await conn.execute("ANALYZE task_embeddings; ANALYZE tasks")
    sql = (
        f"SELECT task_id FROM task_embeddings WHERE model = '{embedder.model}'"  # nosec B608: the model name is the bench's own; a partial index needs it literal
        f" ORDER BY embedding::vector({embedder.dimensions}) <=> $1::vector({embedder.dimensions})"
        " LIMIT 10"
    )
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, queries[0]))
    if INDEX not in plan:
        raise SystemExit(f"the planner does not use the HNSW index:\n{plan}")
    indexed: list[float] = []
    with_embedding: list[float] = []
    answers: dict[int, list[int]] = {}
    for i, (text, vector) in enumerate(zip(data["queries"], queries, strict=True)):
        t = time.perf_counter()
        rows = await conn.fetch(sql, vector)
        indexed.append(time.perf_counter() - t)
        answers[i] = [r["task_id"] for r in rows]
        t = time.perf_counter()
        fresh = (await embedder.embed([text["query"]])).vectors[0]
        await conn.fetch(sql, fresh)
        with_embedding.append(time.perf_counter() - t)
    # The same ordering with "+ 0" cannot be served by the index: every vector is read.
    dims = embedder.dimensions
    exact_sql = (
        f"SELECT task_id FROM task_embeddings WHERE model = '{embedder.model}'"  # nosec B608: the model name is the bench's own; a partial index needs it literal
        f" ORDER BY (embedding::vector({dims}) <=> $1::vector({dims})) + 0 LIMIT 10"
    )
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + exact_sql, queries[0]))
    if INDEX in plan:
        raise SystemExit(f"the exact statement uses the index:\n{plan}")
    exact: list[float] = []
    agreement: list[float] = []
    for i, vector in enumerate(queries[:40]):
        t = time.perf_counter()
        rows = await conn.fetch(exact_sql, vector)
        exact.append(time.perf_counter() - t)
        agreement.append(len({r["task_id"] for r in rows} & set(answers[i])) / 10)
    service = await measure_service_search(conn, embedder, data)
    backfill = await measure_backfill(conn, embedder, seconds=backfill_seconds)
    size = await conn.fetchval(f"SELECT pg_size_pretty(pg_relation_size('{INDEX}'))")
    version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    print(f"\npgvector {version}, {n} task vectors ({embedder.dimensions} dimensions)")
    print(f"  load by COPY {load_s:.1f} s; HNSW build {build_s:.1f} s; index size {size}")
    print(
        f"  semantic search, top 10 through HNSW: p50 {1000 * percentile(indexed, 50):.2f} ms, "
        f"p95 {1000 * percentile(indexed, 95):.2f} ms ({len(indexed)} queries)"
    )
    print(
        f"  with query embedding: p50 {1000 * percentile(with_embedding, 50):.1f} ms, "
        f"p95 {1000 * percentile(with_embedding, 95):.1f} ms"
    )
    print(
        f"  exact scan of every vector: p50 {1000 * percentile(exact, 50):.1f} ms "
        f"({percentile(exact, 50) / percentile(indexed, 50):.0f}x the index's p50); "
        f"HNSW recall@10 against it {statistics.fmean(agreement):.3f}"
    )
    print("  SearchTasks as the service runs it (query embedding, statements, fusion; top 200):")
    for name, latencies in service.items():
        print(
            f"    {name:<28} p50 {1000 * percentile(latencies, 50):6.1f} ms, "
            f"p95 {1000 * percentile(latencies, 95):6.1f} ms"
        )
    done, elapsed, cpu = backfill
    rate = done / elapsed
    print(
        f"  backfill (the embedding worker's rounds of 32, for {elapsed:.0f} s): {done} tasks, "
        f"{rate:.1f} tasks/s ({done / cpu:.1f} per CPU second of this process); "
        f"100000 tasks would take {100_000 / rate / 60:.0f} min at this rate"
    )


async def run(args: argparse.Namespace) -> None:
    data = json.loads(EVAL_SET.read_text())
    print(f"load average: {_loadavg()}")
    embedder = await measure_model(LocalEmbedder, data)
    try:
        async with pgvector_task_connection(args.database_url) as conn:
            await measure_pgvector(
                conn, embedder, data, args.tasks, backfill_seconds=args.backfill_seconds
            )
    finally:
        await embedder.aclose()
    print(f"load average: {_loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--database-url", help="administrator URL of a server with pgvector")
    parser.add_argument(
        "--backfill-seconds", type=float, default=60.0, help="how long to run the backfill"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

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

The service's search will add the task rows and filters on top of these statements.
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


async def measure_pgvector(
    conn: asyncpg.Connection, embedder: LocalEmbedder, data: dict, n: int
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
    first = await conn.fetchval(
        "WITH t AS (INSERT INTO tasks (title, description, repository, created_by)"
        " SELECT 'synthetic ' || g, '', 'bench', $2 FROM generate_series(1, $1) AS g"
        " RETURNING id) SELECT min(id) FROM t",
        n,
        user,
    )
    await conn.execute(f"DROP INDEX {INDEX}")
    digest = bytes(32)
    batch = 20_000
    for start in range(0, n, batch):
        count = min(batch, n - start)
        picks = centres[rng.integers(0, len(centres), count)]
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
    await conn.execute("SET maintenance_work_mem = '1GB'")
    started = time.perf_counter()
    await conn.execute(
        f"CREATE INDEX {INDEX} ON task_embeddings"
        f" USING hnsw ((embedding::vector({embedder.dimensions})) vector_cosine_ops)"
        f" WHERE model = '{embedder.model}'"
    )
    build_s = time.perf_counter() - started
    await conn.execute("ANALYZE task_embeddings")
    sql = (
        f"SELECT task_id FROM task_embeddings WHERE model = '{embedder.model}'"
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
        f"SELECT task_id FROM task_embeddings WHERE model = '{embedder.model}'"
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


async def run(args: argparse.Namespace) -> None:
    data = json.loads(EVAL_SET.read_text())
    print(f"load average: {_loadavg()}")
    embedder = await measure_model(LocalEmbedder, data)
    try:
        async with pgvector_task_connection(args.database_url) as conn:
            await measure_pgvector(conn, embedder, data, args.tasks)
    finally:
        await embedder.aclose()
    print(f"load average: {_loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--database-url", help="administrator URL of a server with pgvector")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Search quality on the evaluation set: recall@5 and MRR of keyword, semantic and hybrid search.

    python -m bench.search_quality [--database-url URL] [--k 5] [--show-misses]

bench/data/search_eval.json holds engineering tasks (title, description) and queries people
would type to find them, paraphrased with few words in common with the task. The bench loads
the tasks into a throw-away database migrated like production (a private PostgreSQL from the
pgserver build, which ships pgvector, unless --database-url names an administrator URL of a
server that has it), embeds them with the local model, and runs every query three ways:

- keyword: SearchTasks in keyword mode (`search_tasks` of the task store:
  websearch_to_tsquery('english'), the weighted title/description tsvector, ts_rank_cd);
- semantic: SearchTasks in semantic mode: the task store's `search_semantic` (cosine nearest
  neighbours through the model's HNSW index, as the service runs it), with the keyword
  matches of tasks not embedded (none here: every task is embedded) fused in;
- hybrid: SearchTasks in hybrid mode: the service's reciprocal rank fusion (`fuse`, k = 60)
  of the keyword and semantic lists (top 50 each here).

Two more rows show where the keyword arm loses: "keyword (any word)" matches tasks sharing any
query lexeme instead of all of them, and "hybrid (any word)" fuses that list instead.

Recall@5 is the share of a query's relevant tasks found in the first five results, averaged
over queries; MRR the mean of 1/rank of the first relevant result (0 when none in the first
50). The goals (issue 16): hybrid recall@5 >= 0.9, semantic >= keyword + 0.30.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import numpy as np

from bench._env import pgvector_task_connection
from mhv_task._embedding_local import LocalEmbedder
from mhv_task._models import Task
from mhv_task._semantic import fuse
from mhv_task._store import search_tasks
from mhv_task._store_embeddings import search_semantic

EVAL_SET = Path(__file__).resolve().parent / "data" / "search_eval.json"
DEPTH = 50
RRF_K = 60

# The keyword statement with OR between the query's lexemes instead of AND.
_ANY_WORD = """
SELECT id FROM tasks,
    (SELECT replace(websearch_to_tsquery('english', $1)::text, ' & ', ' | ')::tsquery AS q) AS w
WHERE search_vector @@ w.q
ORDER BY ts_rank_cd(search_vector, w.q) DESC, id DESC
LIMIT $2
"""
# Share of a query's lexemes that occur in a task's search vector.
_SHARED = """
SELECT coalesce(
    (SELECT count(*) FROM unnest(tsvector_to_array(to_tsvector('english', $1))) AS w
     WHERE w = ANY (tsvector_to_array(t.search_vector)))::float
    / nullif(cardinality(tsvector_to_array(to_tsvector('english', $1))), 0), 0)
FROM tasks t WHERE t.id = $2
"""

Ranker = Callable[[str, np.ndarray], Awaitable[list[int]]]


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form of `vector`."""
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def rrf(*rankings: Sequence[int], k: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion of id lists (for the any-word row, which the service lacks)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda item: (-scores[item], -item))


async def load(
    conn: asyncpg.Connection, embedder: LocalEmbedder, tasks: list[dict[str, str]]
) -> dict[str, int]:
    """Insert the tasks and their embeddings; evaluation id -> database id."""
    user = await conn.fetchval(
        "INSERT INTO users (username, email) VALUES ('eval', 'eval@example.com') RETURNING id"
    )
    ids: dict[str, int] = {}
    for task in tasks:
        ids[task["id"]] = await conn.fetchval(
            "INSERT INTO tasks (title, description, repository, created_by)"
            " VALUES ($1, $2, $3, $4) RETURNING id",
            task["title"],
            task["description"],
            task["repository"],
            user,
        )
    texts = [f"{t['title']}\n{t['description']}" for t in tasks]
    vectors = (await embedder.embed(texts)).vectors
    await conn.executemany(
        "INSERT INTO task_embeddings (task_id, model, dimensions, embedding, content_sha256)"
        " VALUES ($1, $2, $3, $4::vector, $5)",
        [
            (
                ids[t["id"]],
                embedder.model,
                embedder.dimensions,
                vector_literal(v),
                hashlib.sha256(text.encode()).digest(),
            )
            for t, v, text in zip(tasks, vectors, texts, strict=True)
        ],
    )
    await conn.execute("ANALYZE tasks; ANALYZE task_embeddings")
    return ids


async def evaluate(args: argparse.Namespace) -> None:
    data = json.loads(EVAL_SET.read_text())
    embedder = LocalEmbedder.load()
    try:
        async with pgvector_task_connection(args.database_url) as conn:
            ids = await load(conn, embedder, data["tasks"])
            await report(conn, embedder, data, ids, args)
    finally:
        await embedder.aclose()


async def report(
    conn: asyncpg.Connection,
    embedder: LocalEmbedder,
    data: dict[str, list[dict[str, object]]],
    ids: dict[str, int],
    args: argparse.Namespace,
) -> None:
    queries = data["queries"]
    texts = [str(q["query"]) for q in queries]
    vectors = (await embedder.embed(texts)).vectors

    async def keyword_hits(query: str) -> list[tuple[Task, float]]:
        return await search_tasks(
            conn, query=query, filters={}, after=None, limit=DEPTH, timeout=None
        )

    async def semantic_hits(vector: np.ndarray) -> list[tuple[Task, float]]:
        return await search_semantic(
            conn, vector=vector, model=embedder.model, filters={}, limit=DEPTH, timeout=None
        )

    async def keyword(query: str, _v: np.ndarray) -> list[int]:
        return [task.id for task, _rank in await keyword_hits(query)]

    async def any_word(query: str, _v: np.ndarray) -> list[int]:
        return [r["id"] for r in await conn.fetch(_ANY_WORD, query, DEPTH)]

    async def semantic(query: str, vector: np.ndarray) -> list[int]:
        # Semantic mode also fuses the keyword matches of tasks not embedded: none here.
        unembedded = await search_tasks(
            conn,
            query=query,
            filters={},
            after=None,
            limit=DEPTH,
            timeout=None,
            not_embedded_by=embedder.model,
        )
        return [hit.task.id for hit in fuse(unembedded, await semantic_hits(vector))]

    async def hybrid(query: str, vector: np.ndarray) -> list[int]:
        hits = fuse(await keyword_hits(query), await semantic_hits(vector))
        return [hit.task.id for hit in hits]

    async def hybrid_any(query: str, vector: np.ndarray) -> list[int]:
        nearest = [task.id for task, _ in await semantic_hits(vector)]
        return rrf(await any_word(query, vector), nearest)

    modes: dict[str, Ranker] = {
        "keyword": keyword,
        "semantic": semantic,
        "hybrid": hybrid,
        "keyword (any word)": any_word,
        "hybrid (any word)": hybrid_any,
    }
    results: dict[str, tuple[float, float]] = {}
    misses: dict[str, list[str]] = {name: [] for name in modes}
    for name, rank in modes.items():
        recalls, reciprocal = [], []
        for query, vector in zip(queries, vectors, strict=True):
            relevant = {ids[str(r)] for r in query["relevant"]}  # type: ignore[attr-defined]
            found = await rank(str(query["query"]), vector)
            hits = len(relevant & set(found[: args.k]))
            recalls.append(hits / len(relevant))
            first = next((i for i, t in enumerate(found, start=1) if t in relevant), None)
            reciprocal.append(1.0 / first if first else 0.0)
            if hits < len(relevant):
                misses[name].append(str(query["query"]))
        results[name] = (statistics.fmean(recalls), statistics.fmean(reciprocal))

    shared = [
        await conn.fetchval(_SHARED, str(q["query"]), ids[str(r)])
        for q in queries
        for r in q["relevant"]  # type: ignore[attr-defined]
    ]
    print(
        f"{len(data['tasks'])} tasks, {len(queries)} queries "
        f"({sum(len(q['relevant']) for q in queries)} relevant pairs); "  # type: ignore[arg-type]
        f"model {embedder.model}"
    )
    print(
        f"a query shares on average {100 * statistics.fmean(shared):.0f}% of its lexemes with "
        f"a relevant task; {100 * sum(s == 0 for s in shared) / len(shared):.0f}% of the pairs "
        "share none"
    )
    print(f"\n{'mode':<20}{f'recall@{args.k}':>10}{'MRR':>8}")
    for name, (recall, mrr) in results.items():
        print(f"{name:<20}{recall:>10.3f}{mrr:>8.3f}")
    hybrid_ok = results["hybrid"][0] >= 0.9
    gap = results["semantic"][0] - results["keyword"][0]
    print(
        f"\ngoal hybrid recall@{args.k} >= 0.90: {'met' if hybrid_ok else 'NOT met'} "
        f"({results['hybrid'][0]:.3f}); goal semantic >= keyword + 0.30: "
        f"{'met' if gap >= 0.30 else 'NOT met'} (+{gap:.3f})"
    )
    if args.show_misses:
        for name in ("semantic", "hybrid"):
            print(f"\n{name} misses ({len(misses[name])}):")
            for query in misses[name]:
                print(f"  {query}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="administrator URL of a server with pgvector")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--show-misses", action="store_true")
    asyncio.run(evaluate(parser.parse_args()))


if __name__ == "__main__":
    main()

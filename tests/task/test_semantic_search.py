"""SearchTasks in semantic and hybrid mode, through a real task service on PostgreSQL + pgvector.

The task service embeds tasks itself (its embedding worker, after each commit), with the real
local model behind a remote provider that is a local stand-in for a third-party API (see
`tests.task.semantic`). Nothing here writes vectors behind the service's back.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from mahavishnu.task.v1 import task_pb2
from mhv_task._embedding import LOCAL_MODEL
from mhv_task._embedding_local import LocalEmbedder
from tests.harness import Deployment, Keys, bearer, metric, mhv_code, rpc_error
from tests.task.embedding.stub import RemoteEmbeddingsStub, remote_embeddings_stub
from tests.task.semantic import (
    HYBRID,
    KEYWORD,
    SEMANTIC,
    UNSPECIFIED,
    SemanticService,
    embedding_env,
    ids,
    semantic_service,
    wait_until_embedded,
)

pytestmark = pytest.mark.slow

SAFARI = "login page crashes on Safari"
CORPUS = [
    (
        "Fix authentication failure in WebKit browsers",
        "Users on Apple's browser are sent back to the sign-in form: the session cookie is "
        "dropped after the redirect.",
    ),
    ("Speed up the nightly billing export", "The invoice CSV job takes four hours to finish."),
    ("Add a dark theme to the settings screen", "People working at night want darker colours."),
    ("Rotate the database credentials", "The PostgreSQL passwords are two years old."),
]


@pytest.fixture(scope="module")
async def remote_stub(local_embedder: LocalEmbedder) -> AsyncIterator[RemoteEmbeddingsStub]:
    async with remote_embeddings_stub(local_embedder) as running:
        yield running


@pytest.fixture(scope="module")
async def service(
    vector_deployment: Deployment,
    keys: Keys,
    remote_stub: RemoteEmbeddingsStub,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SemanticService]:
    async with semantic_service(
        vector_deployment,
        keys,
        Path(tmp_path_factory.mktemp("semantic")),
        extra=embedding_env(remote_stub.url),
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def corpus(service: SemanticService) -> list[task_pb2.Task]:
    made = [await service.create(title, description) for title, description in CORPUS]
    # A near-duplicate of the first task in the other repository, for the filters.
    made.append(
        await service.create(
            "Safari users cannot sign in to the admin console",
            "The WebKit login form loops back to itself.",
            repository="mahavishnu",
        )
    )
    await wait_until_embedded(service.deployment, [t.id for t in made])
    return made


@pytest.fixture(autouse=True)
def healthy_remote(remote_stub: RemoteEmbeddingsStub) -> None:
    remote_stub.behaviour.failures = 0
    remote_stub.behaviour.delay = 0.0


@pytest.fixture
async def db(vector_deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(vector_deployment.admin_url)
    yield conn
    await conn.close()


async def _count(service: SemanticService, name: str, **labels: str) -> float:
    return await metric(service.process.metrics_port, name, labels)


async def test_a_paraphrase_is_found_by_meaning_not_by_keyword(
    service: SemanticService, corpus: list[task_pb2.Task]
) -> None:
    webkit = corpus[0]
    keyword = await service.search(SAFARI, KEYWORD)
    assert webkit.id not in ids(keyword)
    assert keyword.mode == KEYWORD

    semantic = await service.search(SAFARI, SEMANTIC, repository="demo")
    assert semantic.mode == SEMANTIC
    assert ids(semantic)[0] == webkit.id
    top = semantic.results[0]
    assert list(top.matched) == [SEMANTIC]
    assert top.rank == 0
    assert top.similarity > semantic.results[-1].similarity
    assert [r.score for r in semantic.results] == sorted(
        (r.score for r in semantic.results), reverse=True
    )

    hybrid = await service.search(SAFARI, HYBRID, repository="demo")
    assert hybrid.mode == HYBRID
    assert ids(hybrid)[0] == webkit.id


async def test_unspecified_mode_is_hybrid_where_embeddings_exist(
    service: SemanticService, corpus: list[task_pb2.Task]
) -> None:
    reply = await service.search("nightly invoice export", UNSPECIFIED)
    assert reply.mode == HYBRID
    billing = reply.results[0]
    assert billing.task.id == corpus[1].id
    # Both arms found it: every query word occurs, and it is the nearest neighbour.
    assert sorted(billing.matched) == [KEYWORD, SEMANTIC]
    assert billing.rank > 0
    assert billing.similarity > 0


@pytest.mark.parametrize("mode", [SEMANTIC, HYBRID])
async def test_filters_apply_in_every_mode(
    service: SemanticService, corpus: list[task_pb2.Task], mode: int
) -> None:
    webkit, console = corpus[0], corpus[4]
    everywhere = ids(await service.search(SAFARI, mode))
    assert {webkit.id, console.id} <= set(everywhere)
    assert ids(await service.search(SAFARI, mode, repository="mahavishnu")) == [console.id]
    in_demo = ids(await service.search(SAFARI, mode, repository="demo"))
    assert console.id not in in_demo
    assert webkit.id in in_demo
    pending = ids(await service.search(SAFARI, mode, status=task_pb2.TASK_STATUS_BLOCKED))
    assert pending == []


@pytest.mark.parametrize("mode", [SEMANTIC, HYBRID])
async def test_paging_walks_the_whole_ranking_once(
    service: SemanticService, corpus: list[task_pb2.Task], mode: int
) -> None:
    whole = ids(await service.search(SAFARI, mode, page_size=100))
    assert len(whole) >= len(corpus)
    seen: list[int] = []
    token = ""
    while True:
        page = await service.search(SAFARI, mode, page_size=2, page_token=token)
        assert len(page.results) <= 2
        seen.extend(ids(page))
        token = page.next_page_token
        if not token:
            break
    assert seen == whole


async def test_a_page_token_is_bound_to_its_mode_and_query(
    service: SemanticService, corpus: list[task_pb2.Task]
) -> None:
    first = await service.search(SAFARI, SEMANTIC, page_size=1)
    assert first.next_page_token
    for mode, query in ((HYBRID, SAFARI), (SEMANTIC, "something else")):
        error = await rpc_error(
            service.tasks.SearchTasks(
                task_pb2.SearchTasksRequest(
                    query=query, mode=mode, page_size=1, page_token=first.next_page_token
                ),
                metadata=service.people["viewer"].md(),
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert mhv_code(error) == "MHV-011"


@pytest.mark.parametrize("mode", [KEYWORD, SEMANTIC, HYBRID])
async def test_authorization_is_the_same_in_every_mode(
    service: SemanticService, corpus: list[task_pb2.Task], mode: int
) -> None:
    request = task_pb2.SearchTasksRequest(query=SAFARI, mode=mode)
    anonymous = await rpc_error(service.tasks.SearchTasks(request))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    auditor = await rpc_error(
        service.tasks.SearchTasks(request, metadata=service.people["auditor"].md())
    )
    assert auditor.code() == grpc.StatusCode.PERMISSION_DENIED
    forged = await rpc_error(service.tasks.SearchTasks(request, metadata=bearer("not-a-token")))
    assert forged.code() == grpc.StatusCode.UNAUTHENTICATED
    for who in ("viewer", "alice", "admin"):
        await service.search(SAFARI, mode, who=who)


async def test_an_unknown_mode_is_refused(service: SemanticService) -> None:
    error = await rpc_error(
        service.tasks.SearchTasks(
            task_pb2.SearchTasksRequest(query=SAFARI, mode=9),  # type: ignore[arg-type]
            metadata=service.people["viewer"].md(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mhv_code(error) == "MHV-003"


async def _held_in_backlog(
    db: asyncpg.Connection, service: SemanticService, title: str, description: str, *, waited: str
) -> int:
    """A new task whose backlog row is held under a long lease from the transaction that
    creates it (as if a worker were embedding it): not embedded until it is released."""
    async with db.transaction():
        task_id: int = await db.fetchval(
            "INSERT INTO task.tasks (title, description, repository, created_by)"
            " VALUES ($1, $2, 'demo', $3) RETURNING id",
            title,
            description,
            service.people["alice"].id,
        )
        await db.execute(
            "UPDATE task.embedding_backlog SET claimed_until = now() + interval '1 hour',"
            " enqueued_at = now() - $2::text::interval WHERE task_id = $1",
            task_id,
            waited,
        )
    return task_id


async def test_a_task_not_embedded_yet_is_found_by_keyword(
    service: SemanticService, corpus: list[task_pb2.Task], db: asyncpg.Connection
) -> None:
    task_id = await _held_in_backlog(
        db, service, "Quarterly okapi census", "Count the okapis", waited="0 seconds"
    )
    for mode in (SEMANTIC, HYBRID):
        reply = await service.search("okapi census", mode)
        hit = next(r for r in reply.results if r.task.id == task_id)
        assert list(hit.matched) == [KEYWORD]
        assert hit.rank > 0
        assert hit.similarity == 0
    await db.execute(
        "UPDATE task.embedding_backlog SET claimed_until = NULL WHERE task_id = $1", task_id
    )
    await wait_until_embedded(service.deployment, [task_id])
    semantic = await service.search("how many okapis are there", SEMANTIC)
    assert ids(semantic)[0] == task_id
    assert list(semantic.results[0].matched) == [SEMANTIC]
    # Embedded now: semantic mode no longer adds its keyword match (hybrid does).
    again = await service.search("okapi census", SEMANTIC)
    assert list(next(r for r in again.results if r.task.id == task_id).matched) == [SEMANTIC]
    hybrid = await service.search("okapi census", HYBRID)
    assert sorted(next(r for r in hybrid.results if r.task.id == task_id).matched) == [
        KEYWORD,
        SEMANTIC,
    ]


async def test_the_backlog_gauge_sees_waiting_tasks(
    service: SemanticService, corpus: list[task_pb2.Task], db: asyncpg.Connection
) -> None:
    task_id = await _held_in_backlog(
        db, service, "Held back for the gauge", "", waited="10 minutes"
    )
    try:
        await _wait_for_metric(service, "task_embedding_backlog_age_seconds", lambda v: v >= 600)
        assert await _count(service, "task_embedding_backlog") >= 1
    finally:
        await db.execute(
            "UPDATE task.embedding_backlog SET claimed_until = NULL WHERE task_id = $1", task_id
        )
    await wait_until_embedded(service.deployment, [task_id])
    await _wait_for_metric(service, "task_embedding_backlog_age_seconds", lambda v: v < 600)


async def _wait_for_metric(
    service: SemanticService, name: str, ok: Callable[[float], bool]
) -> None:
    deadline = time.monotonic() + 60
    while True:
        value = await _count(service, name)
        if ok(value):
            return
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        await asyncio.sleep(0.2)


async def test_changing_title_or_description_embeds_the_task_again(
    service: SemanticService, corpus: list[task_pb2.Task], db: asyncpg.Connection
) -> None:
    task = await service.create("Write the onboarding guide", "For new engineers.")
    await wait_until_embedded(service.deployment, [task.id])
    before = await db.fetchval(
        "SELECT embedding::text FROM task.task_embeddings WHERE task_id = $1", task.id
    )
    updated = await service.tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(
                id=task.id,
                title="Replace the office coffee machine",
                description="The espresso maker on the third floor leaks.",
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["title", "description"]),
        ),
        metadata=service.people["alice"].md(),
    )
    await wait_until_embedded(service.deployment, [task.id])
    row = await db.fetchrow(
        "SELECT embedding::text AS v, content_sha256, model, dimensions"
        " FROM task.task_embeddings WHERE task_id = $1",
        task.id,
    )
    assert row["v"] != before
    text = f"{updated.title}\n{updated.description}"
    assert bytes(row["content_sha256"]) == hashlib.sha256(text.encode()).digest()
    assert (row["model"], row["dimensions"]) == (LOCAL_MODEL, 384)
    found = await service.search("broken espresso machine", SEMANTIC)
    assert ids(found)[0] == task.id
    # A change to something else (the priority) does not queue the task again.
    await service.tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, priority=task_pb2.PRIORITY_HIGH),
            update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
        ),
        metadata=service.people["alice"].md(),
    )
    assert (
        await db.fetchval("SELECT count(*) FROM task.embedding_backlog WHERE task_id = $1", task.id)
        == 0
    )


async def test_semantic_searches_are_counted_and_keyword_ones_are_not(
    service: SemanticService, corpus: list[task_pb2.Task]
) -> None:
    before = await _count(service, "semantic_search_total", status="success")
    await service.search(SAFARI, SEMANTIC)
    await service.search(SAFARI, HYBRID)
    await service.search(SAFARI, UNSPECIFIED)
    await service.search(SAFARI, KEYWORD)
    assert await _count(service, "semantic_search_total", status="success") == before + 3


async def test_a_slow_remote_provider_falls_back_within_the_deadline(
    service: SemanticService, corpus: list[task_pb2.Task], remote_stub: RemoteEmbeddingsStub
) -> None:
    labels = {"purpose": "query", "outcome": "local_fallback"}
    fallback = await _count(service, "task_embedding_requests_total", **labels)
    asked = len(remote_stub.requests)
    # Longer than the remote timeout (1 s), far shorter than the search deadline.
    remote_stub.behaviour.delay = 3.0
    reply = await service.tasks.SearchTasks(
        task_pb2.SearchTasksRequest(query=SAFARI, mode=SEMANTIC, repository="demo"),
        metadata=service.people["viewer"].md(),
        timeout=30,
    )
    assert ids(reply)[0] == corpus[0].id
    assert await _count(service, "task_embedding_requests_total", **labels) == fallback + 1
    # The remote was asked (and given up on), not skipped.
    assert len(remote_stub.requests) == asked + 1


async def test_a_failing_remote_provider_falls_back_to_the_local_model(
    service: SemanticService, corpus: list[task_pb2.Task], remote_stub: RemoteEmbeddingsStub
) -> None:
    labels = {"purpose": "query"}
    remote = await _count(service, "task_embedding_requests_total", outcome="remote", **labels)
    await service.search(SAFARI, SEMANTIC)
    assert (
        await _count(service, "task_embedding_requests_total", outcome="remote", **labels)
        == remote + 1
    )
    fallback = await _count(
        service, "task_embedding_requests_total", outcome="local_fallback", **labels
    )
    remote_stub.behaviour.failures = 1000
    asked = len(remote_stub.requests)
    for _ in range(5):
        reply = await service.search(SAFARI, SEMANTIC, repository="demo")
        assert ids(reply)[0] == corpus[0].id
    assert (
        await _count(service, "task_embedding_requests_total", outcome="local_fallback", **labels)
        == fallback + 5
    )
    # The circuit opened after three failures: the last searches did not ask the remote.
    assert len(remote_stub.requests) - asked == 3


async def test_tasks_are_embedded_while_the_remote_provider_is_down(
    service: SemanticService, corpus: list[task_pb2.Task], remote_stub: RemoteEmbeddingsStub
) -> None:
    remote_stub.behaviour.failures = 1000
    task = await service.create("Migrate the wiki to the new host", "Old server retires soon.")
    await wait_until_embedded(service.deployment, [task.id])
    assert (
        await _count(
            service, "task_embedding_requests_total", purpose="index", outcome="local_fallback"
        )
        >= 1
    )


async def test_a_model_that_cannot_load_fails_semantic_search_with_mhv119(
    vector_deployment: Deployment, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = Path(tmp_path_factory.mktemp("broken-model"))
    broken = {**embedding_env(None), "MHV_EMBEDDING_LOCAL_MODEL_DIR": str(folder / "missing")}
    async with semantic_service(vector_deployment, keys, folder, extra=broken) as service:
        port = service.process.metrics_port
        before = await metric(port, "semantic_search_total", {"status": "error"})
        for mode in (SEMANTIC, HYBRID, UNSPECIFIED):
            error = await rpc_error(
                service.tasks.SearchTasks(
                    task_pb2.SearchTasksRequest(query=SAFARI, mode=mode),
                    metadata=service.people["viewer"].md(),
                )
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert mhv_code(error) == "MHV-119"
        # Counted against the search SLO: the failure is the service's, not the caller's.
        assert await metric(port, "semantic_search_total", {"status": "error"}) == before + 3
        reply = await service.search(SAFARI, KEYWORD)
        assert reply.mode == KEYWORD
        assert "the embedding model could not be loaded" in service.process.logs()

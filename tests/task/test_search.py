"""SearchTasks: the plan's query rules, then ranked PostgreSQL full-text search (keyword mode).

Semantic and hybrid mode: tests/task/test_semantic_search.py.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from tests.conftest import Services
from tests.harness import metric, mhv_code, rpc_error, violations
from tests.task.conftest import People, new_task

KEYWORD = task_pb2.SEARCH_MODE_KEYWORD


async def _search_count(services: Services, status: str) -> float:
    return await metric(services.task.metrics_port, "semantic_search_total", {"status": status})


async def test_search_ranks_title_matches_first_and_filters(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    word = f"zebra{uuid.uuid4().hex[:8]}"
    in_title = await new_task(tasks, people.alice, title=f"Migrate the {word} cluster")
    in_body = await new_task(
        tasks, people.alice, title="Unrelated", description=f"see {word} notes"
    )
    other_repo = await new_task(
        tasks, people.alice, title=f"{word} elsewhere", repository="mahavishnu"
    )
    reply = await tasks.SearchTasks(
        task_pb2.SearchTasksRequest(query=word, repository="demo", mode=KEYWORD),
        metadata=people.viewer.md(),
    )
    ids = [r.task.id for r in reply.results]
    assert ids == [in_title.id, in_body.id]
    assert reply.results[0].rank > reply.results[1].rank
    assert other_repo.id not in ids
    both = await tasks.SearchTasks(
        task_pb2.SearchTasksRequest(query=word, mode=KEYWORD), metadata=people.viewer.md()
    )
    assert {r.task.id for r in both.results} == {in_title.id, in_body.id, other_repo.id}


async def test_web_search_syntax_and_paging(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    word = f"okapi{uuid.uuid4().hex[:8]}"
    made = [await new_task(tasks, people.alice, title=f"{word} item {i}") for i in range(5)]
    excluded = await new_task(tasks, people.alice, title=f"{word} item legacy")
    seen: list[int] = []
    token = ""
    while True:
        page = await tasks.SearchTasks(
            task_pb2.SearchTasksRequest(
                query=f"{word} -legacy", page_size=2, page_token=token, mode=KEYWORD
            ),
            metadata=people.viewer.md(),
        )
        seen.extend(r.task.id for r in page.results)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(t.id for t in made)
    assert excluded.id not in seen
    phrase = await tasks.SearchTasks(
        task_pb2.SearchTasksRequest(query=f'"{word} item legacy"', mode=KEYWORD),
        metadata=people.viewer.md(),
    )
    assert [r.task.id for r in phrase.results] == [excluded.id]


@pytest.mark.parametrize("query", ["'; DROP TABLE tasks; --", "a -- b", "x /* y", "y */", "a;b"])
async def test_plan_forbidden_sequences_are_rejected(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, services: Services, query: str
) -> None:
    # Validation comes before anything else, so a hybrid search is refused the same way on a
    # server without pgvector, and counts as a rejected semantic search.
    before = await _search_count(services, "rejected")
    error = await rpc_error(
        tasks.SearchTasks(
            task_pb2.SearchTasksRequest(query=query, mode=task_pb2.SEARCH_MODE_HYBRID),
            metadata=people.viewer.md(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mhv_code(error) == "MHV-003"
    assert "query" in violations(error)
    assert await _search_count(services, "rejected") == before + 1


@pytest.mark.parametrize("query", ["", "   ", "\x00", "q" * 501])
async def test_query_length_rules(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, query: str
) -> None:
    error = await rpc_error(
        tasks.SearchTasks(task_pb2.SearchTasksRequest(query=query), metadata=people.viewer.md())
    )
    assert "query" in violations(error)


async def test_hostile_looking_but_legal_queries_are_plain_text(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, services: Services
) -> None:
    # Every query is words to match, all of them (AND), never SQL or markup: each finds
    # exactly the tasks holding its words.
    marker = f"gnu{uuid.uuid4().hex[:8]}"
    union = await new_task(tasks, people.alice, title=f"{marker} union select users")
    plain = await new_task(tasks, people.alice, title=f"{marker} only")
    drop = await new_task(tasks, people.alice, title=f"{marker} drop table")
    script = await new_task(tasks, people.alice, title=f"{marker} script loader")
    should_match = {
        # "from" is a stop word and "*" no word: marker, union, select and users remain.
        f"{marker}' UNION SELECT * FROM users": {union.id},
        # A tag's name is a word like any other.
        f"<script> {marker}": {script.id},
        f"{marker}": {union.id, plain.id, drop.id, script.id},
        f"{marker} \x00drop": {drop.id},
        f"{marker} select drop": set(),
    }
    before = await _search_count(services, "success")
    for query, expected in should_match.items():
        reply = await tasks.SearchTasks(
            task_pb2.SearchTasksRequest(query=query, mode=KEYWORD), metadata=people.viewer.md()
        )
        assert reply.mode == KEYWORD
        assert {r.task.id for r in reply.results} == expected, query
    # semantic_search_total counts semantic and hybrid searches only.
    assert await _search_count(services, "success") == before

"""The task store's conventions: every statement bounded by the caller's remaining deadline.

What the statements do is tested through the service (test_tasks.py, test_outbox.py,
test_users.py); a deadline that runs out on a locked row is test_outbox.py's
``test_deadline_on_a_locked_task_rolls_back_everything``.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from mhv_task import _store as store

FUNCTIONS = [
    name
    for name, value in vars(store).items()
    if inspect.iscoroutinefunction(value) and not name.startswith("_")
]
_QUERIES = {"fetch", "fetchrow", "fetchval", "execute", "executemany"}


def test_the_store_is_what_the_domain_calls() -> None:
    assert len(FUNCTIONS) >= 20
    assert {"insert_task", "update_task", "claim_pending_events", "user_state"} <= set(FUNCTIONS)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_function_requires_a_keyword_only_timeout(name: str) -> None:
    parameter = inspect.signature(getattr(store, name)).parameters.get("timeout")
    assert parameter is not None, f"{name} takes no timeout"
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    # No default: a caller cannot forget to pass its remaining deadline.
    assert parameter.default is inspect.Parameter.empty


def test_every_statement_gets_the_timeout() -> None:
    tree = ast.parse(inspect.getsource(store))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _QUERIES
    ]
    assert len(calls) >= len(FUNCTIONS)
    for call in calls:
        given = {k.arg: k.value for k in call.keywords}
        assert "timeout" in given, f"line {call.lineno}: a statement without timeout"
        value = given["timeout"]
        assert isinstance(value, ast.Name) and value.id == "timeout", f"line {call.lineno}"

"""The task store's conventions (and the shared outbox statements'): every statement bounded by
the caller's remaining deadline.

What the statements do is tested through the service (test_tasks.py, test_outbox.py,
test_users.py); a deadline that runs out on a locked row is test_outbox.py's
``test_deadline_on_a_locked_task_rolls_back_everything``.
"""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

import pytest

from mhv_common import outbox
from mhv_task import _store as store

# The task service's SQL: its own store, and the outbox statements it shares with the gateway.
MODULES = {"task store": store, "outbox": outbox}


def _functions(module: ModuleType) -> list[str]:
    """The module's public coroutine functions: one statement (or a few) each."""
    return [
        name
        for name, value in vars(module).items()
        if inspect.iscoroutinefunction(value)
        and not name.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
    ]


FUNCTIONS = [(label, name) for label, module in MODULES.items() for name in _functions(module)]
_QUERIES = {"fetch", "fetchrow", "fetchval", "execute", "executemany"}


def test_the_store_is_what_the_domain_calls() -> None:
    assert len(_functions(store)) >= 15
    assert {"insert_task", "update_task", "search_tasks", "user_state"} <= set(_functions(store))
    assert {"insert_subject_event", "claim_pending_events", "mark_delivered"} <= set(
        _functions(outbox)
    )


@pytest.mark.parametrize(("module", "name"), FUNCTIONS)
def test_every_function_requires_a_keyword_only_timeout(module: str, name: str) -> None:
    parameter = inspect.signature(getattr(MODULES[module], name)).parameters.get("timeout")
    assert parameter is not None, f"{name} takes no timeout"
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    # No default: a caller cannot forget to pass its remaining deadline.
    assert parameter.default is inspect.Parameter.empty


def _passes_the_timeout(call: ast.Call) -> bool:
    return any(
        k.arg == "timeout" and isinstance(k.value, ast.Name) and k.value.id == "timeout"
        for k in call.keywords
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_statement_gets_the_timeout(module: str) -> None:
    tree = ast.parse(inspect.getsource(MODULES[module]))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _QUERIES
    ]
    assert calls
    for call in calls:
        assert _passes_the_timeout(call), (
            f"{module} line {call.lineno}: a statement without timeout"
        )
    # Each function runs a statement itself or hands its timeout to one that does
    # (`insert_user_event` writes through the shared outbox, `schema_size` through mhv_common.db).
    functions = {node.name: node for node in tree.body if isinstance(node, ast.AsyncFunctionDef)}
    for name in _functions(MODULES[module]):
        inner = [c for c in ast.walk(functions[name]) if isinstance(c, ast.Call)]
        assert any(_passes_the_timeout(c) for c in inner), f"{module}.{name} drops its timeout"

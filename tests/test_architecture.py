"""docs/architecture.md matches the code: the modules it names, and the orders it draws.

The page is where a newcomer learns the layout; a name it gives that no longer exists, a module
it leaves out, or an interceptor list drawn in another order would teach them wrong.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import mhv_common
from mhv_common import interceptors
from mhv_webhook import _edge_middleware

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
SERVICES = ("task", "audit", "webhook")
_TICKED = re.compile(r"`([^`]+)`")
# The page without its fenced blocks, whose ``` would pair up with the inline backticks.
PROSE = re.sub(r"```.*?```", "", DOC, flags=re.DOTALL)


def _section(heading: str) -> str:
    start = DOC.index(heading)
    end = DOC.find("\n## ", start + len(heading))
    return DOC[start : end if end != -1 else len(DOC)]


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table under `heading`, header and rule left out."""
    lines = _section(heading).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]


def _resolve(dotted: str) -> object:
    """The module, or the attribute of a module, that a dotted name such as
    ``mhv_common.edge.classify`` or ``mhv_webhook._edge_middleware.webhook_middleware`` names."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(dotted)


def _service_modules(service: str) -> set[str]:
    package = ROOT / "services" / service / f"mhv_{service}"
    return {path.name for path in package.glob("*.py")}


# --- modules and names --------------------------------------------------------------------------


def test_every_module_of_a_service_is_in_its_column_and_every_name_there_exists() -> None:
    rows = _table("## The three services on this layout")
    for column, service in enumerate(SERVICES, start=1):
        cells = " ".join(row[column] for row in rows)
        named = set(re.findall(r"`(_\w+\.py)`", cells))
        package = f"mhv_{service}"
        assert named <= _service_modules(service), f"{service}: no such module"
        ours = _service_modules(service) - {"__init__.py", "__main__.py", "app.py"}
        missing = sorted(ours - named)
        assert not missing, (
            f"docs/architecture.md: the {service} column of 'The three services on this layout'"
            f" does not name {missing}; say in which layer each belongs"
        )
        # `Name` (`_module.py`): the name is defined in that module.
        for name, module in re.findall(r"`(\w+)` \(`(_\w+)\.py`", cells):
            assert hasattr(importlib.import_module(f"{package}.{module}"), name), (name, module)


def test_every_common_helper_named_exists() -> None:
    modules = set(mhv_common.__all__)
    checked = 0
    for row in _table("What all three take from `libs/common/mhv_common`"):
        current: str | None = None
        for name in _TICKED.findall(row[1]):
            head = name.split(".")[0]
            if name in modules:
                current = name
            elif head in modules:
                _resolve(f"mhv_common.{name}")
                checked += 1
            elif "." not in name and current is not None:
                assert hasattr(_resolve(f"mhv_common.{current}"), name), (current, name)
                checked += 1
    assert checked >= 15


def test_every_dotted_name_and_path_in_the_page_exists() -> None:
    names = set(_TICKED.findall(PROSE))
    dotted = {n for n in names if re.fullmatch(r"mhv_\w+(\.\w+)+", n)}
    assert len(dotted) >= 10
    for name in sorted(dotted):
        _resolve(name)
    paths = {n for n in names if "/" in n and not re.search(r"[<>{}*\s]|NNN", n)}
    assert len(paths) >= 10
    for name in sorted(paths):
        path = ROOT / name
        if not path.exists():
            path = ROOT / "libs" / "common" / name  # mhv_common/... as the package
        assert path.exists(), f"docs/architecture.md names {name}, which does not exist"


# --- orders -------------------------------------------------------------------------------------


def _drawn_order(heading_text: str) -> list[str]:
    """The layers drawn in the ```text block after `heading_text`: the first word of its first
    line and of each line that starts with an arrow."""
    opening = DOC.index("```text\n", DOC.index(heading_text)) + len("```text\n")
    lines = DOC[opening : DOC.index("```", opening)].splitlines()
    arrows = [m.group(1) for line in lines[1:] if (m := re.match(r"\s*->\s*(\S+)", line))]
    return [lines[0].split()[0], *arrows]


def _returned_calls(function: object) -> list[ast.expr]:
    tree = ast.parse(inspect.getsource(function))  # type: ignore[arg-type]
    (returned,) = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
    assert isinstance(returned.value, ast.List)
    return returned.value.elts


def _name(node: ast.expr) -> str:
    assert isinstance(node, ast.Name | ast.Attribute), ast.dump(node)
    return node.id if isinstance(node, ast.Name) else node.attr


def test_the_grpc_interceptors_are_drawn_in_their_order() -> None:
    in_code = []
    for call in _returned_calls(interceptors.build_interceptors):
        assert isinstance(call, ast.Call)
        name = _name(call.func)
        in_code.append("OpenTelemetry" if name == "aio_server_interceptor" else name)
    drawn = _drawn_order("gRPC: one ordered list")
    assert drawn[-1] == "servicer"
    assert [n.removesuffix("Interceptor") for n in in_code] == drawn[:-1]


def test_the_https_middleware_is_drawn_in_its_order() -> None:
    in_code = []
    for call in _returned_calls(_edge_middleware.webhook_middleware):
        assert isinstance(call, ast.Call) and _name(call.func) == "Middleware"
        in_code.append(_name(call.args[0]))
    drawn = _drawn_order("HTTPS (the webhook gateway): the same concerns")
    assert drawn[-1] == "endpoint"
    assert in_code == drawn[:-1]


@pytest.mark.parametrize(
    ("module", "heading_text"),
    [
        (interceptors, "gRPC: one ordered list"),
        (_edge_middleware, "HTTPS (the webhook gateway): the same concerns"),
    ],
)
def test_the_modules_own_summaries_draw_the_same_order(
    module: ModuleType, heading_text: str
) -> None:
    summary = module.__doc__ or ""
    found = [re.search(rf"\b{name}\b", summary) for name in _drawn_order(heading_text)[:-1]]
    assert all(found), (_drawn_order(heading_text), summary)
    positions = [match.start() for match in found if match]
    assert positions == sorted(positions)


# --- stores -------------------------------------------------------------------------------------


def test_every_store_coroutine_takes_a_keyword_only_timeout() -> None:
    # "Every method takes a keyword-only `timeout`", for every service's store modules.
    stores = sorted((ROOT / "services").glob("*/mhv_*/_store*.py"))
    assert len(stores) >= 4
    checked = 0
    for path in stores:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AsyncFunctionDef) and not node.name.startswith("_"):
                keywords = [argument.arg for argument in node.args.kwonlyargs]
                assert "timeout" in keywords, (
                    f"{path.name}: {node.name} takes no keyword-only timeout"
                )
                checked += 1
    assert checked >= 30

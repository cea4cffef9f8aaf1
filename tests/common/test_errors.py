"""The error catalog: every code maps consistently to gRPC, HTTP, exceptions and docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

import mhv_common.errors as errors
from mhv_common._catalog import CATALOG, ErrorSpec
from mhv_tools import gen_error_docs
from tests.harness import ROOT

PLAN_CODES = {
    f"MHV-{n:03d}" for n in (*range(1, 7), *range(100, 106), 200, 201, 202, 300, 301, 302, 303)
}


def test_catalog_holds_every_code_of_the_plan() -> None:
    assert {spec.code for spec in CATALOG} >= PLAN_CODES


def test_codes_and_names_are_unique_and_well_formed() -> None:
    codes = [s.code for s in CATALOG]
    names = [s.name for s in CATALOG]
    assert len(codes) == len(set(codes))
    assert len(names) == len(set(names))
    for spec in CATALOG:
        assert re.fullmatch(r"MHV-\d{3}", spec.code)
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", spec.name)
        assert spec.recovery, f"{spec.code} has no recovery steps"
        assert spec.grpc_status != grpc.StatusCode.OK
        assert 200 <= spec.http_status < 600


def test_error_code_enum_is_usable_unlike_the_plans() -> None:
    # The plan's ErrorCode referenced itself inside its own class body and could not load.
    assert errors.ErrorCode.VALIDATION_ERROR.value == "MHV-003"
    assert errors.ErrorCode("MHV-301").name == "WEBHOOK_REPLAY_DETECTED"


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.code)
def test_every_code_has_an_exception_and_a_full_rpc_status(spec: ErrorSpec) -> None:
    cls = errors.error_class(spec.code)
    assert issubclass(cls, errors.MahavishnuError)
    exc = cls("something specific", retry_after=2.5)
    assert exc.grpc_status == spec.grpc_status
    assert exc.http_status == spec.http_status
    status = exc.to_rpc_status()
    assert status.code == spec.grpc_status.value[0]
    assert status.message == f"[{spec.code}] something specific"
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
    assert {"ErrorInfo", "Help", "LocalizedMessage"} <= kinds
    assert ("RetryInfo" in kinds) == spec.retryable
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        spec.name,
        "mahavishnu",
        {"error_code": spec.code},
    )
    body = exc.to_dict()
    assert body["error_code"] == spec.code
    assert body["recovery"] == list(spec.recovery)
    assert body["documentation"] == spec.doc_url


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.code)
def test_every_help_link_opens_a_page_of_this_repository(spec: ErrorSpec) -> None:
    # MHV_DOCS_BASE_URL unset (the tests' environment has no MHV_ variables): the link is the
    # page's repository path, and the page is there.
    link = errors.error_class(spec.code)().to_dict()["documentation"]
    assert isinstance(link, str) and (ROOT / link).is_file(), link


def test_help_links_follow_the_configured_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MHV_DOCS_BASE_URL", "https://code.example.test/mahavishnu/blob/main")
    error = errors.ValidationError()
    expected = "https://code.example.test/mahavishnu/blob/main/docs/errors/mhv-003.md"
    assert error.to_dict()["documentation"] == expected
    help_ = error_details_pb2.Help()
    next(d for d in error.to_rpc_status().details if d.Is(help_.DESCRIPTOR)).Unpack(help_)
    assert help_.links[0].url == expected


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.code)
def test_every_code_has_a_named_export(spec: ErrorSpec) -> None:
    exported = [getattr(errors, n) for n in errors.__all__]
    assert errors.error_class(spec.code) in exported


def _declared_error_classes() -> list[tuple[str, str]]:
    """(name, code) of each ``class X(MahavishnuError, code="MHV-NNN")`` in errors.py's source."""
    tree = ast.parse(Path(errors.__file__).read_text())
    declared = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(base, ast.Name) and base.id == "MahavishnuError" for base in node.bases
        ):
            codes = [k.value for k in node.keywords if k.arg == "code"]
            assert len(codes) == 1 and isinstance(codes[0], ast.Constant), node.name
            declared.append((node.name, codes[0].value))
    return declared


def _class_name(spec: ErrorSpec) -> str:
    name = "".join(part.capitalize() for part in spec.name.split("_"))
    name = name if name.endswith("Error") else f"{name}Error"
    # The builtin NotImplementedError keeps its name.
    return "NotImplementedRpcError" if name == "NotImplementedError" else name


def test_error_classes_are_declared_one_per_catalog_row_in_catalog_order() -> None:
    # Written out in the source, not made at import time: readers and mypy see every class.
    declared = _declared_error_classes()
    assert declared == [(_class_name(spec), spec.code) for spec in CATALOG]
    for name, code in declared:
        cls = getattr(errors, name)
        spec = errors.spec_for(code)
        assert cls.spec is spec
        assert cls.code == code
        assert cls.__doc__ == f"{code}: {spec.title}"
        assert errors.error_class(code) is cls
        assert name in errors.__all__
        assert repr(cls("x")).startswith(f"{name}(code={code},")


def test_validation_error_lists_violations_in_http_body_and_grpc() -> None:
    exc = errors.ValidationError(violations=[errors.FieldViolation("title", "too long")])
    assert exc.to_dict()["field_violations"] == [{"field": "title", "description": "too long"}]
    bad = error_details_pb2.BadRequest()
    next(d for d in exc.to_rpc_status().details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert bad.field_violations[0].field == "title"


def test_repr_shows_code_for_logs() -> None:
    assert "MHV-100" in repr(errors.TaskNotFoundError("task 7 does not exist"))


def test_doc_pages_exist_and_are_fresh() -> None:
    for spec in CATALOG:
        assert (gen_error_docs.ROOT / spec.doc_path).is_file(), f"missing {spec.doc_path}"
    assert gen_error_docs.main(["--check"]) == 0, "docs/errors is stale: run `make generate`"


def test_docs_check_detects_drift(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen_error_docs, "DOCS", tmp_path)
    assert gen_error_docs.main([]) == 0
    assert gen_error_docs.main(["--check"]) == 0
    page = tmp_path / "mhv-003.md"
    page.write_text(page.read_text() + "edited by hand\n")
    assert gen_error_docs.main(["--check"]) == 1
    page.unlink()
    assert gen_error_docs.main(["--check"]) == 1
    assert gen_error_docs.main([]) == 0
    (tmp_path / "mhv-999.md").write_text("left over from a removed code\n")
    assert gen_error_docs.main(["--check"]) == 1


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.code)
def test_documents_named_in_recovery_steps_exist(spec: ErrorSpec) -> None:
    for step in spec.recovery:
        for path in re.findall(r"docs/[\w/.-]+\.md", step):
            assert (gen_error_docs.ROOT / path).is_file(), f"{spec.code} names missing {path}"

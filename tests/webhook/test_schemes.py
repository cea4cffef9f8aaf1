"""The registry of sender schemes, and how a stored delivery is read through its scheme."""

from __future__ import annotations

from typing import get_args

import pytest

from mhv_common.config import Repository, RepositoryCatalog, WebhookSource
from mhv_common.errors import ConfigurationError
from mhv_webhook._changes import IgnoredEvent, Kind, TaskChange
from mhv_webhook._schemes import SCHEMES, interpret, scheme_named
from tests.webhook.fixtures import body, form_body, github_issue

REPOSITORIES = RepositoryCatalog((Repository(name="demo", github=("example/demo",)),))


def test_every_scheme_the_settings_allow_has_a_module() -> None:
    allowed = set(get_args(WebhookSource.model_fields["scheme"].annotation))
    assert set(SCHEMES) == allowed == {"github", "gitlab", "standard"}
    for name, scheme in SCHEMES.items():
        assert scheme.name == name
        assert "content-type" in scheme.kept_headers
        assert not any("signature" in h or "token" in h for h in scheme.kept_headers)


def test_an_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no verifier for scheme 'svix'"):
        scheme_named("svix", source="generic")


def test_a_delivery_is_read_by_its_sources_scheme() -> None:
    issue = github_issue("opened", 1)
    change = interpret(
        SCHEMES["github"],
        source="github",
        event="issues",
        body=body(issue),
        content_type="application/json",
        repositories=REPOSITORIES,
    )
    assert isinstance(change, TaskChange) and change.kind == Kind.OPENED
    # The same payload as GitHub's form encoding reads the same.
    assert change == interpret(
        SCHEMES["github"],
        source="github",
        event="issues",
        body=form_body(issue),
        content_type="application/x-www-form-urlencoded",
        repositories=REPOSITORIES,
    )
    # The same body from a Standard Webhooks source is not a task event.
    assert interpret(
        SCHEMES["standard"],
        source="generic",
        event="",
        body=body(issue),
        content_type="application/json",
        repositories=REPOSITORIES,
    ) == IgnoredEvent("None is not a task event: no task mapping")


@pytest.mark.parametrize(
    ("raw", "content_type", "reason"),
    [
        (b"\xff", "application/json", "not a UTF-8 JSON document"),
        (b"{", "application/json", "not a UTF-8 JSON document"),
        (b"[1]", "application/json", "must be a JSON object"),
        (b"{}", "application/x-www-form-urlencoded", "exactly one `payload` field"),
        (b"{}", "text/plain", "'text/plain' is not a valid BodyFormat"),
    ],
)
def test_bodies_no_scheme_can_read_are_ignored(raw: bytes, content_type: str, reason: str) -> None:
    for scheme in (*SCHEMES.values(), None):
        change = interpret(
            scheme,
            source="github",
            event="issues",
            body=raw,
            content_type=content_type,
            repositories=REPOSITORIES,
        )
        assert isinstance(change, IgnoredEvent)
        assert change.reason.startswith("payload cannot be decoded: ")
        assert reason in change.reason


def test_deliveries_of_a_source_no_longer_declared_are_ignored() -> None:
    assert interpret(
        None,
        source="retired",
        event="issues",
        body=b"{}",
        content_type="application/json",
        repositories=REPOSITORIES,
    ) == IgnoredEvent("no task mapping for events of source 'retired'")

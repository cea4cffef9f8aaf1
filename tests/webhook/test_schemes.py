"""The registry of sender schemes, and how a stored delivery is read through its scheme."""

from __future__ import annotations

import json
from typing import get_args

import pytest

from mhv_common.config import Repository, RepositoryCatalog, WebhookSource
from mhv_common.errors import ConfigurationError
from mhv_webhook._changes import IgnoredEvent, IssueChange, Kind
from mhv_webhook._schemes import SCHEMES, interpret, scheme_named

REPOSITORIES = RepositoryCatalog((Repository(name="demo", github="example/demo"),))


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
    body = json.dumps(
        {
            "action": "opened",
            "issue": {"number": 1, "title": "t"},
            "repository": {"full_name": "example/demo"},
            "sender": {"login": "octocat"},
        }
    ).encode()
    change = interpret(
        SCHEMES["github"], source="github", event="issues", body=body, repositories=REPOSITORIES
    )
    assert isinstance(change, IssueChange) and change.kind == Kind.OPENED
    # The same body from a Standard Webhooks source changes nothing.
    assert interpret(
        SCHEMES["standard"], source="generic", event="", body=body, repositories=REPOSITORIES
    ) == IgnoredEvent("no task mapping for standard events")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff", "body is not JSON"),
        (b"{", "body is not JSON"),
        (b"[1]", "body is not a JSON object"),
    ],
)
def test_bodies_no_scheme_can_read_are_ignored(body: bytes, reason: str) -> None:
    for scheme in (*SCHEMES.values(), None):
        assert interpret(
            scheme, source="github", event="issues", body=body, repositories=REPOSITORIES
        ) == IgnoredEvent(reason)


def test_deliveries_of_a_source_no_longer_declared_are_ignored() -> None:
    assert interpret(
        None, source="retired", event="issues", body=b"{}", repositories=REPOSITORIES
    ) == IgnoredEvent("no task mapping for events of source 'retired'")

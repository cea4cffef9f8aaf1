"""Request headers are read strictly: a header the gateway relies on that is repeated, not
UTF-8 or carries control characters makes the request malformed."""

from __future__ import annotations

import uuid

import httpx
import pytest

from mhv_common.errors import ValidationError
from mhv_webhook._headers import HeaderView
from tests.webhook.conftest import Secrets
from tests.webhook.signing import github_headers
from tests.webhook.support import assert_error, body_for


def test_values_by_lower_case_name_stripped() -> None:
    headers = HeaderView([(b"X-GitHub-Event", b" issues "), (b"content-type", b"a/b")])
    assert headers.get("x-github-event") == "issues"
    assert headers.get("X-GitHub-Event") == "issues"
    assert headers.get("x-absent") is None


@pytest.mark.parametrize(
    ("raw", "description"),
    [
        ([(b"x-id", b"a"), (b"X-Id", b"b")], "must appear once"),
        ([(b"x-id", b"\xff\xfe")], "must be UTF-8 text"),
        ([(b"x-id", b"a\x01b")], "must not contain control characters"),
        ([(b"x-id", b"a\x7fb")], "must not contain control characters"),
    ],
)
def test_repeated_undecodable_or_controlled_values_are_malformed(
    raw: list[tuple[bytes, bytes]], description: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        HeaderView(raw).get("x-id")
    assert [(v.field, v.description) for v in refused.value.violations] == [("x-id", description)]


def test_only_single_printable_values_are_kept_for_storage() -> None:
    headers = HeaderView(
        [
            (b"content-type", b"application/json"),
            (b"user-agent", b"a"),
            (b"user-agent", b"b"),
            (b"x-gitlab-instance", b"\xff"),
            (b"x-github-hook-id", b"x" * 201),
            (b"x-secret", b"not asked for"),
        ]
    )
    assert headers.pick(
        ["content-type", "user-agent", "x-gitlab-instance", "x-github-hook-id", "x-absent"]
    ) == {"content-type": "application/json"}


def test_repeated_and_non_utf8_headers_are_malformed(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    body = body_for("headers")
    headers = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    raw = [(k.encode(), v.encode()) for k, v in headers.items() if k != "X-GitHub-Delivery"]
    broken = [*raw, (b"X-GitHub-Delivery", b"\xff\xfe-not-utf8")]
    assert_error(client.post("/webhooks/github", content=body, headers=broken), 400, "MHV-003")
    doubled = [*raw, (b"X-GitHub-Delivery", b"a"), (b"X-GitHub-Delivery", b"b")]
    assert_error(client.post("/webhooks/github", content=body, headers=doubled), 400, "MHV-003")
    signature = next(v for k, v in raw if k == b"X-Hub-Signature-256")
    twice = [*raw, (b"X-GitHub-Delivery", b"c"), (b"X-Hub-Signature-256", signature)]
    assert_error(client.post("/webhooks/github", content=body, headers=twice), 400, "MHV-003")

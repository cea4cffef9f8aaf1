"""GitHub: signatures and replays over HTTPS, and the task change each issues event asks for."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import httpx
import pytest

from mhv_common.config import Repository, RepositoryCatalog
from mhv_common.errors import ConfigurationError
from mhv_webhook._changes import IgnoredEvent, IssueChange, Kind
from mhv_webhook._scheme import FreshnessWindow, Verified
from mhv_webhook._scheme_github import SCHEME
from mhv_webhook._secrets import parse_secrets
from tests.webhook.conftest import EdgeServer, Secrets
from tests.webhook.signing import github_headers, new_signing_key
from tests.webhook.support import assert_error, body_for, metric, rows_for

REPOSITORIES = RepositoryCatalog(
    (Repository(name="demo", github="example/demo", gitlab="example/demo"),)
)


def issues_event(action: str, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "action": action,
        "issue": {
            "number": 42,
            "title": fields.get("title", "Crash on save"),
            "body": fields.get("body", "It crashes."),
            "state_reason": fields.get("state_reason"),
            "user": {"login": "reporter"},
        },
        "repository": {"full_name": fields.get("repo", "Example/Demo")},
        "sender": {"login": "octocat"},
    }
    if "assignee" in fields:
        payload["assignee"] = {"login": fields["assignee"]}
    return payload


def interpret(payload: dict[str, Any], event: str = "issues") -> IssueChange | IgnoredEvent:
    return SCHEME.interpret(
        source="github", event=event, payload=payload, repositories=REPOSITORIES
    )


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("opened", Kind.OPENED),
        ("edited", Kind.EDITED),
        ("closed", Kind.CLOSED),
        ("reopened", Kind.REOPENED),
        ("assigned", Kind.ASSIGNED),
    ],
)
def test_issue_actions_become_task_changes(action: str, kind: Kind) -> None:
    change = interpret(issues_event(action, assignee="hubot"))
    assert change == IssueChange(
        kind=kind,
        source="github",
        external_key="Example/Demo#42",
        repository="demo",
        actor="github.octocat",
        title="Crash on save",
        description="It crashes.",
        assignee="github.hubot" if kind == Kind.ASSIGNED else None,
        not_planned=False,
    )


def test_closed_as_not_planned_and_long_text() -> None:
    change = interpret(
        issues_event("closed", state_reason="not_planned", title="t" * 300, body="b" * 6000)
    )
    assert isinstance(change, IssueChange)
    assert change.not_planned
    assert (len(change.title), len(change.description)) == (200, 5000)


@pytest.mark.parametrize(
    ("payload", "event", "reason"),
    [
        ({"ref": "refs/heads/main"}, "push", "GitHub event 'push' does not change tasks"),
        (issues_event("labeled"), "issues", "GitHub issues action 'labeled' does not change"),
        (issues_event("opened", repo="someone/else"), "issues", "'someone/else' is not configured"),
        ({"action": "opened", "issue": "x"}, "issues", "without issue or repository"),
        (
            {**issues_event("opened"), "sender": None, "issue": {"number": 1}},
            "issues",
            "without a sender",
        ),
    ],
)
def test_what_changes_no_task_is_ignored_with_the_reason(
    payload: dict[str, Any], event: str, reason: str
) -> None:
    change = interpret(payload, event)
    assert isinstance(change, IgnoredEvent)
    assert reason in change.reason


def test_the_event_comes_from_the_header_and_the_action_from_the_body() -> None:
    verified = Verified("d-1", "issues", ("0",), (("delivery_id", "d-1"),))
    assert SCHEME.describe(verified, {"action": "opened"}) == ("issues", "opened")
    assert SCHEME.describe(verified, {"action": ["opened"]}) == ("issues", "")


def test_signing_keys_are_refused_as_secrets() -> None:
    signing = parse_secrets("github", new_signing_key())
    with pytest.raises(ConfigurationError, match="remove the whsec_ prefix"):
        SCHEME.verifier(signing, window=FreshnessWindow(), variable="MHV_WEBHOOK_SECRETS_GITHUB")


# --- over HTTPS -------------------------------------------------------------------------


def test_github_delivery_retry_and_captured_replay(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = body_for("github")
    delivery = str(uuid.uuid4())
    headers = github_headers(hook_secrets.github, body, delivery=delivery)
    first = client.post("/webhooks/github", content=body, headers=headers)
    assert first.status_code == 202, first.text
    # GitHub redelivers with the same id: acknowledged, not enqueued.
    assert_error(client.post("/webhooks/github", content=body, headers=headers), 200, "MHV-301")
    # A captured request resent under a fresh delivery id: the signature still verifies (it
    # covers only the body) but the body is recognised.
    replays_before = metric("webhook_duplicates_total", source="github", matched="body")
    forged = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=body, headers=forged), 200, "MHV-301")
    assert metric("webhook_duplicates_total", source="github", matched="body") == replays_before + 1
    assert rows_for(edge, "github", delivery) == 1
    assert (
        int(
            edge.fetchval(
                "SELECT count(*) FROM deliveries WHERE source = 'github' AND body = $1", body
            )
        )
        == 1
    )


def test_github_replay_days_later_within_retention_is_not_enqueued(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = body_for("captured")
    delivery = str(uuid.uuid4())
    headers = github_headers(hook_secrets.github, body, delivery=delivery)
    assert client.post("/webhooks/github", content=body, headers=headers).status_code == 202
    digest = hashlib.sha256(body).hexdigest()
    # Three days pass (of the four-day retention).
    edge.execute(
        "UPDATE dedup SET received_at = received_at - interval '3 days'"
        " WHERE source = 'github' AND key IN ($1, $2)",
        delivery,
        digest,
    )
    for replay in (headers, github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))):
        assert_error(client.post("/webhooks/github", content=body, headers=replay), 200, "MHV-301")
    assert rows_for(edge, "github", delivery) == 1


def test_github_rejections(client: httpx.Client, hook_secrets: Secrets) -> None:
    body = body_for("rejected")
    good = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    wrong = github_headers("not-the-secret-at-all-0123456789", body, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=body, headers=wrong), 401, "MHV-300")
    for broken in ("sha256=zz", "sha1=" + "0" * 40, "sha256=" + "0" * 63, ""):
        headers = {**good, "X-Hub-Signature-256": broken}
        assert_error(client.post("/webhooks/github", content=body, headers=headers), 401, "MHV-300")
    no_delivery = {k: v for k, v in good.items() if k != "X-GitHub-Delivery"}
    body_json = assert_error(
        client.post("/webhooks/github", content=body, headers=no_delivery), 400, "MHV-003"
    )
    assert body_json["field_violations"] == [
        {"field": "x-github-delivery", "description": "is required"}
    ]
    # Authentic but not JSON: parsed only after verification, refused as malformed.
    text = b"payload=%7B%7D"
    form = github_headers(hook_secrets.github, text, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=text, headers=form), 400, "MHV-003")
    array = b"[1, 2]"
    listed = github_headers(hook_secrets.github, array, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=array, headers=listed), 400, "MHV-003")

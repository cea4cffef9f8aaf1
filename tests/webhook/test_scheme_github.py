"""GitHub: signatures and replays over HTTPS, and the task change each issues event asks for."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from typing import Any

import httpx
import pytest

from mhv_common.config import Repository, RepositoryCatalog
from mhv_common.errors import ConfigurationError
from mhv_webhook._changes import IgnoredEvent, Kind, Missing, TaskChange
from mhv_webhook._scheme import FreshnessWindow, Verified
from mhv_webhook._scheme_github import ACTIONS, IGNORED_ACTIONS, SCHEME
from mhv_webhook._secrets import parse_secrets
from tests.webhook.conftest import EdgeServer, Secrets
from tests.webhook.fixtures import body as json_body
from tests.webhook.fixtures import form_body, github_issue, payload
from tests.webhook.signing import github_headers, new_signing_key
from tests.webhook.support import assert_error, body_for, metric, rows_for

REPOSITORIES = RepositoryCatalog(
    (
        Repository(name="demo", github=("example/demo", "example/demo-mirror")),
        Repository(name="archive", github=("example/demo-archive",)),
    )
)
# Every action of GitHub's issues event (GitHub Docs, "Webhook events and payloads").
EVERY_ACTION = (
    "opened",
    "deleted",
    "transferred",
    "pinned",
    "unpinned",
    "closed",
    "reopened",
    "assigned",
    "unassigned",
    "labeled",
    "unlabeled",
    "locked",
    "unlocked",
    "milestoned",
    "demilestoned",
    "edited",
    "typed",
    "untyped",
)


def interpret(payload: dict[str, Any], event: str = "issues") -> TaskChange | IgnoredEvent:
    return SCHEME.interpret(
        source="github", event=event, payload=payload, repositories=REPOSITORIES
    )


def test_every_issues_action_has_a_defined_effect() -> None:
    assert set(ACTIONS) | set(IGNORED_ACTIONS) == set(EVERY_ACTION)
    assert not set(ACTIONS) & set(IGNORED_ACTIONS)
    for action in EVERY_ACTION:
        change = interpret(payload(f"github/issues.{action}"))
        if action in IGNORED_ACTIONS:
            assert isinstance(change, IgnoredEvent), action
            assert f"GitHub issues action {action!r}:" in change.reason
        else:
            assert isinstance(change, TaskChange), (action, change)
            assert change.kind == ACTIONS[action]


def test_an_opened_issue_brings_its_text_labels_milestone_and_assignees() -> None:
    change = interpret(payload("github/issues.opened"))
    assert change == TaskChange(
        kind=Kind.OPENED,
        source="github",
        external_key="example/demo#42",
        repository="demo",
        actor="github.mona",
        title="Saving a draft loses the attachments",
        description=(
            "Steps to reproduce:\n1. Attach a file\n2. Save as draft\n\nThe attachment is gone."
        ),
        metadata={
            "origin": {
                "source": "github",
                "key": "example/demo#42",
                "url": "https://github.com/example/demo/issues/42",
            },
            "labels": ["bug"],
            "milestone": {"title": "v1.0", "number": 1},
        },
        assignees=("github.hubot",),
        happened_at=dt.datetime(2025, 6, 10, 10, 0, tzinfo=dt.UTC),
    )


def test_labels_milestones_types_and_assignees_follow_the_issue() -> None:
    def edited(action: str) -> TaskChange:
        change = interpret(payload(f"github/issues.{action}"))
        assert isinstance(change, TaskChange) and change.kind == Kind.EDITED
        return change

    assert edited("labeled").metadata["labels"] == ["bug", "ui"]
    assert edited("unlabeled").metadata["labels"] == ["bug"]
    assert edited("milestoned").metadata["milestone"] == {"title": "v1.0", "number": 1}
    # None removes the key from the task's metadata.
    assert edited("demilestoned").metadata["milestone"] is None
    assert edited("typed").metadata["origin"]["type"] == "Bug"
    assert "type" not in edited("untyped").metadata["origin"]
    assert edited("assigned").assignees == ("github.hubot",)
    assert edited("unassigned").assignees == ()
    assert edited("edited").title == "Saving a draft loses attachments over 1 MB"


@pytest.mark.parametrize(
    ("state_reason", "cancel_reason"),
    [
        ("completed", ""),
        (None, ""),
        ("not_planned", "issue closed as not planned"),
        ("duplicate", "issue closed as a duplicate"),
        ("someday", "issue closed (someday)"),
    ],
)
def test_closing_completes_the_task_unless_closed_for_another_reason(
    state_reason: str | None, cancel_reason: str
) -> None:
    closed = payload("github/issues.closed")
    closed["issue"]["state_reason"] = state_reason
    change = interpret(closed)
    assert isinstance(change, TaskChange)
    assert (change.kind, change.cancel_reason, change.quality_gate) == (
        Kind.CLOSED,
        cancel_reason,
        None,
    )
    assert change.happened_at == dt.datetime(2025, 6, 11, 9, 0, tzinfo=dt.UTC)


def test_a_deleted_issue_cancels_its_task_and_never_creates_one() -> None:
    change = interpret(payload("github/issues.deleted"))
    assert isinstance(change, TaskChange)
    assert (change.kind, change.cancel_reason, change.missing) == (
        Kind.DELETED,
        "issue deleted on GitHub",
        Missing.IGNORE,
    )


def test_a_transfer_moves_the_task_to_the_new_issue() -> None:
    # At the old repository: "transferred", naming the new issue.
    moved = interpret(payload("github/issues.transferred"))
    assert isinstance(moved, TaskChange)
    assert (moved.kind, moved.moved_from, moved.external_key, moved.repository) == (
        Kind.TRANSFERRED,
        "example/demo-archive#3",
        "example/demo#7",
        "demo",
    )
    assert (moved.cancel_reason, moved.missing) == ("", Missing.IGNORE)
    assert moved.metadata["origin"]["key"] == "example/demo#7"
    # At the new one: "opened", naming the old issue; whichever comes first moves the task.
    arrived = interpret(payload("github/issues.opened.transferred"))
    assert isinstance(arrived, TaskChange)
    assert (arrived.kind, arrived.moved_from, arrived.external_key) == (
        Kind.OPENED,
        "example/demo-archive#3",
        "example/demo#7",
    )
    # Transferred to a repository not configured here: the task is cancelled, saying where.
    away = payload("github/issues.transferred")
    away["changes"]["new_repository"]["full_name"] = "someone/else"
    gone = interpret(away)
    assert isinstance(gone, TaskChange)
    assert gone.repository is None
    assert gone.cancel_reason == "issue transferred to someone/else#7, which is not configured here"


def test_any_listed_name_of_a_repository_files_into_it() -> None:
    mirrored = github_issue("opened", 5, repository="Example/Demo-Mirror")
    change = interpret(mirrored)
    assert isinstance(change, TaskChange)
    assert (change.repository, change.external_key) == ("demo", "Example/Demo-Mirror#5")


def test_long_text_is_cut_to_the_task_limits() -> None:
    long = payload("github/issues.opened")
    long["issue"].update(title="t" * 300, body="b" * 6000)
    change = interpret(long)
    assert isinstance(change, TaskChange) and change.title and change.description
    assert (len(change.title), len(change.description)) == (200, 5000)


@pytest.mark.parametrize(
    ("body", "event", "reason"),
    [
        ({"ref": "refs/heads/main"}, "push", "GitHub event 'push' does not change tasks"),
        ({"action": "status_changed"}, "issues", "'status_changed' has no defined task effect"),
        (
            github_issue("opened", 1, repository="someone/else"),
            "issues",
            "'someone/else' is not configured",
        ),
        ({"action": "opened", "issue": "x"}, "issues", "without issue or repository"),
        (
            {**payload("github/issues.opened"), "sender": None, "issue": {"number": 1}},
            "issues",
            "without a sender",
        ),
    ],
)
def test_what_changes_no_task_is_ignored_with_the_reason(
    body: dict[str, Any], event: str, reason: str
) -> None:
    change = interpret(body, event)
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
    # Authentic but not JSON: decoded only after verification, refused as malformed.
    text = b"payload=%7B%7D"
    form = github_headers(hook_secrets.github, text, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=text, headers=form), 400, "MHV-003")
    array = b"[1, 2]"
    listed = github_headers(hook_secrets.github, array, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=array, headers=listed), 400, "MHV-003")


# --- form-encoded deliveries -------------------------------------------------------------


def _form_headers(secret: str, body: bytes) -> dict[str, str]:
    headers = github_headers(secret, body, delivery=str(uuid.uuid4()))
    return {**headers, "Content-Type": "application/x-www-form-urlencoded"}


def test_a_form_encoded_delivery_is_verified_then_decoded(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    issue = github_issue("opened", 900_000 + uuid.uuid4().int % 10**5)
    body = form_body(issue)
    headers = _form_headers(hook_secrets.github, body)
    response = client.post("/webhooks/github", content=body, headers=headers)
    assert response.status_code == 202, response.text
    row = edge.run(
        edge._conn.fetchrow(  # type: ignore[union-attr]
            "SELECT event, action, content_type, body FROM deliveries WHERE id = $1",
            uuid.UUID(response.json()["id"]),
        )
    )
    # The exact bytes that were signed are kept, with the media type to decode them by.
    assert (row["event"], row["action"]) == ("issues", "opened")
    assert (row["content_type"], bytes(row["body"])) == ("application/x-www-form-urlencoded", body)
    # The signature covers the form body as sent: the JSON inside it signed instead is refused.
    resigned = {**headers, **github_headers(hook_secrets.github, json_body(issue), delivery="x")}
    resigned["Content-Type"] = "application/x-www-form-urlencoded"
    resigned["X-GitHub-Delivery"] = str(uuid.uuid4())
    assert_error(client.post("/webhooks/github", content=body, headers=resigned), 401, "MHV-300")


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (b"payload=%7B%7D&payload=%7B%7D", "application/x-www-form-urlencoded", "body"),
        (b"other=1", "application/x-www-form-urlencoded", "body"),
        (b"payload=%5B1%5D", "application/x-www-form-urlencoded", "body"),
        (b'{"action": "opened"}', "application/x-www-form-urlencoded", "body"),
        (b'{"action": "opened"}', "text/plain", "content-type"),
    ],
)
def test_authentic_bodies_that_do_not_decode_are_refused_with_the_reason(
    client: httpx.Client, hook_secrets: Secrets, body: bytes, content_type: str, field: str
) -> None:
    headers = {**_form_headers(hook_secrets.github, body), "Content-Type": content_type}
    refused = assert_error(
        client.post("/webhooks/github", content=body, headers=headers), 400, "MHV-003"
    )
    assert [v["field"] for v in refused["field_violations"]] == [field]  # type: ignore[index]

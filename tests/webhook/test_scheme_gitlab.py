"""GitLab: secret and signing tokens over HTTPS, and the task change each issue event asks for."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from mhv_common.config import Repository, RepositoryCatalog
from mhv_webhook._changes import IgnoredEvent, IssueChange, Kind
from mhv_webhook._scheme import Verified
from mhv_webhook._scheme_gitlab import SCHEME
from tests.webhook.conftest import EdgeServer, Secrets
from tests.webhook.signing import gitlab_token_headers, standard_headers
from tests.webhook.support import assert_error, rows_for

REPOSITORIES = RepositoryCatalog(
    (Repository(name="demo", github="example/demo", gitlab="example/demo"),)
)


def issue_hook(action: str, **extra: Any) -> dict[str, Any]:
    return {
        "object_kind": "issue",
        "user": {"username": "gitlab-user"},
        "project": {"path_with_namespace": extra.pop("path", "example/demo")},
        "object_attributes": {
            "iid": 7,
            "title": "From GitLab",
            "description": "d",
            "action": action,
        },
        **extra,
    }


def interpret(payload: dict[str, Any]) -> IssueChange | IgnoredEvent:
    return SCHEME.interpret(
        source="gitlab", event="Issue Hook", payload=payload, repositories=REPOSITORIES
    )


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("open", Kind.OPENED),
        ("update", Kind.EDITED),
        ("close", Kind.CLOSED),
        ("reopen", Kind.REOPENED),
    ],
)
def test_issue_actions_become_task_changes(action: str, kind: Kind) -> None:
    assert interpret(issue_hook(action)) == IssueChange(
        kind=kind,
        source="gitlab",
        external_key="example/demo#7",
        repository="demo",
        actor="gitlab.gitlab-user",
        title="From GitLab",
        description="d",
    )


def test_an_update_of_the_assignees_is_an_assignment() -> None:
    assigned = interpret(
        issue_hook(
            "update",
            changes={"assignees": {"previous": [], "current": [{"username": "dev one"}]}},
        )
    )
    assert isinstance(assigned, IssueChange)
    assert (assigned.kind, assigned.assignee) == (Kind.ASSIGNED, "gitlab.dev-one")
    removed = {"assignees": {"previous": [{"username": "x"}], "current": []}}
    unassigned = interpret(issue_hook("update", changes=removed))
    assert isinstance(unassigned, IssueChange)
    assert (unassigned.kind, unassigned.assignee) == (Kind.ASSIGNED, None)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"object_kind": "note"}, "GitLab 'note' events do not change tasks"),
        (issue_hook("approved"), "GitLab issue action 'approved' does not change tasks"),
        (issue_hook("open", path="someone/else"), "'someone/else' is not configured"),
        ({"object_kind": "issue", "project": {}}, "without attributes or project"),
        ({**issue_hook("open"), "user": {}}, "without a user"),
    ],
)
def test_what_changes_no_task_is_ignored_with_the_reason(
    payload: dict[str, Any], reason: str
) -> None:
    change = interpret(payload)
    assert isinstance(change, IgnoredEvent)
    assert reason in change.reason


def test_the_event_comes_from_the_header_else_the_object_kind() -> None:
    named = Verified("d-1", "Issue Hook", (), ())
    unnamed = Verified("d-1", "", (), ())
    payload = {"object_kind": "issue", "object_attributes": {"action": "open"}}
    assert SCHEME.describe(named, payload) == ("Issue Hook", "open")
    assert SCHEME.describe(unnamed, payload) == ("issue", "open")
    assert SCHEME.describe(unnamed, {"object_attributes": "open"}) == ("", "")


# --- over HTTPS -------------------------------------------------------------------------


def test_gitlab_secret_token(client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets) -> None:
    body = json.dumps({"object_kind": "issue", "object_attributes": {"action": "open"}}).encode()
    event_uuid, key = str(uuid.uuid4()), str(uuid.uuid4())
    headers = gitlab_token_headers(
        hook_secrets.gitlab_token, event_uuid=event_uuid, idempotency_key=key
    )
    response = client.post("/webhooks/gitlab", content=body, headers=headers)
    assert response.status_code == 202, response.text
    # Idempotency-Key is the dedup key when present.
    assert response.json()["delivery_id"] == key
    row = edge.run(
        edge._conn.fetchrow(  # type: ignore[union-attr]
            "SELECT event, action FROM deliveries WHERE source = 'gitlab' AND delivery_id = $1", key
        )
    )
    assert (row["event"], row["action"]) == ("Issue Hook", "open")
    # A GitLab retry carries the same Idempotency-Key.
    assert_error(client.post("/webhooks/gitlab", content=body, headers=headers), 200, "MHV-301")
    # Without Idempotency-Key (GitLab before 17.4) the event UUID is the key.
    older = json.dumps({"object_kind": "note", "n": uuid.uuid4().hex}).encode()
    legacy = gitlab_token_headers(hook_secrets.gitlab_token, event_uuid=str(uuid.uuid4()))
    response = client.post("/webhooks/gitlab", content=older, headers=legacy)
    assert response.status_code == 202
    assert response.json()["delivery_id"] == legacy["X-Gitlab-Event-UUID"]
    # Wrong or missing token.
    wrong = gitlab_token_headers("x" * 40, event_uuid=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/gitlab", content=body, headers=wrong), 401, "MHV-300")
    missing = {k: v for k, v in headers.items() if k != "X-Gitlab-Token"}
    assert_error(client.post("/webhooks/gitlab", content=body, headers=missing), 401, "MHV-300")
    neither = {
        k: v for k, v in legacy.items() if k not in ("X-Gitlab-Event-UUID", "Idempotency-Key")
    }
    assert_error(client.post("/webhooks/gitlab", content=older, headers=neither), 400, "MHV-003")


def test_gitlab_signing_token(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = json.dumps({"object_kind": "issue", "n": uuid.uuid4().hex}).encode()
    msg_id = str(uuid.uuid4())
    now = int(time.time())
    signed = {
        **gitlab_token_headers(
            hook_secrets.gitlab_token, event_uuid=str(uuid.uuid4()), idempotency_key=msg_id
        ),
        **standard_headers(hook_secrets.gitlab_signing, body, msg_id=msg_id, timestamp=now),
    }
    response = client.post("/webhooks/gitlab_signed", content=body, headers=signed)
    assert response.status_code == 202, response.text
    assert response.json()["delivery_id"] == msg_id
    # Both kinds are configured for this source: the token alone is not enough.
    token_only = {k: v for k, v in signed.items() if not k.startswith("webhook-")}
    assert_error(
        client.post("/webhooks/gitlab_signed", content=body, headers=token_only), 401, "MHV-300"
    )
    # Nor the signature alone.
    signature_only = {k: v for k, v in signed.items() if k != "X-Gitlab-Token"}
    assert_error(
        client.post("/webhooks/gitlab_signed", content=body, headers=signature_only), 401, "MHV-300"
    )
    # Signed timestamps are held to the window.
    old_id = str(uuid.uuid4())
    old = {
        **gitlab_token_headers(
            hook_secrets.gitlab_token, event_uuid=old_id, idempotency_key=old_id
        ),
        **standard_headers(hook_secrets.gitlab_signing, body, msg_id=old_id, timestamp=now - 3600),
    }
    assert_error(client.post("/webhooks/gitlab_signed", content=body, headers=old), 401, "MHV-304")
    # The signed webhook-id and Idempotency-Key must agree.
    other = str(uuid.uuid4())
    mismatched = {
        **gitlab_token_headers(hook_secrets.gitlab_token, event_uuid=other, idempotency_key=other),
        **standard_headers(
            hook_secrets.gitlab_signing, body, msg_id=str(uuid.uuid4()), timestamp=now
        ),
    }
    assert_error(
        client.post("/webhooks/gitlab_signed", content=body, headers=mismatched), 400, "MHV-003"
    )
    assert rows_for(edge, "gitlab_signed", msg_id) == 1

"""GitLab: secret and signing tokens over HTTPS, and the task change each issue event asks for."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
import uuid
from typing import Any

import httpx
import pytest

from mhv_common.config import Repository, RepositoryCatalog
from mhv_webhook._changes import IgnoredEvent, Kind, TaskChange
from mhv_webhook._scheme import Verified
from mhv_webhook._scheme_gitlab import ACTIONS, SCHEME
from tests.webhook.conftest import EdgeServer, Secrets, Tls
from tests.webhook.fixtures import body as json_body
from tests.webhook.fixtures import gitlab_issue, payload
from tests.webhook.signing import gitlab_token_headers, standard_headers
from tests.webhook.support import assert_error, rows_for

REPOSITORIES = RepositoryCatalog(
    (Repository(name="demo", github=("example/demo",), gitlab=("example/demo", "mirrors/demo")),)
)


def interpret(body: dict[str, Any]) -> TaskChange | IgnoredEvent:
    return SCHEME.interpret(
        source="gitlab", event="Issue Hook", payload=body, repositories=REPOSITORIES
    )


def change_of(case: str) -> TaskChange:
    change = interpret(payload(f"gitlab/issue.{case}"))
    assert isinstance(change, TaskChange), change
    return change


def test_every_issue_action_has_a_defined_effect() -> None:
    # GitLab Docs, "Work item events": object_attributes.action is open, close, reopen, update.
    assert ACTIONS == {
        "open": Kind.OPENED,
        "reopen": Kind.OPENED,
        "update": Kind.EDITED,
        "close": Kind.CLOSED,
    }
    for case, kind in (("open", Kind.OPENED), ("reopen", Kind.OPENED), ("close", Kind.CLOSED)):
        assert change_of(case).kind == kind


def test_an_opened_issue_brings_its_text_labels_milestone_and_assignees() -> None:
    assert change_of("open") == TaskChange(
        kind=Kind.OPENED,
        source="gitlab",
        external_key="example/demo#23",
        repository="demo",
        actor="gitlab.alice",
        title="Saving a draft loses the attachments",
        description="Steps to reproduce:\n1. Attach a file\n2. Save as draft",
        metadata={
            "origin": {
                "source": "gitlab",
                "key": "example/demo#23",
                "url": "https://gitlab.example.com/example/demo/-/issues/23",
                "type": "Issue",
            },
            "labels": ["bug"],
            "milestone": {"id": 4},
        },
        assignees=("gitlab.bob",),
        happened_at=dt.datetime(2025, 6, 10, 10, 0, tzinfo=dt.UTC),
    )


def test_an_update_carries_the_whole_issue_whatever_changed() -> None:
    title = change_of("update.title")
    assert (title.kind, title.title) == (Kind.EDITED, "Saving a draft loses attachments over 1 MB")
    assert change_of("update.labels").metadata["labels"] == ["bug", "ui"]
    assert change_of("update.milestone").metadata["milestone"] == {"id": 4}
    assert change_of("update.assignees").assignees == ("gitlab.bob",)
    # No assignee left: GitLab leaves the list out, and changes.assignees says so.
    assert change_of("update.unassigned").assignees == ()
    # A change to a field tasks do not hold still re-states the issue (writing nothing new).
    weight = change_of("update.weight")
    assert (weight.kind, weight.metadata["labels"], weight.assignees) == (Kind.EDITED, [], ())


@pytest.mark.parametrize(
    ("case", "cancel_reason"),
    [
        ("close", ""),
        ("close.moved", "issue moved to another GitLab project (issue id 9104)"),
        ("close.duplicate", "issue closed as a duplicate (of GitLab issue id 9011)"),
    ],
)
def test_closing_completes_the_task_unless_moved_or_a_duplicate(
    case: str, cancel_reason: str
) -> None:
    change = change_of(case)
    assert (change.kind, change.cancel_reason, change.quality_gate) == (
        Kind.CLOSED,
        cancel_reason,
        None,
    )
    assert change.happened_at == dt.datetime(2025, 6, 11, 9, 0, tzinfo=dt.UTC)


def test_any_listed_project_files_into_its_repository() -> None:
    change = interpret(gitlab_issue("open", 5, project="mirrors/demo"))
    assert isinstance(change, TaskChange)
    assert (change.repository, change.external_key) == ("demo", "mirrors/demo#5")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"object_kind": "note"}, "GitLab 'note' events do not change tasks"),
        ({"object_kind": "work_item"}, "work items other than issues do not change tasks"),
        (
            {**payload("gitlab/issue.open"), "object_attributes": {"action": "approved"}},
            "GitLab issue action 'approved' has no defined task effect",
        ),
        (gitlab_issue("open", 1, project="someone/else"), "'someone/else' is not configured"),
        ({"object_kind": "issue", "project": {}}, "without attributes or project"),
        ({**payload("gitlab/issue.open"), "user": {}}, "without a user"),
    ],
)
def test_what_changes_no_task_is_ignored_with_the_reason(body: dict[str, Any], reason: str) -> None:
    change = interpret(body)
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


def test_an_issue_near_gitlabs_description_limit_is_accepted_up_to_its_cap(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets, tls: Tls
) -> None:
    # GitLab allows descriptions of about a million characters; with the rest of the payload
    # such an issue is well over 1 MiB, and under GitLab's own 25 MiB sending limit.
    big = gitlab_issue("open", 100_000 + uuid.uuid4().int % 10**5)
    big["object_attributes"]["description"] = "ü" * 1_000_000
    body = json_body(big)
    assert len(body) > 2 * 1024 * 1024
    headers = gitlab_token_headers(hook_secrets.gitlab_token, event_uuid=str(uuid.uuid4()))
    accepted = client.post("/webhooks/gitlab", content=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    # Beyond GitLab's 25 MiB cap: refused on the declared length, before the body is read.
    token = hook_secrets.gitlab_token
    head = (
        "POST /webhooks/gitlab HTTP/1.1\r\nHost: localhost\r\n"
        f"X-Gitlab-Token: {token}\r\nX-Gitlab-Event-UUID: {uuid.uuid4()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {25 * 1024 * 1024 + 1}\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", edge.port), timeout=30) as raw,
        tls.client_context().wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split(b" ")[1] == b"413", answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error_code"] == "MHV-305"

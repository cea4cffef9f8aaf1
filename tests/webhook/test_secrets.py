"""Webhook secrets: the variable's syntax, expiry, and rotation over HTTPS."""

from __future__ import annotations

import base64
import uuid

import httpx
import pytest

from mhv_common.errors import ConfigurationError
from mhv_webhook._secrets import parse_secrets
from tests.webhook.conftest import Secrets
from tests.webhook.signing import github_headers
from tests.webhook.support import assert_error, body_for, metric

SECRET = "0123456789abcdef0123"


def test_entries_newest_first_with_labels_and_expiry() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    parsed = parse_secrets(
        "github",
        f"{SECRET};id=new, whsec_{key} ,{SECRET}x;expires=2030-01-01T00:00:00Z",
    )
    assert [(s.label, s.signing_key) for s in parsed] == [("new", False), ("1", True), ("2", False)]
    assert parsed[0].key == SECRET.encode()
    assert parsed[1].key == b"k" * 32
    assert parsed[2].expires_at == 1_893_456_000.0
    assert parsed[2].active(1_893_455_999.0) and not parsed[2].active(1_893_456_000.0)
    # The key never shows in logs or tracebacks.
    assert SECRET not in repr(parsed[0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "MHV_WEBHOOK_SECRETS_GITHUB is not set"),
        ("  ", "MHV_WEBHOOK_SECRETS_GITHUB is not set"),
        (f"{SECRET},", "entry 1: the secret is empty"),
        ("short", "shorter than 16 bytes"),
        ("whsec_!!!!", "base64 after the prefix"),
        (f"{SECRET};expires=soon", "ISO 8601"),
        (f"{SECRET};expires=2030-01-01T00:00:00", "needs a time zone"),
        (f"{SECRET};id=a b", "id must be"),
        (f"{SECRET};id=a,{SECRET}x;id=a", "id 'a' is used twice"),
        (f"{SECRET};colour=blue", "unknown option 'colour'"),
        (f"{SECRET};id", "options are written name=value"),
    ],
)
def test_malformed_values_are_refused_without_showing_the_secret(
    text: str | None, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as refused:
        parse_secrets("github", text)
    assert SECRET not in str(refused.value)


def test_rotation_accepts_old_and_new_refuses_expired_and_reports_the_key(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    before = {
        key: metric("webhook_secret_matches_total", source="rotating", key=key)
        for key in ("new", "1", "retired")
    }
    for secret, key in ((hook_secrets.rotating_new, "new"), (hook_secrets.rotating_old, "1")):
        body = body_for(f"rotation-{key}")
        headers = github_headers(secret, body, delivery=str(uuid.uuid4()))
        assert client.post("/webhooks/rotating", content=body, headers=headers).status_code == 202
        assert metric("webhook_secret_matches_total", source="rotating", key=key) == before[key] + 1
    body = body_for("rotation-expired")
    expired = github_headers(hook_secrets.rotating_expired, body, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/rotating", content=body, headers=expired), 401, "MHV-300")
    assert (
        metric("webhook_secret_matches_total", source="rotating", key="retired")
        == before["retired"]
    )

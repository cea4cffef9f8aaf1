"""How each sender signs a request, written from the senders' documentation, for the tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


def new_github_secret() -> str:
    return secrets.token_hex(32)


def new_signing_key() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def github_headers(
    secret: str, body: bytes, *, delivery: str, event: str = "issues"
) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": event,
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/test",
    }


def standard_signature(key: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    raw = base64.b64decode(key.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(raw, signed, hashlib.sha256).digest()).decode()


def standard_headers(
    key: str, body: bytes, *, msg_id: str, timestamp: int, prefix: str = "webhook"
) -> dict[str, str]:
    """Standard Webhooks headers (`prefix` "svix" for Svix's names of the same three)."""
    return {
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": str(timestamp),
        f"{prefix}-signature": standard_signature(key, msg_id, timestamp, body),
        "Content-Type": "application/json",
    }


def gitlab_token_headers(
    token: str, *, event_uuid: str, idempotency_key: str | None = None, event: str = "Issue Hook"
) -> dict[str, str]:
    headers = {
        "X-Gitlab-Token": token,
        "X-Gitlab-Event": event,
        "X-Gitlab-Event-UUID": event_uuid,
        "X-Gitlab-Instance": "https://gitlab.example",
        "Content-Type": "application/json",
    }
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers

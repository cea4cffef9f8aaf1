"""Standard Webhooks: the official test vectors, the freshness window at its edges, and what
the scheme makes of its deliveries."""

from __future__ import annotations

import uuid

import httpx
import pytest

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import ConfigurationError, WebhookSignatureInvalidError
from mhv_webhook._changes import IgnoredEvent
from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import FreshnessWindow, Verified
from mhv_webhook._scheme_standard import MAX_SIGNATURES, SCHEME, verify_signature
from mhv_webhook._secrets import parse_secrets
from tests.webhook.conftest import OFFICIAL_SECRET, EdgeServer, Secrets
from tests.webhook.signing import new_github_secret, standard_headers, standard_signature
from tests.webhook.support import assert_error, body_for, rows_for

# The Standard Webhooks project's own vectors (libraries/python/tests/test_webhooks.py).
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
VECTOR_BAD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="


def _headers(**values: str) -> HeaderView:
    return HeaderView([(k.replace("_", "-").encode(), v.encode()) for k, v in values.items()])


def test_test_signer_reproduces_the_official_vector() -> None:
    assert (
        standard_signature(OFFICIAL_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
        == VECTOR_SIGNATURE
    )


def test_verifier_accepts_the_official_vector_and_refuses_its_bad_twin() -> None:
    keys = parse_secrets("official", OFFICIAL_SECRET)
    headers = HeaderView(
        [
            (b"webhook-id", VECTOR_ID.encode()),
            (b"webhook-timestamp", str(VECTOR_TIMESTAMP).encode()),
            (b"webhook-signature", VECTOR_SIGNATURE.encode()),
        ]
    )
    window = FreshnessWindow()
    assert verify_signature(headers, VECTOR_BODY, keys, now=VECTOR_TIMESTAMP, window=window) == (
        VECTOR_ID,
        "0",
    )
    bad = HeaderView(
        [
            (b"webhook-id", VECTOR_ID.encode()),
            (b"webhook-timestamp", str(VECTOR_TIMESTAMP).encode()),
            (b"webhook-signature", VECTOR_BAD_SIGNATURE.encode()),
        ]
    )
    with pytest.raises(WebhookSignatureInvalidError):
        verify_signature(bad, VECTOR_BODY, keys, now=VECTOR_TIMESTAMP, window=window)


def test_more_signatures_than_a_rotation_needs_are_refused_unchecked() -> None:
    keys = parse_secrets("official", OFFICIAL_SECRET)
    # The valid signature is among them, but the header is refused before any HMAC.
    crowded = " ".join([VECTOR_SIGNATURE] + ["v1,AAAA"] * MAX_SIGNATURES)
    headers = _headers(
        webhook_id=VECTOR_ID,
        webhook_timestamp=str(VECTOR_TIMESTAMP),
        webhook_signature=crowded,
    )
    with pytest.raises(WebhookSignatureInvalidError, match="more than 16 signatures"):
        verify_signature(headers, VECTOR_BODY, keys, now=VECTOR_TIMESTAMP, window=FreshnessWindow())


def test_only_signing_keys_are_accepted_as_secrets() -> None:
    plain = parse_secrets("generic", new_github_secret())
    with pytest.raises(ConfigurationError, match="whsec_"):
        SCHEME.verifier(plain, window=FreshnessWindow(), variable="MHV_WEBHOOK_SECRETS_GENERIC")


def test_the_event_is_the_payload_type_and_no_task_changes() -> None:
    verified = Verified("msg_1", "", ("0",), (("delivery_id", "msg_1"),))
    assert SCHEME.describe(verified, {"type": "issue.created"}) == ("issue.created", "")
    assert SCHEME.describe(verified, {"type": "bad\nname"}) == ("", "")
    assert SCHEME.describe(verified, {"type": 7}) == ("", "")
    change = SCHEME.interpret(
        source="generic",
        event="issue.created",
        payload={"type": "issue.created"},
        repositories=RepositoryCatalog(()),
    )
    assert change == IgnoredEvent("no task mapping for standard events")


def _vector_headers(signature: str, timestamp: int = VECTOR_TIMESTAMP) -> dict[str, str]:
    return {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def test_official_vectors_over_https(client: httpx.Client, edge: EdgeServer) -> None:
    edge.clock.pinned = VECTOR_TIMESTAMP
    # Invalid signature vector.
    bad = client.post(
        "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_BAD_SIGNATURE)
    )
    assert_error(bad, 401, "MHV-300")
    # Several signatures, other versions among them, one valid: accepted.
    multi = " ".join(
        [
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            VECTOR_SIGNATURE,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        ]
    )
    first = client.post("/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(multi))
    assert first.status_code == 202, first.text
    assert first.json()["delivery_id"] == VECTOR_ID
    # The single valid signature verifies too; the id was already received: 200, MHV-301.
    again = client.post(
        "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_SIGNATURE)
    )
    assert_error(again, 200, "MHV-301")
    assert rows_for(edge, "official", VECTOR_ID) == 1
    # Too old and too new by more than the window (the vectors' 5-minute tolerance).
    edge.clock.pinned = VECTOR_TIMESTAMP + 301
    assert_error(
        client.post(
            "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_SIGNATURE)
        ),
        401,
        "MHV-304",
    )
    edge.clock.pinned = VECTOR_TIMESTAMP - 31
    assert_error(
        client.post(
            "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_SIGNATURE)
        ),
        401,
        "MHV-304",
    )
    # Missing headers.
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        edge.clock.pinned = VECTOR_TIMESTAMP
        headers = _vector_headers(VECTOR_SIGNATURE)
        del headers[missing]
        response = client.post("/webhooks/official", content=VECTOR_BODY, headers=headers)
        assert response.status_code == 401, (missing, response.text)


# --- Freshness: each edge of the window, +-1 s, with a controlled clock ------------------

NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (-301, False),
        (-300, True),
        (-299, True),
        (29, True),
        (30, True),
        (31, False),
    ],
)
def test_window_edges(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets, offset: int, accepted: bool
) -> None:
    edge.clock.pinned = NOW
    msg_id = f"msg_edge_{uuid.uuid4().hex}"
    body = body_for("edge")
    headers = standard_headers(hook_secrets.generic, body, msg_id=msg_id, timestamp=NOW + offset)
    response = client.post("/webhooks/generic", content=body, headers=headers)
    if accepted:
        assert response.status_code == 202, response.text
        assert rows_for(edge, "generic", msg_id) == 1
    else:
        body_json = assert_error(response, 401, "MHV-304")
        assert ("older" in str(body_json["message"])) == (offset < 0)
        assert rows_for(edge, "generic", msg_id) == 0

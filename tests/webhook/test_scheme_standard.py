"""Standard Webhooks: the official test vectors, the freshness window at its edges, and what
the scheme makes of its deliveries."""

from __future__ import annotations

import functools
import uuid

import httpx
import pytest

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import (
    ConfigurationError,
    WebhookSignatureInvalidError,
    WebhookTimestampInvalidError,
)
from mhv_webhook._changes import IgnoredEvent
from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import FreshnessWindow, Verified
from mhv_webhook._scheme_standard import _PREFIXES as PREFIXES
from mhv_webhook._scheme_standard import (
    MAX_SIGNATURES,
    SCHEME,
    header_prefix,
    verify_signature,
)
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


def test_the_event_is_the_payload_type_and_other_types_change_no_task() -> None:
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
    assert change == IgnoredEvent("'issue.created' is not a task event: no task mapping")


@pytest.mark.parametrize("prefix", ["webhook", "svix"])
def test_svix_headers_are_the_same_scheme(prefix: str) -> None:
    keys = parse_secrets("official", OFFICIAL_SECRET)
    headers = _headers(
        **{
            f"{prefix}_id": VECTOR_ID,
            f"{prefix}_timestamp": str(VECTOR_TIMESTAMP),
            f"{prefix}_signature": VECTOR_SIGNATURE,
        }
    )
    verifier = SCHEME.verifier(keys, window=FreshnessWindow(), variable="V")
    verified = verifier.verify(headers, VECTOR_BODY, now=VECTOR_TIMESTAMP)
    assert (verified.delivery_id, verified.dedup_keys) == (
        VECTOR_ID,
        (("delivery_id", VECTOR_ID),),
    )


def test_the_svix_set_is_read_first_when_complete_as_svix_libraries_do() -> None:
    complete = {"svix_id": "a", "svix_timestamp": "1", "svix_signature": "v1,x"}
    assert header_prefix(_headers(**complete), PREFIXES) == "svix"
    both = {**complete, "webhook_id": "b", "webhook_timestamp": "2", "webhook_signature": "v1,y"}
    assert header_prefix(_headers(**both), PREFIXES) == "svix"
    partial_svix = {"svix_id": "a", **{k: v for k, v in both.items() if "webhook" in k}}
    assert header_prefix(_headers(**partial_svix), PREFIXES) == "webhook"
    # Only part of Svix's set, and none of the standard's: errors name Svix's headers.
    assert header_prefix(_headers(svix_id="a", svix_signature="v1,x"), PREFIXES) == "svix"
    assert header_prefix(_headers(), PREFIXES) == "webhook"
    keys = parse_secrets("official", OFFICIAL_SECRET)
    with pytest.raises(WebhookTimestampInvalidError, match="svix-timestamp header is missing"):
        verify_signature(
            _headers(svix_id=VECTOR_ID, svix_signature=VECTOR_SIGNATURE),
            VECTOR_BODY,
            keys,
            now=VECTOR_TIMESTAMP,
            window=FreshnessWindow(),
            prefixes=PREFIXES,
        )


def _vector_headers(
    signature: str, timestamp: int = VECTOR_TIMESTAMP, prefix: str = "webhook"
) -> dict[str, str]:
    return {
        f"{prefix}-id": VECTOR_ID,
        f"{prefix}-timestamp": str(timestamp),
        f"{prefix}-signature": signature,
        "content-type": "application/json",
    }


@pytest.mark.parametrize("prefix", ["webhook", "svix"])
def test_official_vectors_over_https(client: httpx.Client, edge: EdgeServer, prefix: str) -> None:
    # The same message under Svix's header names is the same delivery: the first of the two
    # runs stores it, the second gets 200 MHV-301 where the first got 202.
    vector_headers = functools.partial(_vector_headers, prefix=prefix)
    already = rows_for(edge, "official", VECTOR_ID) == 1
    edge.clock.pinned = VECTOR_TIMESTAMP
    # Invalid signature vector.
    bad = client.post(
        "/webhooks/official", content=VECTOR_BODY, headers=vector_headers(VECTOR_BAD_SIGNATURE)
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
    first = client.post("/webhooks/official", content=VECTOR_BODY, headers=vector_headers(multi))
    if already:
        assert_error(first, 200, "MHV-301")
    else:
        assert first.status_code == 202, first.text
        assert first.json()["delivery_id"] == VECTOR_ID
    # The single valid signature verifies too; the id was already received: 200, MHV-301.
    again = client.post(
        "/webhooks/official", content=VECTOR_BODY, headers=vector_headers(VECTOR_SIGNATURE)
    )
    assert_error(again, 200, "MHV-301")
    assert rows_for(edge, "official", VECTOR_ID) == 1
    # Too old and too new by more than the window (the vectors' 5-minute tolerance).
    edge.clock.pinned = VECTOR_TIMESTAMP + 301
    assert_error(
        client.post(
            "/webhooks/official", content=VECTOR_BODY, headers=vector_headers(VECTOR_SIGNATURE)
        ),
        401,
        "MHV-304",
    )
    edge.clock.pinned = VECTOR_TIMESTAMP - 31
    assert_error(
        client.post(
            "/webhooks/official", content=VECTOR_BODY, headers=vector_headers(VECTOR_SIGNATURE)
        ),
        401,
        "MHV-304",
    )
    # Missing headers.
    for missing in (f"{prefix}-id", f"{prefix}-timestamp", f"{prefix}-signature"):
        edge.clock.pinned = VECTOR_TIMESTAMP
        headers = vector_headers(VECTOR_SIGNATURE)
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
@pytest.mark.parametrize("prefix", ["webhook", "svix"])
def test_window_edges(
    client: httpx.Client,
    edge: EdgeServer,
    hook_secrets: Secrets,
    offset: int,
    accepted: bool,
    prefix: str,
) -> None:
    edge.clock.pinned = NOW
    msg_id = f"msg_edge_{uuid.uuid4().hex}"
    body = body_for("edge")
    headers = standard_headers(
        hook_secrets.generic, body, msg_id=msg_id, timestamp=NOW + offset, prefix=prefix
    )
    response = client.post("/webhooks/generic", content=body, headers=headers)
    if accepted:
        assert response.status_code == 202, response.text
        assert rows_for(edge, "generic", msg_id) == 1
    else:
        body_json = assert_error(response, 401, "MHV-304")
        assert ("older" in str(body_json["message"])) == (offset < 0)
        assert rows_for(edge, "generic", msg_id) == 0

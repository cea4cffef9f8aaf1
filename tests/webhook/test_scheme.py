"""What the schemes share: the body as a JSON object, required headers, printable fields."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from mhv_common.errors import ValidationError
from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import (
    DELIVERY_ID,
    BodyFormat,
    body_digest,
    body_format,
    checked_delivery_id,
    decode_payload,
    printable,
    required_header,
)


def test_a_body_is_a_json_object_in_utf8() -> None:
    assert decode_payload('{"a": "ü"}'.encode(), BodyFormat.JSON) == {"a": "ü"}
    for body in (b"\xff{}", b"{", b"[1]", b"null", b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(ValidationError) as refused:
            decode_payload(body, BodyFormat.JSON)
        assert [v.field for v in refused.value.violations] == ["body"]


def test_a_form_body_carries_the_json_in_its_payload_field() -> None:
    sent = urllib.parse.urlencode({"payload": '{"a": "ü & b=c"}'}).encode()
    assert decode_payload(sent, BodyFormat.FORM) == {"a": "ü & b=c"}
    # Fields beside the payload are not ours to read; they do not stop the delivery.
    assert decode_payload(b"payload=%7B%7D&hook=1", BodyFormat.FORM) == {}
    for body in (
        b"",
        b"payload=%7B%7D&payload=%7B%7D",
        b"nopayload=%7B%7D",
        b"payload",
        b"payload=%FF",
        b"payload=%5B%5D",
        b"payload={}" + b"&x=1" * 20,
        "payload=ü".encode(),
    ):
        with pytest.raises(ValidationError) as refused:
            decode_payload(body, BodyFormat.FORM)
        assert [v.field for v in refused.value.violations] == ["body"], body


def test_the_format_is_named_by_the_content_type() -> None:
    both = (BodyFormat.JSON, BodyFormat.FORM)

    def named(value: str | None, accepted: tuple[BodyFormat, ...] = both) -> BodyFormat:
        raw = [] if value is None else [(b"content-type", value.encode())]
        return body_format(HeaderView(raw), accepted)

    assert named(None) == BodyFormat.JSON
    assert named("application/json; charset=utf-8") == BodyFormat.JSON
    assert named("Application/X-WWW-Form-Urlencoded") == BodyFormat.FORM
    for refused in ("text/plain", "application/x-www-form-urlencoded-ish"):
        with pytest.raises(ValidationError) as error:
            named(refused)
        assert [v.field for v in error.value.violations] == ["content-type"]
    # A sender that never sends forms: a form is refused, not guessed at.
    with pytest.raises(ValidationError, match="send application/json"):
        named("application/x-www-form-urlencoded", (BodyFormat.JSON,))


def test_required_headers_name_what_is_wrong() -> None:
    headers = HeaderView([(b"x-github-delivery", b"not valid")])
    with pytest.raises(ValidationError) as missing:
        required_header(headers, "x-github-event", DELIVERY_ID, "event name")
    assert [(v.field, v.description) for v in missing.value.violations] == [
        ("x-github-event", "is required")
    ]
    with pytest.raises(ValidationError, match="not a valid delivery id"):
        required_header(headers, "x-github-delivery", DELIVERY_ID, "delivery id")
    ok = HeaderView([(b"x-github-delivery", b"abc-1")])
    assert required_header(ok, "x-github-delivery", DELIVERY_ID, "delivery id") == "abc-1"


def test_signed_ids_must_be_usable_delivery_ids() -> None:
    assert checked_delivery_id("msg_1", "webhook-id") == "msg_1"
    for bad in ("", "with space", "x" * 201, "ü"):
        with pytest.raises(ValidationError) as refused:
            checked_delivery_id(bad, "webhook-id")
        assert [v.field for v in refused.value.violations] == ["webhook-id"]


def test_stored_fields_are_short_printable_text_or_nothing() -> None:
    assert printable("opened") == "opened"
    assert printable("a\nb") == ""
    assert printable("x" * 201) == ""
    assert printable(3) == ""


def test_the_body_digest_is_its_sha256() -> None:
    kind, key = body_digest(b"{}")
    assert kind == "body_sha256"
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

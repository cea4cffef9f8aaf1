"""Redaction of audit details."""

from __future__ import annotations

from mhv_common.redaction import redact_details


def test_plan_sensitive_fields_keep_only_their_length() -> None:
    out = redact_details(
        {"title": "Fix it", "description": "call me at 555-0100", "metadata": {"k": "v"}}
    )
    assert out == {
        "title": "Fix it",
        "description": "[REDACTED (19 characters)]",
        "metadata": "[REDACTED (10 characters)]",  # len('{"k": "v"}')
    }


def test_secret_keys_are_redacted_at_any_depth() -> None:
    details = {
        "changes": {"title": ["a", "b"], "labels": [{"api_key": "sk_live_123"}]},
        "Authorization": "Bearer abc.def",
        "nested": {"deeper": {"db_password": "pw", "note": "fine"}},
        "x_token_id": 7,
    }
    out = redact_details(details)
    assert out["changes"]["title"] == ["a", "b"]
    assert out["changes"]["labels"][0]["api_key"] == "[REDACTED (11 characters)]"
    assert out["Authorization"] == "[REDACTED (14 characters)]"
    assert out["nested"]["deeper"] == {"db_password": "[REDACTED (2 characters)]", "note": "fine"}
    assert out["x_token_id"] == "[REDACTED (1 characters)]"
    assert "sk_live_123" not in repr(out) and "abc.def" not in repr(out)


def test_redaction_is_idempotent_and_does_not_mutate_input() -> None:
    details = {"description": "secret plans", "nested": {"secret": "s3"}}
    once = redact_details(details)
    assert redact_details(once) == once
    assert details == {"description": "secret plans", "nested": {"secret": "s3"}}


def test_none_stays_none() -> None:
    assert redact_details({"description": None}) == {"description": None}

"""The public surface of mhv_webhook is what its __all__ says, and nothing goes missing."""

from __future__ import annotations

import mhv_webhook

EXPECTED = {
    "SCHEMES",
    "STATES",
    "TASK_EVENTS_SCHEMA",
    "AcceptResult",
    "BodyFormat",
    "Claimed",
    "DedupPurger",
    "Deliveries",
    "DeliveryPage",
    "DeliveryPurger",
    "DeliveryRow",
    "Exchange",
    "FreshnessWindow",
    "HeaderView",
    "HttpsListener",
    "IgnoredEvent",
    "Inbox",
    "InboxGauges",
    "InboxStats",
    "Ingestor",
    "IssueBusy",
    "IssueLink",
    "Kind",
    "LeaseLost",
    "ListRequest",
    "Missing",
    "PermanentError",
    "QualityGate",
    "Receipt",
    "SagaRow",
    "SagaStep",
    "SagaWorker",
    "Sagas",
    "Scheme",
    "Secret",
    "Source",
    "TaskChange",
    "TaskClient",
    "TaskServiceError",
    "TaskSnapshot",
    "TaskStatus",
    "TransientError",
    "Verified",
    "Verifier",
    "WebhookAdminServicer",
    "WebhookEdge",
    "build_sources",
    "error_response",
    "interpret",
    "decode_payload",
    "parse_secrets",
    "tls_context",
    "webhook_middleware",
}


def test_exports() -> None:
    assert set(mhv_webhook.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(mhv_webhook, name) is not None


def test_the_three_sender_schemes() -> None:
    assert set(mhv_webhook.SCHEMES) == {"github", "gitlab", "standard"}

"""Prometheus metrics of the webhook gateway (read in docs/runbooks/webhook-security.md).

Labels stay bounded: ``source`` is a declared source name or ``unknown``, never a path an
attacker chose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = (
    "accepted",
    "duplicate",
    "bad_signature",
    "bad_timestamp",
    "malformed",
    "too_large",
    "rate_limited",
    "error",
)

REQUESTS = Counter(
    "webhook_requests_total",
    "HTTP requests to the webhook gateway, by status code.",
    ["source", "code"],
)
DELIVERIES = Counter(
    "webhook_deliveries_total", "Webhook deliveries by outcome.", ["source", "outcome"]
)
ACK_DURATION = Histogram(
    "webhook_ack_duration_seconds",
    "Time from the request's arrival to its answer (202 only after the inbox commit).",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SECRET_MATCHES = Counter(
    "webhook_secret_matches_total",
    "Verified requests by the secret that matched (its id, or its position: 0 = newest).",
    ["source", "key"],
)
DUPLICATES = Counter(
    "webhook_duplicates_total",
    "Repeated deliveries, by what was recognised: delivery_id (a sender retry) or body "
    "(the same signed body under a new id: a replay).",
    ["source", "matched"],
)
BODY_BYTES = Counter(
    "webhook_body_bytes_received_total",
    "Request body bytes the gateway read (at most the source's cap per request).",
    ["source"],
)
CONNECTIONS_REFUSED = Counter(
    "webhook_connections_closed_total",
    "HTTPS connections the gateway closed unserved: per_address (the client address holds its "
    "maximum already), tls_handshake_timeout (no TLS handshake in time) or head_timeout (no "
    "complete request head in time).",
    ["reason"],
)
for _reason in ("per_address", "tls_handshake_timeout", "head_timeout"):
    CONNECTIONS_REFUSED.labels(_reason)
# Every process of the gateway samples the same inbox: the newest sample stands.
INBOX_DEPTH = Gauge(
    "webhook_inbox_depth",
    "Inbox deliveries in each open state.",
    ["state"],
    multiprocess_mode="livemostrecent",
)
INBOX_LAG = Gauge(
    "webhook_inbox_lag_seconds",
    "Age of the oldest delivery still pending (0 when none).",
    multiprocess_mode="livemostrecent",
)
# The audit outbox of operators' actions (`mhv_common.outbox`), as the task service's.
OUTBOX_DEPTH = Gauge(
    "webhook_outbox_depth",
    "Audit events of operators' actions committed but not yet delivered.",
    multiprocess_mode="livemostrecent",
)
OUTBOX_LAG = Gauge(
    "webhook_outbox_lag_seconds",
    "Age of the oldest undelivered audit event (0 when none).",
    multiprocess_mode="livemostrecent",
)
OUTBOX_DELIVERED = Counter("webhook_outbox_delivered_total", "Audit events delivered.")
OUTBOX_FAILURES = Counter(
    "webhook_outbox_delivery_failures_total", "Relay rounds that failed and will be retried."
)
DEDUP_PURGED = Counter("webhook_dedup_purged_total", "Dedup records deleted after their retention.")
DELIVERIES_PURGED = Counter(
    "webhook_deliveries_purged_total", "Finished deliveries deleted after their retention."
)
SAGA_STATES = ("completed", "ignored", "compensated", "dead_letter")
SAGA_OUTCOMES = Counter(
    "webhook_saga_total", "Delivery sagas that ended, by how they ended.", ["outcome"]
)
for _outcome in SAGA_STATES:
    # Present at zero from the start, so rates and SLO ratios exist before the first failure.
    SAGA_OUTCOMES.labels(_outcome)


def initialise(keys: Mapping[str, Iterable[str]]) -> None:
    """Create every known label combination at zero (see docs/sre/metrics.md).

    Args:
        keys: Source name -> the labels of its configured secrets.
    """
    for source, labels in keys.items():
        for label in labels:
            SECRET_MATCHES.labels(source, label)
        REQUESTS.labels(source, "202")
        ACK_DURATION.labels(source)
        for outcome in OUTCOMES:
            DELIVERIES.labels(source, outcome)
        for matched in ("delivery_id", "body"):
            DUPLICATES.labels(source, matched)

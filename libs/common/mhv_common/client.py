"""Channels for service-to-service calls.

A channel made here carries the OpenTelemetry client interceptor, so the W3C trace context of the
current span travels with every call, and callers pass the remaining request deadline as the
call's timeout (`mhv_common.context.time_left`).
"""

from __future__ import annotations

import grpc
from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors

_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    # After an outage, reconnect within seconds rather than gRPC's default backoff of up to
    # two minutes: the callers here are background workers waiting for their peer to return.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


def service_channel(target: str, credentials: grpc.ChannelCredentials | None) -> aio.Channel:
    """A channel to another Mahavishnu service: TLS with `credentials`, else plaintext.

    `credentials` come from `mhv_common.tls.channel_credentials` (the CA the callee's
    certificate is issued by); plaintext is for loopback deployments only.
    """
    interceptors = aio_client_interceptors()
    if credentials is None:
        return aio.insecure_channel(target, options=_OPTIONS, interceptors=interceptors)
    return aio.secure_channel(target, credentials, options=_OPTIONS, interceptors=interceptors)

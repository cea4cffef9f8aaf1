"""Channels for service-to-service calls.

A channel made here carries the OpenTelemetry client interceptor, so the W3C trace context of the
current span travels with every call, and callers pass the remaining request deadline as the
call's timeout (`mhv_common.context.time_left`).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Peer:
    """Another Mahavishnu service this one calls (built by `mhv_common.tls.peer`).

    Attributes:
        target: host:port it listens on.
        tls: Credentials trusting the CA of its certificate; None for plaintext (loopback).
        server_name: The name its certificate must carry. The address alone does not do:
            every service's certificate may name localhost, so without it a service holding
            its own key could pose as another on the same host.
    """

    target: str
    tls: grpc.ChannelCredentials | None
    server_name: str


def service_channel(peer: Peer) -> aio.Channel:
    """A channel to `peer`: TLS checking its certificate's name, or plaintext on loopback."""
    interceptors = aio_client_interceptors()
    if peer.tls is None:
        return aio.insecure_channel(peer.target, options=_OPTIONS, interceptors=interceptors)
    options = [*_OPTIONS, ("grpc.ssl_target_name_override", peer.server_name)]
    return aio.secure_channel(peer.target, peer.tls, options=options, interceptors=interceptors)

"""Channels for service-to-service calls.

A channel made here carries the OpenTelemetry client interceptor, so the W3C trace context of the
current span travels with every call, and callers pass the remaining request deadline as the
call's timeout (`mhv_common.context.time_left`).

Calls are balanced over the callee's replicas by the client (round robin): the target names them
all, as a list (``ipv4:10.0.0.7:50051,10.0.0.8:50051``) or as a DNS name with one address per
replica (``dns:///mahavishnu-task.mahavishnu.svc.cluster.local:50051``, a Kubernetes headless
Service). The channel keeps a connection to every address and takes them in turn; a replica
that goes away is skipped from its first failed connection on, and gets calls again once it
accepts connections. A single ``host:port`` works as before.
"""

from __future__ import annotations

import json
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
    # Round robin over every address of the target, not the first one that answers.
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    # A DNS name is looked up again when a connection fails, at most this often (gRPC's
    # default, 30 s, would leave a replaced pod's new address unknown that long).
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
]


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names: one, or one per address of an ``ipv4:``/``ipv6:`` list.

    A ``unix:`` socket is reported as ``localhost``.

    Args:
        target: A gRPC target: ``host:port``, ``dns:[//authority/]host:port``,
            ``ipv4:addr:port[,addr:port...]``, ``ipv6:[addr]:port[,...]`` or ``unix:path``.
    """
    scheme, _, rest = target.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return ["localhost"]
    if scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    elif scheme == "dns":
        # dns:host:port, dns:///host:port or dns://resolver/host:port
        addresses = [rest.removeprefix("//").partition("/")[2] if rest.startswith("//") else rest]
    else:
        addresses = [target]
    hosts = []
    for address in addresses:
        host, colon, port = address.rpartition(":")
        if not colon or not port.isdigit():
            host = address  # no port: the whole thing is the host
        hosts.append(host.strip("[]"))
    return hosts


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

"""Mahavishnu's common library: everything the three services share.

Its public surface is these modules; import from them by name
(``from mhv_common.errors import ValidationError``):

==============  ===================================================================================
errors          the exception classes, one per row of the error catalog, and their wire encodings
edge            what the edges share: `classify` (any exception -> the caller's error), header
                keys, which gRPC statuses are the service's fault and which are transient
interceptors    the gRPC server interceptors, in their order, and `MethodPolicy`
server          running a service: `run_service`, `ServiceDefinition`, health, graceful shutdown
admission       a bound on requests in progress per listener (MHV-017), and refusal while draining
probes          the plaintext health listener for probes that cannot speak TLS (MHV_HEALTH_PORT)
processes       several processes of one service on one port, under a supervisor
config          settings from the ``MHV_*`` environment and the files in settings/
context         per-request state across awaits: request id, caller, deadline
auth            bearer tokens (EdDSA JWTs), principals and roles, service credentials
ratelimit       rate limits per caller, method class and role
revocation      a person's token works only while its user is active: one check, every service
db              the asyncpg pool: deadline-aware connections and transactions, `schema_size`
paging          the page-token codec and page sizes of every listing
ids             UUIDs a caller sends: `parse_uuid`, `canonical_uuid`, `uuid_or_none`
timestamps      datetimes and microseconds to and from protobuf Timestamps
structs         protobuf Structs (free-form JSON from callers) as plain Python, non-finite refused
outbox          the audit outbox every writing service shares: its statements, the relay, the
                audit service's client
periodic        background jobs that run every so often until the service stops
client          channels for service-to-service calls
tls             TLS for gRPC servers and clients
logs            structured JSON logs
tracing         OpenTelemetry set-up
redaction       redaction of secret-looking values in audit details, before storing or logging
security        the security log and count of refused calls (`mhv_authz_denied_total`)
==============  ===================================================================================

The catalog itself (`_catalog`) is private: read it through `errors`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mhv_common import (
        admission,
        auth,
        client,
        config,
        context,
        db,
        edge,
        errors,
        ids,
        interceptors,
        logs,
        outbox,
        paging,
        periodic,
        probes,
        processes,
        ratelimit,
        redaction,
        revocation,
        security,
        server,
        structs,
        timestamps,
        tls,
        tracing,
    )

__all__ = [
    "admission",
    "auth",
    "client",
    "config",
    "context",
    "db",
    "edge",
    "errors",
    "ids",
    "interceptors",
    "logs",
    "outbox",
    "paging",
    "periodic",
    "probes",
    "processes",
    "ratelimit",
    "redaction",
    "revocation",
    "security",
    "server",
    "structs",
    "timestamps",
    "tls",
    "tracing",
]


def __getattr__(name: str) -> ModuleType:
    # Modules load on first use, so that a tool needing only the errors does not pay for the
    # gRPC server, the database driver and the tracing SDK (half a second at start-up).
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

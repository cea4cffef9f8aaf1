"""gRPC transport security: what a server listens with, and whom a service's calls trust.

A service with ``MHV_GRPC_TLS_CERT_FILE`` and ``MHV_GRPC_TLS_KEY_FILE`` serves gRPC over TLS
only. A service with ``MHV_GRPC_TLS_CA_FILE`` calls the other services over TLS and trusts only
certificates issued by that CA. Plaintext stays possible for a listener on a loopback address
(tests, benchmarks, a sidecar that terminates TLS) and, elsewhere, only when
``MHV_GRPC_ALLOW_PLAINTEXT`` says so: bearer tokens must not cross a network in the clear by
accident.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import grpc

from mhv_common.client import Peer, target_hosts
from mhv_common.config import CommonSettings
from mhv_common.errors import ConfigurationError


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_passphrase() -> bytes:
    """For `load_cert_chain`: an encrypted key is refused instead of prompting on a terminal."""
    raise ssl.SSLError("the private key is encrypted; give it unencrypted (mode 0600)")


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC listener, or None to listen in plaintext.

    Raises:
        ConfigurationError: Only one of certificate and key is set, they cannot be read or do
            not match, or plaintext was asked for on a non-loopback address without
            ``MHV_GRPC_ALLOW_PLAINTEXT``.

    """
    cert, key = settings.grpc_tls_cert_file, settings.grpc_tls_key_file
    if cert is None and key is None:
        if not is_loopback(settings.bind_host) and not settings.grpc_allow_plaintext:
            raise ConfigurationError(
                f"gRPC would listen on {settings.bind_host} without TLS. Set "
                "MHV_GRPC_TLS_CERT_FILE and MHV_GRPC_TLS_KEY_FILE, or MHV_GRPC_ALLOW_PLAINTEXT="
                "true where a trusted proxy terminates TLS."
            )
        return None
    if cert is None or key is None:
        raise ConfigurationError(
            "MHV_GRPC_TLS_CERT_FILE and MHV_GRPC_TLS_KEY_FILE go together: set both or neither."
        )
    # grpc only reports a bad pair at the first handshake; OpenSSL checks it now.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_passphrase)
        pair = (key.read_bytes(), cert.read_bytes())
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"Cannot load the gRPC TLS certificate {cert.name} with key {key.name}: both must "
            "be readable PEM files of one key pair."
        ) from exc
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca_file: Path | None) -> grpc.ChannelCredentials | None:
    """Credentials trusting only `ca_file`'s certificates, or None for plaintext.

    Raises:
        ConfigurationError: The CA file cannot be read or holds no PEM certificate.

    """
    if ca_file is None:
        return None
    try:
        pem = ca_file.read_bytes()
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"Cannot load the gRPC CA file {ca_file.name}: it must hold PEM certificates."
        ) from exc
    return grpc.ssl_channel_credentials(root_certificates=pem)


def peer(settings: CommonSettings, target: str, server_name: str) -> Peer:
    """How this service calls another at `target`, checked before anything starts.

    With ``MHV_GRPC_TLS_CA_FILE``: TLS, trusting that CA, requiring `server_name` in the
    callee's certificate. Without it: plaintext, but only to a loopback target (or with
    ``MHV_GRPC_ALLOW_PLAINTEXT``), and never from a service that itself serves TLS (its peers
    would too, and every call would fail).

    Raises:
        ConfigurationError: The call would be plaintext where it must not, or the CA file is
            unusable.

    """
    if settings.grpc_tls_ca_file is not None:
        return Peer(target, channel_credentials(settings.grpc_tls_ca_file), server_name)
    if settings.grpc_tls_cert_file is not None:
        raise ConfigurationError(
            f"This service serves TLS but would call {target} in plaintext: set "
            "MHV_GRPC_TLS_CA_FILE to the CA that issued the other services' certificates."
        )
    loopback = all(is_loopback(host) for host in target_hosts(target))
    if not loopback and not settings.grpc_allow_plaintext:
        raise ConfigurationError(
            f"The call to {target} would cross the network in plaintext, with a bearer "
            "token: set MHV_GRPC_TLS_CA_FILE, or MHV_GRPC_ALLOW_PLAINTEXT=true where a trusted "
            "proxy adds TLS."
        )
    return Peer(target, None, server_name)

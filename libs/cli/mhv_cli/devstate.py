"""The local deployment's state folder (``.mhv/``, git-ignored; ``MHV_HOME`` moves it).

`mhv up` keeps here what a fresh machine lacks: the private PostgreSQL cluster, a token
signing key and its JWKS, database role passwords, webhook secrets, a self-signed TLS
certificate for the gateway's HTTPS edge, and a private CA with one gRPC certificate per
service. Everything is created on first use, readable by the owner only, and reused
afterwards, so tokens and secrets stay valid across restarts.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from mhv_cli.migrate import SERVICE_SLICES, RoleNames
from mhv_cli.pgcluster import PrivateCluster
from mhv_common.auth import SUBJECT_MEMBER, generate_signing_key
from mhv_common.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_PRIVATE_PG_PORT = 55432
DEFAULT_WEBHOOK_SOURCES = ("github", "gitlab", "generic")
# Services that call others, and the key id of each one's own signing key.
SERVICE_KEY_IDS = {"task": "task-1", "audit": "audit-1", "webhook": "webhook-1"}


def home() -> Path:
    """The state folder."""
    return Path(os.environ.get("MHV_HOME", ROOT / ".mhv")).resolve()


def _private_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)


_LOCALHOST = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])


def _expiring(cert: x509.Certificate) -> bool:
    """Whether `cert` expires within 30 days."""
    return cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey],
    ca: bool,
    dns_names: tuple[str, ...] = ("localhost",),
) -> x509.Certificate:
    """A certificate for `subject` valid for a year, naming localhost and 127.0.0.1."""
    issuer_name, issuer_key = issuer
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(name) for name in dns_names),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class DevState:
    """Paths and lazily created secrets under one state folder."""

    root: Path

    @property
    def signing_key(self) -> Path:
        """Ed25519 private key (PEM) used to sign tokens."""
        return self.root / "keys" / "signing.pem"

    @property
    def jwks(self) -> Path:
        """Public keys for verification."""
        return self.root / "keys" / "jwks.json"

    @property
    def tls_cert(self) -> Path:
        """Gateway certificate (self-signed)."""
        return self.root / "tls" / "cert.pem"

    @property
    def tls_key(self) -> Path:
        """Gateway private key."""
        return self.root / "tls" / "key.pem"

    @property
    def secrets_file(self) -> Path:
        """Generated passwords and webhook secrets."""
        return self.root / "secrets.json"

    @property
    def state_file(self) -> Path:
        """Where `mhv up` records the database URL for other `mhv` commands."""
        return self.root / "state.json"

    def cluster(self, port: int | None = None) -> PrivateCluster:
        """The private PostgreSQL cluster of this state folder."""
        chosen = port or int(os.environ.get("MHV_PRIVATE_PG_PORT", DEFAULT_PRIVATE_PG_PORT))
        return PrivateCluster(self.root / "pg", chosen)

    def service_key(self, service: str) -> Path:
        """The private key `service` signs its own service tokens with."""
        return self.root / "keys" / f"service-{service}.pem"

    def ensure_keys(self, admin_key_id: str) -> None:
        """Create missing signing keys and write the JWKS of all of them.

        Four keys: the administrators' (`mhv token`; signs any token) and one per calling
        service (task, audit, webhook), each bound in the JWKS to that service's own subject,
        so that a service that is compromised cannot mint tokens for anyone else.
        """
        keys: list[tuple[Path, str, str | None]] = [
            (self.signing_key, admin_key_id, None),
            *((self.service_key(s), SERVICE_KEY_IDS[s], f"service:{s}") for s in SERVICE_KEY_IDS),
        ]
        entries = []
        for path, kid, subject in keys:
            if not path.exists():
                pem, _jwk = generate_signing_key()
                _private_file(path, pem)
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise ConfigurationError(f"{path.name} is not an Ed25519 private key.")
            jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key()))
            jwk.update(kid=kid, use="sig")
            if subject is not None:
                jwk[SUBJECT_MEMBER] = subject
            entries.append(jwk)
        _private_file(self.jwks, json.dumps({"keys": entries}, indent=2).encode())

    def ensure_tls(self) -> None:
        """Create a self-signed certificate for localhost unless a usable one exists."""
        if self.tls_key.exists():
            try:
                current = x509.load_pem_x509_certificate(self.tls_cert.read_bytes())
            except (OSError, ValueError):
                current = None
            if current is not None and not _expiring(current):
                return
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(_LOCALHOST, key.public_key(), issuer=(_LOCALHOST, key), ca=True)
        _private_file(self.tls_key, _pem_key(key))
        _private_file(self.tls_cert, cert.public_bytes(serialization.Encoding.PEM))

    @property
    def grpc_ca(self) -> Path:
        """Certificate of the private CA the services' gRPC certificates are issued by."""
        return self.root / "tls" / "grpc-ca.pem"

    @property
    def grpc_ca_key(self) -> Path:
        """The private CA's key: stays here, no service ever receives it."""
        return self.root / "tls" / "grpc-ca-key.pem"

    def grpc_cert(self, service: str) -> Path:
        """`service`'s gRPC server certificate, issued by the private CA."""
        return self.root / "tls" / f"grpc-{service}.pem"

    def grpc_key(self, service: str) -> Path:
        """`service`'s gRPC server key, given to that service only."""
        return self.root / "tls" / f"grpc-{service}-key.pem"

    def ensure_grpc_tls(self, services: tuple[str, ...] = SERVICE_SLICES) -> None:
        """Create the private CA and a certificate per service, where missing or expiring.

        Each certificate names the service itself (``mahavishnu-<service>``, which the callers
        check) besides ``localhost`` and ``127.0.0.1`` (for people with grpcurl), is valid for
        server authentication only, and has its own key. A CA or certificate within 30 days of
        expiry, or a certificate the current CA did not issue, is replaced.
        """
        ca = self._grpc_ca()
        if ca is None:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_name = x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "Mahavishnu local gRPC CA")]
            )
            ca_cert = _certificate(ca_name, ca_key.public_key(), issuer=(ca_name, ca_key), ca=True)
            _private_file(self.grpc_ca_key, _pem_key(ca_key))
            _private_file(self.grpc_ca, ca_cert.public_bytes(serialization.Encoding.PEM))
        else:
            ca_cert, ca_key = ca
        for service in services:
            if self._usable_leaf(service, ca_cert):
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mahavishnu-{service}")])
            cert = _certificate(
                name,
                key.public_key(),
                issuer=(ca_cert.subject, ca_key),
                ca=False,
                dns_names=("localhost", f"mahavishnu-{service}"),
            )
            _private_file(self.grpc_key(service), _pem_key(key))
            _private_file(self.grpc_cert(service), cert.public_bytes(serialization.Encoding.PEM))

    def _grpc_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        """The existing CA and its key, unless missing, unreadable or expiring."""
        try:
            cert = x509.load_pem_x509_certificate(self.grpc_ca.read_bytes())
            key = serialization.load_pem_private_key(self.grpc_ca_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or _expiring(cert):
            return None
        return cert, key

    def _usable_leaf(self, service: str, ca_cert: x509.Certificate) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(self.grpc_cert(service).read_bytes())
            if not self.grpc_key(service).exists():
                return False
            cert.verify_directly_issued_by(ca_cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        return not _expiring(cert)

    def secrets(self) -> dict[str, Any]:
        """Generated secrets, created on first use."""
        if self.secrets_file.exists():
            data: dict[str, Any] = json.loads(self.secrets_file.read_text())
        else:
            data = {}
        changed = False
        passwords = data.setdefault("db_passwords", {})
        for slice_name in SERVICE_SLICES:
            if slice_name not in passwords:
                passwords[slice_name] = secrets.token_urlsafe(24)
                changed = True
        hooks = data.setdefault("webhook_secrets", {})
        for source in DEFAULT_WEBHOOK_SOURCES:
            if source not in hooks:
                # Standard Webhooks secrets are base64 with a whsec_ prefix; the others are
                # plain shared strings.
                token = secrets.token_bytes(32)
                if source == "generic":
                    hooks[source] = "whsec_" + base64.b64encode(token).decode()
                else:
                    hooks[source] = token.hex()
                changed = True
        if changed:
            _private_file(self.secrets_file, json.dumps(data, indent=2).encode())
        return data

    def write_state(self, **values: Any) -> None:
        """Record facts for later `mhv` commands (e.g. the database URL)."""
        _private_file(self.state_file, json.dumps(values, indent=2).encode())

    def read_state(self) -> dict[str, Any]:
        """What `mhv up` recorded, or {}."""
        if not self.state_file.exists():
            return {}
        result: dict[str, Any] = json.loads(self.state_file.read_text())
        return result


def role_url(admin_url: str, role: str, password: str | None) -> str:
    """The admin URL with its credentials replaced by `role`'s."""
    parts = urlsplit(admin_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = quote(role, safe="")
    if password:
        netloc += ":" + quote(password, safe="")
    netloc += "@" + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def database_urls(admin_url: str, roles: RoleNames, passwords: dict[str, str]) -> dict[str, str]:
    """``MHV_<SLICE>_DATABASE_URL`` values for the three services."""
    return {
        f"MHV_{s.upper()}_DATABASE_URL": role_url(admin_url, roles.for_slice(s), passwords.get(s))
        for s in SERVICE_SLICES
    }

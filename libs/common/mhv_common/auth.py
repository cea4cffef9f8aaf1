"""Bearer-token authentication: EdDSA-signed JWTs with expiry, issuer, audience and key id.

Keys never live in code or settings files: verification keys come from a JWKS document given
by environment (``MHV_AUTH_JWKS``) or file (``MHV_AUTH_JWKS_FILE``); the signing key, held only
by token issuers (`mhv token`, and services minting their own short-lived service tokens), comes
from ``MHV_AUTH_SIGNING_KEY_FILE``. Several verification keys may be active at once, selected by
the token's ``kid`` header, so keys rotate without downtime.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mhv_common.errors import AuthenticationError, ConfigurationError

if TYPE_CHECKING:
    from mhv_common.config import CommonSettings

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "mahavishnu"
DEFAULT_AUDIENCE = "mahavishnu-api"
# Clock skew tolerated between issuer and verifier.
LEEWAY_SECONDS = 30
# A JWKS key member (our own) naming the only subject the key may sign tokens for.
SUBJECT_MEMBER = "mhv_subject"
# The longest a token may live (``exp - iat``), however validly signed: a stolen token is
# worth at most this long, and a deactivated user is shut out by the revocation check
# (`mhv_common.revocation`) well before. People's tokens are configurable
# (``MHV_AUTH_MAX_TOKEN_LIFETIME_SECONDS``); services mint their own every few minutes.
MAX_PERSON_TOKEN_SECONDS = 24 * 3600
MAX_SERVICE_TOKEN_SECONDS = 15 * 60
SERVICE_TOKEN_SECONDS = 600
PERSON_TOKEN_SECONDS = 3600
_CACHE_SIZE = 4096


class Role(enum.StrEnum):
    """Roles a principal may hold."""

    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"
    AUDITOR = "auditor"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    Attributes:
        subject: User id (UUID) for people, ``service:<name>`` for services.
        roles: Roles granted by the token.
        username: Human-readable name, for logs only.
        token_id: The token's ``jti``, for audit trails.
    """

    subject: str
    roles: frozenset[Role]
    username: str = ""
    token_id: str = ""

    def has(self, *roles: Role) -> bool:
        """Whether the principal holds any of `roles`."""
        return any(role in self.roles for role in roles)

    @property
    def is_service(self) -> bool:
        """Whether this is a service principal."""
        return Role.SERVICE in self.roles


def generate_signing_key() -> tuple[bytes, dict[str, Any]]:
    """Create a new Ed25519 key pair.

    Returns:
        The private key as PEM and the public key as a JWK (without ``kid``).
    """
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key()))
    return pem, jwk


class TokenVerifier:
    """Verifies bearer tokens against a set of public keys indexed by key id."""

    def __init__(
        self,
        jwks: Mapping[str, Any],
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        max_lifetime: float = MAX_PERSON_TOKEN_SECONDS,
        max_service_lifetime: float = MAX_SERVICE_TOKEN_SECONDS,
    ) -> None:
        self._keys: dict[str, Any] = {}
        # kid -> the one subject that key may sign for (service keys), if restricted.
        self._subjects: dict[str, str] = {}
        for entry in jwks.get("keys", []):
            kid = entry.get("kid")
            if not kid:
                raise ConfigurationError("Every key in the JWKS needs a 'kid'.")
            self._keys[kid] = jwt.PyJWK(
                {k: v for k, v in entry.items() if k != SUBJECT_MEMBER}, algorithm=ALGORITHM
            ).key
            if entry.get(SUBJECT_MEMBER):
                self._subjects[kid] = str(entry[SUBJECT_MEMBER])
        if not self._keys:
            raise ConfigurationError("No token verification keys are configured.")
        self._issuer = issuer
        self._audience = audience
        self._max_lifetime = max_lifetime
        self._max_service_lifetime = max_service_lifetime
        # Verified tokens, so a client reusing its token costs one signature check, not one
        # per call. Entries are dropped at the token's expiry; the dict is bounded.
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_sources(
        cls,
        *,
        jwks_json: str | None,
        jwks_file: Path | None,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        max_lifetime: float = MAX_PERSON_TOKEN_SECONDS,
        max_service_lifetime: float = MAX_SERVICE_TOKEN_SECONDS,
    ) -> TokenVerifier:
        """Build from the JWKS given inline or as a file (inline wins)."""
        if jwks_json:
            document = json.loads(jwks_json)
        elif jwks_file is not None:
            try:
                document = json.loads(jwks_file.read_text())
            except OSError as exc:
                raise ConfigurationError(f"Cannot read the JWKS file {jwks_file.name}.") from exc
        else:
            raise ConfigurationError(
                "Set MHV_AUTH_JWKS or MHV_AUTH_JWKS_FILE to the token verification keys."
            )
        return cls(
            document,
            issuer=issuer,
            audience=audience,
            max_lifetime=max_lifetime,
            max_service_lifetime=max_service_lifetime,
        )

    def verify(self, token: str) -> Principal:
        """Check the token and return its principal.

        Raises:
            AuthenticationError: Malformed, unsigned, wrongly signed, expired, not yet
                valid, living longer than its principal kind may, or issued for another
                issuer or audience. The message says which, without echoing the token.
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires + LEEWAY_SECONDS:
                return principal
            del self._verified[token]
        principal, expires = self._verify(token)
        if len(self._verified) >= _CACHE_SIZE:
            # Oldest first: dicts keep insertion order.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthenticationError("The bearer token is malformed.") from exc
        if header.get("alg") != ALGORITHM:
            raise AuthenticationError("The bearer token uses an unsupported algorithm.")
        kid = str(header.get("kid", ""))
        key = self._keys.get(kid)
        if key is None:
            raise AuthenticationError("The bearer token was signed with an unknown key.")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("The bearer token has expired.") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError("The bearer token is not valid yet.") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise AuthenticationError("The bearer token was issued for another service.") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("The bearer token signature is invalid.") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError("The bearer token is invalid.") from exc
        # The same clock as the cache's, so a cached and an uncached check agree.
        if float(claims["exp"]) + LEEWAY_SECONDS <= time.time():
            raise AuthenticationError("The bearer token has expired.")
        roles: set[Role] = set()
        for name in claims.get("roles", []):
            try:
                roles.add(Role(name))
            except ValueError:
                continue  # roles unknown to this release grant nothing
        limit = self._max_service_lifetime if Role.SERVICE in roles else self._max_lifetime
        if float(claims["exp"]) - float(claims["iat"]) > limit:
            kind = "a service's" if Role.SERVICE in roles else "a person's"
            raise AuthenticationError(
                f"The bearer token lives longer than {kind} token may ({int(limit)} s); "
                "ask for a shorter-lived token."
            )
        bound = self._subjects.get(kid)
        if bound is not None and (str(claims["sub"]) != bound or roles - {Role.SERVICE}):
            # A service's own key signs only that service's service-role tokens: a stolen
            # service key cannot mint an administrator.
            raise AuthenticationError(
                "The bearer token was signed with a key that may not sign for its subject."
            )
        principal = Principal(
            subject=str(claims["sub"]),
            roles=frozenset(roles),
            username=str(claims.get("username", "")),
            token_id=str(claims.get("jti", "")),
        )
        return principal, float(claims["exp"])


class TokenIssuer:
    """Signs tokens with one private key."""

    def __init__(
        self,
        private_key_pem: bytes,
        *,
        key_id: str,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
    ) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError("The token signing key must be an Ed25519 private key.")
        self._key = key
        self._kid = key_id
        self._issuer = issuer
        self._audience = audience

    @classmethod
    def from_file(cls, path: Path, *, key_id: str, **kwargs: str) -> TokenIssuer:
        """Load the signing key from a PEM file."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"Cannot read the signing key file {path.name}.") from exc
        return cls(pem, key_id=key_id, **kwargs)

    def issue(
        self,
        *,
        subject: str,
        roles: Iterable[Role | str],
        ttl_seconds: int | None = None,
        username: str = "",
        now: float | None = None,
    ) -> str:
        """Return a signed token valid for `ttl_seconds`.

        Without `ttl_seconds` a person's token lives an hour and a service's ten minutes, both
        within what `TokenVerifier` accepts by default.
        """
        role_names = sorted(str(Role(r)) for r in roles)
        if ttl_seconds is None:
            service = str(Role.SERVICE) in role_names
            ttl_seconds = SERVICE_TOKEN_SECONDS if service else PERSON_TOKEN_SECONDS
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_seconds,
            "jti": uuid.uuid4().hex,
            "roles": role_names,
        }
        if username:
            claims["username"] = username
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self._kid})


class ServiceCredentials:
    """A service's own bearer token, re-minted before it expires."""

    @classmethod
    def from_settings(cls, settings: CommonSettings, *, service_name: str) -> ServiceCredentials:
        """Credentials signed with ``MHV_AUTH_SIGNING_KEY_FILE``.

        Raises:
            ConfigurationError: No signing key is configured.
        """
        if settings.auth_signing_key_file is None:
            raise ConfigurationError(
                f"The {service_name} service calls other services and needs "
                "MHV_AUTH_SIGNING_KEY_FILE to sign its own tokens."
            )
        issuer = TokenIssuer.from_file(
            settings.auth_signing_key_file,
            key_id=settings.auth_signing_key_id,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
        )
        return cls(issuer, service_name=service_name)

    def __init__(
        self, issuer: TokenIssuer, *, service_name: str, ttl_seconds: int = SERVICE_TOKEN_SECONDS
    ) -> None:
        self._issuer = issuer
        self._subject = f"service:{service_name}"
        self._ttl = ttl_seconds
        self._token = ""
        self._refresh_at = 0.0

    def token(self) -> str:
        """Return a valid token, minting a new one when the old one is past half its life."""
        now = time.time()
        if now >= self._refresh_at:
            self._token = self._issuer.issue(
                subject=self._subject, roles=[Role.SERVICE], ttl_seconds=self._ttl, now=now
            )
            self._refresh_at = now + self._ttl / 2
        return self._token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """GRPC call metadata carrying the token."""
        return (("authorization", f"Bearer {self.token()}"),)

"""Token verification, including the cache of verified tokens."""

from __future__ import annotations

import json
import time

import pytest

from mhv_common import auth
from mhv_common.auth import Role, TokenIssuer, TokenVerifier, generate_signing_key
from mhv_common.errors import AuthenticationError, ConfigurationError


def _pair(kid: str = "k1") -> tuple[TokenIssuer, TokenVerifier]:
    pem, jwk = generate_signing_key()
    jwk["kid"] = kid
    return TokenIssuer(pem, key_id=kid), TokenVerifier({"keys": [jwk]})


def test_round_trip_and_unknown_roles_grant_nothing() -> None:
    issuer, verifier = _pair()
    token = issuer.issue(subject="u1", roles=["member"], username="alice")
    principal = verifier.verify(token)
    assert principal.subject == "u1"
    assert principal.roles == {Role.MEMBER}
    assert principal.username == "alice"


def test_cached_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer, verifier = _pair()
    now = time.time()
    token = issuer.issue(subject="u1", roles=["admin"], ttl_seconds=60, now=now)
    assert verifier.verify(token).subject == "u1"  # verified and cached
    monkeypatch.setattr(auth.time, "time", lambda: now + 60 + auth.LEEWAY_SECONDS + 1)
    with pytest.raises(AuthenticationError, match="expired"):
        verifier.verify(token)


def test_key_rotation_two_keys_by_kid() -> None:
    old_pem, old_jwk = generate_signing_key()
    new_pem, new_jwk = generate_signing_key()
    old_jwk["kid"], new_jwk["kid"] = "old", "new"
    verifier = TokenVerifier({"keys": [new_jwk, old_jwk]})
    for pem, kid in ((old_pem, "old"), (new_pem, "new")):
        assert (
            verifier.verify(TokenIssuer(pem, key_id=kid).issue(subject=kid, roles=[])).subject
            == kid
        )


def test_none_algorithm_is_refused() -> None:
    _issuer, verifier = _pair()
    import base64

    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    forged = f"{b64({'alg': 'none', 'kid': 'k1'})}.{b64({'sub': 'x', 'roles': ['admin']})}."
    with pytest.raises(AuthenticationError):
        verifier.verify(forged)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        TokenVerifier({"keys": []})
    with pytest.raises(ConfigurationError):
        TokenVerifier.from_sources(jwks_json=None, jwks_file=None)


def test_a_service_key_signs_only_for_its_own_service() -> None:
    admin_pem, admin_jwk = generate_signing_key()
    svc_pem, svc_jwk = generate_signing_key()
    admin_jwk["kid"], svc_jwk["kid"] = "admin-1", "webhook-1"
    svc_jwk["mhv_subject"] = "service:webhook"
    verifier = TokenVerifier({"keys": [admin_jwk, svc_jwk]})
    service = TokenIssuer(svc_pem, key_id="webhook-1")
    ok = verifier.verify(service.issue(subject="service:webhook", roles=["service"]))
    assert ok.roles == {Role.SERVICE}
    for subject, roles in (
        ("service:webhook", ["admin"]),
        ("service:task", ["service"]),
        ("some-user", ["member"]),
    ):
        with pytest.raises(AuthenticationError, match="may not sign"):
            verifier.verify(service.issue(subject=subject, roles=roles))
    # The unrestricted key still signs for people.
    admin = TokenIssuer(admin_pem, key_id="admin-1")
    assert verifier.verify(admin.issue(subject="u1", roles=["admin"])).roles == {Role.ADMIN}

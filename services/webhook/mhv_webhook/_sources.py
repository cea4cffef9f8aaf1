"""Declared webhook sources, each with its verifier, body cap and rate limiter (fail closed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mhv_common.config import WebhookSettings, WebhookSource
from mhv_common.errors import ConfigurationError
from mhv_common.ratelimit import RateLimiter
from mhv_webhook._secrets import Secret, env_name, parse_secrets
from mhv_webhook._verify import (
    FreshnessWindow,
    GitHubVerifier,
    GitLabVerifier,
    StandardVerifier,
    Verifier,
)

RATE_CLASS = "webhook"


@dataclass(frozen=True, slots=True)
class Source:
    """A sender the gateway accepts deliveries from.

    Attributes:
        name: Path segment and metric label (``/webhooks/<name>``).
        scheme: ``github``, ``gitlab`` or ``standard``.
        verifier: Authenticates its requests.
        body_cap_bytes: Largest body read; anything larger gets 413.
        limiter: Per-source request budget (rate class ``webhook``, keyed by source).
        kept_headers: Non-secret headers stored with each delivery.

    """

    name: str
    scheme: str
    verifier: Verifier
    body_cap_bytes: int
    limiter: RateLimiter
    kept_headers: tuple[str, ...]


def _verifier(
    declared: WebhookSource, secrets: Sequence[Secret], window: FreshnessWindow
) -> Verifier:
    variable = env_name(declared.name)
    signing = [s for s in secrets if s.signing_key]
    plain = [s for s in secrets if not s.signing_key]
    if declared.scheme == "github":
        if signing:
            raise ConfigurationError(
                f"{variable}: GitHub signs with the secret text as entered; "
                "remove the whsec_ prefix."
            )
        return GitHubVerifier(secrets)
    if declared.scheme == "gitlab":
        return GitLabVerifier(secrets, window=window)
    if declared.scheme == "standard":
        if plain:
            raise ConfigurationError(
                f"{variable}: Standard Webhooks secrets are whsec_<base64> signing keys."
            )
        return StandardVerifier(secrets, window=window)
    raise ConfigurationError(
        f"Source {declared.name!r}: no verifier for scheme {declared.scheme!r}."
    )


def build_sources(
    declared: Sequence[WebhookSource],
    settings: WebhookSettings,
    environ: Mapping[str, str],
    *,
    now: float,
) -> dict[str, Source]:
    """Pair every declared source with its secrets and verifier.

    Args:
        declared: Sources from settings/webhooks.yaml.
        settings: Gateway settings (freshness window, rate-limit storage and overrides).
        environ: Where ``MHV_WEBHOOK_SECRETS_<NAME>`` are read (the process environment).
        now: Current Unix time, to refuse sources whose every secret has expired.

    Raises:
        ConfigurationError: A source has no secret, only expired ones, malformed ones, or a
            scheme without a verifier. The gateway does not start (fail closed).

    """
    window = FreshnessWindow(
        past_seconds=settings.webhook_past_window_seconds,
        future_seconds=settings.webhook_future_window_seconds,
    )
    # MHV_RATE_LIMITS's "webhook" entry, when given, overrides every source's own rate_limit.
    override = settings.rate_limits.get(RATE_CLASS)
    sources: dict[str, Source] = {}
    for entry in declared:
        secrets = parse_secrets(entry.name, environ.get(env_name(entry.name)))
        if not any(s.active(now) for s in secrets):
            raise ConfigurationError(
                f"{env_name(entry.name)}: every secret has expired; source {entry.name!r} "
                "could not authenticate anything."
            )
        verifier = _verifier(entry, secrets, window)
        limiter = RateLimiter(
            {RATE_CLASS: override or entry.rate_limit},
            storage_uri=settings.rate_limit_storage_uri,
            service="webhook",
        )
        sources[entry.name] = Source(
            name=entry.name,
            scheme=entry.scheme,
            verifier=verifier,
            body_cap_bytes=entry.body_cap_bytes,
            limiter=limiter,
            kept_headers=verifier.kept_headers,
        )
    return sources

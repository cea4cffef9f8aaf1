"""Declared webhook sources, each with its scheme, verifier, body cap and rate limiter.

Fail closed: a source without a usable secret stops the gateway from starting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mhv_common.config import WebhookSettings, WebhookSource
from mhv_common.errors import ConfigurationError
from mhv_common.ratelimit import RateLimiter
from mhv_webhook._scheme import FreshnessWindow, Scheme, Verifier
from mhv_webhook._schemes import scheme_named
from mhv_webhook._secrets import env_name, parse_secrets

RATE_CLASS = "webhook"


@dataclass(frozen=True, slots=True)
class Source:
    """A sender the gateway accepts deliveries from.

    Attributes:
        name: Path segment and metric label (``/webhooks/<name>``).
        scheme: What the gateway knows about this kind of sender.
        verifier: Authenticates its requests, with its secrets.
        body_cap_bytes: Largest body read; anything larger gets 413.
        limiter: Per-source request budget (rate class ``webhook``, keyed by source).

    """

    name: str
    scheme: Scheme
    verifier: Verifier
    body_cap_bytes: int
    limiter: RateLimiter


def build_sources(
    declared: Sequence[WebhookSource],
    settings: WebhookSettings,
    environ: Mapping[str, str],
    *,
    now: float,
) -> dict[str, Source]:
    """Pair every declared source with its scheme, secrets and verifier.

    Args:
        declared: Sources from settings/webhooks.yaml.
        settings: Gateway settings (freshness window, rate-limit storage and overrides).
        environ: Where ``MHV_WEBHOOK_SECRETS_<NAME>`` are read (the process environment).
        now: Current Unix time, to refuse sources whose every secret has expired.

    Raises:
        ConfigurationError: A source has no secret, only expired ones, malformed ones, secrets
            its scheme cannot use, or a scheme the gateway does not know. The gateway does
            not start (fail closed).

    """
    window = FreshnessWindow(
        past_seconds=settings.webhook_past_window_seconds,
        future_seconds=settings.webhook_future_window_seconds,
    )
    # MHV_RATE_LIMITS's "webhook" entry, when given, overrides every source's own rate_limit.
    override = settings.rate_limits.get(RATE_CLASS)
    sources: dict[str, Source] = {}
    for entry in declared:
        variable = env_name(entry.name)
        secrets = parse_secrets(entry.name, environ.get(variable))
        if not any(s.active(now) for s in secrets):
            raise ConfigurationError(
                f"{variable}: every secret has expired; source {entry.name!r} "
                "could not authenticate anything."
            )
        scheme = scheme_named(entry.scheme, source=entry.name)
        sources[entry.name] = Source(
            name=entry.name,
            scheme=scheme,
            verifier=scheme.verifier(secrets, window=window, variable=variable),
            body_cap_bytes=entry.body_cap_bytes,
            limiter=RateLimiter(
                {RATE_CLASS: override or entry.rate_limit},
                storage_uri=settings.rate_limit_storage_uri,
                service="webhook",
                fail_closed=settings.rate_limit_fail_closed,
            ),
        )
    return sources

"""Declared sources: each paired with its scheme, verifier and budget, or the gateway refuses
to start."""

from __future__ import annotations

import time

import pytest

from mhv_common.config import WebhookSettings, WebhookSource
from mhv_common.errors import ConfigurationError
from mhv_webhook._scheme_github import GitHubVerifier
from mhv_webhook._scheme_gitlab import GitLabVerifier
from mhv_webhook._scheme_standard import StandardVerifier
from mhv_webhook._schemes import SCHEMES
from mhv_webhook._sources import build_sources
from tests.webhook.signing import new_github_secret, new_signing_key

SETTINGS = WebhookSettings()
EXPIRED = "expires=2020-01-01T00:00:00Z"


def _source(name: str, scheme: str, **extra: object) -> WebhookSource:
    return WebhookSource.model_validate({"name": name, "scheme": scheme, **extra})


def test_each_source_gets_its_schemes_verifier() -> None:
    sources = build_sources(
        [
            _source("hub", "github", body_cap_bytes=4096),
            _source("lab", "gitlab"),
            _source("std", "standard"),
        ],
        SETTINGS,
        {
            "MHV_WEBHOOK_SECRETS_HUB": new_github_secret(),
            "MHV_WEBHOOK_SECRETS_LAB": f"{new_github_secret()},{new_signing_key()}",
            "MHV_WEBHOOK_SECRETS_STD": new_signing_key(),
        },
        now=time.time(),
    )
    assert {name: s.scheme for name, s in sources.items()} == {
        "hub": SCHEMES["github"],
        "lab": SCHEMES["gitlab"],
        "std": SCHEMES["standard"],
    }
    assert isinstance(sources["hub"].verifier, GitHubVerifier)
    assert isinstance(sources["lab"].verifier, GitLabVerifier)
    assert isinstance(sources["std"].verifier, StandardVerifier)
    assert sources["lab"].verifier.key_labels() == ("token:0", "signing:1")
    assert (sources["hub"].body_cap_bytes, sources["std"].body_cap_bytes) == (4096, 1024 * 1024)


@pytest.mark.parametrize(
    ("scheme", "secret", "message"),
    [
        ("github", new_signing_key(), "remove the whsec_ prefix"),
        ("standard", new_github_secret(), "whsec_<base64> signing keys"),
        (
            "gitlab",
            f"{new_github_secret()};expires=2020-01-01T00:00:00Z",
            "every secret has expired",
        ),
        ("gitlab", None, "MHV_WEBHOOK_SECRETS_SRC is not set"),
    ],
)
def test_a_source_that_could_not_authenticate_stops_the_start(
    scheme: str, secret: str | None, message: str
) -> None:
    environ = {} if secret is None else {"MHV_WEBHOOK_SECRETS_SRC": secret}
    with pytest.raises(ConfigurationError, match=message):
        build_sources([_source("src", scheme)], SETTINGS, environ, now=time.time())


def test_a_scheme_the_gateway_does_not_know_stops_the_start() -> None:
    # The settings model refuses it first; the registry refuses it too.
    unknown = WebhookSource.model_construct(
        name="src", scheme="svix", body_cap_bytes=1024, rate_limit="1/minute"
    )
    with pytest.raises(ConfigurationError, match="no verifier for scheme 'svix'"):
        build_sources(
            [unknown], SETTINGS, {"MHV_WEBHOOK_SECRETS_SRC": new_signing_key()}, now=time.time()
        )

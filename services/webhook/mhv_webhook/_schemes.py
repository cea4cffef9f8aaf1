"""The sender schemes the gateway knows, by the name settings/webhooks.yaml gives them.

Adding a scheme: write its module (`Scheme`: verifier, describe, interpret), list it here,
and allow its name in `mhv_common.config.WebhookSource.scheme`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import ConfigurationError, ValidationError
from mhv_webhook import _scheme_github, _scheme_gitlab, _scheme_standard
from mhv_webhook._changes import Change, IgnoredEvent
from mhv_webhook._scheme import BodyFormat, Scheme, decode_payload

SCHEMES: Mapping[str, Scheme] = MappingProxyType(
    {
        scheme.name: scheme
        for scheme in (_scheme_github.SCHEME, _scheme_gitlab.SCHEME, _scheme_standard.SCHEME)
    }
)


def scheme_named(name: str, *, source: str) -> Scheme:
    """The scheme `name` declared for `source`.

    Raises:
        ConfigurationError: No such scheme.
    """
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise ConfigurationError(f"Source {source!r}: no verifier for scheme {name!r}.")
    return scheme


def interpret(
    scheme: Scheme | None,
    *,
    source: str,
    event: str,
    body: bytes,
    content_type: str,
    repositories: RepositoryCatalog,
) -> Change:
    """The task change a stored delivery asks for, in its scheme's reading of its body.

    Args:
        scheme: The delivering source's scheme, or None when the source is no longer declared.
        source: The source's name.
        event: The event name stored with the delivery.
        body: The stored body (verified when it was received).
        content_type: The media type the body was sent as.
        repositories: Where issues' repositories are looked up.
    """
    try:
        payload = decode_payload(body, BodyFormat(content_type))
    except (ValueError, ValidationError) as exc:
        return IgnoredEvent(f"payload cannot be decoded: {exc}")
    if scheme is None:
        return IgnoredEvent(f"no task mapping for events of source {source!r}")
    return scheme.interpret(source=source, event=event, payload=payload, repositories=repositories)

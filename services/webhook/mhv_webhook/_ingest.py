"""The domain of receiving: verify, parse, then claim-and-enqueue in one atomic statement."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import RateLimitExceededError
from mhv_webhook._headers import HeaderView
from mhv_webhook._metrics import DUPLICATES, SECRET_MATCHES
from mhv_webhook._scheme import Clock, body_format, decode_payload
from mhv_webhook._sources import RATE_CLASS, Source
from mhv_webhook._store_inbox import Inbox

# Bodies up to this size are verified on the event loop (well under a millisecond).
_HASH_INLINE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the sender is told.

    Attributes:
        id: The inbox row created, or None for a repeat.
        delivery_id: The sender's delivery id.
        repeated: Dedup kinds that were already known (empty when accepted).

    """

    id: uuid.UUID | None
    delivery_id: str
    repeated: tuple[str, ...]

    @property
    def accepted(self) -> bool:
        """Whether this request enqueued a new delivery."""
        return self.id is not None


class Ingestor:
    """Turns one authenticated request into at most one inbox row.

    Args:
        inbox: The store.
        repositories: What payloads may name as a repository (checked on arrival where a
            scheme's schema asks for one).
        clock: Unix time now; injected so tests control the freshness window.

    """

    def __init__(
        self,
        inbox: Inbox,
        *,
        repositories: RepositoryCatalog | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._inbox = inbox
        self._repositories = repositories or RepositoryCatalog(())
        self._clock = clock

    def precheck(self, source: Source, headers: HeaderView) -> None:
        """Refuse, before its body is read, a request whose headers already fail.

        Raises:
            WebhookSignatureInvalidError: Signature or token missing, malformed or (a GitLab
                secret token) wrong (MHV-300).
            WebhookTimestampInvalidError: Signed timestamp outside the window (MHV-304).

        """
        source.verifier.precheck(headers, now=self._clock())

    async def receive(
        self,
        source: Source,
        headers: HeaderView,
        body: bytes,
        *,
        traceparent: str | None,
        tracestate: str | None,
        timeout: float | None = None,
    ) -> Receipt:
        """Verify the raw request, then store it unless it was seen before.

        Raises:
            WebhookSignatureInvalidError: Authentication failed (MHV-300).
            RateLimitExceededError: The source sent more verified deliveries than its budget
                (MHV-006).
            WebhookTimestampInvalidError: Signed timestamp outside the window (MHV-304).
            ValidationError: Headers or body malformed, a media type the sender does not use,
                or a payload its scheme refuses (MHV-003).
            DatabaseConnectionError: The inbox is unreachable (MHV-002); nothing was stored.

        """
        if len(body) > _HASH_INLINE_BYTES:
            # Hashing megabytes for each active secret would stall every other request.
            verified = await asyncio.to_thread(
                source.verifier.verify, headers, body, now=self._clock()
            )
        else:
            verified = source.verifier.verify(headers, body, now=self._clock())
        for label in verified.matched_keys:
            SECRET_MATCHES.labels(source.name, label).inc()
        # The source's budget is spent only by new deliveries its own secret signed: nobody
        # else can exhaust it, and a repeat (a sender's retry, a captured request replayed)
        # is acknowledged without spending it, so replays cannot crowd out new deliveries.
        # Under budget (the usual case) the atomic insert tells new from repeat and only a new
        # delivery is charged; over budget, the dedup keys are looked up before refusing.
        charged = False
        if not await source.limiter.peek(key=source.name, method_class=RATE_CLASS, roles=()):
            repeated = await self._inbox.known(
                source=source.name, dedup_keys=verified.dedup_keys, timeout=timeout
            )
            if repeated:
                self._count_repeat(source.name, repeated)
                return Receipt(None, verified.delivery_id, repeated)
            decision = await source.limiter.hit(key=source.name, method_class=RATE_CLASS, roles=())
            if not decision.allowed:
                raise RateLimitExceededError(
                    f"Rate limit {decision.limit} for source {source.name} exceeded.",
                    retry_after=decision.retry_after,
                )
            charged = True
        # Only now, with the bytes authenticated, is the body decoded, by its media type.
        fmt = body_format(headers, source.scheme.body_formats)
        payload = decode_payload(body, fmt)
        event, action = source.scheme.describe(verified, payload)
        # What the sender can still correct is refused now, while it is listening.
        source.scheme.check(event=event, payload=payload, repositories=self._repositories)
        result = await self._inbox.accept(
            source=source.name,
            dedup_keys=verified.dedup_keys,
            delivery_id=verified.delivery_id,
            event=event,
            action=action,
            headers=headers.pick(source.scheme.kept_headers),
            body=body,
            content_type=fmt.value,
            traceparent=traceparent,
            tracestate=tracestate,
            timeout=timeout,
        )
        if result.delivery_id is None:
            self._count_repeat(source.name, result.repeated_kinds)
        elif not charged:
            # Concurrent requests may all have passed the peek: the budget can be overrun by
            # at most the requests in flight, and catches up here.
            await source.limiter.hit(key=source.name, method_class=RATE_CLASS, roles=())
        return Receipt(result.delivery_id, verified.delivery_id, result.repeated_kinds)

    @staticmethod
    def _count_repeat(source: str, kinds: tuple[str, ...]) -> None:
        # A repeat of the body alone (new delivery id) is a replay, not a sender retry.
        matched = "delivery_id" if "delivery_id" in kinds else "body"
        DUPLICATES.labels(source, matched).inc()

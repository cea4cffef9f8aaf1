"""The gRPC edge: one ordered list of server interceptors, first = outermost.

    Admission (shed or draining: MHV-017, MHV-016)  ->  OpenTelemetry span
      ->  Edge (request context + error mapping, the catch-all)
      ->  Telemetry (access log + metrics)  ->  Deadline  ->  Auth  ->  RateLimit
      ->  Decode  ->  handler

Admission is outermost so that shedding costs as little as possible when a process is flooded:
a refused call gets no span, no log line, no token check, and an answer encoded once; it is
counted (`admission_rejections_total`, and as UNAVAILABLE in `grpc_server_handled_total`, so
availability SLOs see shedding). The Edge interceptor is the outermost of the rest,
so nothing a handler or an inner interceptor raises reaches the caller unmapped: a
`MahavishnuError` becomes its ``google.rpc.Status``, any other exception becomes
INTERNAL/MHV-008 with none of its text. Telemetry sits inside it and labels its log line and
metrics with `classify`, the same function the Edge uses, so they record the code the caller
receives. Health and reflection pass through untouched: they must answer without a token, are
never rate limited and never shed.

grpc decodes a request before any interceptor runs, and a request that does not decode
(corrupt bytes, a string that is not UTF-8, a Struct nested deeper than protobuf allows) would
end there: UNKNOWN with the parser's text, a traceback logged, no metrics. The Decode
interceptor, innermost, hands grpc a deserializer that cannot fail: what does not decode
arrives as an `UndecodableRequest`, passes the chain like any request (counted, logged once,
rate limited: per peer when it carries no token at all) and is refused with MHV-003 where the
handler would have run.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from grpc_interceptor.server import AsyncServerInterceptor
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from mhv_common import context, security
from mhv_common.admission import Admission
from mhv_common.auth import Principal, Role, TokenVerifier
from mhv_common.edge import ON_BEHALF_OF_KEY, REQUEST_ID_KEY, SERVICE_FAULTS, classify
from mhv_common.errors import (
    GRPC_DETAILS_METADATA_KEY,
    AuthenticationError,
    AuthorizationError,
    FieldViolation,
    InternalError,
    MahavishnuError,
    RequestCancelledError,
    ServerDrainingError,
    ServerOverloadedError,
    ValidationError,
)
from mhv_common.ratelimit import RateLimiter
from mhv_common.revocation import Revocation

logger = logging.getLogger("mhv.access")

# Methods every server exposes for operators and tools; never authenticated or limited.
UNGOVERNED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by final status.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_ERRORS = Counter(
    "mhv_errors_total",
    "RPCs that ended in an MHV error, by code.",
    ["grpc_service", "grpc_method", "error_code"],
)
GRPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to sending its status.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """How the edge governs one RPC.

    Attributes:
        roles: Roles allowed to call at all (finer checks, such as "own task", belong to the
            domain). Empty means any authenticated caller.
        rate_class: Rate-limit class: ``create``, ``search``, ``webhook`` or ``general``.
        max_deadline: The server's own upper bound on the call, in seconds; the caller's
            shorter deadline wins.
    """

    roles: frozenset[Role] = frozenset()
    rate_class: str = "general"
    max_deadline: float = 10.0


def split_method(full: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, service, method = full.split("/", 2)
    return service, method


class _Interceptor(AsyncServerInterceptor):
    """Base: skips health and reflection, which are streaming and ungoverned.

    The wrapped handler of a method never changes, so it is built once per method and reused:
    grpc-interceptor would otherwise rebuild every layer's handler on every call.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        """Pass ungoverned methods straight through; wrap the rest."""
        method = handler_call_details.method
        if method.startswith(UNGOVERNED_PREFIXES):
            return await continuation(handler_call_details)
        handler = self._handlers.get(method)
        if handler is None:
            handler = await super().intercept_service(  # type: ignore[no-untyped-call]
                continuation, handler_call_details
            )
            # Only methods the server serves are remembered: caching every name a caller
            # makes up would let anyone grow this dict without bound.
            if handler is not None:
                self._handlers[method] = handler
        return handler

    @staticmethod
    async def _call(method: Callable[..., Any], request: Any, ctx: aio.ServicerContext) -> Any:
        response = method(request, ctx)
        return response if hasattr(response, "__aiter__") else await response


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """What the handler chain receives for request bytes that do not decode.

    Attributes:
        message: The protobuf message the bytes should have been (full name), or ``""``.
    """

    message: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, answering `UndecodableRequest` instead of raising."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    undecodable = UndecodableRequest(str(getattr(descriptor, "full_name", "")))

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parser failure is the caller's bad bytes
            return undecodable

    return decode


def _metadata(ctx: aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (ctx.invocation_metadata() or ()) if isinstance(v, str)}


# Server span statuses that mark the span as an error (OpenTelemetry's gRPC conventions).
_SPAN_ERRORS = SERVICE_FAULTS | {grpc.StatusCode.UNIMPLEMENTED}


class OpenTelemetryInterceptor(_Interceptor):
    """The call's server span, in the caller's trace (W3C ``traceparent`` in the metadata).

    The same span the OpenTelemetry gRPC instrumentation makes (name, kind, ``rpc.*``
    attributes, status), at a fraction of its cost: the method's attributes are built once,
    the handler is not re-wrapped and the context not proxied on every call, and a span the
    sampler drops records nothing. Spans are sampled as ``OTEL_TRACES_SAMPLER`` says.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tracer = trace.get_tracer(__name__)
        self._attributes: dict[str, dict[str, str]] = {}

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Serve the call inside its server span."""
        attributes = self._attributes.get(name)
        if attributes is None:
            service, rpc = split_method(name)
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
            self._attributes[name] = attributes
        parent = propagate.extract(dict(ctx.invocation_metadata() or ()))
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        with trace.use_span(span, end_on_exit=True, set_status_on_exception=False):
            try:
                return await self._call(method, request, ctx)
            finally:
                if span.is_recording():
                    # The Edge inside has set the final status, by abort or not at all.
                    code = ctx.code() or grpc.StatusCode.OK
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in _SPAN_ERRORS:
                        span.set_status(Status(StatusCode.ERROR, code.name))


class EdgeInterceptor(_Interceptor):
    """Binds the request context and maps every exception to a rich gRPC status."""

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Serve one call inside its request context; translate failures at the edge."""
        meta = _metadata(ctx)
        request_id = meta.get(REQUEST_ID_KEY, "")[:64] or uuid.uuid4().hex
        req = context.RequestContext(request_id=request_id, method=name, metadata=meta)
        with context.bind(req):
            try:
                ctx.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                return await self._call(method, request, ctx)
            except aio.AbortError:
                raise
            except asyncio.CancelledError:
                # The caller went away; there is nobody to answer.
                req.error_code = RequestCancelledError.code
                raise
            except BaseException as exc:
                error = classify(exc)
                req.error_code = error.code
                if isinstance(error, InternalError) and error is not exc:
                    logger.error("unhandled exception", exc_info=exc)
                status = error.to_rpc_status()
                await ctx.abort(
                    error.grpc_status,
                    status.message,
                    trailing_metadata=(
                        (GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),
                        (REQUEST_ID_KEY, request_id),
                    ),
                )


class TelemetryInterceptor(_Interceptor):
    """One access-log line and the RPC metrics per call, labelled with the final code."""

    def __init__(self) -> None:
        super().__init__()
        # Per method: its labels and the series every successful call updates, looked up once.
        self._series: dict[str, tuple[str, str, Any, Any]] = {}

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Time the call and record how it ended."""
        series = self._series.get(name)
        if series is None:
            service, rpc = split_method(name)
            series = (
                service,
                rpc,
                GRPC_HANDLED.labels(service, rpc, "OK"),
                GRPC_LATENCY.labels(service, rpc),
            )
            self._series[name] = series
        service, rpc, handled_ok, latency = series
        started = time.perf_counter()
        error: MahavishnuError | None = None
        try:
            return await self._call(method, request, ctx)
        except BaseException as exc:
            error = classify(exc)
            raise
        finally:
            elapsed = time.perf_counter() - started
            latency.observe(elapsed)
            if error is None:
                code = "OK"
                handled_ok.inc()
            else:
                code = error.grpc_status.name
                GRPC_HANDLED.labels(service, rpc, code).inc()
                GRPC_ERRORS.labels(service, rpc, error.code).inc()
                if security.is_refusal(error):
                    security.record_refusal(error, service=service, method=rpc, peer=ctx.peer())
            logger.info(
                "rpc",
                extra={
                    "grpc_code": code,
                    "error_code": error.code if error else None,
                    "latency_ms": round(elapsed * 1000, 3),
                    "peer": ctx.peer(),
                },
            )


class AdmissionInterceptor(_Interceptor):
    """Sheds a call before any work when the process is at its bound or draining.

    It runs before everything else on purpose: refusing must cost less than serving, or a flood
    of refused calls starves the admitted ones of CPU. A refused call did nothing, so any
    caller may safely send it again.
    """

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self._admission = admission
        # The answers' status details, encoded once per error code.
        self._answers: dict[str, tuple[str, tuple[tuple[str, bytes], ...]]] = {}

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Run the call holding a place, or refuse it (MHV-016, MHV-017)."""
        try:
            self._admission.enter()
        except (ServerDrainingError, ServerOverloadedError) as refused:
            service, rpc = split_method(name)
            GRPC_HANDLED.labels(service, rpc, refused.grpc_status.name).inc()
            GRPC_ERRORS.labels(service, rpc, refused.code).inc()
            message, trailers = self._answer(refused)
            await ctx.abort(refused.grpc_status, message, trailing_metadata=trailers)
        try:
            return await self._call(method, request, ctx)
        finally:
            self._admission.leave()

    def _answer(self, error: MahavishnuError) -> tuple[str, tuple[tuple[str, bytes], ...]]:
        answer = self._answers.get(error.code)
        if answer is None:
            status = error.to_rpc_status()
            trailers = ((GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),)
            answer = self._answers[error.code] = (status.message, trailers)
        return answer


class DeadlineInterceptor(_Interceptor):
    """Applies min(caller deadline, the method's server maximum) to the whole call."""

    def __init__(self, policies: Mapping[str, MethodPolicy], default: MethodPolicy) -> None:
        super().__init__()
        self._policies = policies
        self._default = default

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Run the handler under the effective deadline."""
        policy = self._policies.get(name, self._default)
        budget = policy.max_deadline
        remaining = ctx.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        req = context.current()
        if req is not None:
            req.deadline = time.monotonic() + budget
        async with asyncio.timeout(budget):
            return await self._call(method, request, ctx)


class AuthInterceptor(_Interceptor):
    """Authenticates the bearer token, applies the method's role gate, checks revocation."""

    def __init__(
        self,
        verifier: TokenVerifier,
        policies: Mapping[str, MethodPolicy],
        revocation: Revocation,
    ) -> None:
        super().__init__()
        self._verifier = verifier
        self._policies = policies
        self._revocation = revocation

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Refuse unauthenticated or unauthorised calls before the handler runs."""
        req = context.current()
        meta = req.metadata if req is not None else _metadata(ctx)
        header = meta.get("authorization", "")
        if not header and isinstance(request, UndecodableRequest):
            # Refused as undecodable whoever sent it; a caller without a token is counted
            # against its peer address's budget (RateLimit) rather than told to sign in.
            return await self._call(method, request, ctx)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Missing bearer token in the 'authorization' metadata.")
        principal = self._verifier.verify(token.strip())
        if req is not None:
            # Who the caller proved to be, for the security log should a check below refuse.
            req.extra["subject"] = principal.subject
        policy = self._policies.get(name)
        if policy is None:
            # Fail closed: an RPC nobody wrote a policy for is nobody's to call.
            raise AuthorizationError("No access policy covers this method.")
        if policy.roles and not principal.has(*policy.roles):
            raise AuthorizationError(
                f"This operation needs one of the roles: {', '.join(sorted(policy.roles))}."
            )
        on_behalf_of = meta.get(ON_BEHALF_OF_KEY)
        if on_behalf_of is not None and not principal.is_service:
            raise AuthorizationError(f"Only service callers may send '{ON_BEHALF_OF_KEY}'.")
        # A person's token outlives a deactivation or deletion of its user; this does not.
        await self._revocation.ensure_active(principal)
        if req is not None:
            req.principal = principal
            if on_behalf_of:
                req.extra["on_behalf_of"] = on_behalf_of[:64]
        return await self._call(method, request, ctx)


class RateLimitInterceptor(_Interceptor):
    """Counts each call against the caller's budget for the method's class."""

    def __init__(
        self, limiter: RateLimiter, policies: Mapping[str, MethodPolicy], default: MethodPolicy
    ) -> None:
        super().__init__()
        self._limiter = limiter
        self._policies = policies
        self._default = default

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Refuse the call with MHV-006 when the caller is over budget."""
        policy = self._policies.get(name, self._default)
        req = context.current()
        principal: Principal | None = req.principal if req else None
        key = principal.subject if principal else (ctx.peer() or "anonymous")
        roles = principal.roles if principal else frozenset()
        await self._limiter.enforce(key=key, method_class=policy.rate_class, roles=roles)
        return await self._call(method, request, ctx)


class DecodeInterceptor(_Interceptor):
    """Innermost: gives grpc a deserializer that cannot fail, and refuses what did not decode."""

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        """Wrap the method's request deserializer (ungoverned methods keep grpc's)."""
        handler = await super().intercept_service(continuation, handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNGOVERNED_PREFIXES):
            return handler
        if isinstance(handler, grpc.RpcMethodHandler) and hasattr(handler, "_replace"):
            deserializer = handler.request_deserializer
            if getattr(deserializer, "__wrapped__", None) is None:
                tolerant = _tolerant(deserializer)
                if tolerant is not None:
                    tolerant.__wrapped__ = deserializer  # type: ignore[attr-defined]
                    handler = handler._replace(request_deserializer=tolerant)
                    self._handlers[method] = handler
        return handler

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        """Refuse a request that did not decode with MHV-003; pass the rest on."""
        if isinstance(request, UndecodableRequest):
            what = f"a valid {request.message} message" if request.message else "decodable"
            raise ValidationError(
                "The request body could not be decoded.",
                violations=[
                    FieldViolation(
                        "request",
                        f"is not {what}: corrupt bytes, a string that is not UTF-8, or "
                        "nesting deeper than protobuf allows",
                    )
                ],
            )
        return await self._call(method, request, ctx)


def initialise_metrics(policies: Mapping[str, MethodPolicy]) -> None:
    """Create each governed method's OK count, latency and refusal series at zero."""
    for full in policies:
        service, rpc = split_method(full)
        GRPC_HANDLED.labels(service, rpc, "OK")
        GRPC_LATENCY.labels(service, rpc)
        for refusal in (AuthenticationError, AuthorizationError):
            security.AUTHZ_DENIED.labels(service, rpc, refusal.code)


def build_interceptors(
    *,
    verifier: TokenVerifier,
    limiter: RateLimiter,
    policies: Mapping[str, MethodPolicy],
    admission: Admission,
    revocation: Revocation,
    default_policy: MethodPolicy | None = None,
) -> list[aio.ServerInterceptor]:
    """The ordered interceptor list every service installs (first = outermost)."""
    default = default_policy or MethodPolicy()
    initialise_metrics(policies)
    return [
        AdmissionInterceptor(admission),
        OpenTelemetryInterceptor(),
        EdgeInterceptor(),
        TelemetryInterceptor(),
        DeadlineInterceptor(policies, default),
        AuthInterceptor(verifier, policies, revocation),
        RateLimitInterceptor(limiter, policies, default),
        DecodeInterceptor(),
    ]

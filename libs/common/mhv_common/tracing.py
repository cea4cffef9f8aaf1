"""OpenTelemetry set-up from the standard ``OTEL_*`` environment.

Spans are always created (so trace ids reach logs and propagate between services), but
exported only when ``OTEL_TRACES_EXPORTER`` asks for it: ``otlp`` (OTLP/HTTP, configured by the
usual ``OTEL_EXPORTER_OTLP_*`` variables) or ``console``. The default is ``none``.
"""

from __future__ import annotations

import os

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

from mhv_common.errors import ConfigurationError


def configure(service: str) -> TracerProvider:
    """Install a tracer provider for `service` unless one is installed already."""
    existing = trace.get_tracer_provider()
    if isinstance(existing, TracerProvider):
        return existing
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    )
    exporter = _exporter(os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower())
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter(name: str) -> SpanExporter | None:
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ConfigurationError(
        f"OTEL_TRACES_EXPORTER={name!r} is not supported; use none, console or otlp."
    )


def shutdown() -> None:
    """Flush and stop span export."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the active span, or "" when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")

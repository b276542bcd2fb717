"""OpenTelemetry: one tracer, W3C ``traceparent`` carried in Kafka headers.

A task's trace starts at the client and follows it through the scheduler, the
runtime and the witness processor; each hop extracts the context from the
record's headers and injects its own into what it sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from conclave.settings import Settings

__all__ = [
    "TRACEPARENT",
    "Headers",
    "configure",
    "context_from",
    "headers_for",
    "hop",
    "shutdown",
    "tracer",
]

Headers = list[tuple[str, bytes]]
TRACEPARENT = "traceparent"

_propagator = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset({TRACEPARENT, "tracestate"})
_EMPTY = Context()
_configured = False


def configure(settings: Settings, service: str | None = None) -> None:
    """Install this process's tracer provider, once (the first call wins).

    Spans are exported only when asked: over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (or ``OTEL_TRACES_EXPORTER=otlp``) is set, to stderr with ``console``; with none, a
    sampled span is created and dropped. The standard ``OTEL_*`` variables are honoured by
    the SDK itself: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` over
    ``service``, ``OTEL_TRACES_SAMPLER`` over ``CONCLAVE_TRACE_SAMPLE_RATIO``, the
    exporter's endpoint, headers and timeouts, the batch processor's delays.
    """
    global _configured  # noqa: PLW0603 - process-wide OpenTelemetry provider
    if _configured:
        return
    sampler = (
        None  # the SDK reads OTEL_TRACES_SAMPLER / _ARG
        if settings.trace_sampler_from_env
        else ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
    )
    resource = Resource.create({} if service is None else {SERVICE_NAME: service})
    provider = TracerProvider(sampler=sampler, resource=resource)
    exporter = _exporter(settings.trace_exporter)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True


def _exporter(kind: str) -> SpanExporter | None:
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    # Imported here: only a process that exports pays for loading protobuf.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Export what is still buffered (a process that stops says its last spans)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


@cache
def tracer() -> trace.Tracer:
    """Conclave's tracer (looked up once: a proxy until :func:`configure` has run, then
    the provider's; ``get_tracer`` per span cost ~10 % of the worker's CPU)."""
    return trace.get_tracer("conclave")


def headers_for(context: Context | None = None) -> Headers:
    """Kafka headers carrying the current (or given) trace context."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context)
    return [(k, v.encode()) for k, v in carrier.items()]


def context_from(
    headers: Iterable[tuple[str, bytes]] | Sequence[tuple[str, bytes]] | None,
) -> Context:
    """The trace context a record carried, or an empty one."""
    carrier = {k: v.decode("latin-1") for k, v in (headers or ()) if k in _TRACE_HEADERS}
    if not carrier:
        return _EMPTY  # a record sent outside any trace
    return _propagator.extract(carrier)


@contextmanager
def hop(
    name: str,
    headers: Iterable[tuple[str, bytes]] | None,
    kind: trace.SpanKind = trace.SpanKind.CONSUMER,
    *,
    attach: bool = False,
) -> Iterator[Headers]:
    """One processing hop of the trace a record carries: a span under it for the block,
    and the headers that carry the trace on to what the block sends.

    A record of an unsampled trace (its ``traceparent`` flags say so, as they do for
    ~90 % of tasks by default) gets no span: nothing would record it, and creating and
    propagating spans that no one keeps cost ~15 % of the worker's CPU. Its trace
    headers are passed on as they came, so the trace id still follows the task; with
    ``attach``, the block also runs in the record's trace context, for code inside it
    that opens spans of its own (an agent calling a model)."""
    carried = [(k, v) for k, v in headers or () if k in _TRACE_HEADERS]
    parent = next((v for k, v in carried if k == TRACEPARENT), None)
    if parent is not None and _unsampled(parent):
        if attach:  # spans opened inside (an agent's own) stay in the trace, unsampled
            token = otel_context.attach(context_from(carried))
            try:
                yield carried
            finally:
                otel_context.detach(token)
        else:
            yield carried
        return
    with tracer().start_as_current_span(name, context=context_from(carried), kind=kind):
        yield headers_for()


def _unsampled(traceparent: bytes) -> bool:
    """Whether a well-formed W3C ``traceparent`` has its sampled flag clear."""
    if len(traceparent) != 55 or traceparent[2:3] != b"-":
        return False  # not one we can read: let the propagator decide
    try:
        return not int(traceparent[53:55], 16) & 0x01
    except ValueError:
        return False

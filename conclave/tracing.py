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
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from conclave.settings import Settings

__all__ = [
    "TRACEPARENT",
    "Headers",
    "LinkedOrRatio",
    "branch",
    "configure",
    "context_from",
    "done",
    "headers_for",
    "hop",
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
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        # The application set OpenTelemetry up itself (a service embedding the client):
        # its provider, sampler and exporters stay.
        _configured = True
        return
    sampler = (
        None  # the SDK reads OTEL_TRACES_SAMPLER / _ARG
        if settings.trace_sampler_from_env
        else ParentBased(LinkedOrRatio(settings.trace_sample_ratio))
    )
    resource = Resource.create({} if service is None else {SERVICE_NAME: service})
    provider = TracerProvider(sampler=sampler, resource=resource)
    exporter = _exporter(settings.trace_exporter)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True


class LinkedOrRatio(Sampler):
    """For a new trace: sampled if it links to a sampled span (each task a deliberation
    fans out to is a trace of its own, linked to the deliberation: a sampled
    deliberation keeps all of its tasks), else by the trace id at ``ratio``."""

    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if any(link.context.trace_flags.sampled for link in links or ()):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self._ratio.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkedOrRatio{{{self._ratio.rate}}}"


def branch(name: str, headers: Iterable[tuple[str, bytes]], **attributes: str) -> bytes:
    """The ``traceparent`` of a new trace for one of the tasks a request (a deliberation)
    fanned out to, linked to the request's span: one task, one trace."""
    cause = trace.get_current_span(context_from(headers)).get_span_context()
    links = [trace.Link(cause)] if cause.is_valid else []
    span = tracer().start_span(name, context=_EMPTY, links=links, attributes=attributes)
    try:
        carried = dict(headers_for(trace.set_span_in_context(span)))
    finally:
        span.end()
    return carried[TRACEPARENT]


def _exporter(kind: str) -> SpanExporter | None:
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    # Imported here: only a process that exports pays for loading protobuf.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


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


def done(
    name: str, headers: Iterable[tuple[str, bytes]] | None, started_ns: int, topic: str
) -> None:
    """A span, ending now, for work on a record that began at ``started_ns`` (a batch
    fetched, then committed), if the record's trace is sampled; else nothing, cheaply."""
    carried = [(k, v) for k, v in headers or () if k in _TRACE_HEADERS]
    parent = next((v for k, v in carried if k == TRACEPARENT), None)
    if parent is None or _unsampled(parent):
        return
    span = tracer().start_span(
        name,
        context=context_from(carried),
        kind=trace.SpanKind.CONSUMER,
        start_time=started_ns,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic},
    )
    span.end()


def _unsampled(traceparent: bytes) -> bool:
    """Whether a well-formed W3C ``traceparent`` has its sampled flag clear."""
    if len(traceparent) != 55 or traceparent[2:3] != b"-":
        return False  # not one we can read: let the propagator decide
    try:
        return not int(traceparent[53:55], 16) & 0x01
    except ValueError:
        return False

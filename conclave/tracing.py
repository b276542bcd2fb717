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
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACEPARENT", "Headers", "configure", "context_from", "headers_for", "hop", "tracer"]

Headers = list[tuple[str, bytes]]
TRACEPARENT = "traceparent"

_propagator = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset({TRACEPARENT, "tracestate"})
_EMPTY = Context()
_configured = False


def configure(sample_ratio: float) -> None:
    """Install a sampling tracer provider once per process (spans cost 14-28 µs)."""
    global _configured  # noqa: PLW0603 - process-wide OpenTelemetry provider
    if _configured:
        return
    trace.set_tracer_provider(TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample_ratio))))
    _configured = True


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

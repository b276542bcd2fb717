"""One hop of a task's trace: a span when the trace is sampled, none when it is not."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from conclave import tracing
from conclave.tracing import TRACEPARENT, hop

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Conclave's tracer from a provider of this test's that keeps its spans in memory
    (OpenTelemetry's global provider can be set once per process only)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer", provider.get_tracer)
    tracing.tracer.cache_clear()
    yield exporter
    tracing.tracer.cache_clear()


def sampled(traceparent: bytes) -> bool:
    """The sampled bit of a ``traceparent``'s flags (others, like random-id, may be set)."""
    return bool(int(traceparent.rsplit(b"-", 1)[1], 16) & 0x01)


def traceparent(flags: str) -> bytes:
    return f"00-{TRACE}-{PARENT}-{flags}".encode()


def test_a_sampled_trace_gets_a_span_and_goes_on_from_it(spans: InMemorySpanExporter) -> None:
    with hop("witness", [(TRACEPARENT, traceparent("01")), ("other", b"x")]) as onward:
        pass
    (span,) = spans.get_finished_spans()
    assert span.name == "witness"
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT
    (sent,) = [v.decode() for k, v in onward if k == TRACEPARENT]
    _, trace_id, span_id, flags = sent.split("-")
    assert (trace_id, flags) == (TRACE, "01")
    assert span_id == format(span.context.span_id, "016x") != PARENT


def test_an_unsampled_trace_gets_no_span_and_is_passed_on_as_it_came(
    spans: InMemorySpanExporter,
) -> None:
    with hop("witness", [(TRACEPARENT, traceparent("00")), ("other", b"x")]) as onward:
        pass
    assert spans.get_finished_spans() == ()
    assert onward == [(TRACEPARENT, traceparent("00"))]


@pytest.mark.parametrize(
    "header", [b"garbage", traceparent("zz"), traceparent("00")[:-1], b"-" * 55]
)
def test_a_traceparent_it_cannot_read_is_left_to_the_propagator(
    spans: InMemorySpanExporter, header: bytes
) -> None:
    with hop("witness", [(TRACEPARENT, header)]):
        pass
    # The propagator ignores a malformed parent: a new root, sampled or not by ratio.
    assert all(s.parent is None for s in spans.get_finished_spans())


def test_a_record_outside_any_trace_may_start_one(spans: InMemorySpanExporter) -> None:
    with hop("schedule", None) as onward:
        pass
    started = spans.get_finished_spans()
    assert all(s.parent is None for s in started)
    (sent,) = [v.decode() for k, v in onward if k == TRACEPARENT]
    sampled = int(sent.rsplit("-", 1)[1], 16) & 0x01  # flags may carry more bits (random id)
    assert bool(sampled) == bool(started)  # sampled by ratio, and said so onward


def test_an_agents_own_span_stays_in_an_unsampled_trace(spans: InMemorySpanExporter) -> None:
    unsampled = [(TRACEPARENT, traceparent("00"))]
    tracer = tracing.tracer()
    with hop("agent.run", unsampled, attach=True), tracer.start_as_current_span("llm") as inner:
        assert format(inner.get_span_context().trace_id, "032x") == TRACE
    assert spans.get_finished_spans() == ()  # the parent said: not sampled
    with hop("agent.run", unsampled), tracer.start_as_current_span("llm") as inner:
        assert format(inner.get_span_context().trace_id, "032x") != TRACE  # not attached


@pytest.fixture
def never_sampled_alone(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Conclave's sampler with a ratio of 0: only what a sampled parent or link asks for."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(tracing.LinkedOrRatio(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer", provider.get_tracer)
    tracing.tracer.cache_clear()
    yield exporter
    tracing.tracer.cache_clear()


def test_a_task_a_sampled_deliberation_fans_out_to_is_a_sampled_trace_of_its_own_linked_to_it(
    never_sampled_alone: InMemorySpanExporter,
) -> None:
    deliberation = [(TRACEPARENT, traceparent("01"))]
    first = tracing.branch("task", deliberation, **{"conclave.task_id": "t1"})
    second = tracing.branch("task", deliberation, **{"conclave.task_id": "t2"})
    traces = {first.split(b"-")[1], second.split(b"-")[1]}
    assert len(traces) == 2  # one task, one trace...
    assert TRACE.encode() not in traces  # ...not the deliberation's
    assert sampled(first)  # as the request was
    assert sampled(second)
    spans = never_sampled_alone.get_finished_spans()
    assert [s.attributes["conclave.task_id"] for s in spans if s.attributes] == ["t1", "t2"]
    for span in spans:
        assert span.parent is None
        (link,) = span.links
        assert format(link.context.trace_id, "032x") == TRACE
        assert format(link.context.span_id, "016x") == PARENT


def test_a_task_of_an_unsampled_deliberation_is_sampled_by_ratio_alone(
    never_sampled_alone: InMemorySpanExporter,
) -> None:
    branched = tracing.branch("task", [(TRACEPARENT, traceparent("00"))])
    assert not sampled(branched)
    assert branched.split(b"-")[1] != TRACE.encode()
    assert never_sampled_alone.get_finished_spans() == ()


def test_work_done_on_a_record_of_a_sampled_trace_is_a_span_under_it(
    spans: InMemorySpanExporter,
) -> None:
    tracing.done("project", [(TRACEPARENT, traceparent("01"))], 1_000, "conclave.tasks")
    tracing.done("project", [(TRACEPARENT, traceparent("00"))], 1_000, "conclave.tasks")
    tracing.done("project", None, 1_000, "conclave.tasks")
    (span,) = spans.get_finished_spans()
    assert span.name == "project"
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT
    assert span.start_time == 1_000
    assert span.end_time is not None
    assert span.end_time > 1_000
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == "conclave.tasks"


def test_an_application_that_set_opentelemetry_up_itself_keeps_its_provider() -> None:
    # The global provider can be set once per process: checked in a process of its own.
    script = """
import warnings
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from conclave import tracing
from conclave.settings import Settings

mine = TracerProvider()
trace.set_tracer_provider(mine)
settings = Settings(kafka_bootstrap="b:9092", database_url="postgresql://db/x")
tracing.configure(settings, service="conclave-cli")
assert trace.get_tracer_provider() is mine
print("kept")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "kept", done.stderr
    assert "Overriding" not in done.stderr

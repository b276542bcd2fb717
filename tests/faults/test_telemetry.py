"""Telemetry of Conclave's processes as a user runs them: one task is one trace across
the CLI, the worker, the runtime host and the projector, exported over OTLP/HTTP to a
receiver in this test; each process serves its metrics where its run file says.

The receiver is the OTLP/HTTP protocol itself (protobuf over POST /v1/traces), so the
test checks what a real collector would get."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conclave.processes import alive
from tests.faults.conftest import Cluster
from tests.faults.test_processes import cli

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    links: tuple[tuple[str, str], ...]
    attributes: dict[str, str]


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.take(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Span(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links),
                            attributes={a.key: a.value.string_value for a in span.attributes},
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def trace_of(self, task_id: str) -> list[Span]:
        """Every span of the trace whose root submitted or fanned out ``task_id``."""
        with self.lock:
            spans = list(self.spans)
        roots = {s.trace_id for s in spans if s.attributes.get("conclave.task_id") == task_id}
        return [s for s in spans if s.trace_id in roots]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.close()


def conclave(cluster: Cluster, *args: str) -> str:
    done = cli(cluster.env, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def until(check: object, within: float = 30.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {within} s: {check.__doc__ or check}")
        time.sleep(0.2)


STAGES = {
    "submit": "conclave-cli",
    "schedule task.submitted": "conclave-worker",
    "agent.run": "conclave-runtime",
    "witness": "conclave-worker",
    "schedule witness.entry": "conclave-worker",
    "project": "conclave-projector",
}


def test_one_task_is_one_connected_trace_across_every_process(
    cluster: Cluster, receiver: Receiver
) -> None:
    cluster.extra_env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    cluster.worker("w1")
    cluster.runtime("h1", "default", 3, latency_ms=5)
    cluster.projector()
    task_id = "traced-1"
    conclave(cluster, "submit", "hello", "--id", task_id, "--wait")

    def every_stage_arrived() -> bool:
        """the task's trace has a span of every stage, the projection included"""
        return STAGES.keys() <= {s.name for s in receiver.trace_of(task_id)}

    until(every_stage_arrived)
    spans = receiver.trace_of(task_id)
    assert len({s.trace_id for s in spans}) == 1
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if not s.parent_id]
    assert root.name == "submit"
    for span in spans:  # connected: every parent is in the trace, up to the one root
        assert not span.parent_id or span.parent_id in by_id, span
    for stage, service in STAGES.items():
        assert service in {s.service for s in spans if s.name == stage}, stage
    # The (simulated) agent's model call is a child of its run, with GenAI attributes.
    (run,) = [s for s in spans if s.name == "agent.run"]
    (model,) = [s for s in spans if s.name == "chat simulated"]
    assert model.parent_id == run.span_id
    assert model.attributes["gen_ai.request.model"] == "simulated"
    assert model.attributes["gen_ai.operation.name"] == "chat"

    # Causal order: the completion's projection descends from every stage before it.
    def ancestry(span: Span) -> list[str]:
        names = []
        at: Span | None = span
        while at is not None:
            names.append(at.name)
            at = by_id.get(at.parent_id)
        return names[::-1]

    deepest = max((ancestry(s) for s in spans if s.name == "project"), key=len)
    stages = [name for name in deepest if name in STAGES]
    assert stages == list(STAGES), deepest

    # Every process serves metrics where its run file says.
    served = {p.kind: p.metrics_port for p in alive(cluster.home)}
    assert set(served) == {"worker", "runtime", "projector"}
    for kind, port in served.items():
        assert port is not None, kind
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert "process_cpu_seconds_total" in text, kind
    # ...and say so in their log lines, as JSON (stderr is not a terminal here).
    worker_log = cluster.processes["w1"].text()
    assert '"logger": "conclave.metrics"' in worker_log


def test_each_task_of_a_deliberation_is_a_trace_of_its_own_linked_to_the_motion(
    cluster: Cluster, receiver: Receiver
) -> None:
    cluster.extra_env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "CONCLAVE_TRACE_SAMPLE_RATIO": "1.0",
        }
    )
    cluster.worker("w1")
    cluster.runtime("h1", "default", 3, latency_ms=5)
    cluster.projector()
    conclave(cluster, "deliberate", "should we?", "--id", "motion-1", "--wait")

    def fanned_out() -> bool:
        """three task traces, each with its agent's run"""
        with receiver.lock:
            spans = list(receiver.spans)
        tasks = [s for s in spans if s.name == "task"]
        runs = {s.trace_id for s in spans if s.name == "agent.run"}
        return len(tasks) == 3 and {t.trace_id for t in tasks} <= runs

    until(fanned_out)
    with receiver.lock:
        spans = list(receiver.spans)
    (motion,) = [s for s in spans if s.name == "deliberate"]
    tasks = [s for s in spans if s.name == "task"]
    assert len({t.trace_id for t in tasks} | {motion.trace_id}) == 4  # one trace each
    for task in tasks:
        assert task.links == (
            next(
                (s.trace_id, s.span_id)
                for s in spans
                if s.name == "schedule deliberation.requested"
            ),
        )

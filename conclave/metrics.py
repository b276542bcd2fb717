"""Metrics: what every long-running process serves for Prometheus to scrape.

Two kinds, both in prometheus_client's default registry (which adds the process's own
CPU, memory and file descriptors):

* **Counters and histograms**, moved where things happen (a dispatch, an answer, a
  batch), once per event or per batch: a few hundred nanoseconds each.
* **Gauges read at scrape time** from live state (queue depths, agents by state,
  consumer lag): a component that has such state registers a :data:`Probe`, and the
  endpoint asks every probe when scraped. Nothing is kept up to date between scrapes,
  so they cost nothing while nobody looks.

The endpoint (:func:`serve`) runs on the process's own event loop, so a probe reads
state that no other thread changes under it.

Names and labels follow the OpenTelemetry semantic conventions for messaging where
they define one (``messaging_*``, with the convention's attribute names as labels,
dots turned into underscores as the OpenTelemetry-to-Prometheus mapping does); the
rest are ``conclave_*``. No label takes a task, agent or host id: their number is
bounded by pools, priorities, states, topics and partitions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["GAUGES", "MetricsServer", "Probe", "Sample", "serve", "unwatch", "watch"]

log = logging.getLogger(__name__)

Sample = tuple[str, tuple[str, ...], float]
"""A gauge's name (one of :data:`GAUGES`), its label values in declared order, its value."""
Probe = Callable[[], Iterable[Sample]]

DEFAULT_PORT = 9464
"""The port OpenTelemetry's Prometheus exporter uses by default."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# Semantic-convention attribute names, as Prometheus labels.
SYSTEM = "messaging_system"
GROUP = "messaging_consumer_group_name"
DESTINATION = "messaging_destination_name"
PARTITION = "messaging_destination_partition_id"

# -- gauges read from live state at scrape time: name -> (help, label names) ------------

GAUGES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "conclave_queue_depth": (
        "Tasks queued for an agent, per pool and priority",
        ("pool", "priority"),
    ),
    "conclave_tasks": (
        "Live tasks by status (waiting, queued, dispatched, retrying)",
        ("pool", "status"),
    ),
    "conclave_tasks_in_flight": ("Tasks dispatched and not finished", ("pool",)),
    "conclave_pool_capacity": ("Tasks a pool may have in flight at once", ("pool",)),
    "conclave_agents": (
        "Registered agents by state (idle, busy, unresponsive, lost, retired, circuit_open, "
        "probing)",
        ("pool", "state"),
    ),
    "conclave_hosts": (
        "Runtime hosts by lease (alive, over_limit, leaving, silent: lease run out but not "
        "judged yet, lost, left)",
        ("pool", "state"),
    ),
    "conclave_halted": ("1 while the system is halted (a scheduler shard's view)", ("shard",)),
    "conclave_consumer_lag_records": (
        "Records on a partition that a processor has not processed yet",
        (GROUP, DESTINATION, PARTITION),
    ),
    "conclave_witness_log_size": ("Entries in the witness log", ()),
    "conclave_witness_checkpoint_size": ("Entries under the last signed checkpoint", ()),
    "conclave_witness_checkpoint_age_seconds": (
        "Time since the witness shard last signed a checkpoint",
        (),
    ),
    "conclave_locks_held": ("Resource locks held now, per coordination shard", ("shard",)),
    "conclave_lock_waiters": ("Lock requests waiting in line, per coordination shard", ("shard",)),
    "conclave_state_keys": ("Versioned-state keys, per coordination shard", ("shard",)),
    "conclave_workflows_running": ("Workflows started, not ended, per workflow shard", ("shard",)),
    "conclave_agents_running": ("Agents of this runtime host working on an attempt", ("pool",)),
    "conclave_projection_lag_records": (
        "Records on a history topic not yet folded into the read models",
        (DESTINATION, PARTITION),
    ),
}

# -- counters and histograms moved as things happen -------------------------------------

consumed = Counter(
    "messaging_client_consumed_messages",
    "Records a processor consumed",
    (SYSTEM, GROUP, DESTINATION, PARTITION),
)
sent = Counter(
    "messaging_client_sent_messages",
    "Records a processor wrote (committed in its transaction)",
    (SYSTEM, GROUP, DESTINATION),
)
process_duration = Histogram(
    "messaging_process_duration",
    "Time to decide on one batch and commit its outputs with its positions",
    (SYSTEM, GROUP),
    unit="seconds",
    buckets=_LATENCY_BUCKETS,
)
tasks_dispatched = Counter(
    "conclave_tasks_dispatched", "Attempts dispatched to an agent", ("pool",)
)
tasks_finished = Counter(
    "conclave_tasks_finished",
    "Tasks that ended, by outcome (completed, dead_lettered, cancelled, expired, "
    "dependency_failed)",
    ("pool", "outcome"),
)
task_retries = Counter(
    "conclave_task_retries",
    "Tasks queued again after a failed or stalled attempt (at once or after a back-off)",
    ("pool",),
)
tasks_stalled = Counter(
    "conclave_tasks_stalled",
    "Attempts the scheduler stopped waiting for (deadline passed, host lost)",
    ("pool",),
)
dispatch_latency = Histogram(
    "conclave_dispatch_latency",
    "From a task being queued (accepted, released by its dependencies, or due again "
    "after a back-off) to its dispatch",
    ("pool",),
    unit="seconds",
    buckets=_LATENCY_BUCKETS,
)
task_duration = Histogram(
    "conclave_task_duration",
    "From a task's last dispatch to its completion (its answer witnessed)",
    ("pool",),
    unit="seconds",
    buckets=_DURATION_BUCKETS,
)
heartbeats = Counter(
    "conclave_heartbeats_received", "Runtime host beats the scheduler received", ("pool",)
)
hosts_lost = Counter(
    "conclave_hosts_lost", "Runtime hosts whose lease ran out (beats missed)", ("pool",)
)
witnessed = Counter("conclave_witness_entries", "Entries appended to the witness log")
agent_restarts = Counter(
    "conclave_agent_restarts",
    "Crashed agents this host started afresh (restarted) or gave up on (failed)",
    ("pool", "outcome"),
)
agents_scaled = Counter(
    "conclave_agents_scaled",
    "Agents this host started as the pool grew, or retired as it shrank (autoscaling)",
    ("pool", "change"),
)
agent_runs = Counter(
    "conclave_agent_runs",
    "Attempts an agent of this host finished, by outcome (answered, failed, cancelled)",
    ("pool", "outcome"),
)
agent_run_duration = Histogram(
    "conclave_agent_run_duration",
    "Time an agent of this host worked on one attempt",
    ("pool",),
    unit="seconds",
    buckets=_DURATION_BUCKETS,
)
agent_messages = Counter(
    "conclave_agent_messages",
    "Messages for an agent of this host, by outcome (handled, failed, expired, refused)",
    ("pool", "outcome"),
)
projected = Counter(
    "conclave_projected_records", "History records folded into the read models", (DESTINATION,)
)
projection_batch = Histogram(
    "conclave_projection_batch_size",
    "Records folded per read-model transaction",
    buckets=_BATCH_BUCKETS,
)
reconnects = Counter(
    "conclave_reconnects",
    "Outages of a dependency that this process rode out (kafka, postgresql)",
    ("dependency",),
)


# -- gauges ------------------------------------------------------------------------------


class _Probes(Collector):
    """Asks every registered probe for its gauges at scrape time."""

    def __init__(self) -> None:
        self.probes: list[Probe] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            name: GaugeMetricFamily(name, help_text, labels=labels)
            for name, (help_text, labels) in GAUGES.items()
        }
        for read in list(self.probes):
            try:
                samples = list(read())
            except Exception:
                log.exception("a metrics probe failed")
                continue
            for name, labels, value in samples:
                families[name].add_metric(labels, value)
        yield from (family for family in families.values() if family.samples)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # the names are only known once collected; none clash


_probes = _Probes()
REGISTRY.register(_probes)


def watch(read: Probe) -> None:
    """Serve ``read``'s gauges until :func:`unwatch` (a component registers when it starts
    and leaves when it stops)."""
    if read not in _probes.probes:
        _probes.probes.append(read)


def unwatch(read: Probe) -> None:
    with contextlib.suppress(ValueError):
        _probes.probes.remove(read)


# -- the endpoint ------------------------------------------------------------------------


@dataclass(slots=True)
class MetricsServer:
    """A running scrape endpoint: ``http://host:port/metrics``."""

    runner: Any  # aiohttp.web.AppRunner
    host: str
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def serve(host: str, port: int | None) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port``. ``port`` ``None`` means the default (9464)
    if it is free, else any free port: several processes on one machine (a laptop, the
    test suite) each get one, and say which in their run file. A port asked for
    explicitly must be free."""
    # Imported here: a short command (submit, status) never serves, and aiohttp takes
    # a while to import.
    from aiohttp import web

    async def scraped(_request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scraped)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = await _bind(runner, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    bound = sockets[0].getsockname()[1] if sockets else (port or DEFAULT_PORT)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(runner, host, int(bound))


async def _bind(runner: Any, host: str, port: int | None) -> Any:
    from aiohttp import web

    for candidate in (DEFAULT_PORT, 0) if port is None else (port,):
        site = web.TCPSite(runner, host, candidate)
        try:
            await site.start()
        except OSError as exc:
            if port is None and exc.errno == errno.EADDRINUSE:
                continue
            raise
        return site
    raise AssertionError("port 0 is always free")  # pragma: no cover

"""The metrics endpoint after a workload on the embedded stack: every gauge and counter an
operator alerts on is served, with values that agree with the read models.

The session's worker, runtime hosts and projector run in this process, so one endpoint
serves all of their metrics; counters are cumulative over the session, so the test
reads how much they moved for its own pool."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conclave import metrics
from conclave.domain.retry import RetryPolicy
from conclave.runtime.agents import AgentContext, TransientFailure
from projections import queries
from tests.integration.conftest import System, eventually, has_status

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def endpoint() -> AsyncIterator[str]:
    server = await metrics.serve("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        await server.stop()


async def scrape(url: str) -> Samples:
    """Every sample the endpoint serves, by name and labels."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text: str = response.read().decode()
            return text

    text = await asyncio.to_thread(get)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_a_workload_moves_the_counters_and_the_gauges_match_the_read_models(
    system: System, endpoint: str
) -> None:
    client, pool, db = system.client, system.pool, system.db
    release = asyncio.Event()
    failed_once: set[str] = set()

    async def agent(ctx: AgentContext) -> str:
        if ctx.input == "flaky" and ctx.task_id not in failed_once:
            failed_once.add(ctx.task_id)
            raise TransientFailure("the model timed out")
        await release.wait()
        return f"did {ctx.input}"

    before = await scrape(endpoint)
    await client.configure_pool(pool, capacity=1, reason="metrics test")
    async with system.running(2, agent):
        flaky = await client.submit(
            "flaky", pool=pool, max_attempts=2, retry=RetryPolicy(backoff_ms=0, jitter=0)
        )
        held = [await client.submit(f"held {i}", pool=pool) for i in range(4)]

        # One task holds the pool's one place; the others queue. The gauges say what the
        # read model says, whichever task got the place first.
        async def queued_as_read() -> bool:
            views = {view.pool: view for view in await queries.list_pools(db)}
            view = views.get(pool)
            if view is None or view.in_flight != 1 or sum(view.queued.values()) != 4:
                return False
            served = await scrape(endpoint)
            return (
                value(served, "conclave_queue_depth", pool=pool, priority="normal")
                == view.queued.get("normal", 0)
                == 4
                and value(served, "conclave_tasks_in_flight", pool=pool) == 1
                and value(served, "conclave_pool_capacity", pool=pool) == 1
                and value(served, "conclave_agents", pool=pool, state="busy") == 1
                and value(served, "conclave_agents", pool=pool, state="idle") == 1
            )

        await eventually(queued_as_read)
        release.set()
        await client.configure_pool(pool, capacity=2, reason="metrics test")
        for task_id in [flaky, *held]:
            await eventually(lambda t=task_id: has_status(db, t, "completed"))  # type: ignore[misc]

        async def settled() -> bool:
            served = await scrape(endpoint)
            lags = [v for (name, _), v in served.items() if name == "conclave_consumer_lag_records"]
            return (
                value(served, "conclave_tasks_in_flight", pool=pool) == 0
                and value(served, "conclave_agents", pool=pool, state="idle") == 2
                # Caught up, as of each consumer's last fetch: nobody is behind anywhere.
                and bool(lags)
                and not any(lags)
            )

        await eventually(settled)
        after = await scrape(endpoint)
    await _check_counters(system, before, after)


async def _check_counters(system: System, before: Samples, after: Samples) -> None:
    pool = system.pool

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Five tasks, one of them tried twice.
    assert moved("conclave_tasks_dispatched_total", pool=pool) == 6
    assert moved("conclave_tasks_finished_total", pool=pool, outcome="completed") == 5
    assert moved("conclave_task_retries_total", pool=pool) == 1
    assert moved("conclave_dispatch_latency_seconds_count", pool=pool) == 6
    assert moved("conclave_task_duration_seconds_count", pool=pool) == 5
    assert moved("conclave_task_duration_seconds_sum", pool=pool) > 0
    assert moved("conclave_agent_runs_total", pool=pool, outcome="answered") == 5
    assert moved("conclave_agent_runs_total", pool=pool, outcome="failed") == 1
    assert value(after, "conclave_queue_depth", pool=pool, priority="normal") == 0
    assert value(after, "conclave_hosts", pool=pool, state="alive") >= 1
    assert moved("conclave_heartbeats_received_total", pool=pool) > 0

    # Whole-system figures: the witness log and the read models agree on its size.
    entries = await queries.witness_entries(system.db)
    assert value(after, "conclave_witness_log_size") >= entries[-1].sequence
    assert moved("conclave_witness_entries_total") >= 6  # five answers, one failure
    assert moved("conclave_projection_batch_size_count") > 0
    assert (
        moved(
            "conclave_projected_records_total",
            messaging_destination_name=system.settings.topic_prefix + ".tasks",
        )
        > 0
    )

    # Messaging metrics, labelled as the OpenTelemetry conventions name them.
    group = {"messaging_system": "kafka", "messaging_consumer_group_name": "scheduler-0"}
    consumed = [
        labels for name, labels in after if name == "messaging_client_consumed_messages_total"
    ]
    assert any(set(group.items()) <= labels for labels in consumed)
    assert moved("messaging_process_duration_seconds_count", **group) > 0
    lags = [labels for name, labels in after if name == "conclave_consumer_lag_records"]
    assert any(("messaging_consumer_group_name", "witness-0") in labels for labels in lags)
    assert any(("messaging_consumer_group_name", "runtime") in labels for labels in lags)

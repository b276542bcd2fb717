"""The scheduler's domain alone: µs per event as the queue and the idle agents grow.

``python -m bench.scheduler_micro``. No broker, no codec: decide, evolve and schedule
as the scheduler shard calls them. One pool at its capacity with ``queued`` tasks
waiting and ``idle`` agents beyond the busy ones (plus, in the last row, 1,000 other
pools, each with an idle agent and a task waiting for an agent not registered):

* submit + schedule: a new task is decided, folded, and schedule() finds nothing to
  do (the pool is full);
* complete + schedule: a witnessed output completes a running task, schedule()
  hands the best queued task to an idle agent, and the dispatch is folded.

Both should stay flat across the rows: O(log n) in the queue, nothing in the idle
agents or the pools. Each figure is CPU time (this process's, so that other
processes on a shared machine do not count), the best of ``ROUNDS`` rounds of
``EVENTS`` events, the rounds going round the scenarios; rounds of submits and
completions alternate, so the queue stays near its size. The snapshot columns
(JSON text both ways included) are linear in the live state by design. A shared
machine can also be slow for everyone (steal time): the line under the table
times a plain Python loop, for scale.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from math import inf

from rich.console import Console
from rich.table import Table

from conclave.domain import scheduling
from conclave.domain.events import (
    AgentRegistered,
    Priority,
    TaskDispatched,
    TaskSubmitted,
    WitnessEntry,
)

CAPACITY = 72
EVENTS = 1_000
ROUNDS = 5
NOW = 1_700_000_000_000_000


@dataclass(slots=True)
class Scenario:
    queued: int
    idle: int
    other_pools: int = 0


class Bench:
    """A scheduler state and the shard's loop around it, without Kafka."""

    def __init__(self, scenario: Scenario) -> None:
        self.state = scheduling.SchedulerState(capacity=CAPACITY)
        self.running: deque[TaskDispatched] = deque()
        self.rng = random.Random(7)
        self.submitted = 0
        self.witnessed = 0
        for n in range(CAPACITY + scenario.idle):
            self.register(f"agent-{n:06}", "main")
        for p in range(scenario.other_pools):
            self.register(f"other-{p:04}", f"pool-{p:04}")
            self.submit(f"pool-{p:04}", agent_id=f"nobody-{p:04}")  # waits for its agent
        for _ in range(CAPACITY + scenario.queued):
            self.submit("main")
        assert len(self.running) == CAPACITY

    def register(self, agent_id: str, pool: str) -> None:
        event = AgentRegistered(agent_id=agent_id, pool=pool, host_id="h", agent_ref="m:f")
        scheduling.evolve(self.state, event)

    def submit(self, pool: str, agent_id: str | None = None) -> None:
        self.submitted += 1
        command = TaskSubmitted(
            task_id=f"task-{self.submitted:07}",
            pool=pool,
            priority=self.rng.choice(list(Priority)),
            input="x",
            agent_id=agent_id,
        )
        for event in scheduling.decide(self.state, command, NOW):
            scheduling.evolve(self.state, event)
        self.schedule()

    def complete(self) -> None:
        task = self.running.popleft()
        self.witnessed += 1
        entry = WitnessEntry(
            sequence=self.witnessed,
            previous_hash=b"",
            entry_hash=b"",
            subject_type="agent.output",
            subject_event_id=f"output-{self.witnessed}",
            subject_digest=b"",
            recorded_at=NOW,
            task_id=task.task_id,
            agent_id=task.agent_id,
            detail="",
            attempt=task.attempt,
        )
        for event in scheduling.decide(self.state, entry, NOW):
            scheduling.evolve(self.state, event)
        self.schedule()

    def schedule(self) -> None:
        for dispatch in scheduling.schedule(self.state, NOW):
            scheduling.evolve(self.state, dispatch)
            self.running.append(dispatch)


def per_event_us(action: Callable[[], None]) -> float:
    started = time.process_time()
    for _ in range(EVENTS):
        action()
    return (time.process_time() - started) / EVENTS * 1e6


def snapshot_ms(bench: Bench) -> tuple[float, float]:
    """CPU to write the state as JSON text, and to read it back."""
    started = time.process_time()
    data = json.dumps(scheduling.to_snapshot(bench.state))
    written = time.process_time()
    scheduling.from_snapshot(json.loads(data))
    return (written - started) * 1e3, (time.process_time() - written) * 1e3


def loop_ms() -> float:
    """CPU time of a million additions in a Python loop: how fast this machine is now."""
    started = time.process_time()
    total = 0
    for n in range(1_000_000):
        total += n
    return (time.process_time() - started) * 1e3


def main() -> None:
    scenarios = [Scenario(queued, idle) for queued in (1_000, 100_000) for idle in (10, 10_000)] + [
        Scenario(100_000, 10_000, other_pools=1_000)
    ]
    table = Table(
        title=f"scheduler domain: CPU per event, best of {ROUNDS} x {EVENTS:,}, capacity {CAPACITY}"
    )
    for column in ("queued", "idle agents", "other pools"):
        table.add_column(column, justify="right")
    for column in ("submit µs", "complete µs", "snapshot ms", "restore ms"):
        table.add_column(column, justify="right")
    # Round-robin over the scenarios, so that a busy spell on the machine does not
    # land on one row only; each row keeps its best round.
    benches = [Bench(scenario) for scenario in scenarios]
    best: list[list[float]] = [[inf] * 4 for _ in benches]
    for _ in range(ROUNDS):
        for bench, row in zip(benches, best, strict=True):
            figures = (
                per_event_us(partial(bench.submit, "main")),
                per_event_us(bench.complete),
                *snapshot_ms(bench),
            )
            row[:] = map(min, row, figures)
    for scenario, (submit, complete, written, read) in zip(scenarios, best, strict=True):
        table.add_row(
            f"{scenario.queued:,}",
            f"{scenario.idle:,}",
            f"{scenario.other_pools:,}",
            f"{submit:.1f}",
            f"{complete:.1f}",
            f"{written:.0f}",
            f"{read:.0f}",
        )
    console = Console(width=100)
    console.print(table)
    console.print(f"for scale: 1M additions in a Python loop took {loop_ms():.0f} ms of CPU")


if __name__ == "__main__":
    main()

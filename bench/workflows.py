"""A sequential workflow of lightweight steps: ``python -m bench.workflows``.

Issue 8's shape: S steps (400 by default), each waiting for the previous one, each a
no-op agent. Run twice on one fresh embedded stack, each on a topic prefix of its own
(a ``conclave worker``, one runtime host with 4 simulated agents of 0 ms, a projector):

* **plain dependencies**: S tasks submitted at once, task ``i`` ``depends_on`` task
  ``i - 1`` (the scheduler releases each; ``bench.workloads``'s "sequential");
* **workflow**: one workflow of S steps, step ``i`` ``depends_on`` step ``i - 1`` and
  reads no output: the workflow processor hands the chain to the scheduler at once (each
  task depending on the one before), so it runs as the plain chain does;
* **workflow passing data**: step ``i``'s input is ``{{ steps.s<i-1>.output }}`` (an
  agent that adds one to its input): each step is submitted by the workflow processor
  once the previous one's completion and accepted output are read, one more hop per step.

Wall time from the submission to the last task (plain) or the workflow (``workflows``
row) finished in the read model, and, for the workflow, the processor's own span
(``workflow.started`` -> ``workflow.ended`` envelope times). CPU: process time of the
worker (all shards), the runtime host and the projector during each run. The machine is
shared: figures are as loaded as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

import psutil

from bench.throughput import POOL, _System, stack
from bench.workloads import PUBLISHED_400_STEPS_S, _chains, _until_finished
from conclave.bus import ensure_topics, read_history, topics_for
from conclave.client import Client
from conclave.domain.events import WorkflowEnded, WorkflowStarted
from conclave.runtime.agents import AgentContext
from conclave.settings import Settings
from projections.database import connect
from schemas.codec import default_codec

__all__ = ["Figures", "main", "run"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    name: str
    steps: int
    seconds: float
    ms_per_step: float
    processor_seconds: float | None
    """Workflow only: ``workflow.started`` -> ``workflow.ended``, by the processor's clock."""
    cpu_s: dict[str, float]
    """Process time of each child during the run."""


def _cpu(system: _System) -> dict[str, float]:
    found = {}
    for name, child in system.children.children.items():
        t = psutil.Process(child.pid).cpu_times()
        found[name] = t.user + t.system
    return found


def _spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


async def _plain(settings: Settings, steps: int) -> Figures:
    system = _System(settings.with_(topic_prefix=f"{settings.topic_prefix}pln"), 4, 1)
    await system.start()
    db = await connect(system.settings)
    try:
        await asyncio.sleep(1.0)  # registrations folded, fetchers warm
        cpu = _cpu(system)
        started = time.monotonic()
        async with Client(system.settings, producer_name="bench") as client:
            await client.submit_many(
                [f"step {i}" for i in range(steps)],
                task_ids=[f"sequential-{i}" for i in range(steps)],
                pool=POOL,
                depends_on=_chains(steps, steps, "sequential"),
            )
        await _until_finished(db, steps, "plain", started + 600)
        seconds = time.monotonic() - started
        spent = _spent(cpu, _cpu(system))
    finally:
        await db.close()
        system.stop()
    return Figures(
        name="plain dependencies",
        steps=steps,
        seconds=round(seconds, 2),
        ms_per_step=round(1000 * seconds / steps, 1),
        processor_seconds=None,
        cpu_s=spent,
    )


async def count_up(ctx: AgentContext) -> str:
    """The data-passing run's agent: its input plus one."""
    return str(int(ctx.input) + 1)


class _Counting(_System):
    """The stack with :func:`count_up` as the agent of its runtime host."""

    async def start(self) -> None:
        await ensure_topics(self.settings)
        self.children.spawn(
            "worker", ["worker", "--id", "bench-worker"], ready_marker=b"processors running"
        )
        self.children.spawn(
            "runtime-0",
            ["runtime", "--host-id", "bench-host-0", "--pool", POOL, "--agents", "4",
             "--agent", "bench.workflows:count_up"],
            ready_marker=b"running",
        )  # fmt: skip
        self.children.spawn("projector", ["projector"], ready_marker=b"projector running")
        await asyncio.gather(*(self.children.ready(n) for n in list(self.children.children)))


def passing(steps: int) -> dict[str, object]:
    return {
        "name": f"passing-{steps}",
        "steps": [
            {"name": "s0", "pool": POOL, "input": "0"},
            *(
                {"name": f"s{i}", "pool": POOL, "input": f"{{{{ steps.s{i - 1}.output }}}}"}
                for i in range(1, steps)
            ),
        ],
    }


def definition(steps: int) -> dict[str, object]:
    return {
        "name": f"sequential-{steps}",
        "steps": [
            {"name": "s0", "pool": POOL, "input": "start"},
            *(
                {"name": f"s{i}", "pool": POOL, "input": f"step {i}", "depends_on": [f"s{i - 1}"]}
                for i in range(1, steps)
            ),
        ],
    }


async def _workflow(settings: Settings, steps: int, *, data: bool = False) -> Figures:
    own = settings.with_(topic_prefix=f"{settings.topic_prefix}{'wfd' if data else 'wfl'}")
    system = _Counting(own, 4, 1) if data else _System(own, 4, 1)
    await system.start()
    db = await connect(system.settings)
    try:
        await asyncio.sleep(1.0)
        cpu = _cpu(system)
        started = time.monotonic()
        async with Client(system.settings, producer_name="bench") as client:
            shape = passing(steps) if data else definition(steps)
            wid = await client.run_workflow(shape, workflow_id="bench-sequential")
        while (status := await db.fetchval(
            "SELECT status FROM workflows WHERE workflow_id = $1", wid
        )) in (None, "running"):  # fmt: skip
            if time.monotonic() > started + 600:
                raise TimeoutError(f"workflow not finished in 600 s ({status})")
            await asyncio.sleep(0.02)
        seconds = time.monotonic() - started
        spent = _spent(cpu, _cpu(system))
        if status != "completed":
            reason = await db.fetchval("SELECT reason FROM workflows WHERE workflow_id = $1", wid)
            raise RuntimeError(f"workflow {status}: {reason}")
        if data:
            last = await db.fetchval(
                "SELECT output FROM workflow_steps WHERE task_id = $1", f"{wid}.s{steps - 1}"
            )
            assert last == str(steps), last
        times = {}
        codec = default_codec()
        async for r in read_history(system.settings, [topics_for(system.settings).workflows]):
            envelope, event = codec.decode(r.value)
            if isinstance(event, WorkflowStarted | WorkflowEnded):
                times[type(event)] = envelope.occurred_at
    finally:
        await db.close()
        system.stop()
    return Figures(
        name="workflow passing data" if data else "workflow",
        steps=steps,
        seconds=round(seconds, 2),
        ms_per_step=round(1000 * seconds / steps, 1),
        processor_seconds=round((times[WorkflowEnded] - times[WorkflowStarted]) / 1e6, 2),
        cpu_s=spent,
    )


async def run(steps: int = 400) -> list[Figures]:
    async with stack() as (settings, _embedded):
        return [
            await _plain(settings, steps),
            await _workflow(settings, steps),
            await _workflow(settings, steps, data=True),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workflows")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    rows = asyncio.run(run(args.steps))
    for r in rows:
        extra = f", processor {r.processor_seconds:.2f} s" if r.processor_seconds else ""
        cpu = ", ".join(f"{k} {v:.2f} s" for k, v in r.cpu_s.items())
        print(
            f"{r.name}: {r.steps} steps in {r.seconds:.2f} s ({r.ms_per_step:.1f} ms/step"
            f"{extra}); CPU {cpu}"
        )
    quoted = ", ".join(f"{k} {v} s" for k, v in PUBLISHED_400_STEPS_S.items())
    print(f"goal: 400 steps < 8 s (< 20 ms/step); published, other hardware: {quoted}")
    print(json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main()

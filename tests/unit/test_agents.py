"""Agent loading (``module:function``) and the deterministic simulated agent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.errors import AgentLoadError, ConclaveError
from conclave.runtime.agents import (
    AgentContext,
    SimulatedAgent,
    SimulatedFailure,
    load_agent,
)

HERE = __name__


async def echo_agent(ctx: AgentContext) -> str:
    """A minimal real agent, loadable as ``tests.unit.test_agents:echo_agent``."""
    return f"{ctx.agent_id}: {ctx.input}"


def sync_agent(ctx: AgentContext) -> str:
    return ctx.input


class CallableAgent:
    async def __call__(self, ctx: AgentContext) -> str:
        return ctx.input.upper()


callable_agent = CallableAgent()
NOT_CALLABLE = 42


def ctx(
    agent_id: str = "a",
    task_id: str = "t",
    attempt: int = 1,
    input_: str = "motion",
    memory: dict[str, object] | None = None,
) -> AgentContext:
    return AgentContext(
        agent_id=agent_id,
        task_id=task_id,
        attempt=attempt,
        input=input_,
        deliberation_id=None,
        memory={} if memory is None else memory,
    )


async def test_module_function_reference_loads_the_coroutine_function() -> None:
    fn = load_agent(f"{HERE}:echo_agent")
    assert fn is echo_agent
    assert await fn(ctx(agent_id="x", input_="hi")) == "x: hi"


async def test_instance_with_async_call_is_accepted() -> None:
    fn = load_agent(f"{HERE}:callable_agent")
    assert await fn(ctx(input_="hi")) == "HI"


def test_simulated_reference_takes_options() -> None:
    agent = load_agent("simulated", latency_ms=0, seed=7)
    assert agent == SimulatedAgent(latency_ms=0, seed=7)


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "echo_agent",
        ":echo_agent",
        f"{HERE}:",
        f"{HERE}.echo_agent",
        "conclave_no_such_module_xyz:fn",
        f"{HERE}:no_such_function",
        f"{HERE}:sync_agent",
        f"{HERE}:NOT_CALLABLE",
        f"{HERE}:CallableAgent",
        "os:path",
        "json:dumps",
    ],
)
def test_bad_references_raise_agent_load_error(ref: str) -> None:
    with pytest.raises(AgentLoadError) as raised:
        load_agent(ref)
    assert isinstance(raised.value, ConclaveError)
    assert raised.value.permanent


@pytest.mark.parametrize("ref", [".relative:fn", "..up:fn"])
def test_relative_module_references_raise_agent_load_error(ref: str) -> None:
    with pytest.raises(AgentLoadError):
        load_agent(ref)


def test_sync_function_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(AgentLoadError, match="not an async callable"):
        load_agent(f"{HERE}:sync_agent")


# -- SimulatedAgent ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    agent_id=st.text(max_size=8),
    input_=st.text(max_size=30),
    tasks=st.lists(st.text(max_size=5), min_size=2, max_size=2, unique=True),
)
async def test_output_is_deterministic_in_seed_agent_and_input(
    seed: int, agent_id: str, input_: str, tasks: list[str]
) -> None:
    agent = SimulatedAgent(latency_ms=0, seed=seed)
    first = await agent(ctx(agent_id=agent_id, task_id=tasks[0], input_=input_))
    again = await SimulatedAgent(latency_ms=0, seed=seed)(
        ctx(agent_id=agent_id, task_id=tasks[1], attempt=2, input_=input_)
    )
    assert first == again
    assert first.startswith(f"{agent_id} votes ")


async def test_output_depends_on_seed_agent_and_input() -> None:
    base = await SimulatedAgent(latency_ms=0, seed=0)(ctx(agent_id="a", input_="m"))
    others = {
        await SimulatedAgent(latency_ms=0, seed=1)(ctx(agent_id="a", input_="m")),
        await SimulatedAgent(latency_ms=0, seed=0)(ctx(agent_id="a", input_="n")),
    }
    assert base not in others
    assert len(others) == 2
    other_agent = await SimulatedAgent(latency_ms=0, seed=0)(ctx(agent_id="b", input_="m"))
    assert other_agent != base


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), attempt=st.integers(1, 10), task_id=st.text(max_size=5))
async def test_failure_rate_one_always_fails(seed: int, attempt: int, task_id: str) -> None:
    memory: dict[str, object] = {}
    agent = SimulatedAgent(latency_ms=0, failure_rate=1.0, seed=seed)
    with pytest.raises(SimulatedFailure, match="simulated failure of a"):
        await agent(ctx(task_id=task_id, attempt=attempt, memory=memory))
    assert memory == {}, "a failed attempt leaves no answer in memory"


async def test_failure_rate_zero_never_fails() -> None:
    agent = SimulatedAgent(latency_ms=0, failure_rate=0.0)
    for n in range(50):
        await agent(ctx(task_id=f"t{n}"))


async def test_failures_are_reproducible_per_attempt() -> None:
    agent = SimulatedAgent(latency_ms=0, failure_rate=0.5, seed=3)

    async def outcome(task_id: str, attempt: int) -> bool:
        try:
            await agent(ctx(task_id=task_id, attempt=attempt))
        except SimulatedFailure:
            return False
        return True

    first = [await outcome(f"t{n}", 1) for n in range(40)]
    assert first == [await outcome(f"t{n}", 1) for n in range(40)]
    assert 5 < sum(first) < 35


async def test_agents_keep_separate_memories() -> None:
    agent = SimulatedAgent(latency_ms=0)
    memories: dict[str, dict[str, object]] = {"a": {}, "b": {}}
    for n in range(3):
        await agent(ctx(agent_id="a", task_id=f"t{n}", memory=memories["a"]))
    await agent(ctx(agent_id="b", task_id="t0", memory=memories["b"]))
    assert memories == {"a": {"answered": 3}, "b": {"answered": 1}}


async def test_default_context_memory_is_not_shared() -> None:
    one = AgentContext(agent_id="a", task_id="t", attempt=1, input="", deliberation_id=None)
    two = AgentContext(agent_id="b", task_id="t", attempt=1, input="", deliberation_id=None)
    await SimulatedAgent(latency_ms=0)(one)
    assert one.memory == {"answered": 1}
    assert two.memory == {}

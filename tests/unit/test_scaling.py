"""Autoscaling: the scheduler says a pool is starved (conclave/domain/scheduling.py,
``starved``), a host grows by its share and retires idle agents down to its minimum
(conclave/domain/scaling.py); a retired agent gets no work until registered again."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conclave.domain.events import AgentRegistered, AgentRetired, HostBeat, PoolStarved
from conclave.domain.lifecycle import AgentNow, fold, transitions
from conclave.domain.scaling import Scaling
from conclave.domain.scheduling import (
    STARVED_EVERY_US,
    SchedulerState,
    evolve,
    from_snapshot,
    schedule,
    starved,
    to_snapshot,
)
from tests.unit.test_scheduling import Harness, submit

S = 1_000_000
IDS = tuple(f"a{n}" for n in range(6))


def starving(at: int = 0, waiting: int = 5, hosts: int = 1) -> PoolStarved:
    return PoolStarved(pool="p0", waiting=waiting, hosts=hosts, at=at)


# -- The host's policy ------------------------------------------------------------------


def test_a_host_grows_by_its_share_of_the_waiting_tasks_up_to_its_maximum() -> None:
    scaling = Scaling(IDS, minimum=2, idle_us=10 * S)
    assert scaling.grow(["a0", "a1"], starving(waiting=3)) == ["a2", "a3", "a4"]
    assert scaling.grow(["a0", "a1"], starving(waiting=3, hosts=2)) == ["a2", "a3"]  # ceil(3/2)
    assert scaling.grow(["a0", "a1"], starving(waiting=50)) == ["a2", "a3", "a4", "a5"]
    assert scaling.grow(list(IDS), starving(waiting=50)) == []  # at its maximum
    assert scaling.grow(["a0", "a1", "a3"], starving(waiting=1)) == ["a2"]  # first ids first


def test_a_host_retires_agents_idle_past_the_timeout_last_ids_first_down_to_its_minimum() -> None:
    scaling = Scaling(IDS, minimum=2, idle_us=10 * S)
    running = ["a0", "a1", "a2", "a3", "a4"]
    idle = {"a0": 0, "a2": 0, "a3": 5 * S, "a4": 0}  # a1 is busy
    assert scaling.shrink(running, idle, 9 * S) == []  # nobody idle 10 s yet
    assert scaling.shrink(running, idle, 10 * S) == ["a4", "a2", "a0"]
    assert scaling.shrink(running, idle, 15 * S) == ["a4", "a3", "a2"]  # 2 left: a1 and a0
    assert scaling.shrink(["a0", "a1"], {"a0": 0, "a1": 0}, 100 * S) == []


def test_a_scaling_out_of_bounds_is_refused() -> None:
    with pytest.raises(ValueError, match="minimum 7"):
        Scaling(IDS, minimum=7, idle_us=S)
    with pytest.raises(ValueError, match="repeat"):
        Scaling(("a", "a"), minimum=1, idle_us=S)
    with pytest.raises(ValueError, match="positive"):
        Scaling(IDS, minimum=1, idle_us=0)


@given(
    minimum=st.integers(0, len(IDS)),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 20), st.integers(1, 3), st.integers(0, 30)),
        max_size=30,
    ),
    busy=st.sets(st.sampled_from(IDS)),
)
def test_a_host_stays_between_its_minimum_and_maximum_and_retires_only_the_idle(
    minimum: int, steps: list[tuple[bool, int, int, int]], busy: set[str]
) -> None:
    scaling = Scaling(IDS, minimum=minimum, idle_us=10 * S)
    running = list(IDS[:minimum])
    idle_since = dict.fromkeys(running, 0)
    now = 0
    for grows, waiting, hosts, seconds in steps:
        now += seconds * S
        if grows:
            started = scaling.grow(running, starving(now, waiting, hosts))
            assert len(started) <= -(-waiting // hosts)
            assert not set(started) & set(running)
            running += started
            idle_since |= dict.fromkeys(started, now)
        else:
            idle = {a: t for a, t in idle_since.items() if a in running and a not in busy}
            retired = scaling.shrink(running, idle, now)
            assert all(a in idle and now - idle[a] >= 10 * S for a in retired)
            running = [a for a in running if a not in retired]
        assert minimum <= len(running) <= len(IDS)
        assert len(set(running)) == len(running)


# -- The scheduler's word --------------------------------------------------------------


def _pool_with_a_busy_agent(capacity: int = 72) -> Harness:
    h = Harness(capacity)
    h.register("a0", host_id="h0")
    h.beat("h0", lease_us=10 * S)
    h.command(submit("t0"))  # a0 runs it
    return h


def test_a_pool_whose_tasks_find_no_idle_agent_is_starved_once_a_second() -> None:
    h = _pool_with_a_busy_agent()
    assert starved(h.state, h.now) == []  # nothing waits
    for n in range(1, 4):
        h.command(submit(f"t{n}"))
    said = starved(h.state, h.now)
    assert said == [PoolStarved(pool="p0", waiting=3, hosts=1, at=h.now)]
    evolve(h.state, said[0])
    assert starved(h.state, h.now + STARVED_EVERY_US - 1) == []  # said already
    again = starved(h.state, h.now + STARVED_EVERY_US)
    assert [(e.waiting, e.at) for e in again] == [(3, h.now + STARVED_EVERY_US)]


def test_a_pool_is_not_starved_at_capacity_halted_or_with_no_live_host_that_can_grow() -> None:
    h = _pool_with_a_busy_agent(capacity=2)
    for n in range(1, 4):
        h.command(submit(f"t{n}"))
    assert [e.waiting for e in starved(h.state, h.now)] == [1]  # capacity 2, one in flight
    h.register("a1", host_id="h0")  # takes t1: the pool is at its capacity
    assert starved(h.state, h.now) == []
    h2 = _pool_with_a_busy_agent()
    h2.command(submit("t1"))
    assert starved(h2.state, h2.now + 10 * S) == []  # its only host's lease ran out
    h2.beat("h0", lease_us=10 * S, over_limit="memory over its limit")
    assert starved(h2.state, h2.now) == []  # its only host takes no new work
    h2.beat("h0", lease_us=10 * S, spare=0)
    assert starved(h2.state, h2.now) == []  # its only host cannot grow: nobody to tell
    restored = from_snapshot(json.loads(json.dumps(to_snapshot(h2.state))))
    assert restored.hosts["h0"].spare == 0
    h2.beat("h0", lease_us=10 * S)
    assert len(starved(h2.state, h2.now)) == 1
    restored = from_snapshot(json.loads(json.dumps(to_snapshot(h2.state))))
    assert restored.hosts["h0"].spare == 1
    h2.halt()
    assert starved(h2.state, h2.now) == []


def test_a_retired_agent_gets_no_work_until_registered_again_even_after_a_snapshot() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.register("a1", host_id="h0")
    h.fact(AgentRetired(agent_id="a1", pool="p0", host_id="h0", reason="idle for 60 s"))
    dispatched = h.command(submit("t0"))[1:] + h.command(submit("t1"))[1:]
    assert [d.agent_id for d in dispatched] == ["a0"]  # t1 waits: a1 is retired
    restored = from_snapshot(json.loads(json.dumps(to_snapshot(h.state))))
    assert restored.retired == {"a1"}
    assert schedule(restored, h.now) == []
    again = h.register("a1", host_id="h0")  # the pool grew again
    assert [(d.task_id, d.agent_id) for d in again] == [("t1", "a1")]
    assert h.state.retired == set()


def test_a_beat_does_not_bring_a_retired_agent_back() -> None:
    h = Harness()
    h.register("a0", host_id="h0")
    h.fact(AgentRetired(agent_id="a0", pool="p0", host_id="h0", reason="idle"))
    h.fact(HostBeat(host_id="h0", pool="p0", agent_ids=[], expires_at=h.now + S))
    assert h.command(submit("t0"))[1:] == []


def test_a_starved_word_for_a_pool_the_scheduler_no_longer_holds_is_harmless() -> None:
    state = SchedulerState()
    evolve(state, starving(at=5))
    assert state.pools == {}


# -- The lifecycle --------------------------------------------------------------------


def test_a_retired_agent_is_retired_with_the_reason_until_registered_again() -> None:
    retired = AgentRetired(agent_id="a", pool="p", host_id="h", reason="idle for 61 s")
    (change,) = transitions(retired)
    assert (change.state, change.reason) == ("retired", "idle for 61 s")
    now = fold(AgentNow("idle"), change)
    assert now == AgentNow("retired")
    registered = AgentRegistered(agent_id="a", pool="p", host_id="h", agent_ref="m:f")
    (back,) = transitions(registered)
    assert fold(now, back) == AgentNow("registered")
    assert transitions(starving()) == []  # about a pool, not an agent
    # A dispatch crossed the retirement: its host brings it back, it works on.
    busy = AgentNow("busy", "t1", 1)
    assert fold(busy, change) == busy
    assert fold(fold(busy, change), back) == busy

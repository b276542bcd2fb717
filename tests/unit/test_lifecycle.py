"""The agent lifecycle read off events (conclave/domain/lifecycle.py): which event moves
which agent to which state, and the rule that folds an agent's history."""

from __future__ import annotations

import pytest

from conclave.domain import events as ev
from conclave.domain.lifecycle import AgentNow, Transition, fold, transitions
from conclave.domain.scheduling import LEFT, NO_ANSWER


@pytest.mark.parametrize(
    ("event", "wanted"),
    [
        (
            ev.AgentRegistered(agent_id="a", pool="p", host_id="h", agent_ref="m:f", version="2"),
            [Transition("a", "registered", "on host 'h' in pool 'p', version 2")],
        ),
        (
            ev.TaskDispatched(task_id="t", pool="p", agent_id="a", host_id="h", attempt=2,
                              input="x", deliberation_id=None),
            [Transition("a", "busy", "runs t (attempt 2)", "t", attempt=2)],
        ),
        (
            ev.TaskCompleted(task_id="t", agent_id="a", output_event_id="o", witness_sequence=1),
            [Transition("a", "idle", "answered t", "t", ends_run=True)],
        ),
        (
            ev.TaskFailed(
                task_id="t", agent_id="a", attempt=1, error_type="Boom", error_message="no",
                deliberation_id=None, permanent=True,
            ),
            [Transition("a", "idle", "attempt 1 of t failed: Boom (permanent): no", "t",
                        ends_run=True, attempt=1)],
        ),
        (
            ev.TaskStalled(task_id="t", agent_id="a", host_id="h", attempt=1,
                           reason=f"attempt 1 of 1 stalled: {NO_ANSWER}"),
            [Transition("a", "unresponsive", f"attempt 1 of 1 stalled: {NO_ANSWER}", "t")],
        ),
        (  # its host's loss says it
            ev.TaskStalled(task_id="t", agent_id="a", host_id="h", attempt=1,
                           reason="attempt 1 of 1 stalled: host 'h' lost"),
            [],
        ),
        (
            ev.HostLost(host_id="h", pool="p", agent_ids=["a", "b"], expires_at=1,
                        reason=f"host 'h' {LEFT}"),
            [Transition("a", "retired", f"host 'h' {LEFT}"),
             Transition("b", "retired", f"host 'h' {LEFT}")],
        ),
        (
            ev.HostLost(host_id="h", pool="p", agent_ids=["a"], expires_at=1, reason="gone"),
            [Transition("a", "lost", "gone")],
        ),
        (
            ev.TaskCancelled(task_id="t", agent_id=None, host_id=None, attempt=0, reason="r"),
            [],  # it was not running
        ),
        (ev.AgentCircuitHalfOpened(agent_id="a"),
         [Transition("a", "probing", "cool-down over: one probe task")]),
        (
            ev.AgentRestarted(agent_id="a", pool="p", host_id="h", restarts=2, window_s=60.0,
                              reason="crashed: KeyError: 'x' (task t, attempt 1)"),
            [Transition("a", "restarting",
                        "restart 2 within 60 s: crashed: KeyError: 'x' (task t, attempt 1)"),
             Transition("a", "idle", "started afresh: its memory is empty")],
        ),
        (
            ev.AgentFailed(agent_id="a", pool="p", host_id="h", restarts=5, window_s=60.0,
                           reason="crashed 6 times within 60 s"),
            [Transition("a", "failed", "crashed 6 times within 60 s")],
        ),
        (
            ev.HostFailed(host_id="h", pool="p", agent_ids=["a", "b"], expires_at=1,
                          reason="host 'h' silent 30 s"),
            [Transition("a", "failed", "host 'h' silent 30 s"),
             Transition("b", "failed", "host 'h' silent 30 s")],
        ),
        (ev.Heartbeat(agent_id="a", host_id="h", task_id=None, rss_bytes=1), []),
    ],
)  # fmt: skip
def test_each_event_moves_the_agents_it_names(event: ev.Event, wanted: list[Transition]) -> None:
    assert transitions(event) == wanted


def test_the_end_of_a_run_moves_only_the_agent_running_that_task() -> None:
    busy = fold(None, Transition("a", "busy", "runs t", "t"))
    assert busy == AgentNow("busy", "t")
    stray = Transition("a", "idle", "attempt 1 of u failed: E", "u", ends_run=True)
    assert fold(busy, stray) == busy  # a report about another task says nothing of now
    assert fold(busy, Transition("a", "idle", "answered t", "t", ends_run=True)) == AgentNow("idle")


def test_a_late_report_about_an_earlier_attempt_of_the_task_it_runs_again_ends_nothing() -> None:
    (again,) = transitions(
        ev.TaskDispatched(task_id="t", pool="p", agent_id="a", host_id="h", attempt=2,
                          input="x", deliberation_id=None)
    )  # fmt: skip
    busy = fold(AgentNow("idle"), again)
    assert busy == AgentNow("busy", "t", 2)

    def failed(attempt: int) -> Transition:
        (change,) = transitions(
            ev.TaskFailed(task_id="t", agent_id="a", attempt=attempt, error_type="E",
                          error_message="", deliberation_id=None)
        )  # fmt: skip
        return change

    assert fold(busy, failed(1)) == busy  # attempt 1's failure, witnessed again
    assert fold(busy, failed(2)) == AgentNow("idle")
    answered = Transition("a", "idle", "answered t", "t", ends_run=True)  # no attempt: the last
    assert fold(busy, answered) == AgentNow("idle")


def test_a_registration_while_busy_leaves_it_busy_and_otherwise_says_registered() -> None:
    busy = AgentNow("busy", "t")
    again = Transition("a", "registered", "on host 'h' in pool 'p'")
    assert fold(busy, again) == busy
    assert fold(AgentNow("lost"), again) == AgentNow("registered")
    assert fold(AgentNow("failed"), again) == AgentNow("registered")  # its host started anew
    assert fold(AgentNow("lost"), Transition("a", "busy", "runs t", "t")) == AgentNow("busy", "t")

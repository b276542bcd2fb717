"""The workflow domain: template grammar, DAG checks, and the processor's pure rules
(each step submitted exactly once, only after every dependency completed; only the
accepted output is ever used; a failed step fails the workflow)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conclave.domain import workflows as wf
from conclave.domain.events import (
    Priority,
    WorkflowCancelRequested,
    WorkflowEnded,
    WorkflowRejected,
    WorkflowRunRequested,
    WorkflowStarted,
    WorkflowStepCompleted,
    WorkflowStepSubmitted,
)

FAN = {
    "name": "fan",
    "steps": [
        {"name": "a", "input": "topic: {{ input.topic }}"},
        {"name": "b", "input": "b of {{ steps.a.output }}"},
        {"name": "c", "input": "c of {{steps.a.output}}", "priority": "high", "pool": "p2"},
        {"name": "d", "input": "{{ steps.b.output }} + {{ steps.c.output }}", "max_attempts": 3},
    ],
}


# -- templates ---------------------------------------------------------------------------


def test_references_follow_the_fixed_grammar() -> None:
    refs = wf.references("{{ input }} {{input.a.b}} {{ steps.x-1.output }} {{ steps.y.output.k }}")
    assert refs == [
        wf.Ref(None, ()),
        wf.Ref(None, ("a", "b")),
        wf.Ref("x-1", ()),
        wf.Ref("y", ("k",)),
    ]


@pytest.mark.parametrize(
    "template",
    [
        "{{ __import__('os') }}",
        "{{ input + 1 }}",
        "{{ steps.a }}",
        "{{ steps.a.input }}",
        "{{ }}",
        "{{ input.a[0] }}",
        "{{ steps.a.output|upper }}",
    ],
)
def test_anything_else_between_braces_is_refused(template: str) -> None:
    with pytest.raises(wf.InvalidWorkflow, match="bad reference"):
        wf.references(template)


def test_render_puts_strings_as_they_are_and_other_values_as_json() -> None:
    value = {"topic": "tides", "n": 3, "tags": ["x", "y"], "deep": {"k": None}}
    outputs = {"a": '{"url": "u", "n": [1, 2]}', "b": "plain"}
    text = "{{input.topic}}|{{ input.n }}|{{ input.tags }}|{{ input.tags.1 }}|{{ input.deep }}"
    assert wf.render(text, value, outputs) == 'tides|3|["x","y"]|y|{"k":null}'
    assert wf.render("{{ steps.a.output.url }} {{ steps.a.output.n }}", None, outputs) == "u [1,2]"
    assert (
        wf.render("{{ steps.b.output }}: no {{ braces }", None, outputs) == "plain: no {{ braces }"
    )


def test_render_refuses_a_path_the_value_lacks_and_a_non_json_output_path() -> None:
    with pytest.raises(wf.InvalidWorkflow, match=r"input\.topic\.x"):
        wf.render("{{ input.topic.x }}", {"topic": "t"}, {})
    with pytest.raises(wf.InvalidWorkflow, match="not JSON"):
        wf.render("{{ steps.b.output.k }}", None, {"b": "plain"})


def test_rendering_never_evaluates_the_values_it_inserts() -> None:
    """A value that looks like a template is inserted as text, not rendered again."""
    assert wf.render("{{ input }}", "{{ steps.a.output }}", {"a": "secret"}) == (
        "{{ steps.a.output }}"
    )


# -- definitions -------------------------------------------------------------------------


def test_a_definition_is_normalised_with_template_references_as_dependencies() -> None:
    spec = wf.parse(FAN, {"topic": "t"})
    assert [s.depends_on for s in spec.steps] == [(), ("a",), ("a",), ("b", "c")]
    assert spec.steps[2].priority is Priority.HIGH
    assert spec.steps[2].pool == "p2"
    assert wf.parse(json.loads(spec.to_json())) == spec


def test_steps_may_be_a_mapping_and_inputs_structured() -> None:
    spec = wf.parse({"steps": {"a": {"input": {"q": "{{ input }}"}}, "b": {"depends_on": "a"}}})
    assert spec.steps[0].input == '{"q": "{{ input }}"}'
    assert spec.steps[1].depends_on == ("a",)


@pytest.mark.parametrize(
    ("definition", "reason"),
    [
        ({"steps": [{"name": "a", "input": "{{ steps.zz.output }}"}]}, "unknown step 'zz'"),
        ({"steps": [{"name": "a", "depends_on": ["b"]}]}, "unknown step 'b'"),
        ({"steps": [{"name": "a", "input": "{{ steps.a.output }}"}]}, "depends on itself"),
        (
            {
                "steps": [
                    {"name": "a", "input": "{{ steps.c.output }}"},
                    {"name": "b", "depends_on": ["a"]},
                    {"name": "c", "depends_on": ["b"]},
                ]
            },
            "cycle: a -> c -> b -> a",
        ),
        ({"steps": [{"name": "a"}, {"name": "a"}]}, "unique: a"),
        ({"steps": []}, "non-empty"),
        ({"steps": [{"name": "a b"}]}, "step name"),
        ({"steps": [{"name": "a", "retries": 3}]}, "unknown field"),
        ({"steps": [{"name": "a", "priority": "urgent"}]}, "unknown priority"),
        ({"steps": [{"name": "a", "max_attempts": 0}]}, "max_attempts"),
        ({"steps": [{"name": "a", "input": "{{ input.missing }}"}]}, "input.missing"),
        ({"stepz": []}, "unknown workflow field"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_definitions_are_refused_with_the_reason(definition: Any, reason: str) -> None:
    with pytest.raises(wf.InvalidWorkflow) as caught:
        wf.parse(definition, {"topic": "t"})
    assert reason in str(caught.value)


# -- the processor's rules -----------------------------------------------------------------


def run(state: wf.WorkflowsState, wid: str, definition: Any, input: Any) -> list[wf.Decision]:
    request = WorkflowRunRequested(
        workflow_id=wid, definition_json=json.dumps(definition), input_json=json.dumps(input)
    )
    out = wf.decide(state, request, f"ev-{wid}", "tenant-a")
    for d in out:
        wf.evolve(state, d)
    return out + wf.settle(state)


def submitted(decisions: list[wf.Decision]) -> dict[str, str]:
    return {d.step: d.input for d in decisions if isinstance(d, WorkflowStepSubmitted)}


def complete(state: wf.WorkflowsState, task_id: str, content: str) -> list[wf.Decision]:
    wf.observe_output(state, task_id, f"out-{task_id}", content)
    wf.observe_end(state, task_id, "completed", f"out-{task_id}", "")
    return wf.settle(state)


def test_fan_out_and_in_renders_each_step_from_the_accepted_outputs() -> None:
    state = wf.WorkflowsState()
    first = run(state, "w1", FAN, {"topic": "tides"})
    assert isinstance(first[0], WorkflowStarted)
    assert first[0].tenant == "tenant-a"
    assert submitted(first) == {"a": "topic: tides"}
    # A forged output (another event id) is seen first; the accepted one is named later.
    wf.observe_output(state, "w1.a", "forged", "FORGED")
    assert complete(state, "w1.a", "A")[0] == WorkflowStepCompleted(
        workflow_id="w1", step="a", task_id="w1.a", output_event_id="out-w1.a", output="A"
    )
    assert set(submitted(wf.settle(state, ["w1"]))) == set()  # nothing twice
    assert submitted(complete(state, "w1.b", "B")) == {}  # d waits for c too
    last = complete(state, "w1.c", "C")
    assert submitted(last) == {"d": "B + C"}
    ended = complete(state, "w1.d", "D")[-1]
    assert isinstance(ended, WorkflowEnded)
    assert ended.outcome == "completed"
    assert state.ended == {"w1": "completed"}
    assert not state.running


def test_a_completion_before_its_output_waits_for_the_named_output() -> None:
    state = wf.WorkflowsState()
    run(state, "w", {"steps": [{"name": "a"}, {"name": "b", "input": "{{ steps.a.output }}"}]}, 0)
    wf.observe_end(state, "w.a", "completed", "accepted", "")
    wf.observe_output(state, "w.a", "other", "wrong")
    assert wf.settle(state) == []
    wf.observe_output(state, "w.a", "accepted", "right")
    assert submitted(wf.settle(state)) == {"b": "right"}


def test_a_failed_step_fails_the_workflow_cancels_the_running_and_skips_the_rest() -> None:
    state = wf.WorkflowsState()
    run(state, "w", FAN, {"topic": "t"})
    complete(state, "w.a", "A")
    wf.observe_end(state, "w.b", "dead_lettered", None, "boom")
    (ended,) = wf.settle(state)
    assert ended == WorkflowEnded(
        workflow_id="w",
        outcome="failed",
        failed_step="b",
        reason="dead_lettered: boom",
        skipped_steps=["d"],
        cancelled_steps=["c"],
    )
    assert complete(state, "w.c", "late") == []  # nothing after the end


def test_an_output_path_the_answer_lacks_fails_the_step_that_reads_it() -> None:
    state = wf.WorkflowsState()
    run(state, "w", {"steps": [{"name": "a"}, {"name": "b", "input": "{{steps.a.output.x}}"}]}, 0)
    (done, ended) = complete(state, "w.a", '{"y": 1}')
    assert isinstance(done, WorkflowStepCompleted)
    assert isinstance(ended, WorkflowEnded)
    assert ended.failed_step == "b"
    assert "steps.a.output.x" in ended.reason


def test_cancel_ends_a_running_workflow_and_is_refused_for_others() -> None:
    state = wf.WorkflowsState()
    run(state, "w", FAN, {"topic": "t"})
    (ended,) = wf.decide(state, WorkflowCancelRequested(workflow_id="w", reason="r"), "e", "t")
    assert isinstance(ended, WorkflowEnded)
    assert (ended.outcome, ended.cancelled_steps, ended.skipped_steps) == (
        "cancelled",
        ["a"],
        ["b", "c", "d"],
    )
    wf.evolve(state, ended)
    (again,) = wf.decide(state, WorkflowCancelRequested(workflow_id="w"), "e2", "t")
    assert isinstance(again, WorkflowRejected)
    assert "is cancelled" in again.reason
    (unknown,) = wf.decide(state, WorkflowCancelRequested(workflow_id="nope"), "e3", "t")
    assert isinstance(unknown, WorkflowRejected)
    assert "unknown" in unknown.reason


def test_bad_runs_are_rejected_with_the_reason() -> None:
    state = wf.WorkflowsState()
    run(state, "w", FAN, {"topic": "t"})
    cases = [
        ("w", FAN, {"topic": "t"}, "exists already"),
        ("x/y", FAN, {"topic": "t"}, "workflow_id"),
        ("v", FAN, {"other": 1}, "input.topic"),
        ("u", {"steps": [{"name": "a", "depends_on": ["a"]}]}, None, "depends on itself"),
    ]
    for wid, definition, input, reason in cases:
        (rejected,) = run(state, wid, definition, input)
        assert isinstance(rejected, WorkflowRejected)
        assert reason in rejected.reason


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """Steps ``s<i>`` depending on earlier ones, each dependency either read in the input
    template (the step waits for the output) or only named in ``depends_on`` (the step
    may go to the scheduler early, its task waiting there)."""
    n = draw(st.integers(1, 8))
    steps = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        read = {d for d in deps if draw(st.booleans())}
        refs = " ".join(f"[{{{{ steps.s{d}.output }}}}]" for d in sorted(read))
        named = [f"s{d}" for d in sorted(deps - read)]
        steps.append({"name": f"s{i}", "input": f"s{i}:{refs}", "depends_on": named})
    return {"steps": steps}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.large_base_example])
@given(dags(), st.data())
def test_each_step_is_submitted_exactly_once_and_only_after_its_dependencies(
    definition: dict[str, Any], data: st.DataObject
) -> None:
    """Observations arrive in any order, repeated, with forged outputs among them, and the
    state is sometimes rebuilt from a snapshot (a restart): every step is still submitted
    once; a step that reads outputs only after its dependencies completed, with their
    accepted outputs; one that reads none after they were submitted, naming those not
    completed yet as its task's dependencies (a task completes only after those)."""
    state = wf.WorkflowsState()
    log = run(state, "w", definition, None)
    spec = {s.name: s for s in wf.parse(definition).steps}
    finished: set[str] = set()  # steps whose task the scheduler completed

    def completed_in_log() -> set[str]:
        return {d.step for d in log if isinstance(d, WorkflowStepCompleted)}

    while state.running:
        done = completed_in_log()
        # a task runs once its scheduler dependencies completed
        runnable = sorted(
            s for s in submitted(log)
            if s not in done and all(d in finished for d in spec[s].depends_on)
        )  # fmt: skip
        step = data.draw(st.sampled_from(runnable))
        task = f"w.{step}"
        kind = data.draw(st.sampled_from(["both", "output", "forged", "end", "restart"]))
        if kind in ("both", "output"):
            wf.observe_output(state, task, f"ok-{step}", f"<{step}>")
        if kind in ("both", "end"):
            wf.observe_end(state, task, "completed", f"ok-{step}", "")
            finished.add(step)
        if kind == "forged":
            wf.observe_output(state, task, f"forged-{data.draw(st.integers(0, 9))}", "FORGED")
        if kind == "restart":
            state = wf.from_snapshot(json.loads(json.dumps(wf.to_snapshot(state))))
        log += wf.settle(state)
    subs = [d for d in log if isinstance(d, WorkflowStepSubmitted)]
    assert sorted(d.step for d in subs) == sorted(spec)  # each once
    position = {id(d): i for i, d in enumerate(log)}
    at = {d.step: position[id(d)] for d in subs}
    done_at = {d.step: position[id(d)] for d in log if isinstance(d, WorkflowStepCompleted)}
    for d in subs:
        here = position[id(d)]
        for dep in spec[d.step].depends_on:
            if done_at[dep] < here:
                assert f"w.{dep}" not in d.depends_on
            else:  # went early: only without reading outputs, the scheduler holding it
                assert not spec[d.step].reads_outputs
                assert at[dep] < here
                assert f"w.{dep}" in d.depends_on
        read = sorted(r.step for r in wf.references(spec[d.step].input) if r.step)
        assert d.input == f"{d.step}:" + " ".join(f"[<{r}>]" for r in read)  # never forged
    assert isinstance(log[-1], WorkflowEnded)
    assert log[-1].outcome == "completed"


def test_a_chain_that_reads_no_output_goes_to_the_scheduler_at_once() -> None:
    state = wf.WorkflowsState()
    chain = {"steps": [{"name": "a"}, {"name": "b", "depends_on": "a"}, {"name": "c",
             "depends_on": "b"}, {"name": "d", "input": "{{ steps.c.output }}"}]}  # fmt: skip
    out = run(state, "w", chain, None)
    subs = [d for d in out if isinstance(d, WorkflowStepSubmitted)]
    assert [(d.step, d.depends_on) for d in subs] == [("a", []), ("b", ["w.a"]), ("c", ["w.b"])]
    complete(state, "w.a", "A")
    complete(state, "w.b", "B")
    assert submitted(complete(state, "w.c", "C")) == {"d": "C"}
    # pools in different scheduler shards: no early submission
    state = wf.WorkflowsState()
    apart = {"steps": [{"name": "a", "pool": "p1"}, {"name": "b", "depends_on": "a"}]}
    assert submitted(run(state, "v", apart, 0)) == {"a": ""}

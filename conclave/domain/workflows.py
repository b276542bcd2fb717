"""Workflows: DAGs of named steps, each run as one task. The workflow processor's rules.

Pure: no I/O, no clock. A definition (:func:`parse`) names steps, each with its pool or
agent, priority, attempts and an **input template** that may read the workflow's input and
earlier steps' outputs::

    {{ input }}                     the whole input (JSON text unless it is a string)
    {{ input.topic }}               a field of the input (dotted path)
    {{ steps.research.output }}     the accepted answer of step ``research``
    {{ steps.research.output.url }} a field of that answer, read as JSON

That fixed grammar is matched by one regular expression and substituted: no expression
is ever evaluated. A reference to a step makes it a dependency. Unknown steps, paths the
input lacks, malformed ``{{ }}`` and cycles are refused when the workflow is submitted.

The processor folds its own decisions (:func:`evolve`) and observes the scheduler's facts
about step tasks (:func:`observe_output`, :func:`observe_end`); :func:`settle` then says
what follows: a completed step (its output is the one ``task.completed`` names, never
another output of the same task), the next steps submitted once *all* their
dependencies completed (a step whose input reads no output: once they were submitted,
with the unfinished ones as its task's ``depends_on``, so the scheduler releases it
without a round trip through this processor), or the end of the workflow. Observations
are idempotent and only concern open steps, so folding the inputs again after a restart
decides nothing twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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

__all__ = [
    "MAX_STEPS",
    "Decision",
    "InvalidWorkflow",
    "Step",
    "StepSpec",
    "Workflow",
    "WorkflowSpec",
    "WorkflowsState",
    "decide",
    "evolve",
    "from_snapshot",
    "observe_end",
    "observe_output",
    "parse",
    "references",
    "render",
    "settle",
    "step_of",
    "task_id_of",
    "to_snapshot",
]

MAX_STEPS = 1000
MAX_INPUT_BYTES = 900_000
"""A rendered input must fit in one task (:data:`conclave.domain.validation.MAX_INPUT_BYTES`)."""
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
WORKFLOW_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
"""Step task ids are ``<workflow id>.<step>``: within the scheduler's 200 characters."""
_BRACES = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_REF = re.compile(
    r"\s*(?:input(?P<ipath>(?:\.[A-Za-z0-9_-]+)*)"
    r"|steps\.(?P<step>[A-Za-z0-9_-]{1,64})\.output(?P<opath>(?:\.[A-Za-z0-9_-]+)*))\s*"
)
_STEP_KEYS = frozenset(
    {"name", "pool", "agent", "agent_id", "priority", "max_attempts", "input", "depends_on"}
)

Decision = (
    WorkflowStarted
    | WorkflowRejected
    | WorkflowStepSubmitted
    | WorkflowStepCompleted
    | WorkflowEnded
)
Request = WorkflowRunRequested | WorkflowCancelRequested


class InvalidWorkflow(ValueError):
    """A definition, input or template that cannot run; the message says why."""


@dataclass(frozen=True, slots=True)
class Ref:
    """One ``{{ }}`` reference: ``step`` is ``None`` for the input."""

    step: str | None
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    input: str
    """The template."""
    pool: str = "default"
    agent_id: str | None = None
    priority: Priority = Priority.NORMAL
    max_attempts: int = 1
    depends_on: tuple[str, ...] = ()
    """Explicit dependencies and every step the template reads, sorted."""
    reads_outputs: bool = field(default=False, compare=False)
    """Whether the template reads a step's output (else the step may be submitted before
    its dependencies complete, for the scheduler to hold)."""


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    name: str
    steps: tuple[StepSpec, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "steps": [
                    {
                        "name": s.name,
                        "pool": s.pool,
                        "agent": s.agent_id,
                        "priority": s.priority.label,
                        "max_attempts": s.max_attempts,
                        "input": s.input,
                        "depends_on": list(s.depends_on),
                    }
                    for s in self.steps
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def references(template: str) -> list[Ref]:
    """Every reference in ``template``; anything between ``{{ }}`` outside the grammar is
    :class:`InvalidWorkflow`."""
    found = []
    for match in _BRACES.finditer(template):
        ref = _REF.fullmatch(match.group(1))
        if ref is None:
            raise InvalidWorkflow(
                f"bad reference {match.group(0)!r} (expected {{{{ input[.path] }}}} or "
                f"{{{{ steps.NAME.output[.path] }}}})"
            )
        if ref.group("step") is not None:
            path = ref.group("opath")
            found.append(Ref(ref.group("step"), tuple(path.split(".")[1:]) if path else ()))
        else:
            path = ref.group("ipath")
            found.append(Ref(None, tuple(path.split(".")[1:]) if path else ()))
    return found


def render(template: str, input: Any, outputs: Mapping[str, str]) -> str:
    """``template`` with every reference replaced: strings as they are, anything else as
    compact JSON. A path the value lacks is :class:`InvalidWorkflow`."""

    def one(match: re.Match[str]) -> str:
        (ref,) = references(match.group(0))
        if ref.step is None:
            value = _walk(input, ref.path, "input")
        else:
            if ref.step not in outputs:
                raise InvalidWorkflow(f"step {ref.step!r} has no output yet")
            value = outputs[ref.step]
            if ref.path:
                try:
                    parsed = json.loads(value)
                except ValueError:
                    raise InvalidWorkflow(
                        f"steps.{ref.step}.output is not JSON, so it has no field "
                        f"{'.'.join(ref.path)!r}"
                    ) from None
                value = _walk(parsed, ref.path, f"steps.{ref.step}.output")
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    return _BRACES.sub(one, template)


def _walk(value: Any, path: tuple[str, ...], where: str) -> Any:
    for i, key in enumerate(path):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise InvalidWorkflow(f"{where} has no {'.'.join((where, *path[: i + 1]))!r}")
    return value


def parse(definition: Any, input: Any = None) -> WorkflowSpec:
    """A definition (the mapping a YAML or JSON file holds) checked and normalised:
    every reference known, no cycle, and (``input`` given) every ``{{ input.path }}``
    present in it."""
    if not isinstance(definition, dict):
        raise InvalidWorkflow("a workflow definition is a mapping with 'steps'")
    unknown = set(definition) - {"name", "steps"}
    if unknown:
        raise InvalidWorkflow(f"unknown workflow field(s): {', '.join(sorted(unknown))}")
    name = definition.get("name", "workflow")
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise InvalidWorkflow("name must be a string of 1-200 characters")
    raw_steps = definition.get("steps")
    if isinstance(raw_steps, dict):  # steps: {name: {...}} reads well in YAML
        raw_steps = [{"name": k, **v} if isinstance(v, dict) else v for k, v in raw_steps.items()]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InvalidWorkflow("steps must be a non-empty list (or mapping) of steps")
    if len(raw_steps) > MAX_STEPS:
        raise InvalidWorkflow(f"{len(raw_steps)} steps; at most {MAX_STEPS}")
    steps = [_step(raw, input) for raw in raw_steps]
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidWorkflow(f"step names must be unique: {', '.join(dup)}")
    known = set(names)
    for step in steps:
        for dep in step.depends_on:
            if dep not in known:
                raise InvalidWorkflow(f"step {step.name!r} references unknown step {dep!r}")
            if dep == step.name:
                raise InvalidWorkflow(f"step {step.name!r} depends on itself")
    cycle = _cycle({s.name: s.depends_on for s in steps})
    if cycle:
        raise InvalidWorkflow(f"cycle: {' -> '.join(cycle)}")
    return WorkflowSpec(name, tuple(steps))


def _step(raw: Any, input: Any) -> StepSpec:
    if not isinstance(raw, dict):
        raise InvalidWorkflow("each step is a mapping with a name and an input")
    name = raw.get("name")
    if not isinstance(name, str) or NAME.fullmatch(name) is None:
        raise InvalidWorkflow(f"step name {name!r} must be 1-64 of A-Z a-z 0-9 _ -")
    unknown = set(raw) - _STEP_KEYS
    if unknown:
        raise InvalidWorkflow(f"step {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    template = raw.get("input", "")
    if not isinstance(template, str):
        template = json.dumps(template)  # a structured input in YAML: its JSON text
    pool = raw.get("pool", "default")
    agent = raw.get("agent", raw.get("agent_id"))
    if not isinstance(pool, str) or not pool or len(pool) > 200 or "/" in pool:
        raise InvalidWorkflow(f"step {name!r}: pool must be 1-200 characters without '/'")
    if agent is not None and (not isinstance(agent, str) or not 0 < len(agent) <= 200):
        raise InvalidWorkflow(f"step {name!r}: agent must be 1-200 characters")
    try:
        priority = Priority.parse(str(raw.get("priority", "normal")))
    except ValueError as exc:
        raise InvalidWorkflow(f"step {name!r}: {exc}") from None
    attempts = raw.get("max_attempts", 1)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 100:
        raise InvalidWorkflow(f"step {name!r}: max_attempts must be 1-100")
    depends = raw.get("depends_on", [])
    if isinstance(depends, str):
        depends = [depends]
    if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
        raise InvalidWorkflow(f"step {name!r}: depends_on must be a list of step names")
    try:
        refs = references(template)
    except InvalidWorkflow as exc:
        raise InvalidWorkflow(f"step {name!r}: {exc}") from None
    for ref in refs:
        if ref.step is None and input is not None:
            try:
                _walk(input, ref.path, "input")
            except InvalidWorkflow as exc:
                raise InvalidWorkflow(f"step {name!r}: {exc}") from None
    reads = {r.step for r in refs if r.step is not None}
    deps = sorted({*depends, *reads})
    return StepSpec(name, template, pool, agent, priority, attempts, tuple(deps), bool(reads))


def _cycle(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """A cycle of ``graph`` (step -> its dependencies) as a path, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    for root in graph:
        if root in state:
            continue
        stack = [(root, iter(graph[root]))]
        state[root] = 1
        path.append(root)
        while stack:
            node, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                stack.append((dep, iter(graph[dep])))
    return []


def task_id_of(workflow_id: str, step: str) -> str:
    return f"{workflow_id}.{step}"


def step_of(task_id: str) -> tuple[str, str] | None:
    workflow_id, dot, step = task_id.partition(".")
    return (workflow_id, step) if dot else None


# -- state -----------------------------------------------------------------------------


@dataclass(slots=True)
class Step:
    spec: StepSpec
    status: str = "pending"
    """``pending``, ``submitted``, ``completed``, ``failed``, ``skipped``, ``cancelled``."""
    output: str | None = None
    outputs_seen: dict[str, str] = field(default_factory=dict)
    """Output event id -> content, of this step's task, until it completes."""
    ended: tuple[str, str | None, str] | None = None
    """The task's end as observed: (outcome, output event id, reason)."""


@dataclass(slots=True)
class Workflow:
    workflow_id: str
    spec: WorkflowSpec
    input: Any
    tenant: str
    steps: dict[str, Step]


@dataclass(slots=True)
class WorkflowsState:
    running: dict[str, Workflow] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)
    """Workflow id -> outcome, of every workflow that ended (a re-run is refused)."""
    dirty: set[str] = field(default_factory=set)
    """Running workflows with observations :func:`settle` has not looked at."""


def decide(state: WorkflowsState, request: Request, event_id: str, tenant: str) -> list[Decision]:
    """Answer a run or cancel request (then :func:`settle` submits the first steps)."""
    wid = request.workflow_id
    if isinstance(request, WorkflowCancelRequested):
        wf = state.running.get(wid)
        if wf is None:
            why = f"is {state.ended[wid]}" if wid in state.ended else "is unknown"
            return [
                WorkflowRejected(
                    workflow_id=wid,
                    action="cancel",
                    request_event_id=event_id,
                    reason=f"workflow {wid!r} {why}",
                )
            ]
        reason = f"cancelled: {request.reason}" if request.reason else "cancelled"
        return [_end(wf, "cancelled", None, reason)]
    if WORKFLOW_ID.fullmatch(wid) is None:
        return [_reject(wid[:100], event_id, "workflow_id must be 1-100 of A-Z a-z 0-9 _ -")]
    if wid in state.running or wid in state.ended:
        return [_reject(wid, event_id, f"workflow {wid!r} exists already")]
    try:
        input = json.loads(request.input_json)
        spec = parse(json.loads(request.definition_json), input)
    except ValueError as exc:  # InvalidWorkflow, or JSON that does not parse
        return [_reject(wid, event_id, str(exc))]
    return [
        WorkflowStarted(
            workflow_id=wid,
            name=spec.name,
            definition_json=spec.to_json(),
            input_json=request.input_json,
            tenant=tenant,
        )
    ]


def _reject(wid: str, event_id: str, reason: str) -> WorkflowRejected:
    return WorkflowRejected(workflow_id=wid, action="run", request_event_id=event_id, reason=reason)


def observe_output(state: WorkflowsState, task_id: str, event_id: str, content: str) -> None:
    """An agent's output for ``task_id`` (any: forged ones too; only the accepted one is
    ever used)."""
    step = _open_step(state, task_id)
    if step is not None and step[1].status == "submitted":
        step[1].outputs_seen[event_id] = content
        state.dirty.add(step[0].workflow_id)


def observe_end(
    state: WorkflowsState, task_id: str, outcome: str, output_event_id: str | None, reason: str
) -> None:
    """The scheduler ended ``task_id`` (``completed`` naming its accepted output, or
    ``dead_lettered``, ``cancelled``, ``expired``, ``dependency_failed``, ``rejected``)."""
    step = _open_step(state, task_id)
    if step is not None and step[1].status == "submitted" and step[1].ended is None:
        step[1].ended = (outcome, output_event_id, reason)
        state.dirty.add(step[0].workflow_id)


def _open_step(state: WorkflowsState, task_id: str) -> tuple[Workflow, Step] | None:
    ids = step_of(task_id)
    if ids is None:
        return None
    wf = state.running.get(ids[0])
    step = wf.steps.get(ids[1]) if wf is not None else None
    return (wf, step) if wf is not None and step is not None else None


def is_open(state: WorkflowsState, task_id: str) -> bool:
    """Whether ``task_id`` is a submitted step still running (cheap: no decoding)."""
    step = _open_step(state, task_id)
    return step is not None and step[1].status == "submitted"


def _same_pool(a: str, b: str) -> bool:
    return a == b


def settle(
    state: WorkflowsState,
    workflow_ids: Iterable[str] | None = None,
    *,
    same_shard: Callable[[str, str], bool] = _same_pool,
) -> list[Decision]:
    """Everything the observations (and a fresh start) decide, evolved into ``state``.

    ``same_shard(pool_a, pool_b)``: whether two pools share a scheduler shard, so that a
    task of one may depend on a task of the other (scheduler dependencies resolve within
    a shard); a step whose input reads no output is then submitted with its unfinished
    dependencies as the task's ``depends_on``, one hop earlier."""
    out: list[Decision] = []
    ids = sorted(state.dirty if workflow_ids is None else workflow_ids)
    state.dirty.difference_update(ids)
    for wid in ids:
        wf = state.running.get(wid)
        if wf is None:
            continue
        for decision in _settle(wf, same_shard):
            evolve(state, decision)
            out.append(decision)
    return out


def _settle(wf: Workflow, same_shard: Callable[[str, str], bool]) -> list[Decision]:
    out: list[Decision] = []
    failed = [
        s for s in wf.steps.values()
        if s.status == "submitted" and s.ended is not None and s.ended[0] != "completed"
    ]  # fmt: skip
    if failed:
        # The culprit, rather than a step the scheduler failed because it waited on it.
        step = min(failed, key=lambda s: s.ended is not None and s.ended[0] == "dependency_failed")
        assert step.ended is not None
        outcome, _, reason = step.ended
        return [_end(wf, "failed", step.spec.name, f"{outcome}: {reason}")]
    for step in wf.steps.values():
        if step.status != "submitted" or step.ended is None:
            continue
        _, output_id, _ = step.ended
        if output_id is None or output_id not in step.outputs_seen:
            continue  # the accepted output is not read yet; it follows the completion
        completed = WorkflowStepCompleted(
            workflow_id=wf.workflow_id,
            step=step.spec.name,
            task_id=task_id_of(wf.workflow_id, step.spec.name),
            output_event_id=output_id,
            output=step.outputs_seen[output_id],
        )
        _fold_step(wf, completed)
        out.append(completed)
    outputs = {n: s.output for n, s in wf.steps.items() if s.status == "completed"}
    if len(outputs) == len(wf.steps):
        return [*out, _end(wf, "completed", None, "every step completed")]
    progressed = True
    while progressed:  # a step submitted early may let the next one go early too
        progressed = False
        for step in wf.steps.values():
            decision = _submit(wf, step, outputs, same_shard)
            if isinstance(decision, WorkflowEnded):
                return [*out, decision]
            if decision is not None:
                _fold_step(wf, decision)
                out.append(decision)
                progressed = True
    return out


def _submit(
    wf: Workflow,
    step: Step,
    outputs: Mapping[str, str | None],
    same_shard: Callable[[str, str], bool],
) -> WorkflowStepSubmitted | WorkflowEnded | None:
    """``step`` submitted, if it may go now; the workflow's end if its input cannot be
    rendered."""
    if step.status != "pending":
        return None
    waits = [d for d in step.spec.depends_on if d not in outputs]
    if waits and (
        step.spec.reads_outputs
        or any(wf.steps[d].status != "submitted" for d in waits)
        or not all(same_shard(wf.steps[d].spec.pool, step.spec.pool) for d in waits)
    ):
        return None
    try:
        rendered = render(step.spec.input, wf.input, {k: v or "" for k, v in outputs.items()})
    except InvalidWorkflow as exc:
        return _end(wf, "failed", step.spec.name, f"input: {exc}")
    if len(rendered.encode()) > MAX_INPUT_BYTES:
        reason = f"input: rendered to more than {MAX_INPUT_BYTES:,} bytes"
        return _end(wf, "failed", step.spec.name, reason)
    return WorkflowStepSubmitted(
        workflow_id=wf.workflow_id,
        step=step.spec.name,
        task_id=task_id_of(wf.workflow_id, step.spec.name),
        pool=step.spec.pool,
        agent_id=step.spec.agent_id,
        priority=step.spec.priority,
        max_attempts=step.spec.max_attempts,
        input=rendered,
        depends_on=[task_id_of(wf.workflow_id, d) for d in waits],
    )


def _end(wf: Workflow, outcome: str, failed_step: str | None, reason: str) -> WorkflowEnded:
    return WorkflowEnded(
        workflow_id=wf.workflow_id,
        outcome=outcome,
        failed_step=failed_step,
        reason=reason,
        skipped_steps=[n for n, s in wf.steps.items() if s.status == "pending"],
        cancelled_steps=[
            n for n, s in wf.steps.items() if s.status == "submitted" and n != failed_step
        ],
    )


def evolve(state: WorkflowsState, event: Decision) -> None:
    """Fold one decision (from :func:`decide` / :func:`settle`, or the changelog)."""
    match event:
        case WorkflowStarted():
            spec = parse(json.loads(event.definition_json))
            state.running[event.workflow_id] = Workflow(
                event.workflow_id,
                spec,
                json.loads(event.input_json),
                event.tenant,
                {s.name: Step(s) for s in spec.steps},
            )
            state.dirty.add(event.workflow_id)
        case WorkflowStepSubmitted() | WorkflowStepCompleted():
            wf = state.running.get(event.workflow_id)
            if wf is not None:
                _fold_step(wf, event)
        case WorkflowEnded():
            state.running.pop(event.workflow_id, None)
            state.dirty.discard(event.workflow_id)
            state.ended[event.workflow_id] = event.outcome
        case WorkflowRejected():
            pass


def _fold_step(wf: Workflow, event: WorkflowStepSubmitted | WorkflowStepCompleted) -> None:
    step = wf.steps.get(event.step)
    if step is None:
        return
    if isinstance(event, WorkflowStepSubmitted):
        if step.status == "pending":
            step.status = "submitted"
    elif step.status == "submitted":
        step.status = "completed"
        step.output = event.output
        step.outputs_seen.clear()
        step.ended = None


# -- snapshots -------------------------------------------------------------------------


def to_snapshot(state: WorkflowsState) -> dict[str, Any]:
    return {
        "version": 1,
        "ended": state.ended,
        "running": [
            {
                "id": wf.workflow_id,
                "definition": wf.spec.to_json(),
                "input": json.dumps(wf.input),
                "tenant": wf.tenant,
                "steps": {
                    name: {
                        "status": s.status,
                        "output": s.output,
                        "seen": s.outputs_seen,
                        "ended": list(s.ended) if s.ended is not None else None,
                    }
                    for name, s in wf.steps.items()
                },
            }
            for wf in state.running.values()
        ],
    }


def from_snapshot(data: Mapping[str, Any]) -> WorkflowsState:
    if data.get("version") != 1:
        raise ValueError(f"workflow snapshot version {data.get('version')!r}")
    state = WorkflowsState(ended=dict(data["ended"]))
    for raw in data["running"]:
        spec = parse(json.loads(raw["definition"]))
        steps = {}
        for s in spec.steps:
            saved = raw["steps"][s.name]
            ended = saved["ended"]
            steps[s.name] = Step(
                s,
                saved["status"],
                saved["output"],
                dict(saved["seen"]),
                (ended[0], ended[1], ended[2]) if ended is not None else None,
            )
        state.running[raw["id"]] = Workflow(
            raw["id"], spec, json.loads(raw["input"]), raw["tenant"], steps
        )
        state.dirty.add(raw["id"])
    return state

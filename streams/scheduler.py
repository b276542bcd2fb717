"""The scheduler processor: a thin shell around :mod:`conclave.domain.scheduling`.

One shard per pool partition (see :func:`conclave.topics.pool_partition`): shard ``i``
consumes partition ``i`` of the four command topics and of the agents topic, plus the
control topic (halt/resume) and the witness entries of its own tasks, and appends
queued / dispatched / stalled / retry-scheduled / completed / dead-lettered (and
agent-reinstated) events to partition ``i`` of the tasks topic; it also steps at its
earliest timer (an answer deadline, or the end of a retry's back-off).
A pool lives in exactly one shard, so its capacity is exact however many workers run
the shards.

Its state is a fold of its own output (the changelog) plus the agents and control
records it consumed (state-only inputs); see :mod:`streams.core` for how it is
recovered, and :mod:`conclave.domain.scheduling` for the rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import TopicPartition

from conclave import metrics
from conclave.bus import Outgoing, Position
from conclave.domain import scheduling
from conclave.domain.events import (
    AGENTS_TOPIC_EVENTS,
    TASK_ENDINGS,
    TASKS_TOPIC_EVENTS,
    AgentCircuitClosed,
    AgentCircuitHalfOpened,
    AgentCircuitOpened,
    AgentFailed,
    AgentRegistered,
    AgentReinstated,
    AgentRestarted,
    AgentRetired,
    CancelRequested,
    CommandRejected,
    DeliberationRequested,
    Envelope,
    Event,
    Halt,
    HostBeat,
    HostFailed,
    HostLeaving,
    HostLost,
    PoolConfigured,
    PoolStarved,
    Priority,
    ProjectionDigest,
    Resume,
    TaskCancelled,
    TaskCompleted,
    TaskDispatched,
    TaskExpired,
    TaskQueued,
    TaskStalled,
    TaskSubmitted,
    WitnessEntry,
    now_us,
)
from conclave.domain.scheduler_state import AgentSlot
from conclave.domain.scheduling import SchedulerEvent
from conclave.domain.validation import CONTROL_COMMANDS, invalid_command, invalid_tenant
from conclave.errors import SchemaError
from conclave.records import Record
from conclave.topics import BROADCAST_HEADER, HOST_HEADER, SHARD_HEADER, Topics
from conclave.tracing import TRACEPARENT, branch, hop
from streams.core import Emitter, Source

__all__ = ["SchedulerShard"]

log = logging.getLogger(__name__)

_CHANGELOG = TASKS_TOPIC_EVENTS
_FINISHED = TASK_ENDINGS
Command = TaskSubmitted | DeliberationRequested | CancelRequested
E = TypeVar("E", bound=SchedulerEvent)
_Decided = tuple[Envelope | None, SchedulerEvent, bytes | None]
"""A decision, the input that caused it (if one did) and the trace it continues (if not
the one its task began)."""
_ABOUT_AGENTS = (AgentReinstated, AgentCircuitOpened, AgentCircuitHalfOpened, AgentCircuitClosed)
QUIET_GAP_US = 3_000_000
"""Records stopped arriving for this long (a broker outage, a recovery, a stalled
process): hosts' beats may not have reached us either."""
HOST_GRACE_US = 5_000_000
"""After such a gap (and after starting), how long every host has to be heard from
before it can be judged lost."""


@dataclass(slots=True)
class _Origin:
    """Where a live task came from: every event about it carries the same tenant,
    correlation id and trace, whatever event let it move on."""

    tenant: str
    correlation_id: str
    traceparent: bytes | None
    pool: str = ""
    since: int | None = None
    """When the task was last queued or dispatched (µs since the epoch), for the
    dispatch-latency and duration metrics; not in snapshots (a restart loses one sample)."""
    dispatched: bool = False
    """An attempt of it has begun: queued again, it is a retry (for the metrics)."""

    def headers(self) -> list[tuple[str, bytes]]:
        return [(TRACEPARENT, self.traceparent)] if self.traceparent is not None else []


class SchedulerShard:
    processor = "scheduler"

    def __init__(
        self,
        topics: Topics,
        index: int,
        capacity: int,
        emitter: Emitter,
        *,
        answer_within_s: float | None = None,
        breaker_failures: int = 0,
        breaker_cooldown_s: float = 30.0,
        host_fail_after_s: float = 30.0,
    ) -> None:
        self.topics = topics
        self.index = index
        self.capacity = capacity
        self.emitter = emitter
        self.answer_within_us = (
            int(answer_within_s * 1_000_000) if answer_within_s is not None else None
        )
        """How long after a dispatch the scheduler waits for its answer before the
        attempt is stalled; ``None``: for ever."""
        self.breaker_failures = breaker_failures
        """Failed attempts in a row that open an agent's circuit; 0: no breakers."""
        self.breaker_cooldown_us = int(breaker_cooldown_s * 1_000_000)
        self.host_fail_after_us = int(host_fail_after_s * 1_000_000)
        """How long a lost host may stay silent after its lease ran out before it fails."""
        self.state = scheduling.SchedulerState(capacity=capacity)
        self.origins: dict[str, _Origin] = {}
        self._heard_at: int | None = None
        """When the last batch with records came (None: not since the start)."""
        self._judge_hosts_from: int | None = None
        """No host is judged lost before this (None: not stepped since the start)."""
        self._to_fence: set[str] = set()
        """Hosts to fence once the batch that judged them lost is committed."""
        self._recovered = True
        """Restored and not stepped yet: the hosts still lost are fenced again."""
        self._shard_header = b"%d" % index
        self._commands = set(topics.commands)
        self._priority_of = {topics.command(p): p for p in Priority}
        # What each non-command input topic may carry (commands are checked by
        # invalid_command). Anything else is dead-lettered, not ignored.
        self.accepts: dict[str, tuple[type[Any], ...]] = {
            # A projection digest is witnessed and changes nothing here.
            topics.control: (Halt, Resume, PoolConfigured, ProjectionDigest),
            topics.agents: AGENTS_TOPIC_EVENTS,
            topics.witness: (WitnessEntry,),
        }

    @property
    def name(self) -> str:
        return f"scheduler-{self.index}"

    def inputs(self) -> list[TopicPartition]:
        mine = [TopicPartition(t, self.index) for t in (*self.topics.commands, self.topics.agents)]
        return [
            *mine,
            TopicPartition(self.topics.control, 0),
            TopicPartition(self.topics.witness, 0),
        ]

    def changelog(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.tasks, self.index)]

    def state_inputs(self) -> list[TopicPartition]:
        return [
            TopicPartition(self.topics.agents, self.index),
            TopicPartition(self.topics.control, 0),
        ]

    def resume_at(self) -> Position | None:
        return None  # the positions committed with the outputs

    def restore(self, state: Mapping[str, Any] | None) -> None:
        self._heard_at = self._judge_hosts_from = None  # leases count again from the start
        self._to_fence = set()
        self._recovered = True
        if state is None:
            self.state = scheduling.SchedulerState(capacity=self.capacity)
            self.origins = {}
            return
        # Capacity is configuration, not history: this process's setting wins.
        self.state = scheduling.from_snapshot(state["domain"], capacity=self.capacity)
        tasks = self.state.tasks
        self.origins = {
            task_id: _Origin(
                tenant,
                correlation,
                bytes.fromhex(trace) if trace else None,
                tasks[task_id].pool if task_id in tasks else "",
                dispatched=task_id in tasks and tasks[task_id].attempt > 0,
            )
            for task_id, (tenant, correlation, trace) in state["origins"].items()
        }

    def snapshot(self) -> Mapping[str, Any]:
        return {
            "domain": scheduling.to_snapshot(self.state),
            "origins": {
                task_id: [
                    o.tenant,
                    o.correlation_id,
                    o.traceparent.hex() if o.traceparent else None,
                ]
                for task_id, o in self.origins.items()
            },
        }

    def fold(self, record: Record, source: Source) -> list[Outgoing]:
        try:
            envelope, event = self.emitter.codec.decode(record.value)
        except SchemaError as exc:
            return [
                self.emitter.dead_letter(record, reason=str(exc), error_type="SchemaError", now=0)
            ]
        expected = _CHANGELOG if source == "changelog" else self.accepts.get(record.topic, ())
        if not isinstance(event, expected):
            reason = f"{event.TYPE} does not belong on {record.topic}"
            return [
                self.emitter.dead_letter(record, reason=reason, error_type="InvalidEvent", now=0)
            ]
        if isinstance(event, ProjectionDigest):
            return []  # about the read models: no scheduling state
        assert isinstance(
            event,
            (*_CHANGELOG, *AGENTS_TOPIC_EVENTS, Halt, Resume, PoolConfigured),
        )
        if isinstance(event, CONTROL_COMMANDS) and (refused := invalid_command(event)):
            # Dead-lettered when it was consumed: a recovery must not fold it either.
            return [
                self.emitter.dead_letter(record, reason=refused, error_type="InvalidCommand", now=0)
            ]
        if isinstance(event, CommandRejected):
            return []  # changes no state: the command never became a task
        scheduling.evolve(self.state, event)
        if isinstance(event, TaskQueued) and event.task_id not in self.origins:
            traceparent = dict(record.headers).get(TRACEPARENT)
            self.origins[event.task_id] = _Origin(
                envelope.tenant, envelope.correlation_id, traceparent, event.pool
            )
        elif isinstance(event, _FINISHED):
            self.origins.pop(event.task_id, None)
        return []

    def step(
        self, records: Sequence[Record], now: int, unread: Mapping[TopicPartition, int]
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        decided: list[_Decided] = []
        deferred: list[tuple[Record, Envelope, Command]] = []
        for record in records:
            if record.topic == self.topics.witness and not self._concerns_me(record):
                continue  # another shard's task: skipped without decoding
            decoded = self.emitter.decode(record, now, out)
            if decoded is None:
                continue
            envelope, event = decoded
            if (
                isinstance(event, CancelRequested)
                or (isinstance(event, TaskSubmitted) and event.depends_on)
                or (isinstance(event, DeliberationRequested) and not event.agent_ids)
            ) and scheduling.refusal(self.state, event) is not None:
                # What it names (a task, a pool's agents) may be later in this batch, on
                # another topic: judged once the rest of the batch is in.
                deferred.append((record, envelope, event))
                continue
            self._take(record, envelope, event, now, out, decided)
        for record, envelope, command in deferred:
            self._take(record, envelope, command, now, out, decided)
        # What time alone decides, each folded before the next is judged: lost hosts,
        # attempts past their deadline, circuits that open or half-open; then dispatches,
        # once per batch (cheaper, and a burst is ranked as a whole).
        beats_unread = unread.get(TopicPartition(self.topics.agents, self.index), 0)
        if self._may_judge_hosts(now, bool(records)) and not beats_unread:
            for lost in self._fold(scheduling.lost_hosts(self.state, now), decided):
                if isinstance(lost, HostLost):
                    self._to_fence.add(lost.host_id)
                    if self.state.hosts[lost.host_id].leaving_until is not None:
                        log.info("%s: %s", self.name, lost.reason)
                        continue
                    metrics.hosts_lost.labels(lost.pool).inc()
                    log.warning("%s: %s", self.name, lost.reason)
            failed = scheduling.failed_hosts(self.state, now, self.host_fail_after_us)
            for host in self._fold(failed, decided):
                log.error("%s: %s", self.name, host.reason)
        self._fold(scheduling.expire(self.state, now), decided)
        opened = scheduling.tripped(
            self.state, now, threshold=self.breaker_failures, cooldown_us=self.breaker_cooldown_us
        )
        for circuit in self._fold(opened, decided):
            log.warning("%s: agent %r: %s", self.name, circuit.agent_id, circuit.reason)
        self._fold(scheduling.half_opened(self.state, now), decided)
        if self._recovered:  # the worker may have died between a judgement and its fence
            self._recovered = False
            self._to_fence |= self._lost_hosts()
        dispatches = scheduling.schedule(self.state, now, answer_within_us=self.answer_within_us)
        self._fold(dispatches, decided)
        self._fold(scheduling.starved(self.state, now), decided)  # what is left waits for agents
        for cause, decision, traceparent in decided:
            out.append(self._emit(decision, cause, now, traceparent))
        return out

    def _fold(self, events: list[E], decided: list[_Decided]) -> list[E]:
        """Fold decisions taken at the step's time, in order, to be written with it."""
        for event in events:
            scheduling.evolve(self.state, event)
            decided.append((None, event, None))
        return events

    def _take(
        self,
        record: Record,
        envelope: Envelope,
        event: Event,
        now: int,
        out: list[Outgoing],
        decided: list[_Decided],
    ) -> None:
        """One decoded input: refused, dead-lettered, decided on or folded."""
        if isinstance(event, Command) and (
            refusal := invalid_tenant(envelope.tenant) or self._refusal(record.topic, event)
        ):
            out.append(self._reject(envelope, event, refusal, now))
            return
        if (rejection := self._rejection(record.topic, event)) is not None:
            reason, error_type = rejection
            out.append(
                self.emitter.dead_letter(record, reason=reason, error_type=error_type, now=now)
            )
            return
        match event:
            case TaskSubmitted() | DeliberationRequested() | CancelRequested() | WitnessEntry():
                with hop(f"schedule {event.TYPE}", record.headers) as onward:
                    for outcome in scheduling.decide(
                        self.state, event, now, tenant=envelope.tenant
                    ):
                        scheduling.evolve(self.state, outcome)
                        if isinstance(outcome, TaskQueued) and outcome.task_id not in self.origins:
                            traceparent = (
                                branch("task", onward, **{"conclave.task_id": outcome.task_id})
                                if isinstance(event, DeliberationRequested)
                                else dict(onward).get(TRACEPARENT)
                            )
                            self.origins[outcome.task_id] = _Origin(
                                envelope.tenant, envelope.correlation_id, traceparent, outcome.pool
                            )
                        # A decision about the task the input is about (its completion,
                        # its retry) goes on in the input's trace, after this hop.
                        same = getattr(outcome, "task_id", None) == getattr(event, "task_id", "")
                        decided.append(
                            (envelope, outcome, dict(onward).get(TRACEPARENT) if same else None)
                        )
            case AgentRegistered():
                scheduling.evolve(self.state, event)
                for reinstated in scheduling.reinstate(self.state, event):
                    scheduling.evolve(self.state, reinstated)
                    decided.append((envelope, reinstated, None))
            case HostBeat():
                metrics.heartbeats.labels(event.pool).inc()
                lease = self.state.hosts.get(event.host_id)
                over = lease.over_limit if lease is not None else None
                scheduling.evolve(self.state, event)
                self._say_limits(event.host_id, over)
                if back := scheduling.revived(self.state, event):
                    log.info("%s: host %r is back", self.name, event.host_id)
                for reinstated in back:
                    scheduling.evolve(self.state, reinstated)
                    decided.append((envelope, reinstated, None))
            case AgentRestarted():
                pass  # its host's own doing: the agent takes work as before
            case AgentFailed():
                log.warning(
                    "%s: agent %r failed: %s", self.name, event.agent_id, event.reason[:200]
                )
                scheduling.evolve(self.state, event)
            case AgentRetired():
                log.info("%s: agent %r retired: %s", self.name, event.agent_id, event.reason)
                scheduling.evolve(self.state, event)
            case HostLeaving():
                log.info(
                    "%s: host %r is leaving (%s), its agents take no new work",
                    self.name,
                    event.host_id,
                    event.reason[:200],
                )
                scheduling.evolve(self.state, event)
            case Halt():
                scheduling.evolve(self.state, event)
                for cancelled in scheduling.halted(self.state, event):
                    scheduling.evolve(self.state, cancelled)
                    decided.append((envelope, cancelled, None))
            case Resume() | PoolConfigured():
                scheduling.evolve(self.state, event)

    def _say_limits(self, host_id: str, before: str | None) -> None:
        """Log a host going over its limits (no new work for its agents) or back."""
        said = self.state.hosts[host_id].over_limit
        if said == before:
            return
        if said is not None:
            log.warning("%s: host %r takes no new work: %s", self.name, host_id, said[:200])
        else:
            log.info("%s: host %r has room again", self.name, host_id)

    def _may_judge_hosts(self, now: int, heard: bool) -> bool:
        """Whether hosts' leases count now: not within ``HOST_GRACE_US`` of starting or of
        records arriving again after a quiet gap, when their beats may still be on the
        way. A timer step (nothing heard) is no such gap: that is how a dead host is
        noticed when nothing else happens. (Nor while beats are written and unread: the
        step checks that.)"""
        if self._judge_hosts_from is None:
            self._judge_hosts_from = now + HOST_GRACE_US
        if heard:
            if self._heard_at is not None and now - self._heard_at > QUIET_GAP_US:
                self._judge_hosts_from = max(self._judge_hosts_from, now + HOST_GRACE_US)
            self._heard_at = now
        return now >= self._judge_hosts_from

    def _emit(
        self, event: SchedulerEvent, cause: Envelope | None, now: int, traceparent: bytes | None
    ) -> Outgoing:
        """``event`` as a record; a task's carries the task's trace: ``traceparent`` (the
        hop that decided it) if given, else where the task began."""
        if isinstance(event, _ABOUT_AGENTS):
            return self.emitter.event(
                self.topics.tasks, self.index, event.agent_id, event, now=now, causation=cause
            )
        if isinstance(event, HostLost | HostFailed):
            return self.emitter.event(
                self.topics.tasks, self.index, event.host_id, event, now=now, causation=cause
            )
        if isinstance(event, PoolStarved):  # for every host of the pool: they may grow it
            return self.emitter.event(
                self.topics.tasks,
                self.index,
                event.pool,
                event,
                now=now,
                causation=cause,
                headers=[(BROADCAST_HEADER, event.pool.encode())],
            )
        origin = self.origins.get(event.task_id)
        if origin is not None:
            _account(event, origin, cause, now)
        if traceparent is not None:
            headers = [(TRACEPARENT, traceparent)]
        else:
            headers = origin.headers() if origin is not None else []
        if isinstance(event, TaskDispatched):
            headers = [*headers, (HOST_HEADER, event.host_id.encode())]
        elif isinstance(event, TaskCancelled | TaskExpired) and event.host_id is not None:
            headers = [*headers, (HOST_HEADER, event.host_id.encode())]  # stop its agent
        if isinstance(event, _FINISHED):
            self.origins.pop(event.task_id, None)
        return self.emitter.event(
            self.topics.tasks,
            self.index,
            event.task_id,
            event,
            now=now,
            causation=cause,
            headers=headers,
            tenant=origin.tenant if origin is not None else None,
            correlation_id=origin.correlation_id if origin is not None else None,
        )

    def _refusal(self, topic: str, command: Command) -> str | None:
        """Why a well-formed command is refused, if it is. The topic decides the priority:
        a command whose priority field says otherwise is refused, not re-ranked. Then the
        state: a dependency not known here, a cancellation of nothing unfinished."""
        if (
            not isinstance(command, CancelRequested)
            and topic in self._priority_of
            and command.priority is not self._priority_of[topic]
        ):
            return (
                f"priority {command.priority.label} does not match the topic it was sent on "
                f"({topic}, {self._priority_of[topic].label})"
            )
        return invalid_command(command) or scheduling.refusal(self.state, command)

    def _reject(
        self,
        cause: Envelope,
        command: Command,
        reason: str,
        now: int,
    ) -> Outgoing:
        if isinstance(command, TaskSubmitted):
            subject = command.task_id
        elif isinstance(command, DeliberationRequested):
            subject = command.deliberation_id
        else:
            subject = command.task_id or command.deliberation_id or ""
        log.warning("%s rejected %s %r: %s", self.name, command.TYPE, subject[:200], reason)
        rejected = CommandRejected(
            command_type=command.TYPE,
            subject_id=subject,
            command_event_id=cause.event_id,
            reason=reason,
        )
        # A tenant that is no tenant is not copied on: the rejection is this installation's.
        tenant = self.emitter.tenant if invalid_tenant(cause.tenant) else None
        return self.emitter.event(
            self.topics.tasks,
            self.index,
            subject[:200],
            rejected,
            now=now,
            causation=cause,
            tenant=tenant,
        )

    def _concerns_me(self, record: Record) -> bool:
        shard = dict(record.headers).get(SHARD_HEADER)
        return shard is None or shard in (self._shard_header, b"*")

    def _rejection(self, topic: str, event: Event) -> tuple[str, str] | None:
        """Why ``event`` may not be consumed from ``topic`` (reason, error type), if so."""
        if topic in self._commands:
            reason = invalid_command(event)
            if reason is None and isinstance(event, CONTROL_COMMANDS):
                reason = f"{event.TYPE} belongs on {self.topics.control}, where it is witnessed"
            return None if reason is None else (reason, "InvalidCommand")
        if not isinstance(event, self.accepts.get(topic, ())):
            return f"{event.TYPE} does not belong on {topic}", "InvalidEvent"
        if isinstance(event, CONTROL_COMMANDS) and (reason := invalid_command(event)):
            return reason, "InvalidCommand"  # e.g. a negative capacity, produced by hand
        return None

    def fences(self) -> list[tuple[str, TopicPartition]]:
        """Runtime hosts judged lost, to fence now that the batch that judged them is
        committed: a host killed in the middle of a transaction holds back every reader
        of the outputs it was writing (the witness, so every completion) until then, for
        ever on the embedded broker. At once, not after a while: meanwhile the answers
        of healthy hosts are held back too, past their deadlines. A host that was only
        cut off or paused loses nothing it still had a claim to (judged lost, its
        attempts were stalled) and claims its writer again (``RuntimeHost``)."""
        hosts, self._to_fence = self._to_fence, set()
        anchor = TopicPartition(self.topics.tasks, self.index)  # where hosts of my pools anchor
        return [(f"{self.topics.prefix}.runtime.{host}", anchor) for host in sorted(hosts)]

    def gauges(self) -> Iterator[metrics.Sample]:
        """The schedule as it stands, for the metrics endpoint (read at scrape time)."""
        state = self.state
        counts: Counter[tuple[str, str]] = Counter()
        depths: Counter[tuple[str, str]] = Counter()
        for task in state.tasks.values():
            counts[task.pool, task.status.value] += 1
            if task.status is scheduling.TaskStatus.QUEUED:
                depths[task.pool, task.priority.label] += 1
        for pool, status in counts:
            yield "conclave_tasks", (pool, status), counts[pool, status]
        for name, pool_state in state.pools.items():
            yield "conclave_tasks_in_flight", (name,), pool_state.in_flight
            yield "conclave_pool_capacity", (name,), state.capacity_of(name)
            for priority in Priority:
                yield "conclave_queue_depth", (name, priority.label), depths[name, priority.label]
        agents: Counter[tuple[str, str]] = Counter(
            (slot.pool, _agent_state(state, slot)) for slot in state.agents.values()
        )
        for (pool, agent_state), n in agents.items():
            yield "conclave_agents", (pool, agent_state), n
        now = now_us()
        hosts: Counter[tuple[str, str]] = Counter()
        for lease in state.hosts.values():
            if lease.judged is not None and lease.judged >= lease.expires_at:
                host_state = "lost" if lease.leaving_until is None else "left"
                if (lease.failed or -1) >= lease.expires_at:
                    host_state = "failed"
            elif lease.leaving_until is not None:
                host_state = "leaving"
            elif lease.expires_at < now:
                host_state = "silent"
            else:
                host_state = "alive" if lease.over_limit is None else "over_limit"
            hosts[lease.pool, host_state] += 1
        for (pool, host_state), n in hosts.items():
            yield "conclave_hosts", (pool, host_state), n
        yield "conclave_halted", (self.name,), 1.0 if state.halted else 0.0

    def _lost_hosts(self) -> set[str]:
        return {
            host
            for host, lease in self.state.hosts.items()
            if lease.judged is not None and lease.overdue() is None
        }

    def next_due(self) -> int | None:
        due = scheduling.next_due(self.state)
        leases = (
            scheduling.hosts_due(self.state),
            scheduling.failures_due(self.state, self.host_fail_after_us),
        )
        lease = min((d for d in leases if d is not None), default=None)
        if lease is not None and self._judge_hosts_from is not None:
            lease = max(lease, self._judge_hosts_from)
        return lease if due is None else due if lease is None else min(due, lease)


_SUBMISSIONS = frozenset({TaskSubmitted.TYPE, DeliberationRequested.TYPE})


def _agent_state(state: scheduling.SchedulerState, slot: AgentSlot) -> str:
    """Why an agent gets work or not, the same words as ``conclave agents``."""
    agent = slot.agent_id
    lease = state.hosts.get(slot.host_id)
    if lease is not None and agent in lease.lost_agents:
        if lease.leaving_until is not None:
            return "retired"
        return "failed" if (lease.failed or -1) >= lease.expires_at else "lost"
    if agent in state.failed:
        return "failed"
    if agent in state.retired:
        return "retired"
    if agent in state.breakers:
        return "circuit_open"
    if agent in state.probing:
        return "probing"
    if agent in state.suspects:
        return "unresponsive"
    return "busy" if agent in state.assignments else "idle"


def _account(event: SchedulerEvent, origin: _Origin, cause: Envelope | None, now: int) -> None:
    """Move the metrics a decision about a task moves (once, when it is written)."""
    pool = origin.pool
    if isinstance(event, TaskQueued):
        if not event.waiting_for:
            # Queued on submission: it waits from when it was sent (the client's clock),
            # which is what a user waits; else (released, due again) from now.
            if cause is not None and cause.event_type in _SUBMISSIONS:
                origin.since = cause.occurred_at
            else:
                origin.since = now
        if origin.dispatched:  # queued again after a failed or stalled attempt
            metrics.task_retries.labels(pool).inc()
    elif isinstance(event, TaskDispatched):
        metrics.tasks_dispatched.labels(pool).inc()
        if origin.since is not None:
            metrics.dispatch_latency.labels(pool).observe(max(0, now - origin.since) / 1e6)
        origin.since = now
        origin.dispatched = True
    elif isinstance(event, TaskStalled):
        metrics.tasks_stalled.labels(pool).inc()
    elif isinstance(event, _FINISHED):
        metrics.tasks_finished.labels(pool, event.TYPE.removeprefix("task.")).inc()
        if isinstance(event, TaskCompleted) and origin.since is not None:
            metrics.task_duration.labels(pool).observe(max(0, now - origin.since) / 1e6)

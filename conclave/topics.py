"""Every Kafka topic Conclave uses, declared once.

Names carry a prefix (``conclave`` by default; tests use their own) so that
several installations or test sessions share one broker without meeting.
History topics keep everything (``retention.ms=-1``): they are the source of
truth that read models are folded from.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.partitioner import murmur2

from conclave.domain.events import Priority

__all__ = [
    "BROADCAST_HEADER",
    "HOST_HEADER",
    "SHARD_HEADER",
    "TopicSpec",
    "Topics",
    "pool_partition",
]

HOST_HEADER = "conclave-host"
"""Kafka header on a dispatch naming the runtime host it is for: hosts skip the rest of
the tasks topic without decoding it."""

BROADCAST_HEADER = "conclave-broadcast"
"""Kafka header on a record for every host of a pool, naming the pool: a message to every
agent of the pool (a message for one inbox carries :data:`HOST_HEADER` instead), or the
scheduler's word that the pool is short of agents (``pool.starved``, on the tasks
topic). The pool's hosts read it, the others skip it without decoding it."""

SHARD_HEADER = "conclave-shard"
"""Kafka header on a witness entry naming the scheduler shard (pool partition) whose task it
concerns, so that each shard skips the others' entries without decoding them."""

KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
KEEP_A_WEEK = {"retention.ms": str(7 * 24 * 3600 * 1000), "retention.bytes": "-1"}
KEEP_AN_HOUR = {"retention.ms": str(3600 * 1000), "retention.bytes": "-1"}


def pool_partition(pool: str, partitions: int) -> int:
    """The partition of every pool-scoped record (commands, registrations, task events,
    outputs): Kafka's default partitioner applied to the pool name, so that one pool has
    one scheduler shard and any Kafka client can compute the same partition."""
    return int(murmur2(pool.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
    purpose: str


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one prefix, plus their specs for creation."""

    prefix: str = "conclave"
    partitions: int = 1

    def command(self, priority: Priority) -> str:
        """Where user commands of ``priority`` go (key: task or deliberation id)."""
        return f"{self.prefix}.commands.{priority.label}"

    @property
    def commands(self) -> list[str]:
        return [self.command(p) for p in Priority]

    @property
    def control(self) -> str:
        """HALT and RESUME (key: ``system``)."""
        return f"{self.prefix}.control"

    @property
    def agents(self) -> str:
        """Agent registrations (key: agent id)."""
        return f"{self.prefix}.agents"

    @property
    def heartbeats(self) -> str:
        """Per-agent heartbeats (key: agent id), read by the projector only. Runtime hosts
        no longer write them: a host's one ``host.beat`` a second on the agents topic
        stands for all its agents. Kept so that the history written before still folds,
        and for other producers."""
        return f"{self.prefix}.heartbeats"

    @property
    def tasks(self) -> str:
        """The scheduler's output: queued, dispatched, completed, ... (key: task id)."""
        return f"{self.prefix}.tasks"

    @property
    def outputs(self) -> str:
        """Agent outputs and failures, not yet visible to readers (key: task id)."""
        return f"{self.prefix}.outputs"

    @property
    def witness(self) -> str:
        """The hash-chained witness log: one partition, so one total order."""
        return f"{self.prefix}.witness"

    @property
    def checkpoints(self) -> str:
        """Signed checkpoints of the witness log's Merkle tree (key: the log's origin)."""
        return f"{self.prefix}.checkpoints"

    @property
    def deadletter(self) -> str:
        """Records a processor could not use, with reason and original bytes."""
        return f"{self.prefix}.deadletter"

    @property
    def workers(self) -> str:
        """Stream-processor workers' beats: who is alive and which shards it owns (key:
        worker id). Liveness only, so kept for an hour."""
        return f"{self.prefix}.workers"

    @property
    def liveness(self) -> list[str]:
        """The topics that beat for ever whether or not there is work (workers' beats,
        hosts' beats on the agents topic, heartbeats): a fetcher does not stay hot for
        them (see :mod:`conclave.fetching`)."""
        return [self.workers, self.agents, self.heartbeats]

    @property
    def coordination_requests(self) -> str:
        """Lock and versioned-state requests from clients (key: lock name or state key;
        partition: :func:`pool_partition` of the key, so one shard owns each)."""
        return f"{self.prefix}.coordination.requests"

    @property
    def coordination(self) -> str:
        """The coordination processor's decisions (grants, expiries, new versions,
        rejections): its changelog, and what clients await (key as the requests')."""
        return f"{self.prefix}.coordination"

    @property
    def workflow_requests(self) -> str:
        """Workflow run and cancel requests from clients (key: workflow id; one partition:
        one workflow shard)."""
        return f"{self.prefix}.workflows.requests"

    @property
    def workflows(self) -> str:
        """The workflow processor's decisions (started, step submitted and completed,
        ended, rejected): its changelog (key: workflow id)."""
        return f"{self.prefix}.workflows"

    @property
    def payloads(self) -> str:
        """Task inputs larger than one record, in chunks of raw bytes (key: the task id);
        the task's input is a reference to them (:mod:`conclave.payloads`). Not a history
        topic: nothing is folded from it, hosts read the chunks they are given."""
        return f"{self.prefix}.payloads"

    @property
    def messages(self) -> str:
        """Agent-to-agent messages and their answers (key: the recipient as addressed;
        partition: :func:`pool_partition` of the recipient's pool, or the asker's inbox
        partition for an answer, so each recipient's messages stay in order). History:
        replayable and folded into the ``messages`` read model."""
        return f"{self.prefix}.messages"

    def snapshots(self, processor: str) -> str:
        """Snapshots of one processor's state, one partition per shard: a restart reads the
        latest one and a short tail instead of all history. A cache, not history: kept for
        a week, and re-taken well within that."""
        return f"{self.prefix}.snapshots.{processor}"

    @property
    def history(self) -> list[str]:
        """Every topic a read model is folded from."""
        return [
            self.agents,
            self.heartbeats,
            self.tasks,
            self.outputs,
            self.witness,
            self.checkpoints,
            self.deadletter,
            self.control,
            self.coordination,
            self.workflows,
            self.messages,
        ]

    def specs(self) -> list[TopicSpec]:
        n = self.partitions
        specs = [
            TopicSpec(self.command(p), n, KEEP_FOREVER, f"{p.label}-priority commands")
            for p in Priority
        ]
        specs += [
            TopicSpec(self.control, 1, KEEP_FOREVER, "halt and resume"),
            TopicSpec(self.agents, n, KEEP_FOREVER, "agent registrations"),
            TopicSpec(self.heartbeats, n, KEEP_FOREVER, "agent heartbeats"),
            TopicSpec(self.tasks, n, KEEP_FOREVER, "task schedule events"),
            TopicSpec(self.outputs, n, KEEP_FOREVER, "agent outputs and failures"),
            TopicSpec(self.witness, 1, KEEP_FOREVER, "witness log (hash chain)"),
            TopicSpec(self.checkpoints, 1, KEEP_FOREVER, "signed witness checkpoints"),
            TopicSpec(self.deadletter, 1, KEEP_FOREVER, "dead-letter records"),
            TopicSpec(self.workers, 1, KEEP_AN_HOUR, "processor workers' beats and shards"),
            TopicSpec(self.snapshots("scheduler"), n, KEEP_A_WEEK, "scheduler snapshots"),
            TopicSpec(self.snapshots("witness"), 1, KEEP_A_WEEK, "witness snapshots"),
            TopicSpec(self.coordination_requests, n, KEEP_FOREVER, "lock and state requests"),
            TopicSpec(self.coordination, n, KEEP_FOREVER, "lock and state decisions"),
            TopicSpec(self.snapshots("coordination"), n, KEEP_A_WEEK, "coordination snapshots"),
            TopicSpec(self.workflow_requests, 1, KEEP_FOREVER, "workflow run and cancel requests"),
            TopicSpec(self.workflows, 1, KEEP_FOREVER, "workflow decisions"),
            TopicSpec(self.snapshots("workflows"), 1, KEEP_A_WEEK, "workflow snapshots"),
            TopicSpec(self.messages, n, KEEP_FOREVER, "agent-to-agent messages"),
            TopicSpec(self.payloads, 1, KEEP_FOREVER, "task inputs too large for one record"),
        ]
        return specs

"""The witness processor: appends one hash-chained entry per witnessed event.

Witnessed: agent outputs and failures (from the outputs topic) and halt/resume, pool
capacities and projection digests (from the control topic). One shard, because one chain
has one head. Its state (the head, the input positions and a window of recently witnessed
event ids) is a fold of the witness topic itself: every entry names the record it
witnesses (topic, partition, offset), so a restarted witness resumes exactly after the
last entry that was committed, whatever the broker lost or kept of anything else, and
never forks, skips or repeats.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition

from conclave import metrics
from conclave.bus import Outgoing, Position
from conclave.domain import witness
from conclave.domain.checkpoint import Checkpoint
from conclave.domain.events import (
    AgentOutput,
    Event,
    Halt,
    PoolConfigured,
    ProjectionDigest,
    Resume,
    TaskFailed,
    WitnessCheckpoint,
    WitnessEntry,
    now_us,
)
from conclave.domain.merkle import CompactRange, leaf_hash
from conclave.domain.validation import CONTROL_COMMANDS, invalid_command, invalid_output
from conclave.errors import SchemaError, WitnessChainError
from conclave.records import Record
from conclave.topics import SHARD_HEADER, Topics
from conclave.tracing import hop
from conclave.transparency.keys import SignerKey
from conclave.transparency.note import sign_note
from streams.core import Emitter, Source

__all__ = ["WITNESS_KEY", "WitnessShard"]

WITNESS_KEY = "witness"
ALL_SHARDS = b"*"
"""Shard header of entries every scheduler shard must see (halt and resume)."""


class WitnessShard:
    processor = "witness"
    index = 0
    name = "witness-0"

    def __init__(
        self,
        topics: Topics,
        partitions: int,
        emitter: Emitter,
        *,
        window: int = 100_000,
        signer: SignerKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 10.0,
    ) -> None:
        self.topics = topics
        self.partitions = partitions
        self.emitter = emitter
        self.window = window
        """How many recently witnessed event ids are remembered to drop a re-sent copy."""
        self.signer = signer
        """Signs checkpoints; ``None``: none are published."""
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_us = int(checkpoint_interval_s * 1_000_000)
        self.head = witness.ChainHead()
        self.positions: Position = {}
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.tree = CompactRange()
        """The Merkle tree's right edge over every entry: what a checkpoint's root needs."""
        self.checkpointed = (0, 0)
        """Size and time (µs) of the last checkpoint this shard signed."""

    def inputs(self) -> list[TopicPartition]:
        outputs = [TopicPartition(self.topics.outputs, p) for p in range(self.partitions)]
        return [*outputs, TopicPartition(self.topics.control, 0)]

    def changelog(self) -> list[TopicPartition]:
        return [TopicPartition(self.topics.witness, 0)]

    def state_inputs(self) -> list[TopicPartition]:
        return []

    def resume_at(self) -> Position:
        return dict(self.positions)

    def restore(self, state: Mapping[str, Any] | None) -> None:
        self.head = witness.ChainHead()
        self.positions = {}
        self.recent = OrderedDict()
        self.tree = CompactRange()
        self.checkpointed = (0, 0)
        if state is None:
            return
        self.head = witness.ChainHead(int(state["sequence"]), bytes.fromhex(state["hash"]))
        self.positions = {TopicPartition(t, int(p)): int(o) for t, p, o in state["positions"]}
        self.recent = OrderedDict.fromkeys(state["recent"])
        # A snapshot from before the tree was kept has no "peaks": unusable (KeyError),
        # so the shard folds its log from the start instead.
        self.tree = CompactRange(self.head.sequence, [bytes.fromhex(p) for p in state["peaks"]])
        size, at = state["checkpointed"]
        self.checkpointed = (int(size), int(at))

    def snapshot(self) -> Mapping[str, Any]:
        return {
            "sequence": self.head.sequence,
            "hash": self.head.hash.hex(),
            "positions": [[tp.topic, tp.partition, o] for tp, o in sorted(self.positions.items())],
            "recent": list(self.recent),
            "peaks": [peak.hex() for peak in self.tree.peaks],
            "checkpointed": list(self.checkpointed),
        }

    def fold(self, record: Record, source: Source) -> list[Outgoing]:
        """Recovery: extend the head by one committed entry, refusing a chain that does not
        verify (a fork or gap would otherwise be extended for ever)."""
        try:
            _, entry = self.emitter.codec.decode(record.value)
        except SchemaError as exc:
            # Not an entry: it never was part of the chain, so it cannot break it.
            return [
                self.emitter.dead_letter(record, reason=str(exc), error_type="SchemaError", now=0)
            ]
        if not isinstance(entry, WitnessEntry):
            reason = f"{entry.TYPE} does not belong on {record.topic}"
            return [
                self.emitter.dead_letter(record, reason=reason, error_type="InvalidEvent", now=0)
            ]
        if (violation := witness.check_next(self.head, entry)) is not None:
            raise WitnessChainError(
                f"witness chain broken at sequence {violation.sequence} "
                f"(offset {record.offset}): {violation.reason}",
                sequence=violation.sequence,
            )
        self._remember(entry)
        return []

    def _remember(self, entry: WitnessEntry) -> None:
        self.head = self.head.advance(entry)
        self.tree.append_hash(leaf_hash(witness.leaf_bytes(entry)))
        self.recent[entry.subject_event_id] = None
        while len(self.recent) > self.window:
            self.recent.popitem(last=False)
        if entry.source_topic is not None and entry.source_offset is not None:
            tp = TopicPartition(entry.source_topic, entry.source_partition or 0)
            self.positions[tp] = max(self.positions.get(tp, 0), entry.source_offset + 1)

    def step(
        self, records: Sequence[Record], now: int, unread: Mapping[TopicPartition, int]
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        for record in records:
            decoded = self.emitter.decode(record, now, out)
            if decoded is None:
                continue
            envelope, event = decoded
            # Witness only what the rest of the system acts on from the same topic: a HALT
            # on the outputs topic would be in the log while the scheduler never saw it.
            expected = _CONTROL if record.topic == self.topics.control else _OUTPUTS
            reason: str | None
            if not isinstance(event, expected):
                reason = f"{event.TYPE} is not witnessed from {record.topic}"
            elif isinstance(event, CONTROL_COMMANDS):
                reason = invalid_command(event)  # the scheduler refuses it: so is it here
            elif isinstance(event, AgentOutput | TaskFailed):
                reason = invalid_output(event)  # nobody acts on what is not witnessed
            else:
                reason = None
            if reason is not None:
                out.append(
                    self.emitter.dead_letter(
                        record, reason=reason, error_type="InvalidEvent", now=now
                    )
                )
                continue
            if envelope.event_id in self.recent:
                continue  # a copy sent twice: witnessed exactly once
            with hop("witness", record.headers) as onward:
                entry = witness.next_entry(
                    self.head,
                    subject_type=event.TYPE,
                    subject_event_id=envelope.event_id,
                    subject_digest=witness.digest(record.value or b""),  # decoded: not null
                    recorded_at=now,
                    task_id=getattr(event, "task_id", None),
                    agent_id=getattr(event, "agent_id", None),
                    detail=_detail(event),
                    attempt=getattr(event, "attempt", None),
                    source=(record.topic, record.partition, record.offset),
                )
                shard = (
                    ALL_SHARDS if record.topic == self.topics.control else b"%d" % record.partition
                )
                out.append(
                    self.emitter.event(
                        self.topics.witness,
                        0,
                        WITNESS_KEY,
                        entry,
                        now=now,
                        causation=envelope,
                        headers=[*onward, (SHARD_HEADER, shard)],
                    )
                )
            # The next record of this batch chains onto this entry.
            self._remember(entry)
            metrics.witnessed.inc()
        if self._checkpoint_due(now):
            out.append(self._checkpoint(now))
        return out

    def _checkpoint_due(self, now: int) -> bool:
        size, at = self.checkpointed
        grown = self.tree.size - size
        if self.signer is None or grown <= 0:
            return False
        return grown >= self.checkpoint_every or now >= at + self.checkpoint_interval_us

    def _checkpoint(self, now: int) -> Outgoing:
        """A signed checkpoint of the tree as it stands after this batch, written in the
        batch's transaction: never of entries that were not committed."""
        assert self.signer is not None
        signed_at = datetime.fromtimestamp(now / 1e6, UTC).isoformat().replace("+00:00", "Z")
        checkpoint = Checkpoint(
            origin=self.signer.name,
            size=self.tree.size,
            root=self.tree.root(),
            extensions=(f"time {signed_at}",),
        )
        self.checkpointed = (self.tree.size, now)
        event = WitnessCheckpoint(
            origin=checkpoint.origin,
            tree_size=checkpoint.size,
            root_hash=checkpoint.root,
            note=sign_note(checkpoint.text(), [self.signer]),
        )
        return self.emitter.event(
            self.topics.checkpoints, 0, checkpoint.origin, event, now=now, causation=None
        )

    def fences(self) -> list[tuple[str, TopicPartition]]:
        return []

    def gauges(self) -> Iterator[metrics.Sample]:
        yield "conclave_witness_log_size", (), self.head.sequence
        size, at = self.checkpointed
        if at:
            yield "conclave_witness_checkpoint_size", (), size
            yield "conclave_witness_checkpoint_age_seconds", (), max(0.0, (now_us() - at) / 1e6)

    def next_due(self) -> int | None:
        """The next checkpoint by time, if the log grew since the last one."""
        size, at = self.checkpointed
        if self.signer is None or self.tree.size <= size:
            return None
        return at + self.checkpoint_interval_us


_CONTROL = (Halt, Resume, PoolConfigured, ProjectionDigest)
_OUTPUTS = (AgentOutput, TaskFailed)


SHOWN_WEIGHTS = 10
"""A pool setting's detail names this many weights, then how many more there are."""


def pool_setting(event: PoolConfigured) -> str:
    """``capacity N[, aging K turns][, weights k=w ...]``: the setting, for people (the
    event's own bytes, digested in the entry, are what counts)."""
    parts = [f"capacity {event.capacity}"]
    if event.aging_turns is not None:
        parts.append(f"aging {event.aging_turns} turns")
    if event.weights:
        named = sorted(event.weights.items())
        shown = " ".join(f"{k}={w}" for k, w in named[:SHOWN_WEIGHTS])
        more = len(named) - SHOWN_WEIGHTS
        parts.append(f"weights {shown}" + (f" (+{more} more)" if more > 0 else ""))
    return ", ".join(parts)


def _detail(event: Event) -> str:
    match event:
        case TaskFailed():
            return witness.failure_detail(event.error_type, permanent=event.permanent)
        case Halt() | Resume():
            return event.reason
        case PoolConfigured():
            return f"{event.pool}: {pool_setting(event)}: {event.reason}"
        case ProjectionDigest():
            return f"{event.schema}: {event.reason}: {event.digest}"
        case _:
            return ""

"""Task inputs larger than one record, passed by reference.

A Kafka record holds at most :data:`~conclave.domain.validation.MAX_INPUT_BYTES` of
input. The client stores a larger input in chunks of raw bytes on the payloads topic
(one partition, acknowledged like every write) and submits the task with a short
reference instead: ``conclave-payload:v1:`` and a JSON object naming the topic,
partition, the chunks' offsets in order, the size and the SHA-256 of the whole. The
runtime host reads the chunks back by offset and checks size and digest before the
agent sees the input; the scheduler, the witness and the read models only ever see the
reference. A reference that does not resolve (a chunk missing, a digest that differs)
fails the attempt permanently; one the broker cannot serve in time, transiently.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass

from aiokafka import TopicPartition

from conclave.bus import EventProducer, Outgoing, new_consumer
from conclave.errors import InvalidCommand
from conclave.runtime.agents import PermanentFailure, TransientFailure
from conclave.settings import Settings
from conclave.tracing import headers_for

__all__ = [
    "CHUNK_BYTES",
    "MAX_PAYLOAD_BYTES",
    "PREFIX",
    "PayloadRef",
    "PayloadUnavailable",
    "load",
    "parse",
    "store",
]

PREFIX = "conclave-payload:v1:"
CHUNK_BYTES = 512 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""The largest input passed by reference: 128 chunks."""
LOAD_TIMEOUT_S = 30.0


class PayloadUnavailable(PermanentFailure):
    """The reference names chunks that are not there, or not what was stored."""


@dataclass(frozen=True, slots=True)
class PayloadRef:
    topic: str
    partition: int
    offsets: tuple[int, ...]
    size: int
    sha256: str

    def text(self) -> str:
        fields = {
            "topic": self.topic,
            "partition": self.partition,
            "offsets": list(self.offsets),
            "size": self.size,
            "sha256": self.sha256,
        }
        return PREFIX + json.dumps(fields, separators=(",", ":"))


def parse(text: str) -> PayloadRef | None:
    """The reference ``text`` is, or ``None`` for an ordinary input. A text that starts
    like a reference but is not one is :class:`PayloadUnavailable`."""
    if not text.startswith(PREFIX):
        return None
    try:
        fields = json.loads(text[len(PREFIX) :])
        ref = PayloadRef(
            topic=str(fields["topic"]),
            partition=int(fields["partition"]),
            offsets=tuple(int(o) for o in fields["offsets"]),
            size=int(fields["size"]),
            sha256=str(fields["sha256"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadUnavailable(f"not a payload reference: {exc}") from None
    if not ref.offsets or ref.size < 0:
        raise PayloadUnavailable("not a payload reference: no chunks")
    return ref


async def store(producer: EventProducer, topic: str, key: str, data: bytes) -> PayloadRef:
    """Write ``data`` in chunks and wait for every acknowledgement; the reference to
    submit in its place."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidCommand(
            f"input is {len(data):,} bytes; at most {MAX_PAYLOAD_BYTES:,} even by reference: "
            "store it elsewhere and pass its address"
        )
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    offsets = await producer.send_all(
        Outgoing(topic, 0, key, chunk, headers_for()) for chunk in chunks
    )
    return PayloadRef(topic, 0, tuple(offsets), len(data), hashlib.sha256(data).hexdigest())


async def load(settings: Settings, ref: PayloadRef, *, timeout_s: float = LOAD_TIMEOUT_S) -> bytes:
    """The bytes ``ref`` names, checked against its size and digest."""
    wanted = set(ref.offsets)
    found: dict[int, bytes] = {}
    partition = TopicPartition(ref.topic, ref.partition)
    consumer = new_consumer(settings)
    await consumer.start()
    try:
        consumer.assign([partition])
        consumer.seek(partition, min(ref.offsets))
        deadline = time.monotonic() + timeout_s
        while wanted - found.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientFailure(
                    f"payload chunks not readable within {timeout_s:g} s ({ref.topic})"
                )
            batches = await consumer.getmany(partition, timeout_ms=int(min(left, 1.0) * 1000))
            for record in batches.get(partition, []):
                if record.offset in wanted and record.value is not None:
                    found[record.offset] = record.value
                if record.offset >= max(ref.offsets) and wanted - found.keys():
                    missing = sorted(wanted - found.keys())
                    raise PayloadUnavailable(f"payload chunk(s) at offset {missing} missing")
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    data = b"".join(found[o] for o in ref.offsets)
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise PayloadUnavailable("payload does not match its reference (size or SHA-256)")
    return data

"""The codec: bytes <-> (envelope, domain event), in Avro single-object encoding.

Wire format (Avro 1.10+ "single object encoding")::

    C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema | Avro binary body

The fingerprint tells a reader exactly which schema wrote a record; the reader
resolves it against the current version of that event type (schema evolution:
fields added with defaults are filled in, removed fields are skipped).

Every schema is parsed once, at registry construction. fastavro's errors never
leave this module: they become :class:`~conclave.errors.SchemaError`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from conclave.domain import events as ev
from conclave.errors import SchemaError

__all__ = ["MAGIC", "Codec", "SchemaRegistry", "default_codec"]

MAGIC = b"\xc3\x01"
_HEADER_LEN = 10
_SCHEMA_DIR = Path(__file__).parent
_NAMED_TYPES = ("envelope.avsc", "priority.avsc")
_ENVELOPE_FIELDS = tuple(f.name for f in dataclasses.fields(ev.Envelope))

EVENT_CLASSES: tuple[type[Any], ...] = (
    ev.TaskSubmitted,
    ev.CancelRequested,
    ev.DeliberationRequested,
    ev.TaskQueued,
    ev.TaskDispatched,
    ev.TaskStalled,
    ev.TaskRetryScheduled,
    ev.CommandRejected,
    ev.AgentReinstated,
    ev.AgentRegistered,
    ev.Heartbeat,
    ev.AgentCircuitOpened,
    ev.AgentCircuitHalfOpened,
    ev.AgentCircuitClosed,
    ev.AgentRestarted,
    ev.AgentFailed,
    ev.AgentRetired,
    ev.HostBeat,
    ev.HostLeaving,
    ev.HostLost,
    ev.HostFailed,
    ev.PoolStarved,
    ev.AgentOutput,
    ev.TaskFailed,
    ev.TaskCompleted,
    ev.TaskDeadLettered,
    ev.TaskCancelled,
    ev.TaskExpired,
    ev.TaskDependencyFailed,
    ev.WitnessEntry,
    ev.WitnessCheckpoint,
    ev.DeadLetterRecord,
    ev.Halt,
    ev.Resume,
    ev.PoolConfigured,
    ev.ProjectionDigest,
    ev.WorkerBeat,
    ev.LockRequested,
    ev.LockRenewRequested,
    ev.LockReleaseRequested,
    ev.LockGranted,
    ev.LockWaiting,
    ev.LockDenied,
    ev.LockRenewed,
    ev.LockReleased,
    ev.LockExpired,
    ev.StateUpdateRequested,
    ev.StateCheckpointRequested,
    ev.StateRestoreRequested,
    ev.StateUpdated,
    ev.StateUpdateRejected,
    ev.StateCheckpointed,
    ev.StateRestored,
    ev.WorkflowRunRequested,
    ev.WorkflowCancelRequested,
    ev.WorkflowStarted,
    ev.WorkflowRejected,
    ev.WorkflowStepSubmitted,
    ev.WorkflowStepCompleted,
    ev.WorkflowEnded,
    ev.AgentMessage,
)


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    """Full Avro name, e.g. ``conclave.events.TaskSubmitted``."""
    version: int
    parsed: Any
    fingerprint: bytes
    canonical: str
    """The Parsing Canonical Form, shared named types inlined: what ``fingerprint`` is of."""


class SchemaRegistry:
    """Every schema version Conclave knows, by fingerprint and by name.

    The newest version of each record name is the reader schema; older versions
    are kept (``schemas/history/``) so that history written with them still decodes.
    """

    def __init__(self, documents: Iterable[Mapping[str, Any]], named: Iterable[Mapping[str, Any]]):
        named_by_name = {f"{d['namespace']}.{d['name']}": dict(d) for d in named}
        self._by_fingerprint: dict[bytes, _Schema] = {}
        self._current: dict[str, _Schema] = {}
        for document in documents:
            schema = _load(document, named_by_name)
            self._by_fingerprint[schema.fingerprint] = schema
            current = self._current.get(schema.name)
            if current is None or schema.version > current.version:
                self._current[schema.name] = schema

    @classmethod
    def from_directory(cls, directory: Path = _SCHEMA_DIR) -> SchemaRegistry:
        named = [json.loads((directory / n).read_text()) for n in _NAMED_TYPES]
        paths = [p for p in sorted(directory.glob("*.avsc")) if p.name not in _NAMED_TYPES]
        paths += sorted((directory / "history").glob("*.avsc"))
        return cls((json.loads(p.read_text()) for p in paths), named)

    def current(self, name: str) -> _Schema:
        try:
            return self._current[name]
        except KeyError:
            raise SchemaError(f"no schema named {name!r}") from None

    def writer(self, fingerprint: bytes) -> _Schema:
        try:
            return self._by_fingerprint[fingerprint]
        except KeyError:
            raise SchemaError(f"unknown schema fingerprint {fingerprint.hex()}") from None

    def fingerprints(self) -> dict[str, list[str]]:
        """Schema name -> fingerprints (hex) of every known version, oldest first."""
        out: dict[str, list[tuple[int, str]]] = {}
        for schema in self._by_fingerprint.values():
            out.setdefault(schema.name, []).append((schema.version, schema.fingerprint.hex()))
        return {name: [fp for _, fp in sorted(v)] for name, v in sorted(out.items())}

    def canonical_forms(self) -> dict[str, str]:
        """Fingerprint (hex) -> the Parsing Canonical Form it is the CRC-64-AVRO of, for
        every known schema version: what a reader needs to decode any record."""
        return {fp.hex(): schema.canonical for fp, schema in self._by_fingerprint.items()}


def _load(document: Mapping[str, Any], named: Mapping[str, dict[str, Any]]) -> _Schema:
    full = _inline(dict(document), dict(named), set())
    try:
        canonical = fastavro.schema.to_parsing_canonical_form(full)
        fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
        parsed = fastavro.parse_schema(full)
    except Exception as exc:  # fastavro raises several unrelated types
        raise SchemaError(f"invalid schema {document.get('name')!r}: {exc}") from exc
    name = f"{document['namespace']}.{document['name']}"
    return _Schema(
        name=name,
        version=int(document.get("version", 1)),
        parsed=parsed,
        fingerprint=fingerprint,
        canonical=canonical,
    )


def _inline(node: Any, named: dict[str, dict[str, Any]], seen: set[str]) -> Any:
    """Replace references to shared named types by their definition at first use.

    The parsing canonical form (and so the fingerprint) must describe the whole
    schema, not depend on definitions kept in other files.
    """
    if isinstance(node, str) and node in named and node not in seen:
        seen.add(node)
        return _inline(named[node], named, seen)
    if isinstance(node, list):
        return [_inline(item, named, seen) for item in node]
    if isinstance(node, dict):
        return {
            key: _inline(value, named, seen)
            if key in ("type", "fields", "items", "values")
            else value
            for key, value in node.items()
        }
    return node


class Codec:
    """Encodes and decodes Conclave events; one instance per process is enough."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self._registry = registry
        self._by_class = {
            cls: registry.current(f"conclave.events.{cls.__name__}") for cls in EVENT_CLASSES
        }
        self._class_by_name = {f"conclave.events.{cls.__name__}": cls for cls in EVENT_CLASSES}
        self._fields = {cls: [f.name for f in dataclasses.fields(cls)] for cls in EVENT_CLASSES}

    @property
    def registry(self) -> SchemaRegistry:
        return self._registry

    def encode(self, envelope: ev.Envelope, event: ev.Event) -> bytes:
        schema = self._by_class.get(type(event))
        if schema is None:
            raise SchemaError(f"{type(event).__name__} is not a Conclave event")
        record: dict[str, Any] = {name: getattr(event, name) for name in self._fields[type(event)]}
        if "priority" in record:
            record["priority"] = record["priority"].name
        record["envelope"] = {name: getattr(envelope, name) for name in _ENVELOPE_FIELDS}
        buffer = io.BytesIO()
        buffer.write(MAGIC)
        buffer.write(schema.fingerprint)
        try:
            fastavro.schemaless_writer(buffer, schema.parsed, record)
        except Exception as exc:
            raise SchemaError(f"cannot encode {type(event).__name__}: {exc}") from exc
        return buffer.getvalue()

    def decode(self, data: bytes | None) -> tuple[ev.Envelope, ev.Event]:
        """The event in ``data``; a null value (a Kafka tombstone) or empty bytes are
        :class:`SchemaError` like any other record that holds no event."""
        if data is None:
            raise SchemaError("null value (a tombstone), not an event")
        if not data:
            raise SchemaError("empty value, not an event")
        if len(data) < _HEADER_LEN or data[:2] != MAGIC:
            raise SchemaError("not an Avro single-object record (bad magic)")
        writer = self._registry.writer(data[2:_HEADER_LEN])
        reader = self._registry.current(writer.name)
        cls = self._class_by_name.get(writer.name)
        if cls is None:
            raise SchemaError(f"schema {writer.name} is not a Conclave event")
        body = io.BytesIO(data[_HEADER_LEN:])
        try:
            # Resolution is costly in fastavro: only ask for it when the versions differ.
            record = fastavro.schemaless_reader(
                body, writer.parsed, None if reader is writer else reader.parsed
            )
        except Exception as exc:
            raise SchemaError(f"undecodable {writer.name} body: {exc}") from exc
        if body.tell() != len(data) - _HEADER_LEN:
            # Two byte strings must never mean the same event: witness digests cover bytes.
            raise SchemaError(f"{writer.name} record has trailing bytes")
        if not isinstance(record, dict):
            raise SchemaError(f"{writer.name} body is not a record")
        envelope = ev.Envelope(**record.pop("envelope"))
        if "priority" in record:
            record["priority"] = ev.Priority[record["priority"]]
        try:
            return envelope, cls(**record)
        except TypeError as exc:
            raise SchemaError(f"{writer.name} does not match {cls.__name__}: {exc}") from exc


@cache
def default_codec() -> Codec:
    """The process-wide codec over the schemas shipped in this package."""
    return Codec(SchemaRegistry.from_directory())

"""The codec: round trips, the single-object header, schema evolution, bad input.

The fingerprint is checked against a CRC-64-AVRO and a parsing canonical form
computed here from the Avro specification, not with the codec's helpers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain import events as ev
from conclave.errors import SchemaError
from schemas.codec import EVENT_CLASSES, MAGIC, Codec, SchemaRegistry, default_codec

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
NAMED_FILES = ("envelope.avsc", "priority.avsc")

# -- CRC-64-AVRO, from the Avro specification ("Schema Fingerprints") ------------------

EMPTY = 0xC15D213AA4D7A795


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc_table()


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_crc64_avro_known_value() -> None:
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F
    assert crc64_avro(b'"int"').to_bytes(8, "little").hex() == "8f5c393f1ad57572"


# -- Parsing canonical form, for the subset of Avro our schemas use ----------------------

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
_KEPT = ("name", "type", "fields", "symbols", "items", "values", "size")


def canonical(node: Any, namespace: str | None = None) -> Any:
    """[PRIMITIVES] [FULLNAMES] [STRIP] [ORDER] of the spec, as a JSON-ready value."""
    if isinstance(node, str):
        if node in PRIMITIVES or "." in node or namespace is None:
            return node
        return f"{namespace}.{node}"
    if isinstance(node, list):
        return [canonical(item, namespace) for item in node]
    kind = node["type"]
    if kind in PRIMITIVES:
        return kind
    out: dict[str, Any] = {}
    if kind in ("record", "enum", "fixed"):
        name = node["name"]
        if "." not in name:
            namespace = node.get("namespace", namespace)
            name = f"{namespace}.{name}" if namespace else name
        else:
            namespace = name.rsplit(".", 1)[0]
        out["name"] = name
    out["type"] = kind
    if kind == "record":
        out["fields"] = [
            {"name": f["name"], "type": canonical(f["type"], namespace)} for f in node["fields"]
        ]
    if kind == "enum":
        out["symbols"] = node["symbols"]
    if kind == "array":
        out["items"] = canonical(node["items"], namespace)
    if kind == "map":
        out["values"] = canonical(node["values"], namespace)
    if kind == "fixed":
        out["size"] = node["size"]
    return {key: out[key] for key in _KEPT if key in out}


def canonical_form(schema: dict[str, Any]) -> bytes:
    return json.dumps(canonical(schema), separators=(",", ":"), ensure_ascii=False).encode()


def test_canonical_form_example_from_the_spec() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "namespace": "a.b",
        "doc": "x",
        "fields": [{"name": "f", "type": {"type": "long"}, "default": 1}],
    }
    assert canonical_form(schema) == (
        b'{"name":"a.b.R","type":"record","fields":[{"name":"f","type":"long"}]}'
    )


def inline_named(node: Any, named: dict[str, Any], seen: set[str] | None = None) -> Any:
    """Replace references to the shared named types by their definition at first use."""
    seen = set() if seen is None else seen
    if isinstance(node, str):
        if node in named and node not in seen:
            seen.add(node)
            return inline_named(named[node], named, seen)
        return node
    if isinstance(node, list):
        return [inline_named(item, named, seen) for item in node]
    if isinstance(node, dict):
        out = dict(node)
        for key in ("type", "items", "values"):
            if key in out:
                out[key] = inline_named(out[key], named, seen)
        if "fields" in out:
            out["fields"] = [inline_named(f, named, seen) for f in out["fields"]]
        return out
    return node


@cache
def named_types() -> dict[str, Any]:
    docs = [json.loads((SCHEMA_DIR / n).read_text()) for n in NAMED_FILES]
    return {f"{d['namespace']}.{d['name']}": d for d in docs}


def full_schema(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = inline_named(json.loads(path.read_text()), named_types())
    return result


def event_schema_files() -> dict[str, Path]:
    """Record name -> current .avsc file."""
    files = {}
    for path in sorted(SCHEMA_DIR.glob("*.avsc")):
        if path.name in NAMED_FILES:
            continue
        files[json.loads(path.read_text())["name"]] = path
    return files


def test_every_schema_has_an_event_class_and_every_class_a_schema() -> None:
    files = event_schema_files()
    classes = {cls.__name__: cls for cls in EVENT_CLASSES}
    assert set(files) == set(classes)
    assert len(files) == len(list(SCHEMA_DIR.glob("*.avsc"))) - len(NAMED_FILES)
    assert set(typing.get_args(ev.Event)) == set(EVENT_CLASSES)
    for name, path in files.items():
        document = json.loads(path.read_text())
        assert document["namespace"] == "conclave.events"
        assert document["fields"][0] == {"name": "envelope", "type": "conclave.Envelope"}
        fields = [f["name"] for f in document["fields"][1:]]
        assert fields == [f.name for f in dataclasses.fields(classes[name])], name
    for path in sorted((SCHEMA_DIR / "history").glob("*.avsc")):
        assert json.loads(path.read_text())["name"] in classes, path.name
    envelope = named_types()["conclave.Envelope"]
    assert [f["name"] for f in envelope["fields"]] == [
        f.name for f in dataclasses.fields(ev.Envelope)
    ]
    assert named_types()["conclave.Priority"]["symbols"] == [p.name for p in ev.Priority]


# -- Strategies derived from the dataclass fields ------------------------------------------

LONG = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=20)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return st.one_of([strategy_for(arg) for arg in typing.get_args(tp)])
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(strategy_for(item), max_size=4)
    if origin is dict:
        key, value = typing.get_args(tp)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=4)
    if tp is type(None):
        return st.none()
    if tp is str:
        return TEXT
    if tp is int:
        return LONG
    if tp is bool:
        return st.booleans()
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is bytes:
        return st.binary(max_size=40)
    if tp is ev.Priority:
        return st.sampled_from(ev.Priority)
    raise AssertionError(f"no strategy for {tp!r}: extend strategy_for")


def dataclass_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)})


envelopes = dataclass_strategy(ev.Envelope)
any_event = st.one_of([dataclass_strategy(cls) for cls in EVENT_CLASSES])


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=25)
@given(data=st.data())
def test_round_trip(cls: type[Any], data: st.DataObject) -> None:
    envelope = data.draw(envelopes, label="envelope")
    event = data.draw(dataclass_strategy(cls), label="event")
    encoded = default_codec().encode(envelope, event)
    decoded_envelope, decoded = default_codec().decode(encoded)
    assert decoded_envelope == envelope
    assert type(decoded) is cls
    assert decoded == event
    if hasattr(event, "priority"):
        assert type(getattr(decoded, "priority")) is ev.Priority  # noqa: B009


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda c: c.__name__)
def test_header_is_magic_and_the_crc64_fingerprint_of_the_canonical_form(
    cls: type[Any],
) -> None:
    schema = full_schema(event_schema_files()[cls.__name__])
    form = canonical_form(schema)
    assert form == fastavro.schema.to_parsing_canonical_form(schema).encode()
    envelope = ev.new_envelope(cls.TYPE, tenant="t", producer="test")
    event = _example(cls)
    encoded = default_codec().encode(envelope, event)
    assert encoded[:2] == b"\xc3\x01" == MAGIC
    assert encoded[2:10] == crc64_avro(form).to_bytes(8, "little")
    assert (
        encoded[2:10]
        == default_codec().registry.current(f"conclave.events.{cls.__name__}").fingerprint
    )
    # The body after the header is plain Avro binary of the writer schema.
    body = fastavro.schemaless_reader(io.BytesIO(encoded[10:]), fastavro.parse_schema(schema))
    assert isinstance(body, dict)
    assert body["envelope"]["event_id"] == envelope.event_id


def _example(cls: type[Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _simple(hints[f.name]) for f in dataclasses.fields(cls)})


def _simple(tp: Any) -> Any:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return None
    if typing.get_origin(tp) is list:
        return ["a", "b"]
    if typing.get_origin(tp) is dict:
        return {"a": _simple(typing.get_args(tp)[1])}
    simple = {str: "x", int: 7, float: 1.5, bool: True, bytes: b"\x00\xff"}
    return {**simple, ev.Priority: ev.Priority.HIGH}[tp]


def test_registry_knows_every_task_submitted_version() -> None:
    versions = default_codec().registry.fingerprints()["conclave.events.TaskSubmitted"]
    paths = [f"history/task_submitted.v{v}.avsc" for v in (1, 2, 3, 4)]
    fingerprints = [
        crc64_avro(canonical_form(full_schema(SCHEMA_DIR / path))).to_bytes(8, "little").hex()
        for path in [*paths, "task_submitted.avsc"]
    ]
    assert versions == fingerprints


@settings(max_examples=50)
@given(
    envelope=envelopes,
    task_id=TEXT,
    pool=TEXT,
    priority=st.sampled_from(ev.Priority),
    input_=TEXT,
    agent_id=st.none() | TEXT,
)
def test_v1_task_submitted_decodes_with_the_v2_default(
    envelope: ev.Envelope,
    task_id: str,
    pool: str,
    priority: ev.Priority,
    input_: str,
    agent_id: str | None,
) -> None:
    v1_schema = full_schema(SCHEMA_DIR / "history/task_submitted.v1.avsc")
    assert "max_attempts" not in {f["name"] for f in v1_schema["fields"]}
    v1_fingerprint = bytes.fromhex(
        default_codec().registry.fingerprints()["conclave.events.TaskSubmitted"][0]
    )
    record = {
        "envelope": dataclasses.asdict(envelope),
        "task_id": task_id,
        "pool": pool,
        "priority": priority.name,
        "input": input_,
        "agent_id": agent_id,
    }
    buffer = io.BytesIO()
    buffer.write(MAGIC + v1_fingerprint)
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(v1_schema), record)

    decoded_envelope, decoded = default_codec().decode(buffer.getvalue())
    v2_default = next(
        f["default"]
        for f in json.loads((SCHEMA_DIR / "task_submitted.avsc").read_text())["fields"]
        if f["name"] == "max_attempts"
    )
    assert decoded_envelope == envelope
    assert decoded == ev.TaskSubmitted(
        task_id=task_id,
        pool=pool,
        priority=priority,
        input=input_,
        agent_id=agent_id,
        max_attempts=v2_default,
    )
    assert decoded.max_attempts == 1


def test_old_versions_are_resolved_against_the_reader_schema() -> None:
    """With the v2 default changed to 4, v1 bytes decode to 4: the reader schema fills it in
    (the dataclass default alone would give 1)."""
    documents = []
    for path in sorted(SCHEMA_DIR.glob("*.avsc")):
        if path.name in NAMED_FILES:
            continue
        document = json.loads(path.read_text())
        if document["name"] == "TaskSubmitted":
            for f in document["fields"]:
                if f["name"] == "max_attempts":
                    f["default"] = 4
        documents.append(document)
    documents.append(json.loads((SCHEMA_DIR / "history/task_submitted.v1.avsc").read_text()))
    codec = Codec(SchemaRegistry(documents, named_types().values()))
    v1_schema = full_schema(SCHEMA_DIR / "history/task_submitted.v1.avsc")
    envelope = ev.new_envelope("task.submitted", tenant="t", producer="test")
    record = {
        "envelope": dataclasses.asdict(envelope),
        "task_id": "t",
        "pool": "p",
        "priority": "LOW",
        "input": "i",
        "agent_id": None,
    }
    buffer = io.BytesIO()
    buffer.write(MAGIC + crc64_avro(canonical_form(v1_schema)).to_bytes(8, "little"))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(v1_schema), record)
    _, decoded = codec.decode(buffer.getvalue())
    assert decoded == ev.TaskSubmitted(
        task_id="t", pool="p", priority=ev.Priority.LOW, input="i", agent_id=None, max_attempts=4
    )


# Fingerprints of schema versions that have been written to topics. History topics keep
# everything (retention.ms=-1), so each must stay decodable: change a schema only by
# keeping its previous version in schemas/history/ (as task_submitted.v1.avsc is).
WRITTEN_FINGERPRINTS = [
    ("AgentOutput", "76bcf67a56e3c72d"),
    ("AgentRegistered", "1ef96f6e032bae6d"),
    ("DeadLetterRecord", "9adea077ce3f3a3e"),
    ("DeliberationRequested", "7fbe1b9d92e8ddf3"),
    ("Halt", "d93805e77bc4bb2a"),
    ("Heartbeat", "476829166b41bd6a"),
    ("Resume", "f1e7cae17974aea6"),
    ("TaskCompleted", "5279655217702b7c"),
    ("TaskDeadLettered", "eb887551662e7bbd"),
    ("TaskDispatched", "3527cc75822662e5"),
    ("TaskFailed", "88504a025486eafc"),
    ("TaskQueued", "5afe4ed7952ab151"),
    ("TaskSubmitted", "d169a45e991d694c"),
    ("TaskSubmitted", "ed05d20233adf82d"),
    ("WitnessEntry", "731df6974755d21c"),
    pytest.param("WitnessEntry", "0128b43f8794ac3c", id="WitnessEntry-v1"),
    pytest.param("WitnessEntry", "f9cd34bfbbed81f1", id="WitnessEntry-v3"),
    ("WorkerBeat", "bb11252518812424"),
    pytest.param("DeadLetterRecord", "2694146afc0a2483", id="DeadLetterRecord-v2"),
    pytest.param("TaskDispatched", "4d83e4bc5a3d2a7f", id="TaskDispatched-v2"),
    pytest.param("TaskDeadLettered", "cd8de13959a8e0f5", id="TaskDeadLettered-v2"),
    pytest.param("TaskFailed", "084237190765b577", id="TaskFailed-v2"),
    pytest.param("TaskQueued", "7a96f8e1d15f84cf", id="TaskQueued-v2"),
    pytest.param("TaskSubmitted", "94bb4815e7d72870", id="TaskSubmitted-v3"),
    pytest.param("TaskSubmitted", "5c3fca906642de7b", id="TaskSubmitted-v4"),
    pytest.param("TaskQueued", "2f5a26a777e05c6c", id="TaskQueued-v3"),
    pytest.param("PoolConfigured", "8ccc06ce76923238", id="PoolConfigured-v1"),
    ("TaskRetryScheduled", "04521fc07f7b38df"),
    ("CommandRejected", "5194ac345d06b881"),
    ("ProjectionDigest", "9fc9e73bbba87ce9"),
    pytest.param("HostBeat", "7aa754234a39444f", id="HostBeat-v2"),
    pytest.param("HostBeat", "7fca52f6977341e2", id="HostBeat-v3"),
]


@pytest.mark.parametrize(("name", "fingerprint"), WRITTEN_FINGERPRINTS)
def test_every_written_schema_version_stays_decodable(name: str, fingerprint: str) -> None:
    writer = default_codec().registry.writer(bytes.fromhex(fingerprint))
    assert writer.name == f"conclave.events.{name}"


# -- Bad input: always SchemaError ------------------------------------------------------


def _known_fingerprints() -> list[bytes]:
    return [
        bytes.fromhex(fp) for fps in default_codec().registry.fingerprints().values() for fp in fps
    ]


def test_null_and_empty_values_are_schema_errors_that_say_which() -> None:
    with pytest.raises(SchemaError, match="null value"):
        default_codec().decode(None)
    with pytest.raises(SchemaError, match="empty value"):
        default_codec().decode(b"")


def test_v1_dead_letter_decodes_into_v2_with_bytes_and_v2_keeps_null_apart_from_empty() -> None:
    v1_schema = full_schema(SCHEMA_DIR / "history/dead_letter_record.v1.avsc")
    envelope = ev.new_envelope("dead_letter.recorded", tenant="t", producer="test")
    fields = {
        "reason": "r",
        "error_type": "SchemaError",
        "source_topic": "x.tasks",
        "source_partition": 0,
        "source_offset": 7,
        "processor": "scheduler",
    }
    buffer = io.BytesIO()
    buffer.write(MAGIC + crc64_avro(canonical_form(v1_schema)).to_bytes(8, "little"))
    record = {"envelope": dataclasses.asdict(envelope), "original": b"\x00raw", **fields}
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(v1_schema), record)
    _, old = default_codec().decode(buffer.getvalue())
    assert old == ev.DeadLetterRecord(original=b"\x00raw", **fields)  # type: ignore[arg-type]
    for original in (None, b""):
        letter = ev.DeadLetterRecord(original=original, **fields)  # type: ignore[arg-type]
        _, decoded = default_codec().decode(default_codec().encode(envelope, letter))
        assert isinstance(decoded, ev.DeadLetterRecord)
        assert decoded.original == original
        assert (decoded.original is None) == (original is None)


@pytest.mark.parametrize("data", [b"", b"\xc3", b"\xc3\x01", b"\xc3\x01\x00\x01\x02"])
def test_short_input_is_a_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError):
        default_codec().decode(data)


@settings(max_examples=100)
@given(st.binary(min_size=2, max_size=2).filter(lambda b: b != MAGIC), st.binary(max_size=60))
def test_bad_magic_is_a_schema_error(magic: bytes, rest: bytes) -> None:
    with pytest.raises(SchemaError, match="magic"):
        default_codec().decode(magic + rest)


@settings(max_examples=100)
@given(st.binary(min_size=8, max_size=8), st.binary(max_size=60))
def test_unknown_fingerprint_is_a_schema_error(fingerprint: bytes, body: bytes) -> None:
    if fingerprint in _known_fingerprints():
        return
    with pytest.raises(SchemaError, match="fingerprint"):
        default_codec().decode(MAGIC + fingerprint + body)


@settings(max_examples=50)
@given(envelopes, any_event, st.data())
def test_truncated_body_is_a_schema_error(
    envelope: ev.Envelope, event: Any, data: st.DataObject
) -> None:
    encoded = default_codec().encode(envelope, event)
    cut = data.draw(st.integers(10, len(encoded) - 1), label="cut")
    with pytest.raises(SchemaError):
        default_codec().decode(encoded[:cut])


@settings(max_examples=300)
@given(st.sampled_from(sorted(_known_fingerprints())), st.binary(max_size=120))
def test_random_body_after_a_valid_header_decodes_or_is_a_schema_error(
    fingerprint: bytes, body: bytes
) -> None:
    codec = default_codec()
    try:
        envelope, event = codec.decode(MAGIC + fingerprint + body)
    except SchemaError:
        return
    assert isinstance(envelope, ev.Envelope)
    writer = codec.registry.writer(fingerprint)
    assert f"conclave.events.{type(event).__name__}" == writer.name


def test_encoding_a_long_out_of_range_is_a_schema_error() -> None:
    envelope = ev.new_envelope("agent.heartbeat", tenant="t", producer="test")
    beat = ev.Heartbeat(agent_id="a", host_id="h", task_id=None, rss_bytes=2**63)
    with pytest.raises(SchemaError):
        default_codec().encode(envelope, beat)


def test_encoding_something_that_is_not_an_event_is_a_schema_error() -> None:
    envelope = ev.new_envelope("x", tenant="t", producer="test")
    with pytest.raises(SchemaError):
        default_codec().encode(envelope, envelope)  # type: ignore[arg-type]


def test_event_types_are_unique_and_dotted() -> None:
    kinds = [cls.TYPE for cls in EVENT_CLASSES]
    assert len(set(kinds)) == len(kinds)
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_.]+", kind) for kind in kinds)


def test_trailing_bytes_after_a_complete_record_are_rejected() -> None:
    codec = default_codec()
    event = ev.Halt(reason="r", operator="o")
    data = codec.encode(ev.new_envelope(event.TYPE, tenant="t", producer="p"), event)
    codec.decode(data)
    with pytest.raises(SchemaError, match="trailing bytes"):
        codec.decode(data + b"junk")

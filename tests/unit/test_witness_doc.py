"""docs/witness.md, the transparency-log sections: the worked example (tree, proofs,
key, signed checkpoint, bundle) is what the code computes, and the standalone proof
checker printed there agrees with the code, so a third party reading the page gets
the same answers as Conclave."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain.merkle import InvalidProof, MerkleTree, verify_consistency
from conclave.domain.witness import ChainHead, digest, leaf_bytes, next_entry
from conclave.errors import WitnessProofError
from conclave.transparency.bundle import InclusionBundle, load_bundle
from conclave.transparency.keys import SignerKey, VerifierKey
from conclave.transparency.proofs import (
    InclusionChecked,
    check_proof,
    consistency_bundle,
    inclusion_bundle,
    sign_checkpoint,
    tree_of,
)
from tests.unit.test_witness_chain import WORKED_HASH_2, WORKED_RECORD_1, WORKED_RECORD_2

DOC = Path(__file__).resolve().parents[2] / "docs" / "witness.md"
WORKED_RECORD_3 = (
    "c301f1e7cae17974aea64830303030303030302d303030302d343030302d383030302d303030303030303030"
    "3030331a73797374656d2e726573756d65c0b69abb838985060e64656661756c744830303030303030302d30"
    "3030302d343030302d383030302d303030303030303030303033000c636c69656e74206d61696e74656e616e"
    "636520646f6e650a616c696365"
)
ORIGIN = "conclave.example/witness"
EXAMPLE_KEY = SignerKey(ORIGIN, bytes(range(32)))


def _section(title: str) -> str:
    return DOC.read_text().split(f"\n## {title}\n")[1].split("\n## ")[0]


def _compact(text: str) -> str:
    return "".join(text.split())


def _worked_chain() -> list[Any]:
    first = next_entry(
        ChainHead(),
        subject_type="agent.output",
        subject_event_id="00000000-0000-4000-8000-000000000001",
        subject_digest=digest(bytes.fromhex(WORKED_RECORD_1)),
        recorded_at=1700000000123456,
    )
    second = next_entry(
        ChainHead().advance(first),
        subject_type="system.halt",
        subject_event_id="00000000-0000-4000-8000-000000000002",
        subject_digest=digest(bytes.fromhex(WORKED_RECORD_2)),
        recorded_at=1700000000234567,
    )
    third = next_entry(
        ChainHead().advance(second),
        subject_type="system.resume",
        subject_event_id="00000000-0000-4000-8000-000000000003",
        subject_digest=digest(bytes.fromhex(WORKED_RECORD_3)),
        recorded_at=1700000060234567,
    )
    return [first, second, third]


def test_record_3_is_a_real_resume_event() -> None:
    from conclave.domain.events import Resume
    from schemas.codec import default_codec

    envelope, event = default_codec().decode(bytes.fromhex(WORKED_RECORD_3))
    assert event == Resume(reason="maintenance done", operator="alice")
    assert envelope.event_id == "00000000-0000-4000-8000-000000000003"
    assert envelope.occurred_at == 1700000060100000


def test_worked_tree_in_the_doc_is_what_the_code_computes() -> None:
    section = _compact(_section("Worked example: a tree of three entries"))
    entries = _worked_chain()
    assert entries[1].entry_hash.hex() == WORKED_HASH_2
    tree = tree_of(entries)
    values = [
        WORKED_RECORD_3,
        entries[2].subject_digest.hex(),
        entries[2].entry_hash.hex(),
        *(tree.leaf_hash(i).hex() for i in range(3)),
        tree.root(2).hex(),
        tree.root(3).hex(),
        base64.b64encode(tree.root(3)).decode(),
    ]
    for value in values:
        assert value in section, f"{value[:16]}... missing from the worked example"
    assert [h.hex() for h in tree.inclusion_proof(1)] == [
        tree.leaf_hash(0).hex(),
        tree.leaf_hash(2).hex(),
    ]
    assert tree.consistency_proof(2, 3) == [tree.leaf_hash(2)]


def test_worked_key_and_signed_checkpoint_in_the_doc() -> None:
    section = _section("Worked example: a tree of three entries")
    compact = _compact(section)
    verifier = EXAMPLE_KEY.verifier
    assert EXAMPLE_KEY.text() in compact
    assert verifier.text() in compact
    assert verifier.public_key.hex() in compact
    assert f"{verifier.key_id:08x}" == "eefb2039"
    digest_of_name = hashlib.sha256(ORIGIN.encode() + b"\n\x01" + verifier.public_key).digest()
    assert digest_of_name[:4].hex() == "eefb2039"
    note = sign_checkpoint(tree_of(_worked_chain()), ORIGIN, [EXAMPLE_KEY])
    assert note.rstrip("\n") in section  # the checkpoint block, byte for byte
    text = note.split("\n\n")[0] + "\n"
    assert len(text.encode()) == 72
    assert "72 bytes" in section


@functools.cache
def _doc_bundle() -> str:
    blocks = re.findall(
        r"```json\n(.*?)```", _section("Worked example: a tree of three entries"), re.DOTALL
    )
    assert len(blocks) == 1
    return str(blocks[0])


def test_worked_bundle_in_the_doc_is_what_prove_writes_and_checks() -> None:
    entries = _worked_chain()
    tree = tree_of(entries)
    note = sign_checkpoint(tree, ORIGIN, [EXAMPLE_KEY])
    bundle = inclusion_bundle(tree, leaf_bytes(entries[1]), note)
    assert json.loads(_doc_bundle()) == json.loads(bundle.to_json())
    vkey = VerifierKey.parse(
        "conclave.example/witness+eefb2039+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4"
    )
    result = check_proof(load_bundle(_doc_bundle()), [vkey])
    assert isinstance(result, InclusionChecked)
    summary = f"OK: {result.summary()}"
    section = _compact(_section("Worked example: a tree of three entries"))
    head, tail = summary.split(WORKED_HASH_2)
    assert _compact(head) + WORKED_HASH_2[:8] in section
    assert _compact(tail) in section


# -- the standalone checker printed in the doc --------------------------------------------


@functools.cache
def _doc_checker() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", _section("Standalone proof checker"), re.DOTALL)
    assert len(blocks) == 1
    code = blocks[0]
    imported = set(re.findall(r"^(?:import|from) ([\w.]+)", code, flags=re.MULTILINE))
    assert imported <= {
        "base64",
        "hashlib",
        "json",
        "cryptography.exceptions",
        "cryptography.hazmat.primitives.asymmetric.ed25519",
    }
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


VKEY = EXAMPLE_KEY.verifier.text()


def test_doc_checker_accepts_the_worked_bundle_and_refuses_tampering() -> None:
    check = _doc_checker()["check_inclusion"]
    assert check(_doc_bundle(), VKEY) is None
    data = json.loads(_doc_bundle())
    for key, value in [
        ("index", 2),
        ("tree_size", 4),
        ("path", data["path"][:1]),
        ("path", list(reversed(data["path"]))),
        ("checkpoint", data["checkpoint"].replace("\n3\n", "\n4\n")),
    ]:
        assert check(json.dumps({**data, key: value}), VKEY) is not None, key
    assert check(_doc_bundle(), SignerKey.generate(ORIGIN).verifier.text()) is not None


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.data())
def test_doc_checker_agrees_with_check_proof(n: int, data: st.DataObject) -> None:
    head, entries = ChainHead(), []
    for i in range(1, n + 1):
        entry = next_entry(
            head,
            subject_type="agent.output",
            subject_event_id=f"e{i}",
            subject_digest=digest(bytes([i])),
            recorded_at=i,
        )
        entries.append(entry)
        head = head.advance(entry)
    tree = tree_of(entries)
    size = data.draw(st.integers(1, n), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    note = sign_checkpoint(tree, ORIGIN, [EXAMPLE_KEY], size=size)
    bundle = inclusion_bundle(tree, leaf_bytes(entries[index]), note)
    assert _doc_checker()["check_inclusion"](bundle.to_json(), VKEY) is None
    path = list(bundle.path)
    if path:
        at = data.draw(st.integers(0, len(path) - 1), label="at")
        path[at] = bytes([path[at][0] ^ 4]) + path[at][1:]
        forged = InclusionBundle(
            entry=bundle.entry,
            index=bundle.index,
            tree_size=bundle.tree_size,
            path=tuple(path),
            checkpoint=note,
        )
        assert _doc_checker()["check_inclusion"](forged.to_json(), VKEY) is not None
        with pytest.raises(WitnessProofError, match="bad proof"):
            check_proof(forged, [EXAMPLE_KEY.verifier])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=4), max_size=40), st.data())
def test_doc_consistency_agrees_with_verify_consistency(
    leaves: list[bytes], data: st.DataObject
) -> None:
    consistent = _doc_checker()["consistent"]
    tree = MerkleTree(leaves)
    n = data.draw(st.integers(0, tree.size), label="n")
    m = data.draw(st.integers(0, n), label="m")
    path = tree.consistency_proof(m, n)
    assert consistent(m, n, tree.root(m), tree.root(n), path)
    if path:
        wrong = [*path[:-1], bytes(32)]
        try:
            verify_consistency(m, n, tree.root(m), tree.root(n), wrong)
            ours = True
        except InvalidProof:
            ours = False
        assert consistent(m, n, tree.root(m), tree.root(n), wrong) == ours is False


def test_worked_consistency_bundle_checks() -> None:
    tree = tree_of(_worked_chain())
    bundle = consistency_bundle(
        tree,
        sign_checkpoint(tree, ORIGIN, [EXAMPLE_KEY], size=2),
        sign_checkpoint(tree, ORIGIN, [EXAMPLE_KEY]),
    )
    assert bundle.path == (tree.leaf_hash(2),)
    assert (
        check_proof(bundle, [EXAMPLE_KEY.verifier])
        .summary()
        .endswith(f"(signed by {EXAMPLE_KEY.verifier.label}; {EXAMPLE_KEY.verifier.label})")
    )


# -- the schema fingerprint, as the doc describes it --------------------------------------


def _crc64_avro(data: bytes) -> int:
    """The Avro specification's 64-bit Rabin fingerprint, written out from the spec."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_the_fingerprint_is_of_the_canonical_form_with_the_envelope_inlined() -> None:
    import fastavro

    from conclave.domain.events import Envelope
    from schemas.codec import default_codec

    schemas = Path(__file__).resolve().parents[2] / "schemas"
    document = json.loads((schemas / "witness_entry.avsc").read_text())
    envelope = json.loads((schemas / "envelope.avsc").read_text())
    assert document["fields"][0] == {"name": "envelope", "type": "conclave.Envelope"}
    document["fields"][0]["type"] = envelope
    canonical = fastavro.schema.to_parsing_canonical_form(document)
    header = b"\xc3\x01" + _crc64_avro(canonical.encode()).to_bytes(8, "little")

    entry = _worked_chain()[0]
    meta = Envelope(
        event_id="e",
        event_type="witness.entry",
        occurred_at=1,
        tenant="default",
        correlation_id="c",
        causation_id=None,
        producer="processors",
    )
    assert default_codec().encode(meta, entry)[:10] == header
    section = _compact(DOC.read_text().split("\n## Where entries live\n")[1].split("\n## ")[0])
    assert header.hex() in section
    assert canonical[:120] in section


def test_a_schema_with_priority_is_fingerprinted_with_both_named_types_inlined() -> None:
    """Written from the doc: the envelope and conclave.Priority are replaced by their
    definitions at first use, then the Parsing Canonical Form is fingerprinted."""
    import fastavro

    from schemas.codec import default_codec

    schemas = Path(__file__).resolve().parents[2] / "schemas"
    named = {
        "conclave.Envelope": json.loads((schemas / "envelope.avsc").read_text()),
        "conclave.Priority": json.loads((schemas / "priority.avsc").read_text()),
    }
    document = json.loads((schemas / "task_submitted.avsc").read_text())
    seen: set[str] = set()
    for field in document["fields"]:
        kind = field["type"]
        if isinstance(kind, str) and kind in named and kind not in seen:
            seen.add(kind)
            field["type"] = named[kind]
    assert seen == set(named)
    canonical = fastavro.schema.to_parsing_canonical_form(document)
    assert '"doc"' not in canonical
    assert '"default"' not in canonical
    fingerprint = _crc64_avro(canonical.encode()).to_bytes(8, "little")
    current = default_codec().registry.current("conclave.events.TaskSubmitted")
    assert current.fingerprint == fingerprint
    assert default_codec().registry.canonical_forms()[fingerprint.hex()] == canonical


# -- the export ----------------------------------------------------------------------------


def _example_export() -> list[str]:
    import dataclasses

    from conclave.transparency.export import export_lines

    first, second, third = _worked_chain()
    entries = [
        dataclasses.replace(first, task_id="task-1", agent_id="agent-1", attempt=1),
        dataclasses.replace(second, detail="maintenance"),
        dataclasses.replace(third, detail="maintenance done"),
    ]
    tree = tree_of(entries)
    notes = [
        sign_checkpoint(tree, ORIGIN, [EXAMPLE_KEY], size=2),
        sign_checkpoint(tree, ORIGIN, [EXAMPLE_KEY]),
    ]
    return list(export_lines(entries, notes, [EXAMPLE_KEY.verifier], origin=ORIGIN, schemas={}))


def test_the_export_example_in_the_doc_is_what_the_code_writes_and_verifies(
    tmp_path: Path,
) -> None:
    import importlib.util

    from conclave.transparency.export import verify_export

    blocks = re.findall(r"```jsonl\n(.*?)```", _section("Export"), re.DOTALL)
    assert len(blocks) == 1
    assert blocks[0].splitlines() == _example_export()
    checked = verify_export(blocks[0].splitlines(), [EXAMPLE_KEY.verifier])
    assert checked.checker.size == 3
    assert checked.checker.checkpoints == 2
    # The standalone verifier shipped next to the doc agrees.
    spec = importlib.util.spec_from_file_location(
        "verify_export", DOC.with_name("verify_export.py")
    )
    assert spec is not None
    assert spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "example.jsonl"
    path.write_text(blocks[0])
    size, checkpoints, root, head = script.verify(str(path), [VKEY])
    assert (size, checkpoints) == (3, 2)
    assert root == tree_of(_worked_chain()).root()
    assert head.hex() == _worked_chain()[2].entry_hash.hex()
    # Every key the doc says an export line has, it has.
    section = _section("Export")
    for line in blocks[0].splitlines():
        for key in json.loads(line):
            assert f"`{key}`" in section, key

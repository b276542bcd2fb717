"""The witness chain: built chains verify, every tampering is caught at the right sequence.

The byte rule is re-implemented here from docs/witness.md (hashlib + struct only),
so a change to the code that breaks the documented format fails these tests, and
the verifier and worked example printed in the document are run and checked too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain.events import WitnessEntry
from conclave.domain.witness import (
    GENESIS_HASH,
    ChainHead,
    check_subjects,
    digest,
    entry_hash,
    first_violation,
    next_entry,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "witness.md"

I64 = st.integers(-(2**63), 2**63 - 1)
HASH = st.binary(min_size=32, max_size=32)
SUBJECT_TYPES = st.sampled_from(["agent.output", "task.failed", "system.halt", "system.resume"])


def documented_hash(
    sequence: int,
    previous_hash: bytes,
    subject_type: str,
    subject_event_id: str,
    subject_digest: bytes,
    recorded_at: int,
) -> bytes:
    """docs/witness.md, "The hashing rule", written out independently."""
    kind = subject_type.encode("utf-8")
    subject = subject_event_id.encode("utf-8")
    preimage = (
        b"conclave.witness.v1\x00"
        + struct.pack(">Q", sequence)
        + previous_hash
        + struct.pack(">I", len(kind))
        + kind
        + struct.pack(">I", len(subject))
        + subject
        + subject_digest
        + struct.pack(">q", recorded_at)
    )
    return hashlib.sha256(preimage).digest()


@st.composite
def subjects(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "subject_type": draw(SUBJECT_TYPES),
        "subject_event_id": draw(st.uuids().map(str) | st.text(max_size=12)),
        "subject_digest": digest(draw(st.binary(max_size=16))),
        "recorded_at": draw(I64),
        "task_id": draw(st.none() | st.text(max_size=6)),
        "agent_id": draw(st.none() | st.text(max_size=6)),
        "detail": draw(st.text(max_size=6)),
        "attempt": draw(st.none() | st.integers(1, 5)),
    }


def build_chain(items: list[dict[str, Any]]) -> list[WitnessEntry]:
    head = ChainHead()
    chain = []
    for item in items:
        entry = next_entry(head, **item)
        chain.append(entry)
        head = head.advance(entry)
    return chain


chains = st.lists(subjects(), min_size=1, max_size=8).map(build_chain)
long_chains = st.lists(subjects(), min_size=2, max_size=8).map(build_chain)


@settings(max_examples=60)
@given(chains)
def test_built_chain_verifies(chain: list[WitnessEntry]) -> None:
    assert first_violation(chain) is None
    assert [e.sequence for e in chain] == list(range(1, len(chain) + 1))
    assert chain[0].previous_hash == GENESIS_HASH == bytes(32)
    for before, after in itertools.pairwise(chain):
        assert after.previous_hash == before.entry_hash


def test_empty_chain_verifies() -> None:
    assert first_violation([]) is None


HASHED_FIELDS = (
    "sequence",
    "previous_hash",
    "subject_type",
    "subject_event_id",
    "subject_digest",
    "recorded_at",
    "entry_hash",
)


def _tampered_value(data: st.DataObject, entry: WitnessEntry, field: str) -> Any:
    old = getattr(entry, field)
    if field in ("sequence", "recorded_at"):
        strategy: st.SearchStrategy[Any] = st.integers(0, 2**64 - 1) if field == "sequence" else I64
    elif field in ("previous_hash", "subject_digest", "entry_hash"):
        strategy = HASH
    else:
        strategy = st.text(max_size=12)
    return data.draw(strategy.filter(lambda v: v != old), label=f"new {field}")


@settings(max_examples=150)
@given(chains, st.sampled_from(HASHED_FIELDS), st.data())
def test_tampering_any_hashed_field_is_caught_at_that_entry(
    chain: list[WitnessEntry], field: str, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(chain) - 1), label="index")
    victim = chain[index]
    tampered = list(chain)
    tampered[index] = dataclasses.replace(victim, **{field: _tampered_value(data, victim, field)})
    violation = first_violation(tampered)
    assert violation is not None
    assert violation.sequence == victim.sequence


@settings(max_examples=60)
@given(chains, st.data())
def test_tampering_a_field_and_rehashing_the_entry_is_caught_at_the_next(
    chain: list[WitnessEntry], data: st.DataObject
) -> None:
    """Recomputing the tampered entry's own hash only moves the break to its successor."""
    index = data.draw(st.integers(0, len(chain) - 1), label="index")
    victim = chain[index]
    forged = dataclasses.replace(victim, subject_digest=digest(b"forged" + victim.subject_digest))
    forged = dataclasses.replace(
        forged,
        entry_hash=entry_hash(
            sequence=forged.sequence,
            previous_hash=forged.previous_hash,
            subject_type=forged.subject_type,
            subject_event_id=forged.subject_event_id,
            subject_digest=forged.subject_digest,
            recorded_at=forged.recorded_at,
        ),
    )
    tampered = [*chain[:index], forged, *chain[index + 1 :]]
    violation = first_violation(tampered)
    if index == len(chain) - 1:
        # A rewritten tail verifies: only a previously recorded head reveals it (see the doc).
        assert violation is None
        assert tampered[-1].entry_hash != chain[-1].entry_hash
    else:
        assert violation is not None
        assert violation.sequence == victim.sequence + 1


@settings(max_examples=60)
@given(long_chains, st.data())
def test_dropping_an_entry_is_caught_at_its_sequence(
    chain: list[WitnessEntry], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(chain) - 2), label="index")  # not the last: see below
    violation = first_violation(chain[:index] + chain[index + 1 :])
    assert violation is not None
    assert violation.sequence == index + 1


@settings(max_examples=60)
@given(long_chains, st.data())
def test_swapping_two_entries_is_caught_at_the_first(
    chain: list[WitnessEntry], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(chain) - 2), label="i")
    j = data.draw(st.integers(i + 1, len(chain) - 1), label="j")
    swapped = list(chain)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    violation = first_violation(swapped)
    assert violation is not None
    assert violation.sequence == i + 1


def test_dropping_the_last_entry_is_only_visible_against_a_recorded_head() -> None:
    chain = build_chain(
        [
            {
                "subject_type": "agent.output",
                "subject_event_id": f"e{n}",
                "subject_digest": digest(bytes([n])),
                "recorded_at": n,
            }
            for n in range(3)
        ]
    )
    assert first_violation(chain[:-1]) is None
    assert ChainHead().advance(chain[-2]) != ChainHead().advance(chain[-1])


@settings(max_examples=50)
@given(chains, st.data())
def test_attribution_fields_are_not_hashed(chain: list[WitnessEntry], data: st.DataObject) -> None:
    """As documented: task_id, agent_id, detail, attempt are bound only through subject_digest."""
    index = data.draw(st.integers(0, len(chain) - 1), label="index")
    changed = dataclasses.replace(chain[index], task_id="x", agent_id="y", detail="z", attempt=9)
    assert first_violation([*chain[:index], changed, *chain[index + 1 :]]) is None


@settings(max_examples=300)
@given(
    sequence=st.integers(0, 2**64 - 1),
    previous_hash=HASH,
    subject_type=st.text(),
    subject_event_id=st.text(),
    subject_digest=HASH,
    recorded_at=I64,
)
def test_documented_byte_rule_agrees_with_entry_hash(
    sequence: int,
    previous_hash: bytes,
    subject_type: str,
    subject_event_id: str,
    subject_digest: bytes,
    recorded_at: int,
) -> None:
    fields: dict[str, Any] = {
        "sequence": sequence,
        "previous_hash": previous_hash,
        "subject_type": subject_type,
        "subject_event_id": subject_event_id,
        "subject_digest": subject_digest,
        "recorded_at": recorded_at,
    }
    assert entry_hash(**fields) == documented_hash(**fields)


def test_length_prefixes_keep_field_boundaries() -> None:
    common: dict[str, Any] = {
        "sequence": 1,
        "previous_hash": bytes(32),
        "subject_digest": bytes(32),
        "recorded_at": 0,
    }
    assert entry_hash(subject_type="ab", subject_event_id="c", **common) != entry_hash(
        subject_type="a", subject_event_id="bc", **common
    )


@pytest.mark.parametrize("field", ["subject_digest", "previous_hash"])
@pytest.mark.parametrize("size", [0, 31, 33])
def test_a_hash_of_the_wrong_size_is_a_violation_not_a_crash(field: str, size: int) -> None:
    chain = build_chain(
        [
            {
                "subject_type": "agent.output",
                "subject_event_id": f"e{n}",
                "subject_digest": digest(bytes([n])),
                "recorded_at": n,
            }
            for n in range(3)
        ]
    )
    changes: dict[str, Any] = {field: bytes(size)}
    chain[1] = dataclasses.replace(chain[1], **changes)
    violation = first_violation(chain)
    assert violation is not None
    assert violation.sequence == 2


# -- docs/witness.md: its verifier and its worked example ---------------------------------


@functools.cache
def _doc_verifier() -> dict[str, Any]:
    section = DOC.read_text().split("\n## Standalone verifier\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "'Standalone verifier' must hold exactly one python block"
    code = blocks[0]
    assert set(re.findall(r"^import (\w+)", code, flags=re.MULTILINE)) <= {"hashlib", "struct"}
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def _as_row(entry: WitnessEntry) -> dict[str, Any]:
    return {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}


@settings(max_examples=60)
@given(chains, st.sampled_from(HASHED_FIELDS), st.data())
def test_doc_verifier_agrees_with_first_violation(
    chain: list[WitnessEntry], field: str, data: st.DataObject
) -> None:
    verify = _doc_verifier()["verify"]
    assert verify([_as_row(e) for e in chain]) is None
    head = (chain[-1].sequence, chain[-1].entry_hash)
    assert verify([_as_row(e) for e in chain], head) is None
    assert verify([_as_row(e) for e in chain[:-1]], head) is not None

    index = data.draw(st.integers(0, len(chain) - 1), label="index")
    tampered = list(chain)
    tampered[index] = dataclasses.replace(
        chain[index], **{field: _tampered_value(data, chain[index], field)}
    )
    expected = first_violation(tampered)
    found = verify([_as_row(e) for e in tampered])
    assert expected is not None
    assert found is not None
    assert found[0] == expected.sequence


WORKED_RECORD_1 = (
    "c30176bcf67a56e3c72d4830303030303030302d303030302d343030302d383030302d3030303030303030"
    "3030303118"
    "6167656e742e6f75747075748080f281838985060e64656661756c740c7461736b2d31001c72"
    "756e74696d653a686f73742d310c7461736b2d310e6167656e742d310206617965b81700"
)
WORKED_RECORD_2 = (
    "c301d93805e77bc4bb2a4830303030303030302d303030302d343030302d383030302d3030303030303030"
    "303030321673797374656d2e68616c74c09afe81838985060e64656661756c744830303030303030302d30"
    "3030302d343030302d383030302d303030303030303030303032000c636c69656e74166d61696e74656e61"
    "6e63650a616c696365"
)
WORKED_HASH_1 = "348fc8f6feb203524fca4975f529504b02fd053e34ae80715e921c3e424fe0d4"
WORKED_HASH_2 = "16f6f3e17ebaef73df15eb907a832b828cfa289ab5482373a4aa515d186b5bc1"


def test_worked_example_in_the_doc_is_what_the_code_computes() -> None:
    text = DOC.read_text()
    compact = "".join(text.split())
    first = next_entry(
        ChainHead(),
        subject_type="agent.output",
        subject_event_id="00000000-0000-4000-8000-000000000001",
        subject_digest=digest(bytes.fromhex(WORKED_RECORD_1)),
        recorded_at=1700000000123456,
        task_id="task-1",
        agent_id="agent-1",
        attempt=1,
    )
    second = next_entry(
        ChainHead().advance(first),
        subject_type="system.halt",
        subject_event_id="00000000-0000-4000-8000-000000000002",
        subject_digest=digest(bytes.fromhex(WORKED_RECORD_2)),
        recorded_at=1700000000234567,
        detail="maintenance",
    )
    assert first.entry_hash.hex() == WORKED_HASH_1
    assert second.entry_hash.hex() == WORKED_HASH_2
    assert first_violation([first, second]) is None
    for value in (
        WORKED_RECORD_1,
        WORKED_RECORD_2,
        first.subject_digest.hex(),
        second.subject_digest.hex(),
        WORKED_HASH_1,
        WORKED_HASH_2,
    ):
        assert value in compact, f"{value[:16]}... missing from docs/witness.md"

    # The annotated preimage of entry 1, read back from the document.
    block = text.split("The 156 bytes hashed for entry 1")[1].split("```")[1]
    preimage = bytes.fromhex("".join(re.findall(r"[0-9a-f]{8,}", block)))
    assert len(preimage) == 156
    assert hashlib.sha256(preimage).digest() == first.entry_hash
    verify = _doc_verifier()["verify"]
    assert verify([_as_row(first), _as_row(second)], (2, second.entry_hash)) is None


def test_check_subjects_names_missing_and_altered_events() -> None:
    head = ChainHead()
    chain = []
    for i, data in enumerate([b"first", b"second", b"third"], start=1):
        entry = next_entry(
            head,
            subject_type="agent.output",
            subject_event_id=f"e{i}",
            subject_digest=digest(data),
            recorded_at=i,
        )
        chain.append(entry)
        head = head.advance(entry)
    intact = {"e1": digest(b"first"), "e2": digest(b"second"), "e3": digest(b"third")}
    assert check_subjects(chain, intact) is None

    altered = check_subjects(chain, {**intact, "e2": digest(b"SECOND")})
    assert altered is not None
    assert altered.sequence == 2
    assert "do not match" in altered.reason

    missing = check_subjects(chain, {k: v for k, v in intact.items() if k != "e3"})
    assert missing is not None
    assert missing.sequence == 3
    assert "missing" in missing.reason


@pytest.mark.parametrize(
    ("aging", "weights", "said"),
    [
        (None, {}, "capacity 4"),
        (2, {}, "capacity 4, aging 2 turns"),
        (None, {"bolt": 2, "acme/x": 3}, "capacity 4, weights acme/x=3 bolt=2"),
        (
            None,
            {f"t{n:02}": n + 1 for n in range(12)},
            "capacity 4, weights " + " ".join(f"t{n:02}={n + 1}" for n in range(10)) + " (+2 more)",
        ),
    ],
)
def test_a_pool_settings_entry_names_the_whole_setting(
    aging: int | None, weights: dict[str, int], said: str
) -> None:
    from conclave.domain.events import PoolConfigured
    from streams.witness import pool_setting

    event = PoolConfigured(
        pool="p", capacity=4, reason="r", operator="o", aging_turns=aging, weights=weights
    )
    assert pool_setting(event) == said

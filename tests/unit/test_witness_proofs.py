"""Proof bundles over real witness chains: built, written as JSON, read back and
checked with nothing but the bundle and public keys; every kind of tampering refused
with its reason."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain.events import WitnessEntry
from conclave.domain.merkle import leaf_hash
from conclave.domain.witness import (
    ChainHead,
    HashedEntry,
    digest,
    leaf_bytes,
    next_entry,
    parse_entry_bytes,
)
from conclave.errors import ProofFailure, WitnessProofError
from conclave.transparency.bundle import ConsistencyBundle, InclusionBundle, load_bundle
from conclave.transparency.keys import SignerKey, VerifierKey
from conclave.transparency.proofs import (
    ConsistencyChecked,
    InclusionChecked,
    check_proof,
    consistency_bundle,
    inclusion_bundle,
    prove_inclusion,
    sign_checkpoint,
    tree_of,
)

ORIGIN = "conclave.test/witness"
KEY = SignerKey(ORIGIN, bytes(range(32)))
OTHER_KEY = SignerKey(ORIGIN, bytes(range(1, 33)))  # same name, another key: a rotation
STRANGER = SignerKey("someone.else/log", bytes(range(2, 34)))


def chain(n: int, salt: str = "") -> list[WitnessEntry]:
    head, entries = ChainHead(), []
    for i in range(1, n + 1):
        entry = next_entry(
            head,
            subject_type="agent.output" if i % 3 else "system.halt",
            subject_event_id=f"00000000-0000-4000-8000-{i:012d}",
            subject_digest=digest(f"record {i}{salt}".encode()),
            recorded_at=1_700_000_000_000_000 + i,
        )
        entries.append(entry)
        head = head.advance(entry)
    return entries


def fails(reason: ProofFailure, bundle: InclusionBundle | ConsistencyBundle, **kw: object) -> str:
    keys = kw.pop("keys", [KEY.verifier])
    assert isinstance(keys, list)
    with pytest.raises(WitnessProofError) as caught:
        check_proof(bundle, keys, **kw)  # type: ignore[arg-type]
    assert caught.value.reason is reason, str(caught.value)
    return str(caught.value)


def test_entry_bytes_read_back_as_the_hashed_fields() -> None:
    for entry in chain(5):
        data = leaf_bytes(entry)
        parsed = parse_entry_bytes(data)
        assert parsed == HashedEntry(
            sequence=entry.sequence,
            previous_hash=entry.previous_hash,
            subject_type=entry.subject_type,
            subject_event_id=entry.subject_event_id,
            subject_digest=entry.subject_digest,
            recorded_at=entry.recorded_at,
        )
        assert parsed.entry_hash == entry.entry_hash
        for bad in (data[:-1], data + b"\x00", b"X" + data[1:], data[:30]):
            with pytest.raises(ValueError, match=r"."):
                parse_entry_bytes(bad)


def test_an_inclusion_bundle_round_trips_through_json_and_checks() -> None:
    entries = chain(7)
    bundle = prove_inclusion(entries, 5, ORIGIN, [KEY])
    loaded = load_bundle(bundle.to_json())
    assert loaded == bundle
    result = check_proof(loaded, [KEY.verifier])
    assert isinstance(result, InclusionChecked)
    assert result.entry.sequence == 5
    assert result.entry.entry_hash == entries[4].entry_hash
    assert result.signed.checkpoint.size == 7
    assert result.signed.signed_by == (KEY.verifier,)
    assert "entry 5" in result.summary()
    assert KEY.verifier.label in result.summary()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40))
def test_every_entry_proves_against_every_later_signed_checkpoint(n: int) -> None:
    entries = chain(n)
    tree = tree_of(entries)
    for size in range(1, n + 1):
        note = sign_checkpoint(tree, ORIGIN, [KEY], size=size)
        for entry in entries[:size]:
            bundle = inclusion_bundle(tree, leaf_bytes(entry), note)
            result = check_proof(load_bundle(bundle.to_json()), [KEY.verifier])
            assert isinstance(result, InclusionChecked)
            assert result.entry.sequence == entry.sequence


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.data())
def test_consistency_bundles_between_random_checkpoints(n: int, data: st.DataObject) -> None:
    tree = tree_of(chain(n))
    new = data.draw(st.integers(0, n), label="new")
    old = data.draw(st.integers(0, new), label="old")
    bundle = consistency_bundle(
        tree,
        sign_checkpoint(tree, ORIGIN, [KEY], size=old),
        sign_checkpoint(tree, ORIGIN, [OTHER_KEY], size=new),  # rotated between the two
    )
    result = check_proof(load_bundle(bundle.to_json()), [KEY.verifier, OTHER_KEY.verifier])
    assert isinstance(result, ConsistencyChecked)
    assert (result.old.checkpoint.size, result.new.checkpoint.size) == (old, new)
    assert result.new.signed_by == (OTHER_KEY.verifier,)


def test_a_rewritten_history_is_not_consistent_with_an_earlier_checkpoint() -> None:
    honest, forked = chain(9), chain(9, salt="forged")
    honest_tree = tree_of(honest)
    forked_tree = tree_of(honest[:3] + forked[3:])  # not a valid chain past 3: that's the point
    old = sign_checkpoint(honest_tree, ORIGIN, [KEY], size=6)
    new = sign_checkpoint(forked_tree, ORIGIN, [KEY], size=9)
    path = tuple(forked_tree.consistency_proof(6, 9))
    bundle = ConsistencyBundle(old_checkpoint=old, new_checkpoint=new, path=path)
    fails(ProofFailure.BAD_PROOF, bundle)


# -- tampering ---------------------------------------------------------------------------


@pytest.fixture
def bundle() -> InclusionBundle:
    return prove_inclusion(chain(11), 9, ORIGIN, [KEY])  # 11: not a power of two


def test_a_flipped_path_byte_is_refused(bundle: InclusionBundle) -> None:
    for at in range(len(bundle.path)):
        path = list(bundle.path)
        path[at] = path[at][:7] + bytes([path[at][7] ^ 0x20]) + path[at][8:]
        message = fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, path=tuple(path)))
        assert "root hash" in message


def test_a_truncated_or_extended_path_is_refused(bundle: InclusionBundle) -> None:
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, path=bundle.path[:-1]))
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, path=(*bundle.path, bytes(32))))
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, path=(bundle.path[0][:31],)))


def test_a_wrong_index_is_refused(bundle: InclusionBundle) -> None:
    message = fails(ProofFailure.WRONG_ENTRY, dataclasses.replace(bundle, index=bundle.index + 1))
    assert "entry 9 belongs at index 8" in message


def test_another_entry_with_the_same_path_is_refused(bundle: InclusionBundle) -> None:
    other = leaf_bytes(chain(11)[7])  # entry 8, claimed at entry 9's place
    fails(ProofFailure.WRONG_ENTRY, dataclasses.replace(bundle, entry=other))
    # with its index changed to match, the path no longer fits
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, entry=other, index=7))


def test_a_tampered_entry_is_refused(bundle: InclusionBundle) -> None:
    data = bytearray(bundle.entry)
    data[-1] ^= 1  # recorded_at
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, entry=bytes(data)))
    fails(ProofFailure.MALFORMED, dataclasses.replace(bundle, entry=bundle.entry[:-1]))


def test_a_wrong_tree_size_is_refused(bundle: InclusionBundle) -> None:
    for size in (10, 12, 22):
        message = fails(ProofFailure.WRONG_CHECKPOINT, dataclasses.replace(bundle, tree_size=size))
        assert "checkpoint for 11" in message


def test_a_checkpoint_signed_by_an_unknown_key_is_refused(bundle: InclusionBundle) -> None:
    message = fails(ProofFailure.UNKNOWN_KEY, bundle, keys=[OTHER_KEY.verifier])
    assert KEY.verifier.label in message
    fails(ProofFailure.UNKNOWN_KEY, bundle, keys=[])


def test_a_bad_signature_is_refused(bundle: InclusionBundle) -> None:
    text, _, signatures = bundle.checkpoint.rpartition("\n\n")
    name, encoded = signatures.rstrip("\n").split(" ")[1:]
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 1
    forged = f"{text}\n\n\u2014 {name} {base64.b64encode(bytes(raw)).decode()}\n"
    fails(ProofFailure.BAD_SIGNATURE, dataclasses.replace(bundle, checkpoint=forged))


def test_a_checkpoint_with_a_changed_root_is_refused(bundle: InclusionBundle) -> None:
    # The signature no longer covers the text.
    lines = bundle.checkpoint.split("\n")
    lines[2] = base64.b64encode(bytes(32)).decode()
    fails(ProofFailure.BAD_SIGNATURE, dataclasses.replace(bundle, checkpoint="\n".join(lines)))


def test_a_proof_against_the_wrong_checkpoint_is_refused(bundle: InclusionBundle) -> None:
    # A genuine, well-signed checkpoint of the same size but another history.
    other = sign_checkpoint(tree_of(chain(11, salt="x")), ORIGIN, [KEY])
    message = fails(ProofFailure.BAD_PROOF, dataclasses.replace(bundle, checkpoint=other))
    assert "root hash" in message
    # A checkpoint of the same log at another size.
    later = sign_checkpoint(tree_of(chain(12)), ORIGIN, [KEY])
    fails(ProofFailure.WRONG_CHECKPOINT, dataclasses.replace(bundle, checkpoint=later))


def test_a_checkpoint_of_another_log_is_refused(bundle: InclusionBundle) -> None:
    theirs = sign_checkpoint(tree_of(chain(11)), "another.example/log", [KEY])
    message = fails(ProofFailure.WRONG_ORIGIN, dataclasses.replace(bundle, checkpoint=theirs))
    assert "another.example/log" in message
    fails(ProofFailure.WRONG_ORIGIN, bundle, origin="conclave.test/other")
    # The origin is taken from the key's name only when none is given.
    stranger_signed = sign_checkpoint(tree_of(chain(11)), ORIGIN, [STRANGER])
    fails(
        ProofFailure.WRONG_ORIGIN,
        dataclasses.replace(bundle, checkpoint=stranger_signed),
        keys=[STRANGER.verifier],
    )
    result = check_proof(
        dataclasses.replace(bundle, checkpoint=stranger_signed),
        [STRANGER.verifier],
        origin=ORIGIN,
    )
    assert isinstance(result, InclusionChecked)


def test_consistency_tampering_is_refused() -> None:
    tree = tree_of(chain(13))
    old = sign_checkpoint(tree, ORIGIN, [KEY], size=5)
    new = sign_checkpoint(tree, ORIGIN, [KEY], size=13)
    good = consistency_bundle(tree, old, new)
    assert isinstance(check_proof(good, [KEY.verifier]), ConsistencyChecked)
    path = list(good.path)
    path[1] = bytes([path[1][0] ^ 1]) + path[1][1:]
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(good, path=tuple(path)))
    fails(ProofFailure.BAD_PROOF, dataclasses.replace(good, path=good.path[:-1]))
    fails(
        ProofFailure.WRONG_CHECKPOINT,
        ConsistencyBundle(old_checkpoint=new, new_checkpoint=old, path=good.path),
    )
    theirs = sign_checkpoint(tree, "another.example/log", [STRANGER], size=13)
    fails(
        ProofFailure.WRONG_ORIGIN,
        dataclasses.replace(good, new_checkpoint=theirs),
        keys=[KEY.verifier, STRANGER.verifier],
    )
    fails(ProofFailure.UNKNOWN_KEY, good, keys=[STRANGER.verifier])


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("path"),
        lambda d: d.update(extra=1),
        lambda d: d.update(format="conclave.witness.inclusion/v0"),
        lambda d: d.update(index="8"),
        lambda d: d.update(index=True),
        lambda d: d.update(path=["not base64!"]),
        lambda d: d.update(path="AAAA"),
        lambda d: d.update(entry=None),
        lambda d: d.update(checkpoint=["x"]),
    ],
)
def test_malformed_bundles_are_refused(bundle: InclusionBundle, change: object) -> None:
    data = json.loads(bundle.to_json())
    change(data)  # type: ignore[operator]
    with pytest.raises(WitnessProofError) as caught:
        load_bundle(json.dumps(data))
    assert caught.value.reason is ProofFailure.MALFORMED
    for text in ("", "[]", "{", '"x"'):
        with pytest.raises(WitnessProofError):
            load_bundle(text)


def test_size_one_and_the_last_leaf() -> None:
    one = prove_inclusion(chain(1), 1, ORIGIN, [KEY])
    assert one.path == ()
    assert isinstance(check_proof(one, [KEY.verifier]), InclusionChecked)
    for n in (2, 4, 8, 16, 17):
        last = prove_inclusion(chain(n), n, ORIGIN, [KEY])
        assert last.index == n - 1
        assert isinstance(check_proof(last, [KEY.verifier]), InclusionChecked)


def test_building_refuses_what_is_not_of_the_tree() -> None:
    entries = chain(4)
    tree = tree_of(entries)
    foreign = sign_checkpoint(tree_of(chain(4, salt="x")), ORIGIN, [KEY])
    with pytest.raises(ValueError, match="not of this tree"):
        inclusion_bundle(tree, leaf_bytes(entries[0]), foreign)
    small = sign_checkpoint(tree, ORIGIN, [KEY], size=2)
    with pytest.raises(ValueError, match="not in a tree"):
        inclusion_bundle(tree, leaf_bytes(entries[3]), small)
    with pytest.raises(ValueError, match="other bytes"):
        inclusion_bundle(tree, leaf_bytes(chain(4, salt="x")[1]), small)
    with pytest.raises(ValueError, match="expected entry 1"):
        tree_of(entries[1:])
    with pytest.raises(ValueError, match="no entry 5"):
        prove_inclusion(entries, 5, ORIGIN, [KEY])
    assert tree.leaf_hash(0) == leaf_hash(leaf_bytes(entries[0]))


def test_a_verifier_holding_only_the_exported_vkey_text_accepts() -> None:
    bundle = prove_inclusion(chain(3), 2, ORIGIN, [KEY])
    vkey = VerifierKey.parse(KEY.verifier.text())
    assert isinstance(check_proof(load_bundle(bundle.to_json()), [vkey]), InclusionChecked)

"""Ed25519 keys and signed notes (C2SP signed-note), and checkpoint texts
(C2SP tlog-checkpoint).

Known answers: the key pair, note text and signatures below are those of
golang.org/x/mod ``sumdb/note/note_test.go`` (TestNewSigner, TestSign, TestOpen): our
key id, key formats and signatures must agree with the reference implementation, or
existing tooling could not read Conclave's checkpoints.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain.checkpoint import Checkpoint
from conclave.errors import ProofFailure, WitnessProofError
from conclave.transparency.keys import SignerKey, VerifierKey, key_id
from conclave.transparency.note import open_note, parse_note, sign_note

GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_B64 = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
ENOCH_B64 = (
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ="
)
GO_PETER_SIG = f"\u2014 PeterNeumann {PETER_B64}\n"
GO_ENOCH_SIG = f"\u2014 EnochRoot {ENOCH_B64}\n"


def test_go_reference_key_pair_and_key_id() -> None:
    signer = SignerKey.parse(GO_SKEY)
    assert signer.verifier.text() == GO_VKEY
    assert signer.text() == GO_SKEY
    verifier = VerifierKey.parse(GO_VKEY)
    assert verifier == signer.verifier
    assert verifier.key_id == 0xC74F20A3 == key_id("PeterNeumann", verifier.public_key)
    assert "AYEK" not in repr(signer)  # the seed never shows


def test_go_reference_signature() -> None:
    signed = sign_note(GO_TEXT, [SignerKey.parse(GO_SKEY)])
    assert signed == GO_TEXT + "\n" + GO_PETER_SIG


def test_go_reference_note_opens_with_either_key() -> None:
    message = GO_TEXT + "\n" + GO_PETER_SIG + GO_ENOCH_SIG
    peter, enoch = VerifierKey.parse(GO_VKEY), VerifierKey.parse(GO_ENOCH_VKEY)
    note, signed_by = open_note(message, [peter])
    assert note.text == GO_TEXT
    assert signed_by == (peter,)
    assert open_note(message, [enoch, peter])[1] == (peter, enoch)
    with pytest.raises(WitnessProofError) as caught:
        open_note(message, [])
    assert caught.value.reason is ProofFailure.UNKNOWN_KEY
    assert "PeterNeumann+c74f20a3" in str(caught.value)


def test_a_corrupted_signature_by_a_known_key_is_refused() -> None:
    corrupted = GO_TEXT + "\n" + GO_PETER_SIG[:60] + "ABCD" + GO_PETER_SIG[60:]
    with pytest.raises(WitnessProofError) as caught:
        open_note(corrupted, [VerifierKey.parse(GO_VKEY)])
    assert caught.value.reason is ProofFailure.BAD_SIGNATURE
    # ... and ignored when the key is not one we hold, as long as another verifies.
    _, signed_by = open_note(corrupted + GO_ENOCH_SIG, [VerifierKey.parse(GO_ENOCH_VKEY)])
    assert [k.name for k in signed_by] == ["EnochRoot"]


def test_a_changed_text_is_refused() -> None:
    message = GO_TEXT.replace("answer", "ANSWER") + "\n" + GO_PETER_SIG
    with pytest.raises(WitnessProofError) as caught:
        open_note(message, [VerifierKey.parse(GO_VKEY)])
    assert caught.value.reason is ProofFailure.BAD_SIGNATURE


@pytest.mark.parametrize(
    "message",
    [
        GO_TEXT,
        GO_TEXT + "\n",
        GO_TEXT + "\n" + GO_PETER_SIG[:-1],
        "\x01" + GO_TEXT + "\n" + GO_PETER_SIG,
        GO_TEXT + "\n" + f"\u2014 Bad Name {PETER_B64}\n",
        GO_TEXT + "\n" + GO_PETER_SIG + "Unexpected line.\n",
        GO_TEXT + "\n" + GO_PETER_SIG * 101,
        GO_TEXT + "\n" + "\u2014 PeterNeumann !!!!\n",
        GO_TEXT + "\n" + "\u2014 PeterNeumann AAAA\n",  # shorter than a key id
    ],
    ids=[
        "no-signatures",
        "blank-line-only",
        "no-final-newline",
        "control-character",
        "name-with-space",
        "trailing-line",
        "too-many-signatures",
        "not-base64",
        "too-short",
    ],
)
def test_malformed_notes_are_refused(message: str) -> None:
    # The malformed cases of golang.org/x/mod's TestOpen, and a few more.
    with pytest.raises(WitnessProofError) as caught:
        open_note(message, [VerifierKey.parse(GO_VKEY)])
    assert caught.value.reason is ProofFailure.MALFORMED


def test_every_mangling_of_a_vkey_is_refused() -> None:
    # As golang.org/x/mod's TestNewVerifier: every substring and every one-byte change.
    for i in range(len(GO_VKEY) + 1):
        for j in range(i + 1, len(GO_VKEY) + 1):
            if (i, j) != (0, len(GO_VKEY)):
                with pytest.raises(WitnessProofError):
                    VerifierKey.parse(GO_VKEY[i:j])
    for i in range(len(GO_VKEY)):
        changed = GO_VKEY[:i] + chr(ord(GO_VKEY[i]) + 1) + GO_VKEY[i + 1 :]
        with pytest.raises(WitnessProofError) as caught:
            VerifierKey.parse(changed)
        assert caught.value.reason is ProofFailure.MALFORMED


@pytest.mark.parametrize("key_id", ["0xc74f20", "c74f_20a", " c74f20a", "C74F20A3", "+c74f20a"])
def test_a_key_id_is_exactly_eight_lowercase_hex_digits(key_id: str) -> None:
    with pytest.raises(WitnessProofError, match="8 lowercase hex digits"):
        VerifierKey.parse(GO_VKEY.replace("c74f20a3", key_id))


def test_generated_keys_round_trip_and_rotate() -> None:
    old, new = SignerKey.generate("log.example/witness"), SignerKey.generate("log.example/witness")
    assert SignerKey.parse(old.text()) == old
    assert VerifierKey.parse(old.verifier.text()) == old.verifier
    assert old.verifier.key_id != new.verifier.key_id
    text = "log.example/witness\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    by_old, by_new = sign_note(text, [old]), sign_note(text, [new])
    both = [old.verifier, new.verifier]
    assert open_note(by_old, both)[1] == (old.verifier,)
    assert open_note(by_new, both)[1] == (new.verifier,)
    assert open_note(sign_note(text, [old, new]), both)[1] == tuple(both)
    with pytest.raises(WitnessProofError) as caught:
        open_note(by_new, [old.verifier])
    assert caught.value.reason is ProofFailure.UNKNOWN_KEY


def test_a_key_with_another_name_but_the_same_id_is_not_the_same_key() -> None:
    signer = SignerKey.generate("alice")
    impostor = VerifierKey("mallory", signer.verifier.public_key)
    note = sign_note("hello\n", [signer])
    with pytest.raises(WitnessProofError) as caught:
        open_note(note, [impostor])
    assert caught.value.reason is ProofFailure.UNKNOWN_KEY


# -- checkpoints -------------------------------------------------------------------------


def test_checkpoint_text_is_the_c2sp_layout() -> None:
    root = bytes(range(32))
    checkpoint = Checkpoint(origin="log.example/witness", size=42, root=root)
    assert checkpoint.text() == (f"log.example/witness\n42\n{base64.b64encode(root).decode()}\n")
    with_ext = Checkpoint(origin="o", size=0, root=root, extensions=("ext one", "ext two"))
    assert with_ext.text().endswith("\next one\next two\n")
    assert Checkpoint.parse(with_ext.text()) == with_ext


@settings(max_examples=50)
@given(
    origin=st.from_regex(r"[a-z0-9./-]{1,30}", fullmatch=True),
    size=st.integers(0, 2**63),
    root=st.binary(min_size=32, max_size=32),
)
def test_checkpoints_round_trip(origin: str, size: int, root: bytes) -> None:
    checkpoint = Checkpoint(origin=origin, size=size, root=root)
    assert Checkpoint.parse(checkpoint.text()) == checkpoint


ROOT_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "text",
    [
        f"o\n1\n{ROOT_B64}",  # no final newline
        "o\n1\n",
        f"\n1\n{ROOT_B64}\n",  # empty origin
        f"o o\n1\n{ROOT_B64}\n",
        f"o\n01\n{ROOT_B64}\n",  # leading zero
        f"o\n-1\n{ROOT_B64}\n",
        f"o\n1x\n{ROOT_B64}\n",
        "o\n1\nnot base64\n",
        f"o\n1\n{base64.b64encode(bytes(31)).decode()}\n",  # not 32 bytes
        f"o\n1\n{ROOT_B64}\n\n",  # empty extension line
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        Checkpoint.parse(text)


def test_parse_note_keeps_signatures_of_unknown_keys() -> None:
    note = parse_note(GO_TEXT + "\n" + GO_PETER_SIG + GO_ENOCH_SIG)
    assert [(s.name, s.key_id) for s in note.signatures] == [
        ("PeterNeumann", 0xC74F20A3),
        ("EnochRoot", 0xAF0CFE78),
    ]
    assert all(len(s.signature) == 64 for s in note.signatures)

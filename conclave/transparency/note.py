"""Signed notes (C2SP ``signed-note``): a text, a blank line, then signature lines.

::

    <text, ending with a newline>
    <empty line>
    — <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>\\n
    ...

The em dash is U+2014 followed by one space. A signature covers exactly the UTF-8 bytes
of the text (its final newline included, the blank line not). A verifier ignores
signatures by keys it does not hold, refuses a note whose signature by a key it holds
does not verify, and refuses a note with no signature by any of its keys.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from conclave.errors import ProofFailure, WitnessProofError
from conclave.transparency.keys import SignerKey, VerifierKey, valid_key_name

__all__ = ["MAX_SIGNATURES", "Note", "NoteSignature", "open_note", "parse_note", "sign_note"]

MAX_SIGNATURES = 100
"""As in golang.org/x/mod/sumdb/note: more signature lines than this is malformed."""
_DASH = "\u2014 "


def _malformed(message: str) -> WitnessProofError:
    return WitnessProofError(message, reason=ProofFailure.MALFORMED)


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: int
    signature: bytes
    """What follows the key id: the 64-byte signature for Ed25519."""

    def line(self) -> str:
        encoded = base64.b64encode(self.key_id.to_bytes(4, "big") + self.signature).decode()
        return f"{_DASH}{self.name} {encoded}\n"


@dataclass(frozen=True, slots=True)
class Note:
    text: str
    signatures: tuple[NoteSignature, ...]


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise _malformed("the note text does not end with a newline")
    if any(ch < " " and ch != "\n" for ch in text):
        raise _malformed("the note text holds control characters")


def sign_note(text: str, signers: Iterable[SignerKey]) -> str:
    """The signed note: ``text`` signed by each of ``signers``."""
    _check_text(text)
    lines = [
        NoteSignature(s.name, s.verifier.key_id, s.sign(text.encode())).line() for s in signers
    ]
    if not lines:
        raise ValueError("a signed note needs at least one signer")
    return f"{text}\n{''.join(lines)}"


def parse_note(message: str) -> Note:
    """Split a signed note into its text and signature lines, without verifying."""
    if any(ch < " " and ch != "\n" for ch in message):
        raise _malformed("the note holds control characters")
    split = message.rfind("\n\n")
    if split < 0:
        raise _malformed("the note has no blank line before its signatures")
    text, block = message[: split + 1], message[split + 2 :]
    if not block.endswith("\n"):
        raise _malformed("the last signature line does not end with a newline")
    signatures = []
    for line in block[:-1].split("\n"):
        if not line.startswith(_DASH):
            raise _malformed(f"{line[:40]!r} is not a signature line")
        name, _, encoded = line[len(_DASH) :].partition(" ")
        if not valid_key_name(name) or " " in encoded:
            raise _malformed(f"{line[:40]!r} is not '— name signature'")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise _malformed(f"the signature of {name} is not base64") from None
        if len(raw) < 5:
            raise _malformed(f"the signature of {name} is too short")
        signatures.append(NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    if len(signatures) > MAX_SIGNATURES:
        raise _malformed(f"more than {MAX_SIGNATURES} signatures")
    _check_text(text)
    return Note(text, tuple(signatures))


def open_note(
    message: str, verifiers: Sequence[VerifierKey]
) -> tuple[Note, tuple[VerifierKey, ...]]:
    """The note and the keys (among ``verifiers``) whose signatures on it verify.

    Raises :class:`WitnessProofError`: ``MALFORMED``, ``BAD_SIGNATURE`` when a key the
    caller holds signed and its signature does not verify, ``UNKNOWN_KEY`` when no key
    the caller holds signed."""
    note = parse_note(message)
    known: dict[tuple[str, int], VerifierKey] = {}
    for key in verifiers:
        other = known.setdefault((key.name, key.key_id), key)
        if other.public_key != key.public_key:
            raise _malformed(f"two different keys are both {key.label}")
    verified: list[VerifierKey] = []
    for sig in note.signatures:
        signer = known.get((sig.name, sig.key_id))
        if signer is None:
            continue
        if not signer.verify(note.text.encode(), sig.signature):
            raise WitnessProofError(
                f"the signature by {signer.label} does not verify",
                reason=ProofFailure.BAD_SIGNATURE,
            )
        if signer not in verified:
            verified.append(signer)
    if not verified:
        signed_by = ", ".join(f"{s.name}+{s.key_id:08x}" for s in note.signatures)
        raise WitnessProofError(
            f"signed by {signed_by or 'nobody'}, none of them a key given to check with",
            reason=ProofFailure.UNKNOWN_KEY,
        )
    return note, tuple(verified)

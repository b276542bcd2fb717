"""Ed25519 keys for signed notes, in the C2SP ``signed-note`` text formats (the ones
``golang.org/x/mod/sumdb/note`` reads and writes, so existing tooling can use them).

* key id: the first 4 bytes of SHA-256(key name || 0x0A || 0x01 || 32-byte public key),
  a big-endian uint32;
* verifier key ("vkey"), public:  ``<name>+<8 hex digits of key id>+<base64(0x01 || public key)>``
* signer key, secret: ``PRIVATE+KEY+<name>+<8 hex digits of key id>+<base64(0x01 || seed)>``,
  where the seed is the 32-byte Ed25519 private key (RFC 8032).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conclave.errors import ProofFailure, WitnessProofError

__all__ = ["ALG_ED25519", "SignerKey", "VerifierKey", "key_id", "valid_key_name"]

ALG_ED25519 = 0x01
_PRIVATE_PREFIX = "PRIVATE+KEY+"


def valid_key_name(name: str) -> bool:
    """A key name is non-empty, without whitespace, control characters or '+'."""
    return bool(name) and not any(ch.isspace() or ch == "+" or ch < " " for ch in name)


def key_id(name: str, public_key: bytes) -> int:
    """The signed-note key id of an Ed25519 public key named ``name``."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def _malformed(message: str) -> WitnessProofError:
    return WitnessProofError(message, reason=ProofFailure.MALFORMED)


def _parse(text: str, what: str) -> tuple[str, int, bytes]:
    """``name+hexid+base64(alg || key)`` -> (name, key id, key bytes); the id is checked
    against the key when the caller knows the public key."""
    parts = text.strip().split("+", 2)  # base64 has '+' of its own: split at the first two
    if len(parts) != 3:
        raise _malformed(f"a {what} is name+keyid+key")
    name, hex_id, encoded = parts
    if not valid_key_name(name):
        raise _malformed(f"{name!r} is not a key name")
    if len(hex_id) != 8 or not set(hex_id) <= set("0123456789abcdef"):
        # int(x, 16) would also take "0x", "_" and spaces: one key, one text
        raise _malformed(f"key id {hex_id!r} is not 8 lowercase hex digits")
    try:
        ident = int(hex_id, 16)
        raw = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise _malformed(f"the {what} is not hex and base64 where it should be") from None
    if base64.b64encode(raw).decode() != encoded:
        raise _malformed(f"the {what} is not canonical base64")
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise _malformed(f"the {what} is not an Ed25519 key (0x01 and 32 bytes)")
    return name, ident, raw[1:]


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """A public key that checks signed notes, under the name its signatures carry."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        if not valid_key_name(self.name):
            raise _malformed(f"{self.name!r} is not a key name")
        if len(self.public_key) != 32:
            raise _malformed("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.public_key)

    @property
    def label(self) -> str:
        """``name+hexid``: how errors and results name the key."""
        return f"{self.name}+{self.key_id:08x}"

    def text(self) -> str:
        """The vkey line, safe to publish."""
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.public_key).decode()
        return f"{self.label}+{encoded}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        name, ident, public_key = _parse(text, "verifier key")
        key = cls(name, public_key)
        if key.key_id != ident:
            raise _malformed(f"key id {ident:08x} does not match the key of {name}")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SignerKey:
    """A private Ed25519 key that signs notes. Its ``repr`` never shows the seed."""

    name: str
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not valid_key_name(self.name):
            raise _malformed(f"{self.name!r} is not a key name")
        if len(self.seed) != 32:
            raise _malformed("an Ed25519 private key (seed) is 32 bytes")

    @classmethod
    def generate(cls, name: str) -> SignerKey:
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(name, seed)

    @property
    def verifier(self) -> VerifierKey:
        public = (
            Ed25519PrivateKey.from_private_bytes(self.seed)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        return VerifierKey(self.name, public)

    def text(self) -> str:
        """The private key line; keep it secret (written with mode 0600 by keygen)."""
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"{_PRIVATE_PREFIX}{self.verifier.label}+{encoded}"

    @classmethod
    def parse(cls, text: str) -> SignerKey:
        if not text.startswith(_PRIVATE_PREFIX):
            raise _malformed("a private key starts with PRIVATE+KEY+")
        name, ident, seed = _parse(text[len(_PRIVATE_PREFIX) :], "private key")
        key = cls(name, seed)
        if key.verifier.key_id != ident:
            raise _malformed(f"key id {ident:08x} does not match the key of {name}")
        return key

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)

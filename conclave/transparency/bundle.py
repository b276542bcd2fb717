"""Proof bundles: a JSON object carrying everything needed to check a proof offline.

Inclusion (one witness entry is in the log)::

    {"format": "conclave.witness.inclusion/v1",
     "entry": base64 of the entry's hashed bytes (its leaf),
     "index": leaf index = the entry's sequence - 1,
     "tree_size": the checkpoint's tree size,
     "path": [base64 of each 32-byte hash, leaf to root (RFC 9162 §2.1.3)],
     "checkpoint": the signed checkpoint note, as text}

Consistency (the log at a later checkpoint extends the log at an earlier one)::

    {"format": "conclave.witness.consistency/v1",
     "old_checkpoint": signed note, "new_checkpoint": signed note,
     "path": [base64 of each 32-byte hash (RFC 9162 §2.1.4)]}

Base64 is standard with padding. No other keys are allowed: a bundle means one thing.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from conclave.errors import ProofFailure, WitnessProofError

__all__ = [
    "CONSISTENCY_FORMAT",
    "INCLUSION_FORMAT",
    "ConsistencyBundle",
    "InclusionBundle",
    "load_bundle",
]

INCLUSION_FORMAT = "conclave.witness.inclusion/v1"
CONSISTENCY_FORMAT = "conclave.witness.consistency/v1"


def _malformed(message: str) -> WitnessProofError:
    return WitnessProofError(message, reason=ProofFailure.MALFORMED)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True, slots=True, kw_only=True)
class InclusionBundle:
    entry: bytes
    """The entry's hashed bytes (docs/witness.md, "The hashing rule"): the leaf's data."""
    index: int
    tree_size: int
    path: tuple[bytes, ...]
    checkpoint: str
    """The signed checkpoint note of ``tree_size`` the path leads to."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": INCLUSION_FORMAT,
                "entry": _b64(self.entry),
                "index": self.index,
                "tree_size": self.tree_size,
                "path": [_b64(h) for h in self.path],
                "checkpoint": self.checkpoint,
            },
            indent=2,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistencyBundle:
    old_checkpoint: str
    new_checkpoint: str
    path: tuple[bytes, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CONSISTENCY_FORMAT,
                "old_checkpoint": self.old_checkpoint,
                "new_checkpoint": self.new_checkpoint,
                "path": [_b64(h) for h in self.path],
            },
            indent=2,
        )


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    # bool is an int in Python, and not a size or an index in JSON
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _malformed(f"{key!r} must be a {kind.__name__}")
    return value


def _decode(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise _malformed(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _malformed(f"{what} is not base64") from None


def _path(data: dict[str, Any]) -> tuple[bytes, ...]:
    items = _field(data, "path", list)
    return tuple(_decode(item, f"path[{i}]") for i, item in enumerate(items))


def load_bundle(text: str) -> InclusionBundle | ConsistencyBundle:
    """Read a bundle written by ``to_json`` (or by anyone following the format)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise _malformed("the bundle is not JSON") from None
    if not isinstance(data, dict):
        raise _malformed("the bundle is not a JSON object")
    kind = data.get("format")
    if kind == INCLUSION_FORMAT:
        expected = {"format", "entry", "index", "tree_size", "path", "checkpoint"}
    elif kind == CONSISTENCY_FORMAT:
        expected = {"format", "old_checkpoint", "new_checkpoint", "path"}
    else:
        raise _malformed(f"unknown bundle format {kind!r}")
    if set(data) != expected:
        raise _malformed(f"a {kind} bundle has exactly the keys {', '.join(sorted(expected))}")
    if kind == CONSISTENCY_FORMAT:
        return ConsistencyBundle(
            old_checkpoint=_field(data, "old_checkpoint", str),
            new_checkpoint=_field(data, "new_checkpoint", str),
            path=_path(data),
        )
    return InclusionBundle(
        entry=_decode(data["entry"], "entry"),
        index=_field(data, "index", int),
        tree_size=_field(data, "tree_size", int),
        path=_path(data),
        checkpoint=_field(data, "checkpoint", str),
    )

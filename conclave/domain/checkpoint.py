"""Checkpoints of the witness tree in the C2SP ``tlog-checkpoint`` text format. Pure.

A checkpoint is the body of a signed note (``conclave.transparency.note``)::

    <origin>\\n                   the log's name, e.g. conclave.example.org/witness
    <tree size>\\n                ASCII decimal, no leading zeros
    <base64 root hash>\\n         standard base64 with padding of the 32-byte MTH
    [<extension line>\\n ...]    optional, opaque, non-empty

The same text is what the log's key signs; docs/witness.md has the byte rules.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

__all__ = ["Checkpoint"]

_DECIMAL = re.compile(r"0|[1-9][0-9]*")


def _is_line(text: str) -> bool:
    """Non-empty, printable: no control characters (newline included)."""
    return bool(text) and all(ch >= " " and ch != "\x7f" for ch in text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A signed statement that the log named ``origin`` had ``size`` entries with
    Merkle tree head ``root``."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()
    """Lines after the root, as the log wrote them; Conclave writes none yet."""

    def __post_init__(self) -> None:
        if not _is_line(self.origin) or any(ch.isspace() or ch == "+" for ch in self.origin):
            raise ValueError(f"origin {self.origin!r} must be one line without spaces or '+'")
        if self.size < 0:
            raise ValueError("tree size must not be negative")
        if len(self.root) != 32:
            raise ValueError("the root hash is 32 bytes")
        for line in self.extensions:
            if not _is_line(line):
                raise ValueError(f"extension line {line!r} must be one non-empty line")

    def text(self) -> str:
        """The checkpoint's note text (what is signed), ending with a newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "".join(f"{line}\n" for line in (*lines, *self.extensions))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Read a note text back; ``ValueError`` saying why when it is not a checkpoint."""
        if not text.endswith("\n"):
            raise ValueError("a checkpoint ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise ValueError("a checkpoint has an origin, a tree size and a root hash line")
        origin, size, root, *extensions = lines
        if not _DECIMAL.fullmatch(size):
            raise ValueError(f"tree size {size!r} is not a decimal number")
        try:
            digest = base64.b64decode(root, validate=True)
        except binascii.Error:
            raise ValueError(f"root hash {root!r} is not base64") from None
        if base64.b64encode(digest).decode() != root:
            raise ValueError(f"root hash {root!r} is not canonical base64")
        return cls(origin=origin, size=int(size), root=digest, extensions=tuple(extensions))

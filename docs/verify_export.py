#!/usr/bin/env python3
"""Verify a Conclave witness export, following only docs/witness.md ("Export").

    python verify_export.py EXPORT.jsonl [--vkey VKEY ...]

Needs the Python standard library and, for the Ed25519 signatures, the `cryptography`
package. Independent of Conclave's code on purpose: it is the proof that a third party
can re-implement the checks from the document. Prints `OK: ...` and exits 0, or prints
`line N: why` for the first bad line and exits 1. Without --vkey, the signatures are
checked against the keys the export carries (which proves less: anyone can carry a key).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TAG = b"conclave.witness.v1\x00"
FORMAT = "conclave.witness.export/v1"
ENTRY_KEYS = {
    "sequence", "entry", "entry_hash", "previous_hash", "subject_type", "subject_event_id",
    "subject_digest", "recorded_at", "task_id", "agent_id", "attempt", "detail",
}  # fmt: skip
EMPTY = 0xC15D213AA4D7A795
CRC_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (EMPTY & -(_fp & 1))
    CRC_TABLE.append(_fp)


class Bad(Exception):
    pass


def crc64_avro(data):
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ CRC_TABLE[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def parse_vkey(text):
    """name+keyid+base64(0x01 || public key) -> (name, key id bytes, public key)."""
    name, key_id, encoded = text.strip().split("+", 2)
    raw = base64.b64decode(encoded, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        raise Bad(f"key {name} is not an Ed25519 vkey")
    ident = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if ident.hex() != key_id:
        raise Bad(f"key id {key_id} is not that of the key of {name}")
    return name, ident, raw[1:]


def parse_entry(data):
    """The hashed fields of an entry's bytes (docs/witness.md, "The hashing rule")."""
    if data[:20] != TAG:
        raise Bad("entry bytes do not start with the tag")
    sequence, previous = struct.unpack_from(">Q", data, 20)[0], data[28:60]
    at = 60
    strings = []
    for _ in range(2):
        if at + 4 > len(data):
            raise Bad("entry bytes are truncated")
        (size,) = struct.unpack_from(">I", data, at)
        strings.append(data[at + 4 : at + 4 + size].decode())
        at += 4 + size
    if len(data) != at + 40:
        raise Bad("entry bytes have the wrong length")
    digest = data[at : at + 32]
    (recorded_at,) = struct.unpack_from(">q", data, at + 32)
    return sequence, previous, strings[0], strings[1], digest, recorded_at


class Tree:
    """RFC 9162 tree head over leaves appended in order: the roots of the complete
    subtrees that make up the size (one per set bit)."""

    def __init__(self):
        self.size, self.peaks = 0, []

    def append(self, leaf):
        node, size = leaf, self.size
        while size & 1:
            node = hashlib.sha256(b"\x01" + self.peaks.pop() + node).digest()
            size >>= 1
        self.peaks.append(node)
        self.size += 1

    def root(self):
        if not self.peaks:
            return hashlib.sha256(b"").digest()
        node = self.peaks[-1]
        for peak in reversed(self.peaks[:-1]):
            node = hashlib.sha256(b"\x01" + peak + node).digest()
        return node


def open_checkpoint(note, keys, origin):
    """(size, root) of a signed checkpoint note, after its signature by one of keys."""
    text, sep, block = note.rpartition("\n\n")
    if not sep or not block.endswith("\n"):
        raise Bad("malformed: the checkpoint is not a signed note")
    text += "\n"
    verified = []
    for line in block[:-1].split("\n"):
        if not line.startswith("\u2014 "):
            raise Bad("malformed: not a signature line")
        name, _, encoded = line[2:].partition(" ")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise Bad("malformed: a signature is not base64") from None
        for key_name, ident, public in keys:
            if key_name == name and raw[:4] == ident:
                try:
                    Ed25519PublicKey.from_public_bytes(public).verify(raw[4:], text.encode())
                except InvalidSignature:
                    raise Bad(f"bad signature: by {name}+{ident.hex()}") from None
                verified.append(name)
    if not verified:
        raise Bad("unknown key: the checkpoint is signed by no key given to check with")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not lines[1].isdigit() or str(int(lines[1])) != lines[1]:
        raise Bad("malformed: not a checkpoint")
    if lines[0] not in ({origin} if origin else set(verified)):
        raise Bad(f"wrong origin: {lines[0]}")
    return int(lines[1]), base64.b64decode(lines[2], validate=True)


def check_entry(fields, expected, head, where):
    """An entry line: the entry bytes of sequence `expected`, linked to `head`; returns
    the bytes and their entry_hash."""
    if set(fields) != ENTRY_KEYS:
        raise Bad(f"{where}: not an entry line")
    try:
        data = base64.b64decode(fields["entry"], validate=True)
        sequence, previous, kind, subject, digest, recorded_at = parse_entry(data)
    except (binascii.Error, ValueError, TypeError, struct.error, Bad) as exc:
        raise Bad(f"{where}: malformed entry bytes ({exc})") from None
    if sequence != expected:
        raise Bad(f"{where}: expected sequence {expected}, found {sequence}")
    if previous != head:
        raise Bad(f"{where}: previous_hash does not match the prior entry")
    entry_hash = hashlib.sha256(data).digest()
    if entry_hash.hex() != fields["entry_hash"]:
        raise Bad(f"{where}: entry_hash does not match its contents")
    readable = (sequence, previous.hex(), kind, subject, digest.hex(), recorded_at)
    names = ("sequence", "previous_hash", "subject_type", "subject_event_id")
    found = tuple(fields[k] for k in (*names, "subject_digest", "recorded_at"))
    if found != readable or type(found[0]) is not int or type(found[5]) is not int:
        raise Bad(f"{where}: a readable field is not what the entry bytes say")
    return data, entry_hash


def read_header(line, vkeys):
    """(keys to check signatures with, origin) from the first line."""
    try:
        header = json.loads(line)
    except ValueError:
        raise Bad("line 1: not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise Bad("line 1: not a witness export")
    try:
        keys = [parse_vkey(k) for k in (vkeys or header["keys"])]
    except (ValueError, binascii.Error, Bad) as exc:
        raise Bad(f"line 1: a key is refused ({exc})") from None
    origin = header["origin"]
    for name, _, _ in (parse_vkey(k) for k in header["keys"]):
        if origin is not None and name != origin:
            raise Bad(f"line 1: key {name!r} is not named for the origin {origin!r}")
    for fingerprint, form in header["schemas"].items():
        if crc64_avro(form.encode()).hex() != fingerprint:
            raise Bad(f"line 1: schema {fingerprint} is not the fingerprint of its form")
    return keys, header["origin"]


def verify(path, vkeys):
    with open(path, "rb") as file:
        lines = enumerate(file, start=1)
        number, line = next(lines, (1, b""))
        keys, origin = read_header(line, vkeys)
        tree, head, checkpoints, end = Tree(), bytes(32), 0, None
        for number, line in lines:
            where = f"line {number}"
            if end is not None:
                raise Bad(f"{where}: a line after the closing line")
            try:
                fields = json.loads(line.decode())  # UnicodeDecodeError is a ValueError
            except ValueError:
                raise Bad(f"{where}: not JSON") from None
            if not isinstance(fields, dict):
                raise Bad(f"{where}: not a JSON object")
            if "checkpoint" in fields:
                try:
                    size, root = open_checkpoint(fields["checkpoint"], keys, origin)
                except (Bad, ValueError, TypeError, AttributeError) as exc:
                    raise Bad(f"{where}: checkpoint refused, {exc}") from None
                if size != tree.size:
                    raise Bad(f"{where}: checkpoint of size {size} after {tree.size} entries")
                if root != tree.root():
                    raise Bad(f"{where}: the root is not the one the checkpoint signed")
                checkpoints += 1
            elif "end" in fields:
                end = fields["end"]
                closing = {"entries": tree.size, "checkpoints": checkpoints}
                closing |= {"head": head.hex(), "root": tree.root().hex()}
                if end != closing:
                    raise Bad(f"{where}: the closing line is not that of the lines before it")
            else:
                where = f"line {number} (sequence {tree.size + 1})"
                data, head = check_entry(fields, tree.size + 1, head, where)
                tree.append(hashlib.sha256(b"\x00" + data).digest())
        if end is None:
            raise Bad(f"line {number + 1}: the export ends without its closing line")
    return tree.size, checkpoints, tree.root(), head


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--vkey", action="append", default=[], help="a trusted public key")
    args = parser.parse_args()
    try:
        size, checkpoints, root, head = verify(args.export, args.vkey)
    except Bad as exc:
        print(exc)
        return 1
    except OSError as exc:
        print(f"cannot read {args.export}: {exc.strerror or exc}")
        return 1
    print(f"OK: {size} entries, {checkpoints} checkpoints, root {root.hex()}, head {head.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

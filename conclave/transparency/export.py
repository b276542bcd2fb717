"""The witness log's export (JSON lines) and the one checker behind ``conclave witness
verify``, whatever the source: an export, the topic or the read model.

An export is, one JSON object per line (docs/witness.md, "Export")::

    {"format": "conclave.witness.export/v1", "origin": ..., "keys": [vkey, ...],
     "schemas": {fingerprint hex: Parsing Canonical Form, ...}}          the header
    {"sequence": 1, "entry": base64 entry bytes, "entry_hash": hex, ...}  one per entry
    {"checkpoint": signed note}     right after the entry that brings the log to its size
    {"end": {"entries": n, "checkpoints": k, "head": hex, "root": hex}}  the last line

The entry bytes are authoritative; every other field of an entry line that they hash
must say the same, or the line is refused. Checking streams: constant memory (the tree's
right edge, one hash per set bit of the size), and the first bad place ends it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from conclave.domain.events import WitnessEntry
from conclave.domain.merkle import EMPTY_ROOT, CompactRange
from conclave.domain.witness import DOMAIN_TAG, GENESIS_HASH, parse_entry_bytes
from conclave.errors import WitnessProofError
from conclave.transparency.keys import VerifierKey
from conclave.transparency.proofs import open_checkpoint

__all__ = [
    "EXPORT_FORMAT",
    "ExportChecked",
    "LogBroken",
    "LogChecker",
    "checkpoint_line",
    "crc64_avro",
    "end_line",
    "entry_line",
    "export_lines",
    "header_line",
    "verify_export",
]

EXPORT_FORMAT = "conclave.witness.export/v1"
ENTRY_KEYS = frozenset(
    {
        "sequence",
        "entry",
        "entry_hash",
        "previous_hash",
        "subject_type",
        "subject_event_id",
        "subject_digest",
        "recorded_at",
        "task_id",
        "agent_id",
        "attempt",
        "detail",
    }
)
_HEADER_KEYS = frozenset({"format", "origin", "keys", "schemas"})
_END_KEYS = frozenset({"entries", "checkpoints", "head", "root"})
_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> bytes:
    """The Avro specification's 64-bit Rabin fingerprint (CRC-64-AVRO) of ``data``, as the
    8 little-endian bytes a single-object record carries after ``C3 01``."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


# -- writing -------------------------------------------------------------------------------


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def header_line(origin: str | None, keys: Iterable[VerifierKey], schemas: dict[str, str]) -> str:
    return _dumps(
        {
            "format": EXPORT_FORMAT,
            "origin": origin,
            "keys": [key.text() for key in keys],
            "schemas": dict(sorted(schemas.items())),
        }
    )


def entry_line(entry: WitnessEntry, data: bytes) -> str:
    """The line of ``entry`` whose hashed bytes are ``data`` (``leaf_bytes(entry)``)."""
    return _dumps(
        {
            "sequence": entry.sequence,
            "entry": base64.b64encode(data).decode(),
            "entry_hash": entry.entry_hash.hex(),
            "previous_hash": entry.previous_hash.hex(),
            "subject_type": entry.subject_type,
            "subject_event_id": entry.subject_event_id,
            "subject_digest": entry.subject_digest.hex(),
            "recorded_at": entry.recorded_at,
            "task_id": entry.task_id,
            "agent_id": entry.agent_id,
            "attempt": entry.attempt,
            "detail": entry.detail,
        }
    )


def checkpoint_line(note: str) -> str:
    return _dumps({"checkpoint": note})


def end_line(entries: int, checkpoints: int, head: bytes, root: bytes) -> str:
    return _dumps(
        {
            "end": {
                "entries": entries,
                "checkpoints": checkpoints,
                "head": head.hex(),
                "root": root.hex(),
            }
        }
    )


# -- checking ------------------------------------------------------------------------------


class LogBroken(Exception):
    """The first bad place of a log: ``where`` (e.g. ``line 7``, ``sequence 5``) and why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class LogChecker:
    """Checks a log entry by entry: sequence from 1 without gaps, each previous_hash link,
    each entry_hash recomputed from the entry bytes, and at each checkpoint the signature
    (by one of ``keys``) and the Merkle root of the entries so far. Raises
    :class:`LogBroken` at the first bad place; ``where`` is the caller's name for it."""

    def __init__(self, keys: Sequence[VerifierKey], origin: str | None = None) -> None:
        self.keys = tuple(keys)
        self.origin = origin
        self.size = 0
        self.head = GENESIS_HASH
        self.range = CompactRange()
        self.checkpoints = 0

    def entry(self, data: bytes, stored_hash: bytes | str, where: str) -> None:
        """Entry ``self.size + 1``, as its hashed bytes and the entry_hash stored with it
        (32 bytes, or as 64 lowercase hex digits). The bytes must be well formed: the
        caller parses them (``parse_entry_bytes``) unless it built them itself."""
        expected = self.size + 1
        sequence = int.from_bytes(data[20:28], "big")
        if sequence != expected:
            raise LogBroken(where, f"expected sequence {expected}, found {sequence}")
        if data[28:60] != self.head:
            raise LogBroken(where, "previous_hash does not match the prior entry")
        computed = hashlib.sha256(data).digest()
        if computed != stored_hash and computed.hex() != stored_hash:
            if isinstance(stored_hash, str):
                _hex(stored_hash, 32, "entry_hash", where)  # raises if it is not hex at all
            raise LogBroken(where, "entry_hash does not match its contents")
        self.range.append_hash(hashlib.sha256(b"\x00" + data).digest())
        self.head = computed
        self.size = expected

    def checkpoint(self, note: str, where: str) -> None:
        """A signed checkpoint that must be of the log as it is now (``self.size``)."""
        try:
            signed = open_checkpoint(note, self.keys, origin=self.origin)
        except WitnessProofError as exc:
            raise LogBroken(where, f"checkpoint refused, {exc}") from None
        checkpoint = signed.checkpoint
        if checkpoint.size != self.size:
            raise LogBroken(
                where,
                f"checkpoint of tree size {checkpoint.size} placed after {self.size} entries",
            )
        if checkpoint.root != self.root:
            raise LogBroken(
                where,
                f"the root of the first {self.size} entries is not the root the checkpoint "
                "signed: the log was rewritten",
            )
        self.checkpoints += 1

    @property
    def root(self) -> bytes:
        return self.range.root() if self.size else EMPTY_ROOT

    def summary(self) -> str:
        return (
            f"{self.size} entries, {self.checkpoints} checkpoints checked, "
            f"root {self.root.hex()}, head {self.head.hex()}"
        )


@dataclass(frozen=True, slots=True)
class ExportChecked:
    checker: LogChecker
    keys_from_export: bool
    """The signatures were checked against the keys the export carries (no trusted key
    was given): proof that the log is what that key signed, not that the key is the log's."""


def _object(text: str | bytes, line: int) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError (not UTF-8)
        raise LogBroken(f"line {line}", f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise LogBroken(f"line {line}", "not a JSON object")
    return value


def _hex(value: object, size: int, what: str, where: str) -> bytes:
    if isinstance(value, str) and len(value) == 2 * size:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            pass
        else:
            if raw.hex() == value:  # lowercase only: one text per hash
                return raw
    raise LogBroken(where, f"{what} is not {size} bytes in lowercase hex")


def _header(fields: dict[str, Any]) -> tuple[str | None, list[VerifierKey]]:
    where = "line 1"
    if fields.get("format") != EXPORT_FORMAT:
        raise LogBroken(where, f"not a witness export (format {fields.get('format')!r})")
    if set(fields) != _HEADER_KEYS:
        raise LogBroken(where, f"the header has exactly the keys {', '.join(sorted(_HEADER_KEYS))}")
    origin, keys, schemas = fields["origin"], fields["keys"], fields["schemas"]
    if origin is not None and not isinstance(origin, str):
        raise LogBroken(where, "origin is not a string or null")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise LogBroken(where, "keys is not a list of vkey strings")
    try:
        verifiers = [VerifierKey.parse(k) for k in keys]
    except WitnessProofError as exc:
        raise LogBroken(where, f"a key is refused, {exc}") from None
    for key in verifiers:  # a log's keys are named for it: the origin is bound to them
        if origin is not None and key.name != origin:
            raise LogBroken(where, f"key {key.name!r} is not named for the origin {origin!r}")
    if not isinstance(schemas, dict):
        raise LogBroken(where, "schemas is not an object")
    for fingerprint, form in schemas.items():
        if not isinstance(form, str) or crc64_avro(form.encode()).hex() != fingerprint:
            raise LogBroken(where, f"schema {fingerprint} is not the fingerprint of its form")
    return origin, verifiers


def _malformed(data: bytes, where: str) -> LogBroken:
    try:
        parse_entry_bytes(data)
    except ValueError as exc:
        return LogBroken(where, f"entry bytes are malformed: {exc}")
    return LogBroken(where, "entry bytes are malformed")  # pragma: no cover - parsed above


def _entry(checker: LogChecker, fields: dict[str, Any], where: str) -> None:
    """One entry line. The hot loop of a verify: no field is decoded twice, the hashed
    fields are read from the bytes at their offsets (docs/witness.md, "The hashing
    rule") and compared as text with the readable ones."""
    if fields.keys() != ENTRY_KEYS:
        extra = sorted(set(fields) ^ ENTRY_KEYS)
        raise LogBroken(where, f"an entry line has other keys than expected: {', '.join(extra)}")
    encoded = fields["entry"]
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (TypeError, ValueError, binascii.Error):
        raise LogBroken(where, "entry is not base64") from None
    # The layout: tag (20) | sequence (8) | previous_hash (32) | u32 + subject_type |
    # u32 + subject_event_id | subject_digest (32) | recorded_at (8); nothing after.
    size = len(data)
    if size < 108 or data[:20] != DOMAIN_TAG:
        raise _malformed(data, where)
    kind_end = 64 + int.from_bytes(data[60:64], "big")
    if kind_end + 4 > size:
        raise _malformed(data, where)
    digest_at = kind_end + 4 + int.from_bytes(data[kind_end : kind_end + 4], "big")
    if digest_at + 40 != size:
        raise _malformed(data, where)
    try:
        kind = data[64:kind_end].decode()
        subject = data[kind_end + 4 : digest_at].decode()
    except UnicodeDecodeError:
        raise _malformed(data, where) from None
    stored = fields["entry_hash"]
    checker.entry(data, stored, where)
    # The readable fields that the bytes hash must say what the bytes say.
    sequence = fields["sequence"]
    if sequence != checker.size or type(sequence) is not int:
        raise LogBroken(where, "sequence is not what the entry bytes say")
    if fields["previous_hash"] != data[28:60].hex():
        raise LogBroken(where, "previous_hash is not what the entry bytes say")
    if fields["subject_type"] != kind:
        raise LogBroken(where, "subject_type is not what the entry bytes say")
    if fields["subject_event_id"] != subject:
        raise LogBroken(where, "subject_event_id is not what the entry bytes say")
    if fields["subject_digest"] != data[digest_at : digest_at + 32].hex():
        raise LogBroken(where, "subject_digest is not what the entry bytes say")
    recorded_at = fields["recorded_at"]
    if (
        recorded_at != int.from_bytes(data[digest_at + 32 :], "big", signed=True)
        or type(recorded_at) is not int
    ):
        raise LogBroken(where, "recorded_at is not what the entry bytes say")
    task_id, agent_id, attempt = fields["task_id"], fields["agent_id"], fields["attempt"]
    if task_id is not None and type(task_id) is not str:
        raise LogBroken(where, "task_id is not a string or null")
    if agent_id is not None and type(agent_id) is not str:
        raise LogBroken(where, "agent_id is not a string or null")
    if attempt is not None and type(attempt) is not int:
        raise LogBroken(where, "attempt is not an integer or null")
    if type(fields["detail"]) is not str:
        raise LogBroken(where, "detail is not a string")


_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
_ATTRIBUTION = re.compile(
    rf'"task_id":(?:null|{_JSON_STRING}),"agent_id":(?:null|{_JSON_STRING}),'
    rf'"attempt":(?:null|-?(?:0|[1-9][0-9]*)),"detail":{_JSON_STRING}}}[ \t\n\r]*'
)
"""The end of an entry line as Conclave writes it: valid JSON of the right types."""


def _plain(text: str) -> bool:
    """Written as is between JSON quotes (ASCII, printable, no quote or backslash)."""
    return text.isprintable() and '"' not in text and "\\" not in text


def _fast_entry(checker: LogChecker, text: str) -> bool:
    """An entry line exactly as Conclave writes it, checked without decoding its JSON:
    the line must be, character for character, the rendering of its own entry bytes
    (which the checks of :func:`_entry` then hold by construction), followed by
    attribution of the right types. ``False``, with nothing changed, for anything else:
    the caller then checks the line field by field, and names what is wrong."""
    start = text.find('"entry":"', 12)
    if start < 0:
        return False
    encoded = text[start + 9 : text.find('"', start + 9)]
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (ValueError, binascii.Error):
        return False
    size = len(data)
    if size < 108 or data[:20] != DOMAIN_TAG:
        return False
    kind_end = 64 + int.from_bytes(data[60:64], "big")
    if kind_end + 4 > size:
        return False
    digest_at = kind_end + 4 + int.from_bytes(data[kind_end : kind_end + 4], "big")
    if digest_at + 40 != size:
        return False
    try:
        kind, subject = (
            data[64:kind_end].decode("ascii"),
            data[kind_end + 4 : digest_at].decode("ascii"),
        )
    except UnicodeDecodeError:
        return False
    sequence, previous = checker.size + 1, data[28:60]
    if (
        int.from_bytes(data[20:28], "big") != sequence
        or previous != checker.head
        or not (_plain(kind) and _plain(subject))
    ):
        return False
    computed = hashlib.sha256(data).digest()
    subject_digest = data[digest_at : digest_at + 32].hex()
    recorded_at = int.from_bytes(data[digest_at + 32 :], "big", signed=True)
    rendered = (
        f'{{"sequence":{sequence},"entry":"{encoded}","entry_hash":"{computed.hex()}",'
        f'"previous_hash":"{previous.hex()}","subject_type":"{kind}",'
        f'"subject_event_id":"{subject}","subject_digest":"{subject_digest}",'
        f'"recorded_at":{recorded_at},'
    )
    if not text.startswith(rendered) or _ATTRIBUTION.fullmatch(text, len(rendered)) is None:
        return False
    checker.range.append_hash(hashlib.sha256(b"\x00" + data).digest())
    checker.head, checker.size = computed, sequence
    return True


def _end(checker: LogChecker, fields: dict[str, Any], where: str) -> None:
    end = fields["end"]
    if len(fields) != 1 or not isinstance(end, dict) or set(end) != _END_KEYS:
        raise LogBroken(where, f'the closing line is {{"end": {{{", ".join(sorted(_END_KEYS))}}}}}')
    if end["entries"] != checker.size or end["checkpoints"] != checker.checkpoints:
        raise LogBroken(
            where,
            f"the export says {end['entries']} entries and {end['checkpoints']} checkpoints, "
            f"it holds {checker.size} and {checker.checkpoints}",
        )
    if end["head"] != checker.head.hex() or end["root"] != checker.root.hex():
        raise LogBroken(where, "the closing line's head or root is not that of the entries")


def verify_export(
    lines: Iterable[str | bytes],
    trusted: Sequence[VerifierKey] = (),
    *,
    origin: str | None = None,
) -> ExportChecked:
    """Check an export line by line (``lines`` with or without their newlines). With
    ``trusted`` keys the signatures must be by one of them; without, by a key the export
    carries. Raises :class:`LogBroken` naming the first bad line."""
    numbered = enumerate(lines, start=1)
    first = next(numbered, None)
    if first is None:
        raise LogBroken("line 1", "the export is empty: no header")
    expected_origin, carried = _header(_object(first[1], 1))
    checker = LogChecker(trusted or carried, origin or expected_origin)
    ended = False
    loads = json.loads
    for number, text in numbered:
        try:
            # json.loads of bytes guesses their encoding first: twice the time of UTF-8
            line = text.decode() if isinstance(text, bytes) else text
        except UnicodeDecodeError:
            line = ""  # not JSON: said below
        if not ended and line.startswith('{"sequence":') and _fast_entry(checker, line):
            continue
        try:
            fields = loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError (not UTF-8)
            fields = _object(text, number)  # raises, saying why
        if ended:
            raise LogBroken(f"line {number}", "a line after the closing line")
        if type(fields) is not dict:
            raise LogBroken(f"line {number}", "not a JSON object")
        if "sequence" in fields:
            sequence = checker.size + 1
            try:
                _entry(checker, fields, "")
            except LogBroken as exc:  # the place is named only when there is a finding
                raise LogBroken(f"line {number} (sequence {sequence})", exc.reason) from None
        elif "checkpoint" in fields:
            note = fields["checkpoint"]
            if len(fields) != 1 or not isinstance(note, str):
                raise LogBroken(
                    f"line {number}", 'a checkpoint line is {"checkpoint": signed note}'
                )
            checker.checkpoint(note, f"line {number}")
        elif "end" in fields:
            _end(checker, fields, f"line {number}")
            ended = True
        else:
            raise LogBroken(f"line {number}", "neither an entry, a checkpoint nor the closing line")
    if not ended:
        raise LogBroken(
            f"line {checker.size + checker.checkpoints + 2}",
            "the export ends without its closing line: it is truncated",
        )
    return ExportChecked(checker, keys_from_export=not trusted)


def export_lines(
    entries: Iterable[WitnessEntry],
    checkpoints: Iterable[str],
    keys: Sequence[VerifierKey],
    *,
    origin: str | None = None,
    schemas: dict[str, str] | None = None,
) -> Iterator[str]:
    """The lines (without newlines) of the export of ``entries`` (sequence 1 first) and the
    signed ``checkpoints`` of them, each placed after the entry that completes its size.
    Checks as it goes, like the export from a live source: :class:`LogBroken` if the
    log does not verify."""
    from conclave.domain.witness import leaf_bytes

    pending = sorted((_size_of(note), note) for note in checkpoints)
    checker = LogChecker(keys, origin)
    yield header_line(origin, keys, schemas or {})

    def due() -> Iterator[str]:
        while pending and pending[0][0] <= checker.size:
            size, note = pending.pop(0)
            checker.checkpoint(note, f"checkpoint of tree size {size}")
            yield checkpoint_line(note)

    yield from due()
    for entry in entries:
        data = leaf_bytes(entry)
        checker.entry(data, entry.entry_hash, f"sequence {entry.sequence}")
        yield entry_line(entry, data)
        yield from due()
    if pending:
        raise LogBroken(f"checkpoint of tree size {pending[0][0]}", "beyond the last entry")
    yield end_line(checker.size, checker.checkpoints, checker.head, checker.root)


def _size_of(note: str) -> int:
    lines = note.split("\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() else -1

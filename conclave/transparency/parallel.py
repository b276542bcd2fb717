"""An export checked by several processes: ``conclave witness verify --export FILE --jobs N``.

The file after its header is cut into N byte ranges at line starts. Each process checks
its lines as :func:`~conclave.transparency.export.verify_export` does (JSON, entry bytes,
readable fields, links and hashes within the range, checkpoint signatures) and hashes its
leaves into the Merkle nodes of its range; it cannot know where its range starts in the
log, so it takes that from its first entry. The parent then walks the ranges in order:
each must start where the previous ended (sequence and previous_hash), each checkpoint's
size and root are checked against the ranges before it joined with the nodes its range
had at that line, and the first bad line is the one :func:`verify_export` would name.
Same verdict, CPU time spread over N cores (the hashing and JSON are per line; joining is
O(log n) per checkpoint and per range).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conclave.domain.merkle import EMPTY_ROOT, node_hash
from conclave.domain.witness import GENESIS_HASH
from conclave.errors import WitnessProofError
from conclave.transparency.export import (
    ExportChecked,
    LogBroken,
    LogChecker,
    _end,
    _entry,
    _fast_entry,
    _header,
    _object,
)
from conclave.transparency.keys import VerifierKey
from conclave.transparency.proofs import open_checkpoint

__all__ = ["NodeRange", "verify_export_parallel"]

Node = tuple[int, int, bytes]
"""(level, index, hash): the root of the aligned subtree of leaves
``[index * 2**level, (index + 1) * 2**level)``."""


class NodeRange:
    """The leaves ``[begin, end)`` as the roots of their maximal aligned subtrees, left to
    right; ranges that meet join into one (RFC 9162 hashing)."""

    __slots__ = ("end", "nodes")

    def __init__(self, begin: int = 0) -> None:
        self.end = begin
        self.nodes: list[Node] = []

    def append_hash(self, leaf: bytes) -> None:
        self._push((0, self.end, leaf))
        self.end += 1

    def _push(self, node: Node) -> None:
        nodes = self.nodes
        nodes.append(node)
        while len(nodes) > 1:
            (left_level, left, left_hash), (level, index, right_hash) = nodes[-2], nodes[-1]
            if left_level != level or left & 1 or index != left + 1:
                return
            del nodes[-2:]
            nodes.append((level + 1, left >> 1, node_hash(left_hash, right_hash)))

    def joined(self, nodes: Sequence[Node], end: int) -> NodeRange:
        """This range followed by the range of ``nodes`` that ends at ``end``."""
        out = NodeRange()
        out.nodes = list(self.nodes)
        for node in nodes:
            out._push(node)
        out.end = end
        return out

    def root(self) -> bytes:
        """MTH of the leaves; the range must begin at 0."""
        if not self.nodes:
            return EMPTY_ROOT
        root = self.nodes[-1][2]
        for _, _, peak in reversed(self.nodes[:-1]):
            root = node_hash(peak, root)
        return root


class _RangeChecker(LogChecker):
    """A :class:`LogChecker` that starts wherever its first entry says."""

    def __init__(self, keys: Sequence[VerifierKey], origin: str | None) -> None:
        super().__init__(keys, origin)
        self.first: tuple[int, bytes] | None = None
        self.count = 0
        self.nodes = NodeRange()

    def entry(self, data: bytes, stored_hash: bytes | str, where: str) -> None:
        if self.first is None:
            sequence = int.from_bytes(data[20:28], "big")
            self.first = (sequence, data[28:60])
            self.size, self.head = sequence - 1, data[28:60]
            self.nodes = NodeRange(sequence - 1)
            self.range = self.nodes  # type: ignore[assignment]  # the same append_hash
        super().entry(data, stored_hash, where)
        self.count += 1


@dataclass(slots=True)
class _Part:
    lines: int = 0
    first_entry_line: int = 0
    first: tuple[int, bytes] | None = None
    count: int = 0
    head: bytes = GENESIS_HASH
    nodes: list[Node] = field(default_factory=list)
    checkpoints: list[tuple[int, int, bytes, int, list[Node]]] = field(default_factory=list)
    """(line, size, root, entries of this range before it, the range's nodes then)."""
    end: tuple[int, dict[str, Any]] | None = None
    failure: tuple[int, bool, int, str] | None = None
    """(line, on an entry line, entries of this range before it, reason)."""


class _EntryBroken(LogBroken):
    def __init__(self, before: int, reason: str) -> None:
        super().__init__("", reason)
        self.before = before


def _check_part(
    path: str, start: int, stop: int, keys: Sequence[VerifierKey], origin: str | None
) -> _Part:
    part, checker = _Part(), _RangeChecker(keys, origin)
    with open(path, "rb") as file:
        file.seek(start)
        at = start
        for text in file:
            if at >= stop:
                break
            at += len(text)
            part.lines += 1
            try:
                _check_line(part, checker, text, part.lines)
            except _EntryBroken as exc:
                part.failure = (part.lines, True, exc.before, exc.reason)
                break
            except LogBroken as exc:
                part.failure = (part.lines, False, checker.count, exc.reason)
                break
    part.first, part.count, part.head = checker.first, checker.count, checker.head
    part.nodes = list(checker.nodes.nodes)
    return part


def _check_line(part: _Part, checker: _RangeChecker, text: bytes, number: int) -> None:
    """One line of a range, as ``verify_export`` checks it; what it cannot check without
    the lines before is recorded in ``part``."""
    try:
        line = text.decode()
    except UnicodeDecodeError:
        line = ""  # not JSON: said below
    if part.end is None and line.startswith('{"sequence":'):
        part.first_entry_line = part.first_entry_line or number
        # Not the range's first entry: that one sets where the range starts.
        if checker.first is not None and _fast_entry(checker, line):
            checker.count += 1
            return
    try:
        fields = json.loads(line)
    except ValueError:
        fields = _object(text, number)
    if part.end is not None:
        raise LogBroken("", "a line after the closing line")
    if type(fields) is not dict:
        raise LogBroken("", "not a JSON object")
    if "sequence" in fields:
        part.first_entry_line = part.first_entry_line or number
        before = checker.count
        try:
            _entry(checker, fields, "")
        except LogBroken as exc:
            raise _EntryBroken(before, exc.reason) from None
    elif "checkpoint" in fields:
        note = fields["checkpoint"]
        if len(fields) != 1 or not isinstance(note, str):
            raise LogBroken("", 'a checkpoint line is {"checkpoint": signed note}')
        try:
            signed = open_checkpoint(note, checker.keys, origin=checker.origin)
        except WitnessProofError as exc:
            raise LogBroken("", f"checkpoint refused, {exc}") from None
        cp = signed.checkpoint
        part.checkpoints.append(
            (number, cp.size, cp.root, checker.count, list(checker.nodes.nodes))
        )
    elif "end" in fields:
        part.end = (number, fields)
    else:
        raise LogBroken("", "neither an entry, a checkpoint nor the closing line")


def _cuts(path: Path, start: int, jobs: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    bounds = [start]
    with path.open("rb") as file:
        for i in range(1, jobs):
            target = start + (size - start) * i // jobs
            file.seek(max(target - 1, start))
            file.readline()  # to the start of the next line
            bounds.append(max(file.tell(), bounds[-1]))
    bounds.append(size)
    return list(itertools.pairwise(bounds))


def verify_export_parallel(
    path: Path,
    trusted: Sequence[VerifierKey] = (),
    *,
    origin: str | None = None,
    jobs: int = 0,
) -> ExportChecked:
    """:func:`~conclave.transparency.export.verify_export` of a file, in ``jobs``
    processes (all cores by default); the same verdict, naming the same first bad line."""
    jobs = jobs or os.cpu_count() or 1
    with path.open("rb") as file:
        first = file.readline()
        body = file.tell()
    if not first:
        raise LogBroken("line 1", "the export is empty: no header")
    expected_origin, carried = _header(_object(first, 1))
    keys, origin = tuple(trusted or carried), origin or expected_origin
    cuts = _cuts(path, body, jobs)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=len(cuts), mp_context=context) as pool:
        futures = [pool.submit(_check_part, str(path), a, b, keys, origin) for a, b in cuts]
        parts = [future.result() for future in futures]
    return _join(parts, keys, origin, trusted)


def _join(
    parts: list[_Part],
    keys: Sequence[VerifierKey],
    origin: str | None,
    trusted: Sequence[VerifierKey],
) -> ExportChecked:
    checker = LogChecker(keys, origin)
    prefix, lines, ended = NodeRange(), 1, False
    for part in parts:
        if ended and part.lines:
            raise LogBroken(f"line {lines + 1}", "a line after the closing line")
        # What the range says, line by line: its checkpoints, the line its first entry is
        # on (where it must take over from the ranges before it), its closing line and
        # its own finding, in the order verify_export meets them.
        events: list[tuple[int, int, Any]] = [(cp[0], 1, cp) for cp in part.checkpoints]
        if part.first is not None:
            events.append((part.first_entry_line, 0, part.first))
        if part.end is not None:
            events.append((part.end[0], 2, part.end[1]))
        if part.failure is not None:
            events.append((part.failure[0], 3, part.failure))
        folded = False
        for line, kind, event in sorted(events, key=lambda e: (e[0], e[1])):
            where = f"line {lines + line}"
            if kind == 0:
                _take_over(checker, event, where)
            elif kind == 1:
                _checkpoint(checker, prefix, event, where)
            elif kind == 2:  # the closing line: every entry of the range is before it
                prefix, folded = _fold(checker, prefix, part), True
                checker.range.peaks = [node[2] for node in prefix.nodes]
                checker.range.size = prefix.end
                _end(checker, event, where)
                ended = True
            else:
                _, on_entry, before, reason = event
                if on_entry:
                    where = f"{where} (sequence {checker.size + before + 1})"
                raise LogBroken(where, reason)
        if not folded:
            prefix = _fold(checker, prefix, part)
        lines += part.lines
    if not ended:
        raise LogBroken(
            f"line {lines + 1}", "the export ends without its closing line: it is truncated"
        )
    return ExportChecked(checker, keys_from_export=not trusted)


def _take_over(checker: LogChecker, first: tuple[int, bytes], where: str) -> None:
    """A range's first entry must follow on from the ranges before it."""
    sequence, previous = first
    expected = checker.size + 1
    if sequence != expected:
        raise LogBroken(
            f"{where} (sequence {expected})", f"expected sequence {expected}, found {sequence}"
        )
    if previous != checker.head:
        raise LogBroken(
            f"{where} (sequence {expected})", "previous_hash does not match the prior entry"
        )


def _checkpoint(
    checker: LogChecker,
    prefix: NodeRange,
    event: tuple[int, int, bytes, int, list[Node]],
    where: str,
) -> None:
    _, size, root, before, nodes = event
    at = checker.size + before
    if size != at:
        raise LogBroken(where, f"checkpoint of tree size {size} placed after {at} entries")
    if prefix.joined(nodes, at).root() != root:
        raise LogBroken(
            where,
            f"the root of the first {at} entries is not the root the checkpoint signed: "
            "the log was rewritten",
        )
    checker.checkpoints += 1


def _fold(checker: LogChecker, prefix: NodeRange, part: _Part) -> NodeRange:
    """The ranges before, followed by ``part``'s entries."""
    if part.first is None:
        return prefix
    checker.size += part.count
    checker.head = part.head
    return prefix.joined(part.nodes, checker.size)

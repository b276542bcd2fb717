"""The witness export alone, no broker: ``python -m bench.witness_export [N]``.

For a chain of N entries (default 1,000,000) with a signed checkpoint every 1,000:

* export: entries/s writing the export file (entry bytes, hashes, JSON lines, the
  checks the exporter makes on the way), from entries built on the fly (not timed
  apart: what an export from PostgreSQL adds is the reading);
* verify (Conclave): entries/s of ``verify_export`` over the file, as
  ``conclave witness verify --export`` runs it (JSON per line, entry bytes parsed,
  readable fields compared, chain, tree, signatures);
* verify --jobs N: the same in N processes (``verify_export_parallel``): entries per
  second of wall-clock time, and per CPU-second of all the processes;
* verify (standalone): the same file through docs/verify_export.py in a process of
  its own (its CPU time, from the child's rusage);
* the floor: the hashing alone (entry_hash, leaf hash, tree nodes) over the same
  entry bytes, no JSON: what any verifier in Python pays.

CPU time (process time), so other processes on a shared machine do not count.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from conclave.domain.events import WitnessEntry
from conclave.domain.merkle import CompactRange
from conclave.domain.witness import ChainHead, leaf_bytes, next_entry
from conclave.transparency.export import export_lines, verify_export
from conclave.transparency.keys import SignerKey
from conclave.transparency.note import sign_note
from conclave.transparency.parallel import verify_export_parallel
from schemas.codec import default_codec

EVERY = 1_000
ORIGIN = "bench.example/witness"
SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "verify_export.py"


def _entries(n: int) -> Iterator[WitnessEntry]:
    head = ChainHead()
    for i in range(1, n + 1):
        entry = next_entry(
            head,
            subject_type="agent.output",
            subject_event_id=f"00000000-0000-4000-8000-{i:012d}",
            subject_digest=hashlib.sha256(i.to_bytes(8, "big")).digest(),
            recorded_at=1_700_000_000_000_000 + i,
            task_id=f"task-{i}",
            agent_id=f"agent-{i % 72:03d}",
            attempt=1,
        )
        head = head.advance(entry)
        yield entry


def _notes(n: int, key: SignerKey) -> list[str]:
    """A signed checkpoint every EVERY entries and at the end (roots from a first pass)."""
    from conclave.domain.checkpoint import Checkpoint

    tree, notes = CompactRange(), []
    for entry in _entries(n):
        tree.append_hash(hashlib.sha256(b"\x00" + leaf_bytes(entry)).digest())
        if tree.size % EVERY == 0 or tree.size == n:
            text = Checkpoint(origin=ORIGIN, size=tree.size, root=tree.root()).text()
            notes.append(sign_note(text, [key]))
    return notes


def main(n: int) -> None:
    key = SignerKey.generate(ORIGIN)
    print(f"signing {n // EVERY:,} checkpoints over {n:,} entries (not timed) ...", flush=True)
    notes = _notes(n, key)
    with tempfile.TemporaryDirectory(prefix="witness-export-") as home:
        path = Path(home) / "export.jsonl"
        start = time.process_time()
        with path.open("w", encoding="utf-8") as out:
            lines = export_lines(
                _entries(n),
                notes,
                [key.verifier],
                origin=ORIGIN,
                schemas=default_codec().registry.canonical_forms(),
            )
            for line in lines:
                out.write(line)
                out.write("\n")
        seconds = time.process_time() - start
        size = path.stat().st_size
        print(
            f"export             {n / seconds:>12,.0f} entries/s   ({seconds:.2f} s CPU, "
            f"{size / 2**20:,.0f} MiB, {size / max(n, 1):.0f} bytes/entry; entries built "
            "on the fly included)"
        )

        start = time.process_time()
        with path.open("rb") as file:
            checked = verify_export(file, [key.verifier])
        seconds = time.process_time() - start
        assert checked.checker.size == n
        print(
            f"verify (Conclave)  {n / seconds:>12,.0f} entries/s   ({seconds:.2f} s CPU, "
            f"{checked.checker.checkpoints:,} checkpoints)"
        )

        for jobs in (2, os.cpu_count() or 2):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            own, wall = time.process_time(), time.perf_counter()
            checked = verify_export_parallel(path, [key.verifier], jobs=jobs)
            wall = time.perf_counter() - wall
            own = time.process_time() - own
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = own + (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            assert checked.checker.size == n
            print(
                f"verify --jobs {jobs:<3} {n / wall:>12,.0f} entries/s wall   "
                f"({n / cpu:,.0f} per CPU-second, {cpu:.2f} s CPU in all)"
            )
            if jobs == os.cpu_count():
                break

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [sys.executable, str(SCRIPT), str(path), "--vkey", key.verifier.text()],
            capture_output=True,
            text=True,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert done.returncode == 0, done.stdout
        seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"verify (script)    {n / seconds:>12,.0f} entries/s   ({seconds:.2f} s CPU)")

    data = [leaf_bytes(entry) for entry in _entries(min(n, 200_000))]
    start = time.process_time()
    tree, sha256 = CompactRange(), hashlib.sha256
    append = tree.append_hash
    for item in data:
        sha256(item).digest()
        append(sha256(b"\x00" + item).digest())
    seconds = time.process_time() - start
    print(f"hashing floor      {len(data) / seconds:>12,.0f} entries/s   (no JSON, no parsing)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)

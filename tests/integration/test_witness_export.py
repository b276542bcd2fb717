"""The witness export and ``conclave witness verify`` over a real log: the session's
witness topic and read model after real tasks, with the checkpoints the witness
processor signed. Exports from the topic and from PostgreSQL are the same file and
verify offline (with Conclave's checker and with docs/verify_export.py, which knows
only the doc); a copy of the log under a prefix of its own, altered, cut, padded or
reordered on the topic (forged records) or in PostgreSQL (UPDATE, DELETE, INSERT),
is refused at its first bad sequence."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from conclave.bus import ensure_topics, read_history, topics_for
from conclave.connections import kafka_options
from conclave.domain.events import Envelope, WitnessEntry
from conclave.errors import SchemaError
from conclave.exporting import verify_log
from conclave.settings import Settings
from conclave.transparency.export import LogBroken
from conclave.transparency.keyfiles import read_verifier
from conclave.transparency.keys import VerifierKey
from conclave.verify import topic_entries
from projections.database import connect, migrate, schema_for
from schemas.codec import default_codec
from tests.integration.conftest import System, eventually
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration

STANDALONE = Path(__file__).resolve().parents[2] / "docs" / "verify_export.py"


def public_key(settings: Settings) -> VerifierKey:
    assert settings.witness_key is not None
    return read_verifier(str(settings.witness_key.with_suffix(".vkey")))


async def real_log(system: System) -> tuple[list[WitnessEntry], int]:
    """At least 5 entries, every one projected, the head under a published checkpoint;
    (entries, their count) as the topic holds them then."""
    settings, db = system.settings, system.db
    async with system.running(2):
        for i in range(5):
            await system.submit_visible(f"export me {i}")
    entries, _ = await topic_entries(settings)

    async def settled() -> bool:
        size = await db.fetchval("SELECT max(tree_size) FROM checkpoints")
        rows = await db.fetchval("SELECT count(*) FROM witness_entries")
        now, _ = await topic_entries(settings)
        return size is not None and size == rows == len(now)

    await eventually(settled, within=60)
    entries, _ = await topic_entries(settings)
    return entries, len(entries)


def standalone(export: Path, vkey: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STANDALONE), str(export), "--vkey", vkey],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_exports_of_a_real_log_verify_offline_and_edits_are_found(
    system: System, tmp_path: Path
) -> None:
    settings = system.settings
    entries, n = await real_log(system)
    vkey = public_key(settings).text()

    topic_file, pg_file = tmp_path / "topic.jsonl", tmp_path / "pg.jsonl"
    made = cli(settings, "witness", "export", "--vkey", vkey, "--output", str(topic_file))
    assert made.returncode == 0, made.stderr
    assert f"exported {n} entries" in made.stderr
    made = cli(
        settings, "witness", "export", "--from", "postgres", "--vkey", vkey, "-o", str(pg_file)
    )
    assert made.returncode == 0, made.stderr
    assert pg_file.read_text() == topic_file.read_text()  # the same log, the same file
    assert not (tmp_path / "pg.jsonl.part").exists()  # written aside, then renamed

    lines = topic_file.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["keys"] == [vkey]
    codec = default_codec()
    fingerprint = codec.registry.current("conclave.events.WitnessEntry").fingerprint.hex()
    assert fingerprint in header["schemas"]
    end = json.loads(lines[-1])["end"]
    assert end["entries"] == n
    assert end["head"] == entries[-1].entry_hash.hex()
    checkpoints = [json.loads(line)["checkpoint"] for line in lines if '"checkpoint"' in line[:15]]
    assert checkpoints
    assert end["checkpoints"] == len(checkpoints)

    for args in (
        ("--export", str(topic_file), "--vkey", vkey),
        ("--from", "topic", "--vkey", vkey),
        ("--from", "postgres", "--vkey", vkey),
    ):
        verified = cli(settings, "witness", "verify", *args)
        assert verified.returncode == 0, verified.stderr
        assert f"chain intact, {n} entries, {len(checkpoints)} checkpoints checked" in (
            verified.stdout
        )
    ok = standalone(topic_file, vkey)
    assert ok.returncode == 0, ok.stderr
    assert f"{n} entries" in ok.stdout
    edited_exports_are_refused(settings, lines, vkey, tmp_path)

    # A checkpoint by a key the verifier does not trust is refused with the reason.
    stranger = VerifierKey("conclave.localhost/witness", bytes(32)).text()
    refused = cli(settings, "witness", "verify", "--export", str(topic_file), "--vkey", stranger)
    assert refused.returncode == 1
    assert "unknown key" in refused.stderr


def edited_exports_are_refused(
    settings: Settings, lines: list[str], vkey: str, tmp_path: Path
) -> None:
    # Edit the export: each edit is found at its line, by Conclave and by the standalone
    # script; the entry at line 1 + k... is wherever the file put it, so look it up.
    def index(sequence: int) -> int:
        return next(i for i, x in enumerate(lines) if x.startswith(f'{{"sequence":{sequence},'))

    at, second, fourth = index(3), index(2), index(4)

    def swapped(ls: list[str]) -> None:
        ls[at], ls[fourth] = ls[fourth], ls[at]

    def altered(ls: list[str]) -> None:
        fields = json.loads(ls[at])
        data = bytearray(base64.b64decode(fields["entry"]))
        data[-10] ^= 1
        fields["entry"] = base64.b64encode(bytes(data)).decode()
        ls[at] = json.dumps(fields)

    edits: list[tuple[Callable[[list[str]], object], str]] = [
        (altered, "entry_hash does not match its contents"),
        (lambda ls: ls.pop(at), "expected sequence 3, found 4"),
        (lambda ls: ls.insert(at, ls[second]), "expected sequence 3, found 2"),
        (swapped, "expected sequence 3, found 4"),
    ]
    for edit, reason in edits:
        copy = list(lines)
        edit(copy)
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(f"{line}\n" for line in copy))
        refused = cli(settings, "witness", "verify", "--export", str(bad), "--vkey", vkey)
        assert refused.returncode == 1, reason
        assert refused.stderr.strip() == (
            f"export {bad}: broken at line {at + 1} (sequence 3): {reason}"
        ), refused.stderr
        assert "Traceback" not in refused.stderr
        script = standalone(bad, vkey)
        assert script.returncode == 1
        assert f"line {at + 1}" in script.stdout + script.stderr, script.stdout


async def own_prefix(settings: Settings) -> Settings:
    own = dataclasses.replace(settings, topic_prefix=f"x{secrets.token_hex(4)}")
    await ensure_topics(own)
    return own


async def copy_log(
    settings: Settings, own: Settings, change: Callable[[list[bytes]], list[bytes]]
) -> None:
    """The session's witness and checkpoints topics, record values byte for byte, into
    ``own``'s, the witness records passed through ``change`` first."""
    source, target = topics_for(settings), topics_for(own)
    codec = default_codec()
    values = []
    async for record in read_history(settings, [source.witness]):
        with contextlib.suppress(SchemaError):  # other tests' garbage: not the log
            if isinstance(codec.decode(record.value)[1], WitnessEntry):
                values.append(record.value)
    notes = [r.value async for r in read_history(settings, [source.checkpoints])]
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, **kafka_options(settings)
    )
    await producer.start()
    try:
        for value in change(values):
            await producer.send_and_wait(target.witness, value, key=b"witness")
        for value in notes:
            await producer.send_and_wait(target.checkpoints, value)
    finally:
        await producer.stop()


def forge(value: bytes, **changes: object) -> bytes:
    """A witness record re-encoded with some fields changed (its entry_hash kept)."""
    codec = default_codec()
    envelope, entry = codec.decode(value)
    assert isinstance(entry, WitnessEntry)
    assert isinstance(envelope, Envelope)
    return codec.encode(envelope, dataclasses.replace(entry, **changes))  # type: ignore[arg-type]


async def test_a_forged_topic_is_refused_at_its_first_bad_sequence(
    system: System, tmp_path: Path
) -> None:
    settings = system.settings
    _, n = await real_log(system)
    key = public_key(settings)

    empty = await own_prefix(settings)
    verified = await verify_log(empty, "topic", [key])
    assert verified.checker.size == 0  # the empty log verifies

    sound = await own_prefix(settings)
    await copy_log(settings, sound, lambda vs: vs)
    verified = await verify_log(sound, "topic", [key])
    assert verified.checker.size >= n
    assert verified.checker.checkpoints >= 1

    cases: list[tuple[Callable[[list[bytes]], list[bytes]], str, str]] = [
        (
            lambda vs: [*vs[:2], forge(vs[2], subject_digest=bytes(32)), *vs[3:]],
            "sequence 3 (offset 2)",
            "entry_hash does not match its contents",
        ),
        (lambda vs: [*vs[:2], *vs[3:]], "sequence 4 (offset 2)", "expected sequence 3, found 4"),
        (
            lambda vs: [*vs[:3], vs[2], *vs[3:]],
            "sequence 3 (offset 3)",
            "expected sequence 4, found 3",
        ),
        (
            lambda vs: [*vs[:2], vs[3], vs[2], *vs[4:]],
            "sequence 4 (offset 2)",
            "expected sequence 3, found 4",
        ),
        # The last entries removed: the chain is sound, the checkpoint that signed them is not.
        (lambda vs: vs[:2], "checkpoint of tree size", "entries it signed are missing"),
    ]
    for change, where, reason in cases:
        own = await own_prefix(settings)
        await copy_log(settings, own, change)
        with pytest.raises(LogBroken) as caught:
            await verify_log(own, "topic", [key])
        assert caught.value.where.startswith(where), str(caught.value)
        assert reason in caught.value.reason, str(caught.value)

    # From the shell: one line naming the place, exit 1.
    own = await own_prefix(settings)
    await copy_log(settings, own, cases[0][0])
    refused = cli(own, "witness", "verify", "--from", "topic", "--vkey", key.text())
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "topic: broken at sequence 3 (offset 2): entry_hash does not match its contents"
    )
    # An export of it is refused at the same place, and leaves no file behind.
    target = tmp_path / "forged.jsonl"
    made = cli(own, "witness", "export", "--vkey", key.text(), "-o", str(target))
    assert made.returncode == 1
    assert "broken at sequence 3 (offset 2): entry_hash does not match its contents" in (
        made.stderr
    )
    assert "nothing written" in made.stderr
    assert not target.exists()
    assert not target.with_name("forged.jsonl.part").exists()


async def test_rows_changed_in_postgres_are_refused_at_their_sequence(
    system: System,
) -> None:
    settings, db = system.settings, system.db
    _, n = await real_log(system)
    key = public_key(settings)
    own = await own_prefix(settings)
    pool = await connect(own)
    try:
        await migrate(pool)

        async def copy() -> None:
            await pool.execute("DELETE FROM witness_entries")
            await pool.execute("DELETE FROM checkpoints")
            rows = await db.fetch("SELECT * FROM witness_entries ORDER BY sequence")
            await pool.copy_records_to_table(
                "witness_entries",
                records=[tuple(r.values()) for r in rows],
                columns=list(rows[0].keys()),
            )
            cps = await db.fetch("SELECT * FROM checkpoints")
            await pool.copy_records_to_table(
                "checkpoints", records=[tuple(r.values()) for r in cps], columns=list(cps[0].keys())
            )

        await copy()
        verified = await verify_log(own, "postgres", [key])
        assert verified.checker.size == n

        last = n
        cases: list[tuple[str, str, str]] = [
            (
                "UPDATE witness_entries SET subject_digest = '\\x00'::bytea "
                "|| substring(subject_digest from 2) WHERE sequence = 3",
                "sequence 3 (row)",
                "entry_hash does not match its contents",
            ),
            (
                "DELETE FROM witness_entries WHERE sequence = 3",
                "sequence 4 (row)",
                "expected sequence 3, found 4",
            ),
            (
                "UPDATE witness_entries SET recorded_at = recorded_at + 1, entry_hash = "
                "sha256(''::bytea) WHERE sequence = 2",
                "sequence 2 (row)",
                "entry_hash does not match",
            ),
            (
                f"INSERT INTO witness_entries SELECT sequence + {last}, previous_hash, entry_hash, "
                "subject_type, subject_event_id || 'x', subject_digest, recorded_at, task_id, "
                "agent_id, detail, attempt FROM witness_entries WHERE sequence = 1",
                f"sequence {last + 1} (row)",
                "previous_hash does not match the prior entry",
            ),
            (
                "UPDATE witness_entries SET sequence = -sequence WHERE sequence IN (3, 4); "
                "UPDATE witness_entries SET sequence = 7 + sequence WHERE sequence IN (-3, -4)",
                "sequence 3 (row)",
                "previous_hash does not match the prior entry",
            ),
            (
                f"DELETE FROM witness_entries WHERE sequence > {last - 2}",
                "checkpoint of tree size",
                "entries it signed are missing",
            ),
        ]
        for statement, where, reason in cases:
            await copy()
            await pool.execute(statement)
            with pytest.raises(LogBroken) as caught:
                await verify_log(own, "postgres", [key])
            assert caught.value.where.startswith(where), (statement, str(caught.value))
            assert reason in caught.value.reason, (statement, str(caught.value))
        refused = cli(own, "witness", "verify", "--from", "postgres", "--vkey", key.text())
        assert refused.returncode == 1
        assert "broken at checkpoint of tree size" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema_for(own)}" CASCADE')
        await pool.close()

"""Invariant 7 at run time and in recovery: null values, empty values, garbage and unknown
fingerprints on every topic, then a worker killed with -9 and restarted. Nothing bricks:
the restarted worker processes new work, each bad record is a dead letter with its reason
and its original bytes (null kept apart from empty), and ``witness verify`` names them as
findings in one line each instead of a traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from conclave.bus import read_history, topics_for
from conclave.client import Client
from conclave.domain.events import DeadLetterRecord
from schemas.codec import MAGIC, default_codec
from tests.faults.conftest import Cluster, check_invariants, submit
from tests.integration.conftest import eventually

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BAD = {
    "null": None,
    "empty": b"",
    "garbage": b"\x00\xffnot avro at all",
    "unknown": MAGIC + bytes(8) + b"\x02",
}


async def test_bad_records_on_every_topic_then_a_restart_brick_nothing(cluster: Cluster) -> None:
    settings = cluster.settings
    topics = topics_for(settings)
    cluster.worker("w1")
    cluster.runtime("h1", "bpool", agents=4, latency_ms=5)
    cluster.projector()
    before = await submit(settings, "bpool", 20, prefix="before")
    every = [
        *topics.commands,
        topics.control,
        topics.agents,
        topics.tasks,
        topics.outputs,
        topics.witness,
        topics.workers,
        topics.snapshots("scheduler"),
        topics.snapshots("witness"),
        topics.coordination_requests,
        topics.coordination,
        topics.snapshots("coordination"),
    ]
    sent: dict[tuple[str, int], bytes | None] = {}
    async with Client(settings, producer_name="vandal") as vandal:
        for topic in every:
            for name, value in BAD.items():
                offset = await vandal.send_raw(topic, name, value, partition=0)
                sent[topic, offset] = value
    cluster.kill("w1")  # recovery now reads every one of them
    cluster.worker("w1")
    after = await submit(settings, "bpool", 20, prefix="after")

    async def letters() -> dict[tuple[str, int], DeadLetterRecord]:
        found = {}
        async for record in read_history(settings, [topics.deadletter]):
            _, letter = default_codec().decode(record.value)
            assert isinstance(letter, DeadLetterRecord)
            found[letter.source_topic, letter.source_offset] = letter
        return found if set(sent) <= set(found) else {}

    dead = await eventually(letters, within=60)
    for (topic, offset), value in sent.items():
        letter = dead[topic, offset]
        assert letter.original == value
        assert (letter.original is None) == (value is None), (topic, offset)
        assert letter.reason
    await check_invariants(cluster, [*before, *after])

    verify = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "conclave.cli", "witness", "verify", "--source", "topic"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert "Traceback" not in verify.stderr
    assert "chain intact" in verify.stdout
    findings = [line for line in verify.stderr.splitlines() if "not an entry" in line]
    assert len(findings) == len(BAD)
    assert any("null value" in line for line in findings)
    assert any("empty value" in line for line in findings)
    assert any("unknown schema fingerprint" in line for line in findings)

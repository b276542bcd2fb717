"""The projector under faults: PostgreSQL restarted and the broker stopped while events
flow, two projectors of one schema at once (one folds, the other takes over when it
stops or is killed with -9), and rebuilds next to running projectors.

After each: the read models equal a rebuild from offset 0 (nothing lost, nothing
folded twice), the projector resumed by itself, and each outage cost one WARNING
and one INFO line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from conclave.devstack import EmbeddedStack, StackInfo
from conclave.settings import Settings
from projections.database import ProjectorActive, drop_read_models
from projections.projector import Projector
from tests.integration.conftest import eventually
from tests.integration.test_projector_folding import Installation, installation, task_history
from tests.integration.test_rebuild import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@contextlib.asynccontextmanager
async def running(it: Installation, pool: asyncpg.Pool | None = None) -> AsyncIterator[Projector]:
    """A projector folding ``it`` in the background for the block."""
    projector = Projector(it.settings, pool or it.pool)
    await projector.start()
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        yield projector
    finally:
        stop.set()
        await task
        await projector.stop()


class Load:
    """Tasks' events produced in small slices, as a busy system writes them."""

    def __init__(self, it: Installation, per_slice: int = 10, every_s: float = 0.05) -> None:
        self.it = it
        self.per_slice = per_slice
        self.every_s = every_s
        self.tasks = 0

    async def run(self, stop: asyncio.Event) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.it.settings.kafka_bootstrap, acks="all", linger_ms=5
        )
        await producer.start()
        try:
            while not stop.is_set():
                records = task_history(self.it, self.per_slice, start=self.tasks)
                futures = [
                    await producer.send(topic, value=value, key=key.encode())
                    for topic, key, value in records
                ]
                await asyncio.gather(*futures)
                self.tasks += self.per_slice
                await asyncio.sleep(self.every_s)
        finally:
            await producer.stop()

    async def send(self, tasks: int) -> None:
        """``tasks`` more tasks, at once."""
        await self.it.produce(task_history(self.it, tasks, start=self.tasks))
        self.tasks += tasks


async def folded_everything(it: Installation, tasks: int, within: float = 30.0) -> None:
    async def done() -> bool:
        with contextlib.suppress(Exception):  # PostgreSQL may still be coming back
            completed = await it.pool.fetchval(
                "SELECT count(*) FROM tasks WHERE status = 'completed'"
            )
            return bool(completed == tasks)
        return False

    await eventually(done, within=within, every=0.1)


async def equals_a_rebuild(it: Installation) -> None:
    """The installation's read models are what folding from offset 0 gives."""
    rebuilt = await it.pool_for(f"{it.schema}_rebuilt")
    await it.fold(rebuilt)
    assert await snapshot(it.pool) == await snapshot(rebuilt)


def lines(caplog: pytest.LogCaptureFixture, schema: str) -> list[logging.LogRecord]:
    """What this installation's projectors logged (the session's own projector logs too)."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("projections") and f"schema {schema}" in r.getMessage()
    ]


async def outage_lines(
    caplog: pytest.LogCaptureFixture, what: str, *, within: float = 15.0
) -> tuple[list[str], list[str]]:
    """The WARNING and INFO lines the projectors of this process logged about ``what``.

    One outage, one line each way, per projector at most: the session's own projector
    may see the same outage (a process reports it once for all its parts, and its end
    when the last of them is through: that one may still be in its back-off, so wait
    for the line a little).
    """

    async def ended() -> bool:
        return any(f"{what} back after" in r.getMessage() for r in caplog.records)

    await eventually(ended, within=within, every=0.1)
    ours = [r for r in caplog.records if r.name.startswith("projections")]
    mine = [
        r
        for r in ours
        if f"{what} unavailable" in r.getMessage() or f"{what} back after" in r.getMessage()
    ]
    assert all(r.exc_info is None for r in mine), "an outage line carries a traceback"
    assert not [r for r in ours if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in mine if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in mine if r.levelno == logging.INFO]
    for lines in (warnings, infos):
        by_projector = [line.split(":")[0] for line in lines]
        assert len(by_projector) == len(set(by_projector)), lines
    assert len(warnings) == len(infos) >= 1, (warnings, infos)
    return warnings, infos


async def test_postgresql_restarted_under_load(
    stack: StackInfo, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections")
    embedded = EmbeddedStack(stack.home)
    async with installation(settings, partitions=2) as it, running(it) as projector:
        load = Load(it)
        stop_load = asyncio.Event()
        producing = asyncio.create_task(load.run(stop_load))
        try:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(embedded._stop_postgres)
            await asyncio.sleep(4.0)  # events keep coming: the projector must wait
            await asyncio.to_thread(embedded.up, pg_port=stack.pg_port)
            restarted = time.monotonic()
            await asyncio.sleep(1.0)
        finally:
            stop_load.set()
            await producing
        await folded_everything(it, load.tasks)
        caught_up = time.monotonic() - restarted
        assert projector.active
        await equals_a_rebuild(it)
        await outage_lines(caplog, "PostgreSQL")
        assert caught_up < 10.0  # back-off tops out at 5 s


async def test_broker_stopped_and_started_again(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections")
    home = Path(tempfile.mkdtemp(prefix="conclave-broker-"))
    broker = EmbeddedStack(home)
    port = _free_port()
    await asyncio.to_thread(broker._start_kafka, port)
    try:
        own = settings.with_(kafka_bootstrap=f"127.0.0.1:{port}")
        async with installation(own) as it, running(it) as projector:
            load = Load(it)
            await load.send(50)
            await folded_everything(it, load.tasks)
            # Stopped idle: the embedded broker loses acknowledged writes when stopped busy.
            await asyncio.to_thread(broker._stop_kafka)
            await asyncio.sleep(8.0)  # long enough for the projector to notice
            await asyncio.to_thread(broker._start_kafka, port)
            await load.send(50)
            await folded_everything(it, load.tasks)
            assert projector.active
            await equals_a_rebuild(it)
            warnings, infos = await outage_lines(caplog, f"Kafka at {own.kafka_bootstrap}")
            assert len(warnings) == len(infos) == 1, (warnings, infos)  # its own broker
    finally:
        await asyncio.to_thread(broker._stop_kafka)
        shutil.rmtree(home, ignore_errors=True)


async def test_one_projector_folds_and_the_standby_takes_over_when_it_stops_or_dies(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections")
    async with installation(settings, partitions=2) as it:
        load = Load(it)
        other = await CliProjector.start(it.settings)
        try:
            async with running(it) as first:
                await eventually(lambda: _true(first.active))
                await other.said("standing by")
                await load.send(30)
                await folded_everything(it, load.tasks)
            # The first one stopped: the one in the other process takes over.
            await other.said("is active now")
            await load.send(30)
            await folded_everything(it, load.tasks)
            async with running(it) as again:
                await asyncio.sleep(2.0)
                assert not again.active
                standby = [r for r in lines(caplog, it.schema) if "standing by" in r.getMessage()]
                assert len(standby) == 1
                other.kill()  # -9: its session ends, and with it the lock
                killed = time.monotonic()
                await eventually(lambda: _true(again.active), within=10.0)
                takeover = time.monotonic() - killed
                await load.send(30)
                await folded_everything(it, load.tasks)
            assert takeover < 5.0
        finally:
            await other.close()
        assert "Traceback" not in other.output
        await equals_a_rebuild(it)


async def test_rebuild_is_refused_next_to_an_active_projector_and_holds_off_the_others(
    settings: Settings,
) -> None:
    async with installation(settings) as it:
        load = Load(it)
        await load.send(20)
        async with running(it) as active:
            await folded_everything(it, load.tasks)
            with pytest.raises(ProjectorActive, match="stop it before rebuilding"):
                await drop_read_models(it.pool)
            rebuild = Projector(it.settings, it.pool)
            await rebuild.start()
            try:
                with pytest.raises(ProjectorActive):
                    await rebuild.rebuild()
            finally:
                await rebuild.stop()
            assert active.active
        rebuild = Projector(it.settings, it.pool)
        await rebuild.start()
        try:
            assert await rebuild.rebuild() > 0
            async with running(it) as waiting:
                await asyncio.sleep(1.5)
                assert not waiting.active  # the rebuild still holds the schema
                await rebuild.stop()
                await eventually(lambda: _true(waiting.active), within=5.0)
                await load.send(20)
                await folded_everything(it, load.tasks)
        finally:
            await rebuild.stop()
        await equals_a_rebuild(it)


class CliProjector:
    """``conclave projector`` in a process of its own, its stderr collected."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = ""
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, settings: Settings) -> CliProjector:
        env = {
            **os.environ,
            "CONCLAVE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CONCLAVE_DATABASE_URL": settings.database_url,
            "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conclave.cli",
            "projector",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.output += line.decode(errors="replace")

    async def said(self, text: str, within: float = 20.0) -> None:
        await eventually(lambda: _true(text in self.output), within=within, every=0.1)

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        self.kill()
        await self.process.wait()
        await self._reader


async def _true(value: bool) -> bool:
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

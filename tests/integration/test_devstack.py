"""The embedded stack really serves Kafka and PostgreSQL, and up/down/status keep their word."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from conclave.devstack import DEV_WITNESS_ORIGIN, EmbeddedStack, StackInfo
from conclave.errors import StackError
from conclave.settings import Settings, stack_file

pytestmark = pytest.mark.integration


async def test_kafka_round_trip(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}.devstack.roundtrip"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"hello", key=b"k1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.topic_prefix}-devstack-{secrets.token_hex(4)}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value, record.offset) == (b"k1", b"hello", sent.offset)


async def test_postgres_answers_on_database_conclave(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == "conclave"
    finally:
        await conn.close()


def test_stack_file_holds_the_settings(stack: StackInfo) -> None:
    recorded = json.loads(stack_file(stack.home).read_text())
    assert recorded == {
        "kafka_bootstrap": f"127.0.0.1:{stack.kafka_port}",
        "database_url": f"postgresql://postgres@127.0.0.1:{stack.pg_port}/conclave",
        "witness_key": str(stack.witness_key),
    }
    from_file = Settings.from_env({"CONCLAVE_HOME": str(stack.home)})
    assert from_file.kafka_bootstrap == stack.kafka_bootstrap
    assert from_file.database_url == stack.database_url
    # The stack's own signing key, private to its owner, with its public half beside it.
    assert from_file.witness_key == stack.witness_key
    assert stack.witness_key.stat().st_mode & 0o777 == 0o600
    assert stack.witness_key.with_suffix(".vkey").read_text().startswith(DEV_WITNESS_ORIGIN)


def test_status_reports_running(stack: StackInfo) -> None:
    status = EmbeddedStack(stack.home).status()
    assert status.running
    assert status.kafka.address == f"127.0.0.1:{stack.kafka_port}"
    assert status.postgres.address == f"127.0.0.1:{stack.pg_port}"
    assert status.kafka.pid is not None
    assert status.postgres.pid is not None


def test_up_is_idempotent(stack: StackInfo) -> None:
    embedded = EmbeddedStack(stack.home)
    pids = [s.pid for s in embedded.status().services]
    started = time.perf_counter()
    again = embedded.up(kafka_port=0, pg_port=0)  # ports only matter for a service it starts
    elapsed = time.perf_counter() - started
    assert (again.kafka_port, again.pg_port, again.started) == (
        stack.kafka_port,
        stack.pg_port,
        False,
    )
    assert [s.pid for s in embedded.status().services] == pids
    assert elapsed < 1.0


@pytest.fixture
def listener() -> Iterator[int]:
    """A port somebody else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def own_home() -> Iterator[Path]:
    """A home for a second, short-lived stack; whatever a test leaves running is stopped."""
    home = Path(tempfile.mkdtemp(prefix="conclave-test-"))
    yield home
    EmbeddedStack(home).down()
    shutil.rmtree(home, ignore_errors=True)


def test_taken_default_ports_fall_back_and_down_up_reuses_ports(
    own_home: Path, listener: int
) -> None:
    embedded = EmbeddedStack(own_home, default_kafka_port=listener, default_pg_port=listener)
    first = embedded.up()
    assert listener not in (first.kafka_port, first.pg_port)

    embedded.down()
    assert not stack_file(own_home).exists()
    status = embedded.status()
    assert not status.kafka.running
    assert not status.postgres.running

    second = embedded.up()
    assert (second.kafka_port, second.pg_port, second.started) == (
        first.kafka_port,
        first.pg_port,
        True,
    )
    assert embedded.status().running
    embedded.down()
    embedded.down()  # stopping a stopped stack is fine too


def test_taken_explicit_port_fails_and_leaves_nothing_running(
    own_home: Path, listener: int
) -> None:
    embedded = EmbeddedStack(own_home)
    with pytest.raises(StackError, match=rf"postgres: port {listener} is already in use.*pg/log"):
        embedded.up(kafka_port=0, pg_port=listener)
    status = embedded.status()
    assert not status.kafka.running  # the broker this call started was stopped again
    assert not status.postgres.running
    assert not stack_file(own_home).exists()

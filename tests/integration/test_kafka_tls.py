"""Conclave's Kafka clients speak TLS when told to, and check whom they speak to.

The embedded broker has no TLS listener, so the peer is a TLS server made here with a
certificate from a CA made here. It reads the first Kafka request frame a client
sends and hangs up: enough to see that each of Conclave's clients (producers,
consumer, admin) got through a verified handshake and spoke Kafka inside it, and that
a client trusting another CA never sends a byte of Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from conclave.bus import EventProducer, TransactionalProducer, ensure_topics, new_consumer
from conclave.errors import BrokerUnavailable
from conclave.settings import Settings
from tests.certificates import TlsFiles, make_tls_files

pytestmark = pytest.mark.integration


@dataclass
class TlsListener:
    port: int
    requests: list[tuple[int, str, str]] = field(default_factory=list)
    """(api_key, client_id, TLS version) of every request frame received."""


async def _first_request(
    listener: TlsListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        frame = await reader.readexactly(size)
        # Request header v1: api_key, api_version, correlation_id, client_id (int16 + bytes).
        api_key, _, _, id_length = struct.unpack(">hhih", frame[:10])
        client_id = frame[10 : 10 + id_length].decode()
        tls = writer.get_extra_info("ssl_object")
        listener.requests.append((api_key, client_id, tls.version() if tls else "plaintext"))
    writer.close()


@contextlib.asynccontextmanager
async def tls_listener(tls: TlsFiles) -> AsyncIterator[TlsListener]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    listener = TlsListener(port=0)
    server = await asyncio.start_server(
        lambda r, w: _first_request(listener, r, w), "127.0.0.1", 0, ssl=context
    )
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def settings_for(port: int, ca: Path) -> Settings:
    return Settings.from_env(
        {
            "CONCLAVE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "CONCLAVE_DATABASE_URL": "postgresql://unused@127.0.0.1:9/unused",
            "CONCLAVE_KAFKA_SECURITY_PROTOCOL": "SSL",
            "CONCLAVE_KAFKA_SSL_CAFILE": str(ca),
        }
    )


async def _producer(settings: Settings) -> None:
    producer = EventProducer(settings, producer="tls-probe")
    try:
        await producer.start()
    finally:
        await producer.stop()


async def _transactional_producer(settings: Settings) -> None:
    writer = TransactionalProducer(settings, "tls-probe", TopicPartition("t", 0))
    producer = writer._new_producer("tls-probe.1")  # start() reads offsets first
    try:
        await producer.start()
    finally:
        await producer.stop()


async def _consumer(settings: Settings) -> None:
    consumer = new_consumer(settings)
    try:
        await consumer.start()
    finally:
        await consumer.stop()


# Every place conclave/bus.py builds an aiokafka client.
CLIENTS: dict[str, Callable[[Settings], Awaitable[object]]] = {
    "producer": _producer,
    "transactional producer": _transactional_producer,
    "consumer": _consumer,
    "admin": ensure_topics,
}


@pytest.mark.parametrize("client", CLIENTS)
async def test_every_client_speaks_kafka_inside_verified_tls(client: str, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    async with tls_listener(tls) as listener:
        with pytest.raises((BrokerUnavailable, KafkaError)):  # the listener hangs up
            await CLIENTS[client](settings_for(listener.port, tls.ca))
    assert listener.requests, f"no Kafka request of the {client} came through TLS"
    _, client_id, version = listener.requests[0]
    assert version.startswith("TLSv1."), version
    if "producer" in client:
        assert client_id.startswith("conclave-tls-probe"), client_id


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_broker_certificate_from_another_ca_gets_no_request(
    client: str, tmp_path: Path
) -> None:
    (tmp_path / "broker").mkdir()
    (tmp_path / "other").mkdir()
    tls, other = make_tls_files(tmp_path / "broker"), make_tls_files(tmp_path / "other")
    async with tls_listener(tls) as listener:
        with pytest.raises((BrokerUnavailable, KafkaError)):
            await CLIENTS[client](settings_for(listener.port, other.ca))
    assert listener.requests == [], f"the {client} sent requests to a broker it does not trust"

"""How clients connect: Kafka's TLS and SASL options, PostgreSQL's password.

Every Kafka client (consumer, producer, admin) is built with :func:`kafka_options`,
every PostgreSQL connection with :func:`postgres_options`, so that a secured cluster
is configured once, in :class:`~conclave.settings.Settings`, and never half-applied
(a producer over TLS and an admin client in plaintext).

Bad TLS files surface here, as :class:`ConfigError` naming the variable: they are
read when the first client is built, not when settings are parsed.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka.helpers import create_ssl_context

from conclave.errors import ConfigError
from conclave.settings import KafkaSecurity, Settings

__all__ = ["kafka_options", "postgres_options"]


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaConsumer``, ``AIOKafkaProducer`` and
    ``AIOKafkaAdminClient``: security protocol, TLS context, SASL credentials."""
    security = settings.kafka_security
    options: dict[str, Any] = {"security_protocol": str(security.protocol)}
    if security.protocol.tls:
        options["ssl_context"] = _ssl_context(security)
    if security.protocol.sasl:
        options |= {
            "sasl_mechanism": str(security.sasl_mechanism),
            # aiokafka's names; they carry SCRAM credentials as well as PLAIN ones.
            "sasl_plain_username": security.sasl_username,
            "sasl_plain_password": security.sasl_password,
        }
    return options


def postgres_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``create_pool`` besides the URL.

    TLS (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``) stays in the URL, in
    libpq's own syntax, which asyncpg reads; only the password may come apart from it.
    A TLS file the URL names must exist: asyncpg would report a missing one as a bare
    "No such file or directory", which reads like (and is retried as) an outage.
    """
    query = parse_qs(urlsplit(settings.database_url).query)
    for parameter in _POSTGRES_FILES:
        for path in query.get(parameter, []):
            if not Path(path).expanduser().is_file():
                raise ConfigError(
                    f"CONCLAVE_DATABASE_URL: {parameter}={path} is not a readable file"
                )
    return {"password": settings.database_password} if settings.database_password else {}


_POSTGRES_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")


# One context per configuration: loading the CA bundle costs milliseconds, and a
# process builds a consumer for every history read.
@functools.lru_cache(maxsize=4)
def _ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    files: tuple[tuple[str, Path | None], ...] = (
        ("CONCLAVE_KAFKA_SSL_CAFILE", security.ssl_cafile),
        ("CONCLAVE_KAFKA_SSL_CERTFILE", security.ssl_certfile),
        ("CONCLAVE_KAFKA_SSL_KEYFILE", security.ssl_keyfile),
    )
    for name, path in files:
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    try:
        # Verifies the brokers' certificates and host names (not optional in aiokafka).
        context: ssl.SSLContext = create_ssl_context(
            cafile=security.ssl_cafile,
            certfile=security.ssl_certfile,
            keyfile=security.ssl_keyfile,
            password=security.ssl_key_password or None,
        )
    except (ssl.SSLError, OSError) as exc:
        loaded = ", ".join(f"{name}={path}" for name, path in files if path is not None)
        raise ConfigError(f"Kafka TLS files do not load ({loaded}): {exc}") from None
    return context

"""Settings: the environment is read here and nowhere else.

Every process reads one frozen :class:`Settings`. Explicit environment
variables win; otherwise the connection settings written by ``conclave dev up``
into ``.conclave/stack.json`` (in the working directory, or ``CONCLAVE_HOME``)
are used, so that a laptop needs no configuration at all.

Secrets (the database URL and password, Kafka's SASL password, a TLS key's
password) are fields with ``repr=False``, and error messages name a URL only
through :func:`redacted_url`: no log line or traceback shows them. Passwords may
also come from files (``*_PASSWORD_FILE``), as container orchestrators mount them.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, overload
from urllib.parse import parse_qs, urlsplit

from conclave.domain.validation import invalid_tenant
from conclave.errors import ConfigError, StackError

__all__ = [
    "KafkaSecurity",
    "KafkaSecurityProtocol",
    "LogSettings",
    "SaslMechanism",
    "Settings",
    "redacted_url",
    "stack_file",
]

_STACK_FILE = "stack.json"


def stack_file(home: Path) -> Path:
    """Where ``conclave dev up`` records the embedded stack's connection settings."""
    return home / _STACK_FILE


class KafkaSecurityProtocol(enum.StrEnum):
    """Kafka's ``security.protocol``: TLS or not, SASL authentication or not."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def tls(self) -> bool:
        return self in (KafkaSecurityProtocol.SSL, KafkaSecurityProtocol.SASL_SSL)

    @property
    def sasl(self) -> bool:
        return self in (KafkaSecurityProtocol.SASL_PLAINTEXT, KafkaSecurityProtocol.SASL_SSL)


class SaslMechanism(enum.StrEnum):
    """SASL mechanisms aiokafka speaks with a user name and password."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSecurity:
    """How every Kafka client authenticates and encrypts (checked by :meth:`Settings.from_env`).

    The TLS files are paths as given; they are read when a client is built
    (:func:`conclave.connections.kafka_options`), so a missing file is reported there.
    """

    protocol: KafkaSecurityProtocol = KafkaSecurityProtocol.PLAINTEXT
    sasl_mechanism: SaslMechanism = SaslMechanism.PLAIN
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: Path | None = None
    """CA bundle the brokers' certificates are checked against; None: the system's."""
    ssl_certfile: Path | None = None
    """Client certificate (mutual TLS), PEM; may hold the key too."""
    ssl_keyfile: Path | None = None
    ssl_key_password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Connection and tuning settings for every Conclave process."""

    kafka_bootstrap: str
    database_url: str = field(repr=False)  # may carry a password: never logged
    database_password: str = field(default="", repr=False)
    """Overrides the URL's password (``CONCLAVE_DATABASE_PASSWORD``): keeps it out of the
    URL, where it would need percent-encoding and shows in process listings."""
    kafka_security: KafkaSecurity = KafkaSecurity()
    home: Path = Path(".conclave")
    topic_prefix: str = "conclave"
    read_schema: str | None = None
    """Read commands query this PostgreSQL schema (``CONCLAVE_SCHEMA``, ``conclave --schema``)
    instead of the live read models: one built by ``conclave replay --as-of``. Writers
    (projector, API tokens) never use it."""
    partitions: int = 1
    replication_factor: int = 1
    tenant: str = "default"
    pool_capacity: int = 72
    heartbeat_interval_s: float = 1.0
    host_lease_s: float = 5.0
    """A runtime host silent this long after its last beat is lost: its running attempts
    are stalled and retried elsewhere, its agents get no work until it is back."""
    host_fail_after_s: float = 30.0
    """A host judged lost and still silent this long after its lease ran out is failed
    (``host.failed``): it is not coming back by itself, and its agents show ``failed``."""
    breaker_failures: int = 10
    """Attempts an agent fails in a row before its circuit opens (no work for it for
    ``breaker_cooldown_s``, then one probe task); 0: no circuit breakers."""
    breaker_cooldown_s: float = 30.0
    agent_restarts: int = 5
    """Restarts of a crashed agent its host allows within ``agent_restart_window_s``;
    the crash after that fails the agent (``agent.failed``: no work for it until its
    host starts again). 0: the first crash fails it."""
    agent_restart_window_s: float = 60.0
    task_timeout_s: float = 300.0
    """How long an agent may work on one attempt; the host then reports it failed."""
    answer_grace_s: float = 30.0
    """How much longer the scheduler waits for an answer before it stalls the attempt
    (the host died or cannot reach the broker) and retries or dead-letters the task."""
    witness_key: Path | None = None
    """The witness log's signing key (``conclave witness keygen``): with one, the witness
    processor publishes signed checkpoints; without, none."""
    checkpoint_every: int = 1000
    """A checkpoint after this many new entries..."""
    checkpoint_interval_s: float = 10.0
    """...or this long after the last one, if the log grew since."""
    trace_sample_ratio: float = 0.1
    trace_sampler_from_env: bool = False
    """``OTEL_TRACES_SAMPLER`` is set: the OpenTelemetry SDK's sampler, not the ratio."""
    trace_exporter: Literal["none", "otlp", "console"] = "none"
    """Where spans go: ``OTEL_TRACES_EXPORTER``, else ``otlp`` when an OTLP endpoint is
    set (``OTEL_EXPORTER_OTLP_ENDPOINT``), else nowhere."""
    metrics_port: int | None = None
    """Where long-running processes serve Prometheus metrics; ``None``: 9464 if free,
    else any free port (the process's run file says which)."""
    metrics_host: str = "0.0.0.0"
    metrics: bool = True
    """``CONCLAVE_METRICS=off``: no endpoint at all."""
    producer_linger_ms: int = 0
    """How long a producer waits to batch records into one request (latency vs. syscalls)."""
    fetch_idle_ms: float = 5.0
    """After an empty fetch answered early, wait this long before the next one
    (brokers that do not long-poll; see conclave/fetching.py)."""
    fetch_idle_max_ms: float = 100.0
    """...doubling up to this once no record came for ``fetch_hot_ms``: the first record
    after a pause waits up to this."""
    fetch_hot_ms: float = 150.0
    """How long after the last record the short idle wait holds: idle cost against the
    first hop's latency (see conclave/fetching.py for figures)."""
    fetch_cold_ms: float = 10_000.0
    fetch_cold_max_ms: float = 400.0
    """...and once no record came for ``fetch_cold_ms``, doubling on up to this: an idle
    process then fetches ~2.5 times a second, and the first record after a long pause
    waits up to this (100 turns the cold tier off)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``CONCLAVE_*`` variables, falling back to the embedded stack.

        Raises :class:`StackError` when neither the variables nor a running
        embedded stack give a broker and a database.
        """
        env = os.environ if env is None else env
        home = Path(env.get("CONCLAVE_HOME", ".conclave"))
        kafka = env.get("CONCLAVE_KAFKA_BOOTSTRAP", "")
        database = env.get("CONCLAVE_DATABASE_URL", "")
        witness_key = env.get("CONCLAVE_WITNESS_KEY", "")
        if not kafka or not database:
            recorded = _read_stack_file(home)
            kafka = kafka or recorded.get("kafka_bootstrap", "")
            database = database or recorded.get("database_url", "")
            # The embedded stack's own key, made by `conclave dev up`.
            witness_key = witness_key or recorded.get("witness_key", "")
        if not kafka or not database:
            raise StackError(
                "no broker or database configured: run `conclave dev up` "
                "or set CONCLAVE_KAFKA_BOOTSTRAP and CONCLAVE_DATABASE_URL"
            )
        _check_database_url(database)
        return cls(
            kafka_bootstrap=kafka,
            database_url=database,
            database_password=_secret(
                env, "CONCLAVE_DATABASE_PASSWORD", "CONCLAVE_DATABASE_PASSWORD_FILE"
            ),
            kafka_security=_kafka_security(env),
            home=home,
            topic_prefix=env.get("CONCLAVE_TOPIC_PREFIX", "conclave"),
            read_schema=_schema_name(env),
            partitions=_int(env, "CONCLAVE_PARTITIONS", 1),
            replication_factor=_int(env, "CONCLAVE_REPLICATION_FACTOR", 1),
            tenant=_tenant(env),
            pool_capacity=_int(env, "CONCLAVE_POOL_CAPACITY", 72),
            heartbeat_interval_s=_float(env, "CONCLAVE_HEARTBEAT_INTERVAL_S", 1.0),
            host_lease_s=_float(env, "CONCLAVE_HOST_LEASE_S", 5.0),
            host_fail_after_s=_float(env, "CONCLAVE_HOST_FAIL_AFTER_S", 30.0),
            breaker_failures=_int(env, "CONCLAVE_BREAKER_FAILURES", 10),
            breaker_cooldown_s=_float(env, "CONCLAVE_BREAKER_COOLDOWN_S", 30.0),
            agent_restarts=_at_least(
                0, "CONCLAVE_AGENT_RESTARTS", _int(env, "CONCLAVE_AGENT_RESTARTS", 5)
            ),
            agent_restart_window_s=_positive(
                "CONCLAVE_AGENT_RESTART_WINDOW_S",
                _float(env, "CONCLAVE_AGENT_RESTART_WINDOW_S", 60.0),
            ),
            task_timeout_s=_float(env, "CONCLAVE_TASK_TIMEOUT_S", 300.0),
            answer_grace_s=_float(env, "CONCLAVE_ANSWER_GRACE_S", 30.0),
            witness_key=Path(key) if (key := witness_key) else None,
            checkpoint_every=_int(env, "CONCLAVE_CHECKPOINT_EVERY", 1000),
            checkpoint_interval_s=_float(env, "CONCLAVE_CHECKPOINT_INTERVAL_S", 10.0),
            trace_sample_ratio=_float(env, "CONCLAVE_TRACE_SAMPLE_RATIO", 0.1),
            trace_sampler_from_env=bool(env.get("OTEL_TRACES_SAMPLER")),
            trace_exporter=_trace_exporter(env),
            metrics_port=_int(env, "CONCLAVE_METRICS_PORT", None),
            metrics_host=env.get("CONCLAVE_METRICS_HOST", "0.0.0.0"),
            metrics=_switch(env, "CONCLAVE_METRICS", default=True),
            fetch_idle_ms=_float(env, "CONCLAVE_FETCH_IDLE_MS", 5.0),
            fetch_idle_max_ms=_float(env, "CONCLAVE_FETCH_IDLE_MAX_MS", 100.0),
            fetch_hot_ms=_float(env, "CONCLAVE_FETCH_HOT_MS", 150.0),
            fetch_cold_ms=_float(env, "CONCLAVE_FETCH_COLD_MS", 10_000.0),
            fetch_cold_max_ms=_float(env, "CONCLAVE_FETCH_COLD_MAX_MS", 400.0),
            producer_linger_ms=_int(env, "CONCLAVE_PRODUCER_LINGER_MS", 0),
        )

    @property
    def silent_after_us(self) -> int:
        """An agent with no heartbeat for this long shows as ``silent``: three periods."""
        return int(3 * self.heartbeat_interval_s * 1_000_000)

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests use their own topic prefix)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How a process logs: read before anything else (settings may fail, and say so)."""

    level: str = "INFO"
    format: Literal["auto", "json", "text"] = "auto"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LogSettings:
        env = os.environ if env is None else env
        fmt = env.get("CONCLAVE_LOG_FORMAT", "auto").strip().lower() or "auto"
        if fmt not in ("auto", "json", "text"):
            raise ConfigError(f"CONCLAVE_LOG_FORMAT must be auto, json or text, got {fmt!r}")
        level = env.get("CONCLAVE_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"CONCLAVE_LOG_LEVEL must be a logging level, got {level!r}")
        return cls(level, fmt)  # type: ignore[arg-type]  # checked just above


def _read_stack_file(home: Path) -> dict[str, str]:
    path = stack_file(home)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return {str(k): str(v) for k, v in data.items()}


@overload
def _int(env: Mapping[str, str], name: str, default: int) -> int: ...
@overload
def _int(env: Mapping[str, str], name: str, default: None) -> int | None: ...
def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _tenant(env: Mapping[str, str]) -> str:
    tenant = env.get("CONCLAVE_TENANT", "default")
    if (reason := invalid_tenant(tenant)) is not None:
        raise ConfigError(f"CONCLAVE_TENANT: {reason}")
    return tenant


def _schema_name(env: Mapping[str, str]) -> str | None:
    name = env.get("CONCLAVE_SCHEMA", "").strip()
    if not name:
        return None
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ConfigError(
            f"CONCLAVE_SCHEMA={name!r} is not a schema name: lower-case letters, digits and _"
        )
    return name


def _trace_exporter(env: Mapping[str, str]) -> Literal["none", "otlp", "console"]:
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        named = "otlp" if endpoint else "none"
    if named not in ("none", "otlp", "console"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, got {named!r}")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if named == "otlp" and protocol != "http/protobuf":
        raise ConfigError(
            f"OTLP over {protocol} is not supported: Conclave exports traces over "
            "http/protobuf (OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf, port 4318)"
        )
    return named  # type: ignore[return-value]  # checked just above


def _switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, got {raw!r}")


def _at_least(low: int, name: str, value: int) -> int:
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")
    return value


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be more than 0, got {value:g}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_QUERY_SECRETS = frozenset({"password", "sslpassword"})
_USERINFO_PASSWORD = re.compile(r"^([^:/]*://[^:@/]*):.*@")


def redacted_url(url: str) -> str:
    """``url`` with every password in it replaced by ``***`` (for messages and logs): the
    one in the user info and ``password`` / ``sslpassword`` query parameters, which
    libpq and asyncpg accept too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable (a bad IPv6 literal): drop everything between the user and the
        # last "@" rather than show a password.
        return _USERINFO_PASSWORD.sub(r"\1:***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if has_password else netloc
    query = "&".join(
        f"{key}=***" if key in _QUERY_SECRETS else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return parts._replace(netloc=netloc, query=query).geturl()


def _check_database_url(url: str) -> None:
    """A malformed URL fails here, in one line that never shows its password."""
    shown = redacted_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a port that is not a number
    except ValueError:
        raise ConfigError(f"CONCLAVE_DATABASE_URL is not a valid URL: {shown}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"CONCLAVE_DATABASE_URL must start with postgresql://, got {shown}")
    modes = parse_qs(parts.query).get("sslmode", [])
    if any(mode not in _SSLMODES for mode in modes):
        raise ConfigError(
            f"CONCLAVE_DATABASE_URL: sslmode must be one of {', '.join(_SSLMODES)}, got {shown}"
        )


def _secret(env: Mapping[str, str], name: str, file_name: str) -> str:
    """``name``'s value, or the content of the file ``file_name`` names (one of them)."""
    value = env.get(name, "")
    path = env.get(file_name, "")
    if value and path:
        raise ConfigError(f"set {name} or {file_name}, not both")
    if not path:
        return value
    try:
        # Files written by editors and `echo` end in a newline that is no part of it.
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{file_name}: cannot read {path}: {exc.strerror}") from None


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "")
    return Path(raw) if raw else None


def _kafka_security(env: Mapping[str, str]) -> KafkaSecurity:
    raw_protocol = env.get("CONCLAVE_KAFKA_SECURITY_PROTOCOL", "").strip().upper() or "PLAINTEXT"
    try:
        protocol = KafkaSecurityProtocol(raw_protocol)
    except ValueError:
        choices = ", ".join(KafkaSecurityProtocol)
        raise ConfigError(
            f"CONCLAVE_KAFKA_SECURITY_PROTOCOL must be one of {choices}, got {raw_protocol!r}"
        ) from None
    raw_mechanism = env.get("CONCLAVE_KAFKA_SASL_MECHANISM", "").strip().upper() or "PLAIN"
    try:
        mechanism = SaslMechanism(raw_mechanism)
    except ValueError:
        choices = ", ".join(SaslMechanism)
        raise ConfigError(
            f"CONCLAVE_KAFKA_SASL_MECHANISM must be one of {choices}, got {raw_mechanism!r}"
        ) from None
    security = KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=env.get("CONCLAVE_KAFKA_SASL_USERNAME", ""),
        sasl_password=_secret(
            env, "CONCLAVE_KAFKA_SASL_PASSWORD", "CONCLAVE_KAFKA_SASL_PASSWORD_FILE"
        ),
        ssl_cafile=_path(env, "CONCLAVE_KAFKA_SSL_CAFILE"),
        ssl_certfile=_path(env, "CONCLAVE_KAFKA_SSL_CERTFILE"),
        ssl_keyfile=_path(env, "CONCLAVE_KAFKA_SSL_KEYFILE"),
        ssl_key_password=_secret(
            env, "CONCLAVE_KAFKA_SSL_KEY_PASSWORD", "CONCLAVE_KAFKA_SSL_KEY_PASSWORD_FILE"
        ),
    )
    _check_kafka_security(security, env)
    return security


def _check_kafka_security(security: KafkaSecurity, env: Mapping[str, str]) -> None:
    """Settings that would be silently ignored are refused: a user who set a CA file
    believes the connection is encrypted."""
    protocol = security.protocol
    if protocol.sasl and not (security.sasl_username and security.sasl_password):
        raise ConfigError(
            f"CONCLAVE_KAFKA_SECURITY_PROTOCOL={protocol} needs CONCLAVE_KAFKA_SASL_USERNAME "
            "and CONCLAVE_KAFKA_SASL_PASSWORD (or CONCLAVE_KAFKA_SASL_PASSWORD_FILE)"
        )
    sasl_set = [
        name
        for name in ("CONCLAVE_KAFKA_SASL_MECHANISM", "CONCLAVE_KAFKA_SASL_USERNAME")
        if env.get(name)
    ] + (["CONCLAVE_KAFKA_SASL_PASSWORD"] if security.sasl_password else [])
    if sasl_set and not protocol.sasl:
        raise ConfigError(
            f"{sasl_set[0]} is set but CONCLAVE_KAFKA_SECURITY_PROTOCOL is {protocol}: "
            "use SASL_SSL (or SASL_PLAINTEXT) to authenticate"
        )
    tls_set = [
        name
        for name in (
            "CONCLAVE_KAFKA_SSL_CAFILE",
            "CONCLAVE_KAFKA_SSL_CERTFILE",
            "CONCLAVE_KAFKA_SSL_KEYFILE",
        )
        if env.get(name)
    ] + (["CONCLAVE_KAFKA_SSL_KEY_PASSWORD"] if security.ssl_key_password else [])
    if tls_set and not protocol.tls:
        raise ConfigError(
            f"{tls_set[0]} is set but CONCLAVE_KAFKA_SECURITY_PROTOCOL is {protocol}: "
            "use SSL or SASL_SSL to encrypt"
        )
    if security.ssl_keyfile and not security.ssl_certfile:
        raise ConfigError(
            "CONCLAVE_KAFKA_SSL_KEYFILE is set without CONCLAVE_KAFKA_SSL_CERTFILE: "
            "a client key needs its certificate"
        )

"""Settings: the environment is read here and nowhere else.

Every process reads one frozen :class:`Settings`. Explicit environment
variables win; otherwise the connection settings written by ``conclave dev up``
into ``.conclave/stack.json`` (in the working directory, or ``CONCLAVE_HOME``)
are used, so that a laptop needs no configuration at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, overload

from conclave.errors import ConfigError, StackError

__all__ = ["LogSettings", "Settings", "stack_file"]

_STACK_FILE = "stack.json"


def stack_file(home: Path) -> Path:
    """Where ``conclave dev up`` records the embedded stack's connection settings."""
    return home / _STACK_FILE


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Connection and tuning settings for every Conclave process."""

    kafka_bootstrap: str
    database_url: str = field(repr=False)  # may carry a password: never logged
    home: Path = Path(".conclave")
    topic_prefix: str = "conclave"
    partitions: int = 1
    replication_factor: int = 1
    tenant: str = "default"
    pool_capacity: int = 72
    heartbeat_interval_s: float = 1.0
    host_lease_s: float = 5.0
    """A runtime host silent this long after its last beat is lost: its running attempts
    are stalled and retried elsewhere, its agents get no work until it is back."""
    breaker_failures: int = 10
    """Attempts an agent fails in a row before its circuit opens (no work for it for
    ``breaker_cooldown_s``, then one probe task); 0: no circuit breakers."""
    breaker_cooldown_s: float = 30.0
    task_timeout_s: float = 300.0
    """How long an agent may work on one attempt; the host then reports it failed."""
    answer_grace_s: float = 30.0
    """How much longer the scheduler waits for an answer before it stalls the attempt
    (the host died or cannot reach the broker) and retries or dead-letters the task."""
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
        if not kafka or not database:
            recorded = _read_stack_file(home)
            kafka = kafka or recorded.get("kafka_bootstrap", "")
            database = database or recorded.get("database_url", "")
        if not kafka or not database:
            raise StackError(
                "no broker or database configured: run `conclave dev up` "
                "or set CONCLAVE_KAFKA_BOOTSTRAP and CONCLAVE_DATABASE_URL"
            )
        return cls(
            kafka_bootstrap=kafka,
            database_url=database,
            home=home,
            topic_prefix=env.get("CONCLAVE_TOPIC_PREFIX", "conclave"),
            partitions=_int(env, "CONCLAVE_PARTITIONS", 1),
            replication_factor=_int(env, "CONCLAVE_REPLICATION_FACTOR", 1),
            tenant=env.get("CONCLAVE_TENANT", "default"),
            pool_capacity=_int(env, "CONCLAVE_POOL_CAPACITY", 72),
            heartbeat_interval_s=_float(env, "CONCLAVE_HEARTBEAT_INTERVAL_S", 1.0),
            host_lease_s=_float(env, "CONCLAVE_HOST_LEASE_S", 5.0),
            breaker_failures=_int(env, "CONCLAVE_BREAKER_FAILURES", 10),
            breaker_cooldown_s=_float(env, "CONCLAVE_BREAKER_COOLDOWN_S", 30.0),
            task_timeout_s=_float(env, "CONCLAVE_TASK_TIMEOUT_S", 300.0),
            answer_grace_s=_float(env, "CONCLAVE_ANSWER_GRACE_S", 30.0),
            trace_sample_ratio=_float(env, "CONCLAVE_TRACE_SAMPLE_RATIO", 0.1),
            trace_sampler_from_env=bool(env.get("OTEL_TRACES_SAMPLER")),
            trace_exporter=_trace_exporter(env),
            metrics_port=_int(env, "CONCLAVE_METRICS_PORT", None),
            metrics_host=env.get("CONCLAVE_METRICS_HOST", "0.0.0.0"),
            metrics=_switch(env, "CONCLAVE_METRICS", default=True),
            fetch_idle_ms=_float(env, "CONCLAVE_FETCH_IDLE_MS", 5.0),
            fetch_idle_max_ms=_float(env, "CONCLAVE_FETCH_IDLE_MAX_MS", 100.0),
            fetch_hot_ms=_float(env, "CONCLAVE_FETCH_HOT_MS", 150.0),
            producer_linger_ms=_int(env, "CONCLAVE_PRODUCER_LINGER_MS", 0),
        )

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


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None

"""Settings.from_env: explicit variables win, the stack file is the fallback, bad values fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conclave.errors import ConfigError, StackError
from conclave.settings import LogSettings, Settings, stack_file


def _write_stack_file(home: Path) -> None:
    stack_file(home).write_text(
        json.dumps(
            {
                "kafka_bootstrap": "127.0.0.1:1111",
                "database_url": "postgresql://postgres@127.0.0.1:2222/conclave",
            }
        )
    )


def test_stack_file_is_the_fallback(tmp_path: Path) -> None:
    _write_stack_file(tmp_path)
    settings = Settings.from_env({"CONCLAVE_HOME": str(tmp_path)})
    assert settings.kafka_bootstrap == "127.0.0.1:1111"
    assert settings.database_url == "postgresql://postgres@127.0.0.1:2222/conclave"
    assert settings.home == tmp_path


def test_env_wins_over_stack_file(tmp_path: Path) -> None:
    _write_stack_file(tmp_path)
    settings = Settings.from_env(
        {"CONCLAVE_HOME": str(tmp_path), "CONCLAVE_KAFKA_BOOTSTRAP": "broker:9092"}
    )
    assert settings.kafka_bootstrap == "broker:9092"
    assert settings.database_url == "postgresql://postgres@127.0.0.1:2222/conclave"

    both = Settings.from_env(
        {
            "CONCLAVE_HOME": str(tmp_path),
            "CONCLAVE_KAFKA_BOOTSTRAP": "broker:9092",
            "CONCLAVE_DATABASE_URL": "postgresql://db/prod",
        }
    )
    assert (both.kafka_bootstrap, both.database_url) == ("broker:9092", "postgresql://db/prod")


def test_missing_both_raises_stack_error(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="conclave dev up"):
        Settings.from_env({"CONCLAVE_HOME": str(tmp_path)})


def test_half_configured_without_stack_file_raises_stack_error(tmp_path: Path) -> None:
    with pytest.raises(StackError):
        Settings.from_env({"CONCLAVE_HOME": str(tmp_path), "CONCLAVE_KAFKA_BOOTSTRAP": "b:9092"})


_CONNECTED = {"CONCLAVE_KAFKA_BOOTSTRAP": "b:9092", "CONCLAVE_DATABASE_URL": "postgresql://db/x"}


@pytest.mark.parametrize(
    "name", ["CONCLAVE_PARTITIONS", "CONCLAVE_REPLICATION_FACTOR", "CONCLAVE_POOL_CAPACITY"]
)
def test_bad_int_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**_CONNECTED, name: "many"})


@pytest.mark.parametrize("tenant", ["", "acme/batch", "x" * 201])
def test_a_tenant_that_is_no_id_is_refused(tenant: str) -> None:
    with pytest.raises(ConfigError, match="CONCLAVE_TENANT: tenant must"):
        Settings.from_env({**_CONNECTED, "CONCLAVE_TENANT": tenant})


def test_bad_float_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="CONCLAVE_TRACE_SAMPLE_RATIO"):
        Settings.from_env({**_CONNECTED, "CONCLAVE_TRACE_SAMPLE_RATIO": "half"})


def test_unreadable_stack_file_raises_config_error(tmp_path: Path) -> None:
    stack_file(tmp_path).write_text("{not json")
    with pytest.raises(ConfigError, match=r"stack\.json"):
        Settings.from_env({"CONCLAVE_HOME": str(tmp_path)})


def test_values_and_defaults() -> None:
    settings = Settings.from_env(
        {**_CONNECTED, "CONCLAVE_PARTITIONS": "6", "CONCLAVE_TOPIC_PREFIX": "t1"}
    )
    assert settings.partitions == 6
    assert settings.topic_prefix == "t1"
    assert settings.pool_capacity == 72
    assert settings.replication_factor == 1
    assert settings.trace_sample_ratio == pytest.approx(0.1)


def test_database_url_is_not_in_repr() -> None:
    settings = Settings.from_env(
        {**_CONNECTED, "CONCLAVE_DATABASE_URL": "postgresql://u:secret@db/x"}
    )
    assert "secret" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, "none"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ],
)
def test_traces_are_exported_only_where_the_standard_variables_say(
    env: dict[str, str], exporter: str
) -> None:
    assert Settings.from_env({**_CONNECTED, **env}).trace_exporter == exporter


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER must be"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTLP over grpc is not supported",
        ),
        ({"CONCLAVE_METRICS_PORT": "ninety"}, "CONCLAVE_METRICS_PORT must be an integer"),
        ({"CONCLAVE_METRICS": "maybe"}, "CONCLAVE_METRICS must be on or off"),
    ],
)
def test_telemetry_settings_that_cannot_work_are_refused_in_one_line(
    env: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        Settings.from_env({**_CONNECTED, **env})


def test_metrics_port_defaults_to_any_free_one_and_can_be_pinned_or_turned_off() -> None:
    default = Settings.from_env(_CONNECTED)
    assert default.metrics
    assert default.metrics_port is None
    pinned = Settings.from_env({**_CONNECTED, "CONCLAVE_METRICS_PORT": "9500"})
    assert pinned.metrics_port == 9500
    assert not Settings.from_env({**_CONNECTED, "CONCLAVE_METRICS": "off"}).metrics
    assert Settings.from_env(
        {**_CONNECTED, "OTEL_TRACES_SAMPLER": "always_on"}
    ).trace_sampler_from_env


def test_log_settings_are_checked() -> None:
    assert LogSettings.from_env({}) == LogSettings("INFO", "auto")
    assert LogSettings.from_env({"CONCLAVE_LOG_LEVEL": "debug", "CONCLAVE_LOG_FORMAT": "JSON"}) == (
        LogSettings("DEBUG", "json")
    )
    with pytest.raises(ConfigError, match="CONCLAVE_LOG_FORMAT"):
        LogSettings.from_env({"CONCLAVE_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="CONCLAVE_LOG_LEVEL"):
        LogSettings.from_env({"CONCLAVE_LOG_LEVEL": "loud"})

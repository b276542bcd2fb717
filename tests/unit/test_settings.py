"""Settings.from_env: explicit variables win, the stack file is the fallback, bad values fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conclave.errors import ConfigError, StackError
from conclave.settings import Settings, stack_file


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

"""The pure parts of rebuilds and time travel: the digest rule, positions, as-of times,
schema names; and the replay command's bad input (one line, exit 2, no broker)."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from conclave.cli import app
from conclave.errors import ConfigError
from conclave.settings import Settings
from projections.asof import asof_schema_name, check_schema_name, parse_as_of
from projections.digest import (
    DIGESTED_TABLES,
    SchemaDigest,
    TableDigest,
    combined,
    compare,
    digest_rows,
    format_positions,
    parse_positions,
)

NOW = datetime(2026, 12, 6, 3, 0, 0, tzinfo=UTC)


def _by_hand(rows: list[str]) -> str:
    sha = hashlib.sha256()
    for row in rows:
        data = row.encode()
        sha.update(struct.pack(">I", len(data)) + data)
    return sha.hexdigest()


def test_digest_is_sha256_of_length_prefixed_rows() -> None:
    rows = ["(t1,queued,)", '(t2,completed,"a b")', "(t3,é,)"]
    assert digest_rows(rows) == (3, _by_hand(rows))
    assert digest_rows([]) == (0, hashlib.sha256().hexdigest())


def test_digest_tells_rows_apart_however_they_are_cut() -> None:
    # Without the length prefix these would hash the same bytes.
    assert digest_rows(["ab", "c"])[1] != digest_rows(["a", "bc"])[1]
    assert digest_rows(["a", "b"])[1] != digest_rows(["b", "a"])[1], "order is part of it"
    assert digest_rows(["a"])[1] != digest_rows(["a", ""])[1], "an empty row still counts"


def test_digest_vector_in_the_docs() -> None:
    # docs/witness.md, "Projection digests", states this example for other languages.
    rows = ["(t1,queued)", "(t2,completed)"]
    vector = "8b4734f2c077e1044a37e29dcfb8e6a1e1fc5d5a2f06dd36b96620b35fd58083"
    assert digest_rows(rows) == (2, vector) == (2, _by_hand(rows))
    with open("docs/witness.md") as doc:
        assert vector in doc.read()


def _schema(**sha: str) -> SchemaDigest:
    tables = tuple(TableDigest(name, 1, sha.get(name, "0" * 64)) for name in DIGESTED_TABLES)
    return SchemaDigest("s", tables, (("t", 0, 5),))


def test_compare_names_the_tables_that_differ_in_order() -> None:
    assert compare(_schema(), _schema()) == []
    assert compare(_schema(tasks="1" * 64), _schema()) == ["tasks"]
    differ = compare(_schema(outputs="2" * 64), _schema(tasks="1" * 64))
    assert differ == ["tasks", "outputs"]


def test_combined_does_not_depend_on_table_order() -> None:
    a = [TableDigest("tasks", 2, "a" * 64), TableDigest("agents", 1, "b" * 64)]
    assert combined(a) == combined(list(reversed(a)))
    assert combined(a) != combined([TableDigest("tasks", 3, "a" * 64), a[1]])


def test_positions_round_trip_and_bad_ones_are_named() -> None:
    text = "conclave.tasks:0:10, conclave.control:0:3"
    parsed = parse_positions(text)
    assert parsed == {("conclave.tasks", 0): 10, ("conclave.control", 0): 3}
    triples = [(t, p, o) for (t, p), o in parsed.items()]
    assert format_positions(triples) == ["conclave.control:0:3", "conclave.tasks:0:10"]
    assert parse_positions(",".join(format_positions(triples))) == parsed
    for bad, reason in [
        ("conclave.tasks:0", "not topic:partition:offset"),
        (":0:1", "not topic:partition:offset"),
        ("t:x:1", "must be integers"),
        ("t:0:-1", "must not be negative"),
        ("t:0:1,t:0:2", "given twice"),
        (" , ", "no topic:partition:offset"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_positions(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", NOW - timedelta(minutes=15)),
        ("90s", NOW - timedelta(seconds=90)),
        ("2h", NOW - timedelta(hours=2)),
        ("1.5d", NOW - timedelta(hours=36)),
        ("1w", NOW - timedelta(days=7)),
        ("2026-12-06T02:30:00Z", datetime(2026, 12, 6, 2, 30, tzinfo=UTC)),
        ("2026-12-06 02:30:00", datetime(2026, 12, 6, 2, 30, tzinfo=UTC)),
        ("2026-12-06T03:30:00+01:00", datetime(2026, 12, 6, 2, 30, tzinfo=UTC)),
    ],
)
def test_as_of_times(text: str, expected: datetime) -> None:
    assert parse_as_of(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("yesterday", "neither an ISO time"),
        ("15 minutes", "neither an ISO time"),
        ("-5m", "neither an ISO time"),
        ("2026-12-07T00:00:00Z", "in the future"),
    ],
)
def test_bad_as_of_times(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_as_of(text, NOW)


def test_schema_names() -> None:
    assert asof_schema_name(datetime(2026, 12, 6, 2, 5, 9, tzinfo=UTC)) == "asof_20261206020509"
    assert check_schema_name("asof_x1") == "asof_x1"
    for bad in ("Asof", "1x", "a-b", "pg_x", "a" * 64, "", 'x"; drop'):
        with pytest.raises(ValueError, match="not a schema name"):
            check_schema_name(bad)


def test_conclave_schema_setting_is_checked() -> None:
    env = {
        "CONCLAVE_KAFKA_BOOTSTRAP": "localhost:9092",
        "CONCLAVE_DATABASE_URL": "postgresql://u@localhost/db",
        "CONCLAVE_SCHEMA": "asof_1",
    }
    assert Settings.from_env(env).read_schema == "asof_1"
    with pytest.raises(ConfigError, match="CONCLAVE_SCHEMA"):
        Settings.from_env({**env, "CONCLAVE_SCHEMA": "Bad-Name"})


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["replay", "--as-of", "yesterday"], "neither an ISO time"),
        (["replay", "--as-of-offsets", "t:0"], "not topic:partition:offset"),
        (["replay", "--as-of", "1h", "--into", "Bad"], "not a schema name"),
        (["replay", "--check", "--list"], "exclude each other"),
        (["replay", "--as-of", "1h", "--as-of-offsets", "t:0:1"], "not both"),
        (["replay", "--into", "x"], "--into names the schema"),
        (["--schema", "Bad", "tasks"], "not a schema name"),
    ],
)
def test_replay_bad_input_is_one_message_and_exit_2(args: list[str], said: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    # rich draws the message in a box, wrapped: compare the words alone.
    words = " ".join(result.output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())
    assert said in words
    assert "Traceback" not in result.output


def test_every_read_model_is_digested() -> None:
    # A read model added later (by another issue) must be digested too, or a rebuild
    # could differ in it unseen: READ_MODEL_TABLES is what a replay rebuilds.
    from projections.database import READ_MODEL_TABLES

    assert set(DIGESTED_TABLES) == set(READ_MODEL_TABLES) - {"projection_offsets"}

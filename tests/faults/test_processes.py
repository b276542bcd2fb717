"""Two of anything, and stopping: every combination a user can start from the README
works or is refused in one line, and every process stops on the first signal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from conclave.cli import STOP_GRACE_S
from conclave.devstack import EmbeddedStack, throwaway_stack
from conclave.settings import Settings
from tests.faults.conftest import Cluster, check_invariants, submit

pytestmark = [pytest.mark.integration, pytest.mark.faults]

OwnStack = tuple[EmbeddedStack, dict[str, str]]


@pytest.fixture
async def own_stack() -> AsyncIterator[OwnStack]:
    """A stack of this test's own (it freezes or stops it), and the environment for it."""
    async with throwaway_stack("conclave-procs-") as (embedded, info):
        yield embedded, {**os.environ, **info.env(), "CONCLAVE_TOPIC_PREFIX": "procs"}


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``conclave ARGS``; one that does not end in ``timeout`` fails the test with where
    its coroutines were waiting (SIGUSR1) and what it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", *args],
        env={**env, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"conclave {' '.join(args)}: no end in {timeout} s\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


async def test_a_second_worker_with_the_same_id_is_refused_in_one_line(cluster: Cluster) -> None:
    cluster.worker("w1")
    refused = await asyncio.to_thread(cli, cluster.env, "worker", "--id", "w1")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "already running here" in lines[0]
    assert str(cluster.processes["w1"].popen.pid) in lines[0]


async def test_the_demo_next_to_a_running_worker_shares_the_shards(cluster: Cluster) -> None:
    cluster.worker("w1")
    # Longer than the demo's own deadline (2 x 120 s), so that a hang fails with the
    # demo's report of the step it was stuck at (seen once in a full run, 8 s alone).
    demo = await asyncio.to_thread(
        cli, cluster.env, "demo", "--agents", "8", "--latency-ms", "20", "--json", timeout=260
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert '"completed": 8' in demo.stdout
    # The demo's own worker left cleanly: w1 runs everything again, and work goes on.
    cluster.runtime("h1", "after-demo", agents=2, latency_ms=5)
    cluster.projector()
    task_ids = await submit(cluster.settings, "after-demo", 20)
    await check_invariants(cluster, task_ids)


async def test_a_worker_still_starting_stops_on_the_first_signal(own_stack: OwnStack) -> None:
    embedded, env = own_stack
    broker = embedded.status().kafka.pid
    assert broker is not None
    os.kill(broker, signal.SIGSTOP)  # it accepts connections and answers nothing
    process = _spawn(env, "worker", "--id", "starting")
    try:
        await asyncio.sleep(4.0)  # imports done, waiting for the broker's first answer
        assert process.poll() is None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 10)
        assert time.monotonic() - started < 3
        assert code == 130
        _, said = process.communicate()
        assert "Traceback" not in said
    finally:
        os.kill(broker, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.communicate()


async def test_a_running_worker_whose_broker_froze_stops_within_the_grace(
    own_stack: OwnStack,
) -> None:
    embedded, env = own_stack
    process = _spawn(env, "worker", "--id", "stranded")
    broker = embedded.status().kafka.pid
    assert broker is not None
    try:
        assert process.stderr is not None
        while "processors running" not in process.stderr.readline():
            assert process.poll() is None
        os.kill(broker, signal.SIGSTOP)  # the graceful stop's hand-over can never finish
        await asyncio.sleep(1.0)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, STOP_GRACE_S + 10)
        assert time.monotonic() - started < STOP_GRACE_S + 5
        assert code in (0, 130)
    finally:
        os.kill(broker, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
        process.communicate()


def _spawn(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_dev_down_stops_conclave_processes_before_the_broker(own_stack: OwnStack) -> None:
    embedded, env = own_stack
    cluster = Cluster(settings=Settings.from_env(env), home=embedded.home)
    cluster.worker("w1")
    worker = cluster.processes["w1"].popen
    down = await asyncio.to_thread(cli, env, "dev", "down", "--home", str(embedded.home))
    assert down.returncode == 0, down.stderr
    assert "stopped worker w1" in down.stderr
    assert worker.poll() is not None  # gone before the broker went
    assert worker.returncode == 0  # a clean stop, not a kill
    assert not embedded.status().kafka.running

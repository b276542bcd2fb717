"""Peer baselines for Conclave's throughput: ``python -m bench.peers [--tasks N]``.

Conclave's throughput only means something next to what the same machine does with
the tools a team would otherwise pick, measured the same way in the same run:

* **Dramatiq** and **Celery** on the machine's Redis: N no-op tasks end to end, from
  the first enqueue to the last task done, with worker processes started by their own
  CLIs (``dramatiq``, ``celery worker``) and each peer's best settings for a 2-core
  machine. These are the task queues Conclave replaces; they keep no history, no
  witness log and no read models, so they are the ceiling for "just run the tasks".
* **raw aiokafka consume-transform-produce** on the embedded broker, plain and with
  Kafka transactions: the ceiling for any processor on this broker, since every
  Conclave hop is at least one such step. Conclave's processors commit with
  transactions, so the transactional figure is the one to compare them with.
* **a faust-streaming no-op agent** on the same broker: documents why Conclave's hot
  path takes aiokafka batches rather than one faust delivery per message.

Every function takes what it needs (a Redis URL, a Kafka bootstrap string) and
returns a :class:`PeerFigures`, so ``bench/__main__.py`` can call them in the same run
as Conclave's own figures. The Redis ones are blocking (they run subprocesses); call
them outside the event loop or through ``asyncio.to_thread``. The Kafka ones are
coroutines. Worker subprocesses run in their own process groups and are killed, group
and all, on every way out (success, failure, Ctrl-C, SIGTERM to ``python -m
bench.peers``).

The peer packages come from the optional ``bench`` extra (``pip install -e
'.[bench]'``; ``make bench`` installs it). Without them, or without a reachable Redis,
a row says "skipped: ..." instead of failing. Isolation on the shared Redis: one
dedicated database number (``DEFAULT_REDIS_URL``, db 15), flushed before and after
each peer.

Completion is counted the same cheap way for both task queues: each task INCRs one
Redis counter, and the task that brings it to N pushes to a list that the benchmark
BLPOPs, so the end time is exact without polling and without a result backend (which
would cost each peer a write and a read per task that Conclave's figure does not pay
for a no-op either).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_REDIS_URL",
    "DEFAULT_TASKS",
    "PeerFigures",
    "aiokafka_ctp",
    "celery_tasks",
    "dramatiq_tasks",
    "faust_noop",
    "main",
    "redis_unreachable",
    "run_all",
    "show",
]

DEFAULT_TASKS = 20_000
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"

_REPO = Path(__file__).resolve().parent.parent
_REDIS_ENV = "CONCLAVE_BENCH_REDIS_URL"
_ACKS_LATE_ENV = "CONCLAVE_BENCH_ACKS_LATE"
_QUEUE = "conclave_bench"
_TASK_NAME = "conclave_bench_noop"
_COUNTER = "conclave-bench:done"
_FINISHED = "conclave-bench:finished"
_READY = "conclave-bench:ready"
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_VALUE_BYTES = (150, 300)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerFigures:
    """One peer's figures; ``per_second`` is None when the peer was skipped."""

    peer: str
    items: int
    """Tasks (task queues) or records (Kafka) processed."""
    seconds: float | None
    per_second: float | None
    settings: str
    """The settings measured, in one line: what a reader needs to reproduce the row."""
    note: str = ""
    """Why the row was skipped, or what else is worth knowing about the figure."""

    @property
    def skipped(self) -> bool:
        return self.per_second is None


def _skipped(peer: str, items: int, settings: str, why: str) -> PeerFigures:
    return PeerFigures(
        peer=peer, items=items, seconds=None, per_second=None, settings=settings, note=why
    )


# -- the task body shared by both task queues ------------------------------------------

_clients: dict[int, Any] = {}


def _redis() -> Any:
    """This process's Redis client: one per pid, since Celery's prefork pool forks."""
    client = _clients.get(os.getpid())
    if client is None:
        import redis

        client = redis.Redis.from_url(os.environ[_REDIS_ENV])
        _clients.clear()
        _clients[os.getpid()] = client
    return client


def _noop_task(total: int) -> None:
    """The no-op task: count it done; the one that completes ``total`` says so."""
    client = _redis()
    if client.incr(_COUNTER) == total:
        client.rpush(_FINISHED, b"1")


def redis_unreachable(redis_url: str) -> str | None:
    """Why the Redis peers cannot run (``None`` when they can)."""
    try:
        import redis
    except ImportError:
        return "skipped: redis client not installed (pip install -e '.[bench]')"
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=2.0).ping()
    except (redis.RedisError, OSError):
        return f"skipped: Redis not reachable at {redis_url}"
    return None


# -- Dramatiq ---------------------------------------------------------------------------


def dramatiq_setup() -> None:
    """Broker and actor for ``dramatiq bench.peers:dramatiq_setup`` (each worker process).

    A callable rather than module-level actors so that importing this module never needs
    the bench extra. The readiness middleware INCRs a Redis key once a worker's
    consumers are running, so the clock starts only after every process can take work.
    """
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    class Ready(dramatiq.Middleware):
        def after_worker_boot(self, broker: Any, worker: Any) -> None:
            _redis().incr(_READY)

    broker = RedisBroker(url=os.environ[_REDIS_ENV])  # type: ignore[no-untyped-call]
    broker.add_middleware(Ready())
    dramatiq.set_broker(broker)
    dramatiq.actor(actor_name=_TASK_NAME, queue_name=_QUEUE, max_retries=0)(_noop_task)


def dramatiq_tasks(
    redis_url: str = DEFAULT_REDIS_URL,
    tasks: int = DEFAULT_TASKS,
    *,
    processes: int = 1,
    threads: int = 16,
    timeout_s: float = 300.0,
) -> PeerFigures:
    """N no-op Dramatiq tasks end to end on Redis (blocking; starts ``dramatiq`` workers).

    The default, 1 process x 16 threads, was the fastest of processes 1-2 x threads
    4/8/16 on this 2-core machine (2026-11-28, 10,000-20,000 tasks, interleaved runs):
    ~1,350-1,450/s against ~930-1,250/s for 2 x 8 and ~1,000-1,100/s for 2 x 16. With
    enough threads the workers keep up and the one enqueuing process is the limit
    (``actor.send`` is one Redis script call per message); a second worker process
    only takes CPU from it.
    """
    settings = (
        f"dramatiq CLI, {processes} process{'es' if processes > 1 else ''} x {threads} threads,"
        " RedisBroker, default middleware"
    )
    try:
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker
    except ImportError:
        return _skipped(
            "Dramatiq",
            tasks,
            settings,
            "skipped: dramatiq not installed (pip install -e '.[bench]')",
        )
    if (why := redis_unreachable(redis_url)) is not None:
        return _skipped("Dramatiq", tasks, settings, why)
    command = [
        _script("dramatiq"),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--queues",
        _QUEUE,
        "--skip-logging",
        "bench.peers:dramatiq_setup",
    ]
    with _isolated_redis(redis_url) as client, _workers([command], redis_url) as workers:
        broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
        actor = dramatiq.actor(
            broker=broker, actor_name=_TASK_NAME, queue_name=_QUEUE, max_retries=0
        )(_noop_task)
        try:
            workers.wait_ready(client, processes)

            def enqueue(total: int, count: int) -> None:
                for _ in range(count):
                    actor.send(total)

            seconds, enqueue_s = _timed_run(
                client, workers, enqueue, tasks, threads * processes, timeout_s
            )
        finally:
            broker.close()
    return PeerFigures(
        peer="Dramatiq",
        items=tasks,
        seconds=seconds,
        per_second=tasks / seconds,
        settings=settings,
        note=f"enqueue alone {enqueue_s:.2f} s ({tasks / enqueue_s:,.0f}/s, one process)",
    )


# -- Celery -----------------------------------------------------------------------------


def _celery_app(redis_url: str, acks_late: bool) -> Any:
    """The Celery app: no result backend, no events, JSON, one dedicated queue.

    ``worker_ready`` INCRs the readiness key once the worker (and its pool) consumes.
    """
    from celery import Celery  # type: ignore[import-untyped]
    from celery.signals import worker_ready  # type: ignore[import-untyped]

    app = Celery("conclave_bench", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_acks_late=acks_late,
    )
    app.task(name=_TASK_NAME, ignore_result=True)(_noop_task)
    worker_ready.connect(lambda **_: _redis().incr(_READY), weak=False)
    return app


def __getattr__(name: str) -> Any:
    """``celery -A bench.peers:celery_app`` builds the app on first access.

    Lazy for the same reason as :func:`dramatiq_setup`: importing this module must not
    need the bench extra, and the app needs the Redis URL from the environment.
    """
    if name == "celery_app":
        app = _celery_app(os.environ[_REDIS_ENV], os.environ.get(_ACKS_LATE_ENV) == "1")
        globals()[name] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def celery_tasks(
    redis_url: str = DEFAULT_REDIS_URL,
    tasks: int = DEFAULT_TASKS,
    *,
    pool: str = "solo",
    concurrency: int = 1,
    instances: int = 2,
    prefetch_multiplier: int = 64,
    acks_late: bool = False,
    timeout_s: float = 300.0,
) -> PeerFigures:
    """N no-op Celery tasks end to end on Redis (blocking; starts ``celery worker``).

    ``instances`` worker processes are started, each with ``pool`` x ``concurrency``;
    every one runs ``-O fair`` without gossip, mingle and heartbeat (cluster chatter
    that only costs a single-machine benchmark), with no result backend.

    The default, two worker processes with the solo pool (one per core, no pool IPC),
    was at least as fast as every other setting tried on this 2-core machine
    (2026-11-28, interleaved runs): e.g. 530/s against 390/s for ``--pool prefork -c 2``
    and 400/s for ``--pool threads -c 8`` in the quietest round. Prefetch x64 beat the
    default x4 for prefork; acks late (at-least-once, like Dramatiq and Conclave) cost
    no measurable rate, but early acks are Celery's default and kept. Publishing is the
    limit: one process's ``apply_async`` reaches a few hundred to ~1,000 per second
    here (kombu builds a new redis-py client object for every publish).
    """
    ack = "acks late" if acks_late else "acks early (default)"
    settings = (
        f"{instances} x celery worker --pool {pool} -c {concurrency} -O fair, "
        f"prefetch x{prefetch_multiplier}, {ack}"
    )
    if importlib.util.find_spec("celery") is None:
        return _skipped(
            "Celery", tasks, settings, "skipped: celery not installed (pip install -e '.[bench]')"
        )
    if (why := redis_unreachable(redis_url)) is not None:
        return _skipped("Celery", tasks, settings, why)
    commands = [
        [
            _script("celery"),
            "-A",
            "bench.peers:celery_app",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "-O",
            "fair",
            "--prefetch-multiplier",
            str(prefetch_multiplier),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--queues",
            _QUEUE,
            "--hostname",
            f"bench{i}-{secrets.token_hex(3)}@%h",
            "--loglevel",
            "WARNING",
        ]
        for i in range(instances)
    ]
    env = {_ACKS_LATE_ENV: "1" if acks_late else "0"}
    with _isolated_redis(redis_url) as client, _workers(commands, redis_url, env) as workers:
        app = _celery_app(redis_url, acks_late)
        task = app.tasks[_TASK_NAME]
        try:
            workers.wait_ready(client, instances)

            def enqueue(total: int, count: int) -> None:
                for _ in range(count):
                    task.apply_async((total,))

            seconds, enqueue_s = _timed_run(
                client, workers, enqueue, tasks, 4 * concurrency * instances, timeout_s
            )
        finally:
            app.close()
    return PeerFigures(
        peer="Celery",
        items=tasks,
        seconds=seconds,
        per_second=tasks / seconds,
        settings=settings,
        note=f"enqueue alone {enqueue_s:.2f} s ({tasks / enqueue_s:,.0f}/s, one process)",
    )


# -- worker processes and Redis isolation -----------------------------------------------


def _script(name: str) -> str:
    """A console script of this interpreter's environment (the venv's, not PATH's)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@contextlib.contextmanager
def _isolated_redis(redis_url: str) -> Iterator[Any]:
    """A client on the dedicated database, flushed before and after (whatever happens)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=30.0)
    client.flushdb()
    try:
        yield client
    finally:
        with contextlib.suppress(redis.RedisError):
            client.flushdb()
        client.close()


class _Workers:
    """Worker subprocesses, each the leader of its own process group, logging to files."""

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str], logs: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for i, command in enumerate(commands):
            log = logs / f"worker{i}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        list(command),
                        cwd=_REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # own group: killable whole, deaf to our Ctrl-C
                    )
                )

    def check(self) -> None:
        """Raise if a worker has exited: a benchmark must not wait for a dead one."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(
                    f"worker {proc.args!r} exited with {proc.returncode}: " + " | ".join(tail)
                )

    def wait_ready(self, client: Any, expected: int) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while int(client.get(_READY) or 0) < expected:
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every group (a warm shutdown), SIGKILL whatever is left after a while.

        The SIGKILL round runs even when the wait is interrupted (a second Ctrl-C).
        """
        try:
            for proc in self.procs:
                _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for proc in self.procs:
                # Also when the leader is gone: a forked child may outlive it in the group.
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def _workers(
    commands: Sequence[Sequence[str]], redis_url: str, extra_env: dict[str, str] | None = None
) -> Iterator[_Workers]:
    logs = Path(tempfile.mkdtemp(prefix="conclave-peers-"))
    try:
        workers = _Workers(commands, _child_env({_REDIS_ENV: redis_url} | (extra_env or {})), logs)
        try:
            yield workers
        finally:
            workers.stop()
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with the repository importable (``bench`` is not installed)."""
    pythonpath = os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PYTHONPATH": pythonpath} | (extra or {})


def _timed_run(
    client: Any,
    workers: _Workers,
    enqueue: Callable[[int, int], None],
    tasks: int,
    warmup: int,
    timeout_s: float = 300.0,
) -> tuple[float, float]:
    """Warm up, then time N tasks from the first enqueue to the last done.

    Returns (end-to-end seconds, seconds spent enqueueing). The warm-up (a few tasks
    per worker thread) opens every connection and imports every lazy module first.
    """
    for total, count in ((warmup, warmup), (tasks, tasks)):
        client.delete(_COUNTER, _FINISHED)
        started = time.perf_counter()
        enqueue(total, count)
        enqueued = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while client.blpop([_FINISHED], timeout=1) is None:
            workers.check()
            if time.monotonic() > deadline:
                done = int(client.get(_COUNTER) or 0)
                raise TimeoutError(f"{done}/{total} tasks done after {timeout_s:.0f} s")
        finished = time.perf_counter()
    return finished - started, enqueued - started


# -- Kafka: raw aiokafka and faust ------------------------------------------------------


def _values(records: int, seed: int = 7) -> list[bytes]:
    """Record values of 150-300 bytes, like an encoded Conclave event."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(*_VALUE_BYTES)) for _ in range(records)]


async def _topic_with_records(
    bootstrap: str, topic: str, records: int, partitions: int, extra_topics: Sequence[str] = ()
) -> None:
    """Create ``topic`` (and ``extra_topics``) and fill ``topic`` with N records, untimed."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, partitions, 1) for name in (topic, *extra_topics)]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i, value in enumerate(_values(records)):
            await producer.send(topic, value=value, key=f"task-{i:07d}".encode())
        await producer.flush()
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def _scratch(bootstrap: str) -> AsyncIterator[str]:
    """A fresh topic-name prefix; every topic under it is deleted afterwards.

    The embedded broker keeps all topics in one JSON file that it rewrites every ~2 s
    (20,000 records are ~17 MB of it): leftovers would slow every later measurement
    on the same broker, Conclave's own included.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    prefix = f"peers-{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        with contextlib.suppress(KafkaError, OSError):
            await admin.start()
            names = [t for t in await admin.list_topics() if t.startswith(prefix)]
            if names:
                await admin.delete_topics(names)
        await admin.close()


async def aiokafka_ctp(
    bootstrap: str,
    records: int = DEFAULT_TASKS,
    *,
    transactional: bool = False,
    partitions: int = 1,
    max_records: int | None = 1000,
    repeats: int = 3,
    timeout_s: float = 300.0,
) -> PeerFigures:
    """Raw aiokafka consume-transform-produce: one output record per input record.

    Per batch (``getmany``, up to ``max_records``): send one transformed record per
    input, then await once -- the acknowledgements (plain), or
    ``send_offsets_to_transaction`` + ``commit_transaction`` (transactional, with a
    read_committed consumer). Timed from the first fetch to the last batch
    acknowledged; filling the input topic is not timed. The consumer uses Conclave's
    fetcher (:mod:`conclave.fetching`) and fetch options, so this is the ceiling for
    Conclave's processors on the same broker.

    20,000 records take well under a second, so one pass is at the mercy of whatever
    else the 2-core machine does (and of the broker rewriting its data file): the
    figure is the median of ``repeats`` passes, each on fresh topics, with the range
    in the note. Batches of up to 1,000, the top of the batch sizes Conclave plans
    per transaction: against 250 and against whole fetches (the embedded broker hands
    over everything it has, 20,000 records at once) no size was reliably faster on
    this shared machine (2026-11-28; passes of the same setting ranged 2-3x).
    """
    name = "aiokafka CTP, transactions" if transactional else "aiokafka CTP"
    batch_text = f"up to {max_records:,}" if max_records else "whole fetches"
    settings = f"getmany ({batch_text}), {partitions} partition(s), acks=all, linger 0" + (
        ", transactional producer, read_committed" if transactional else ""
    )
    passes: list[float] = []
    batches = 0
    for _ in range(repeats):
        seconds, batches = await _ctp_once(
            bootstrap, records, transactional, partitions, max_records, timeout_s
        )
        passes.append(seconds)
    median = statistics.median(passes)
    rates = sorted(records / s for s in passes)
    spread = f"{rates[0]:,.0f}-{rates[-1]:,.0f}/s" if len(rates) > 1 else "one pass"
    return PeerFigures(
        peer=name,
        items=records,
        seconds=median,
        per_second=records / median,
        settings=settings,
        note=f"median of {len(passes)} passes ({spread}); {batches} batches per pass",
    )


async def _ctp_once(
    bootstrap: str,
    records: int,
    transactional: bool,
    partitions: int,
    max_records: int | None,
    timeout_s: float,
) -> tuple[float, int]:
    """One pass of :func:`aiokafka_ctp` on fresh topics: (seconds, batches)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from conclave import fetching

    async with _scratch(bootstrap) as prefix:
        source, sink, group = f"{prefix}-in", f"{prefix}-out", prefix
        await _topic_with_records(bootstrap, source, records, partitions, extra_topics=[sink])
        fetching.install()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group if transactional else None,  # only names the offsets; no join
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if transactional else "read_uncommitted",
            fetch_max_wait_ms=100,  # Conclave's consumer options (conclave.bus), spelled
            fetch_min_bytes=1,  # out so that a change there does not move the ceiling
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=0,
            transactional_id=prefix if transactional else None,
        )
        await consumer.start()
        try:
            await producer.start()
            try:
                tps = [TopicPartition(source, p) for p in range(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                done = batches = 0
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout_s
                started = time.perf_counter()
                while done < records:
                    if loop.time() > deadline:
                        raise TimeoutError(f"{done}/{records} records after {timeout_s:.0f} s")
                    batch = await consumer.getmany(timeout_ms=1000, max_records=max_records)
                    if not batch:
                        continue
                    if transactional:
                        await producer.begin_transaction()
                    futures = []
                    for tp, recs in batch.items():
                        for r in recs:
                            futures.append(
                                await producer.send(
                                    sink, value=r.value[::-1], key=r.key, partition=tp.partition
                                )
                            )
                    if transactional:
                        offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items()}
                        await producer.send_offsets_to_transaction(offsets, group)
                        await producer.commit_transaction()
                    else:
                        await asyncio.gather(*futures)
                    done += len(futures)
                    batches += 1
                seconds = time.perf_counter() - started
            finally:
                await producer.stop()
        finally:
            await consumer.stop()
    return seconds, batches


async def faust_noop(
    bootstrap: str,
    records: int = DEFAULT_TASKS,
    *,
    partitions: int = 1,
    timeout_s: float = 300.0,
) -> PeerFigures:
    """A faust-streaming no-op agent reading N records (a subprocess, web disabled).

    The agent runs in a child process (``python -m bench.peers --faust-child``) in its
    own process group: faust's services, threads and global state stay out of the
    caller's process, and an interrupted run is ended by killing the group. (In
    process, a Ctrl-C cancels faust's tasks in no particular order and ``App.stop()``
    could hang for minutes, re-fetching from topics already deleted.)

    Configured as a Conclave processor would be (Conclave's fetcher, linger 0, memory
    store, earliest offsets, a fresh group id so that no old member is waited for).
    Timed from the first record the agent receives to the N-th, so the start and group
    join (seconds on the embedded broker) are in the note but not in faust's rate.
    """
    settings = "faust.App in a child process, web disabled, memory store, async for per message"
    async with _scratch(bootstrap) as prefix:
        source = f"{prefix}-faust"
        await _topic_with_records(bootstrap, source, records, partitions)
        spec = {
            "bootstrap": bootstrap,
            "app": prefix,
            "topic": source,
            "records": records,
            "partitions": partitions,
            "timeout_s": timeout_s,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.peers",
            "--faust-child",
            json.dumps(spec),
            cwd=_REPO,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s + 30):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
    if proc.returncode != 0:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-5:])
        raise RuntimeError(f"faust child exited with {proc.returncode}: {tail}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    seconds = float(result["seconds"])
    return PeerFigures(
        peer="faust no-op agent",
        items=records,
        seconds=seconds,
        per_second=records / seconds,
        settings=settings,
        note=f"start + group join {result['join_s']:.1f} s (not counted)",
    )


async def _faust_child(spec: dict[str, Any]) -> dict[str, float]:
    """The child's side of :func:`faust_noop`: run the agent, return its timings."""
    import faust

    from conclave import fetching

    records = int(spec["records"])
    fetching.install()
    app = faust.App(
        spec["app"],  # the group id, and the prefix of faust's own internal topics
        broker=f"kafka://{spec['bootstrap']}",
        web_enabled=False,
        store="memory://",
        topic_replication_factor=1,
        topic_partitions=int(spec["partitions"]),
        producer_linger=0.0,
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
    )
    topic = app.topic(spec["topic"], key_serializer="raw", value_serializer="raw", value_type=bytes)
    seen = 0
    first: float | None = None
    last = 0.0
    finished = asyncio.Event()

    async def noop(stream: Any) -> None:
        nonlocal seen, first, last
        async for _ in stream:
            seen += 1
            if first is None:
                first = time.perf_counter()
            if seen == records:
                last = time.perf_counter()
                finished.set()

    app.agent(topic, name=f"{spec['app']}-noop")(noop)
    begun = time.perf_counter()
    await app.start()
    try:
        try:
            async with asyncio.timeout(float(spec["timeout_s"])):
                await finished.wait()
        except TimeoutError:
            raise TimeoutError(f"faust: {seen}/{records} records") from None
    finally:
        await app.stop()
    assert first is not None
    return {"join_s": first - begun, "seconds": last - first}


# -- all of it --------------------------------------------------------------------------


def _progress(row: PeerFigures) -> PeerFigures:
    """One line on stderr per row as it is measured: a full run takes minutes."""
    rate = row.note if row.per_second is None else f"{row.per_second:,.0f}/s"
    print(f"peers: {row.peer}: {rate}", file=sys.stderr, flush=True)
    return row


async def kafka_peers(bootstrap: str, records: int = DEFAULT_TASKS) -> list[PeerFigures]:
    """The three Kafka rows, one after the other (they share the broker)."""
    return [
        _progress(await aiokafka_ctp(bootstrap, records)),
        _progress(await aiokafka_ctp(bootstrap, records, transactional=True)),
        _progress(await faust_noop(bootstrap, records)),
    ]


def run_all(
    bootstrap: str | None, tasks: int = DEFAULT_TASKS, redis_url: str = DEFAULT_REDIS_URL
) -> list[PeerFigures]:
    """Every peer row (blocking; must not be called from a running event loop).

    ``bootstrap`` of None starts a fresh embedded stack for the Kafka rows and stops
    it afterwards.
    """
    rows = [_progress(dramatiq_tasks(redis_url, tasks)), _progress(celery_tasks(redis_url, tasks))]
    if bootstrap is not None:
        return rows + asyncio.run(kafka_peers(bootstrap, tasks))
    from conclave.devstack import EmbeddedStack

    home = Path(tempfile.mkdtemp(prefix="conclave-peers-"))
    stack = EmbeddedStack(home)
    try:
        info = stack.up(kafka_port=0, pg_port=0)
        rows += asyncio.run(kafka_peers(info.kafka_bootstrap, tasks))
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    return rows


def show(rows: Sequence[PeerFigures], caption: str | None = None) -> None:
    """The rows as a rich table; ``caption`` for the conditions of the run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "peer", "items", "seconds", "per second", "settings", "note", title="Peers", caption=caption
    )
    for row in rows:
        table.add_row(
            row.peer,
            f"{row.items:,}",
            "-" if row.seconds is None else f"{row.seconds:.2f}",
            "-" if row.per_second is None else f"{row.per_second:,.0f}",
            row.settings,
            row.note,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # a log file: do not wrap cells
    console.print(table)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM is handled as Ctrl-C, so every ``finally`` stops its workers and stack.

    Re-raised as SIGINT rather than as KeyboardInterrupt so that inside
    ``asyncio.run`` its own handler cancels the main task, whose ``finally`` blocks
    then run in order, instead of an exception tearing through the event loop.
    """
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS, help="tasks / records per peer")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a dedicated database")
    parser.add_argument(
        "--kafka-bootstrap", default=None, help="an existing broker (default: a fresh embedded one)"
    )
    parser.add_argument("--faust-child", default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.faust_child is not None:
        print(json.dumps(asyncio.run(_faust_child(json.loads(args.faust_child)))), flush=True)
        return
    signal.signal(signal.SIGTERM, _terminate)
    before = os.getloadavg()[0]
    rows = run_all(args.kafka_bootstrap, args.tasks, args.redis_url)
    # Everything here is CPU-bound on 2 cores: other processes' load moves every row.
    show(rows, caption=f"1-min load average {before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()

"""A fetch back-off for brokers that do not long-poll.

Kafka holds an empty fetch for up to ``fetch.max.wait.ms`` until data arrives.
The embedded broker (noida-db) answers at once, and aiokafka then fetches again
immediately: measured here, ~3,000 fetch requests per second and a whole core
per idle consumer, which starves every other process on a 2-core machine.

:func:`install` swaps aiokafka's fetcher for one that, after an answer that came back
sooner than the current idle wait, waits out the rest of it before the next fetch
(:class:`IdleWait` decides how long). The wait is ``idle_s`` while records flowed in the
last ``hot_s`` seconds (so a busy pipeline keeps its short hops), then doubles on every
answer that brought nothing new up to ``max_idle_s``: an aiokafka fetch cycle costs about
1.5 ms of CPU here (a worker's consumer fetches ~15 partitions), so a process idle for
long costs ``1.5 ms / max_idle_s`` of a core instead of ``1.5 ms / idle_s``. The price
is paid once, by the first record after a pause, which waits up to ``max_idle_s``.

``hot_s`` is the trade-off between the two (measured 2026-11-28, 72 idle agents, whose
heartbeats and the workers' own beats arrive every second): 1 s kept every process hot
for ever, 16 % of a core each for the worker and the projector, submit -> dispatched
p99 6 ms in the demo; 150 ms (the default) costs 4.5 % each, and the first hop after a
quiet second 20-40 ms.

**Beats do not heat.** Records on the ``quiet`` topics (liveness: the workers' beats,
the hosts' beats and agent registrations, per-agent heartbeats) are read like any other
but do not start a hot period: they arrive every second for ever, and each one kept a
fetcher at ``idle_s`` for ``hot_s``. Measured 2026-12-07 with 72 idle agents on one
host: the worker fetched 62 times a second (9.4 % of a core), the projector 36 (5.4 %),
all of it hot periods after a beat. A task's own hops (commands, dispatches, outputs,
witness entries, task events) still heat.

**A cold tier.** Once nothing heated for ``cold_s`` (10 s), the wait doubles on up to
``cold_max_s`` (400 ms): an idle process fetches ~2.5 times a second (measured with 72
idle agents: worker 1.2 %, projector 1.15 %, runtime host 0.9 % of a core, against 2.4,
2.2 and 2.4 % with beats alone not heating). The first record after 10 quiet seconds
waits up to ``cold_max_s`` instead of ``max_idle_s``; the timer starts at a consumer's
first fetch, so a process just started is warm.

Against a broker that long-polls an empty answer takes ``fetch.max.wait.ms`` and the
fetcher never waits, so production behaviour is unchanged. Faust builds its consumers
from aiokafka's, so they are covered too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiokafka.consumer.consumer as _consumer_module
from aiokafka.consumer.fetcher import Fetcher

__all__ = ["DEFAULT_IDLE_S", "DEFAULT_MAX_IDLE_S", "IdleWait", "install"]

DEFAULT_IDLE_S = 0.005
DEFAULT_MAX_IDLE_S = 0.1
DEFAULT_HOT_S = 0.15
DEFAULT_COLD_S = 10.0
DEFAULT_COLD_MAX_S = 0.4


@dataclass(slots=True)
class IdleWait:
    """How long a fetcher waits between fetches (pure: times are passed in)."""

    idle_s: float = DEFAULT_IDLE_S
    max_idle_s: float = DEFAULT_MAX_IDLE_S
    hot_s: float = DEFAULT_HOT_S
    cold_s: float = DEFAULT_COLD_S
    cold_max_s: float = DEFAULT_COLD_MAX_S
    last_heat: float | None = None
    """When records that heat last arrived (or the first fetch began)."""
    wait: float = DEFAULT_IDLE_S
    """The wait between two fetch starts that the next answer is held to."""

    def after(self, started: float, now: float, *, heated: bool) -> float:
        """A fetch that began at ``started`` was answered at ``now``, with records that
        heat (``heated``) or not: how much longer to wait before the next one."""
        if heated or self.last_heat is None:
            self.last_heat, self.wait = (now if heated else started), self.idle_s
            if heated:
                return 0.0
        quiet_for = now - self.last_heat
        if quiet_for > self.hot_s:
            ceiling = self.cold_max_s if quiet_for > self.cold_s else self.max_idle_s
            self.wait = min(max(ceiling, self.idle_s), self.wait * 2)
        return max(0.0, self.wait - (now - started))


class PatientFetcher(Fetcher):  # type: ignore[misc]  # aiokafka ships no type hints
    idle_s = DEFAULT_IDLE_S
    max_idle_s = DEFAULT_MAX_IDLE_S
    hot_s = DEFAULT_HOT_S
    cold_s = DEFAULT_COLD_S
    cold_max_s = DEFAULT_COLD_MAX_S
    quiet: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle = IdleWait(
            self.idle_s, self.max_idle_s, self.hot_s, self.cold_s, self.cold_max_s
        )
        self.answered_at = 0.0
        """When the broker last answered a fetch (the loop's clock)."""

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # A partition with records not yet taken is left out of the next request, so
        # the ones added now are exactly what this answer brought.
        before = set(self._records)
        got_records: bool = await super()._proc_fetch_request(assignment, node_id, request)
        self.answered_at = loop.time()
        heated = got_records and any(
            tp.topic not in self.quiet for tp in set(self._records) - before
        )
        rest = self._idle.after(started, self.answered_at, heated=heated)
        if got_records and rest > 0:
            # Hand the beats over now, as aiokafka does when this returns; the next fetch
            # still waits its turn.
            for waiter in self._fetch_waiters:
                self._notify(waiter)
        if rest > 0:
            try:
                await asyncio.sleep(rest)
            except asyncio.CancelledError:
                # aiokafka cancels in-flight fetches on close and on reassignment and
                # expects this coroutine to return quietly, as its own version does.
                return False
        return got_records


def install(
    idle_s: float = DEFAULT_IDLE_S,
    max_idle_s: float = DEFAULT_MAX_IDLE_S,
    *,
    hot_s: float = DEFAULT_HOT_S,
    cold_s: float = DEFAULT_COLD_S,
    cold_max_s: float = DEFAULT_COLD_MAX_S,
    quiet: Iterable[str] = (),
) -> None:
    """Use the patient fetcher for every aiokafka consumer created from now on; records
    on the ``quiet`` topics do not start a hot period."""
    PatientFetcher.idle_s = idle_s
    PatientFetcher.hot_s = hot_s
    PatientFetcher.max_idle_s = max(idle_s, max_idle_s)
    PatientFetcher.cold_s = cold_s
    PatientFetcher.cold_max_s = max(PatientFetcher.max_idle_s, cold_max_s)
    PatientFetcher.quiet = frozenset(quiet)
    _consumer_module.Fetcher = PatientFetcher

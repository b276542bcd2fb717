"""A fetch back-off for brokers that do not long-poll.

Kafka holds an empty fetch for up to ``fetch.max.wait.ms`` until data arrives.
The embedded broker (noida-db) answers at once, and aiokafka then fetches again
immediately: measured here, ~3,000 fetch requests per second and a whole core
per idle consumer, which starves every other process on a 2-core machine.

:func:`install` swaps aiokafka's fetcher for one that, after an empty answer that came
back sooner than the current idle wait, waits out the rest of it before the next fetch.
The wait is ``idle_s`` while records flowed in the last ``hot_s`` seconds (so a busy
pipeline keeps its short hops), then doubles on every empty answer up to
``max_idle_s``: an aiokafka fetch cycle costs about 1 ms of CPU here, so a process idle
for long costs ``1 ms / max_idle_s`` of a core instead of ``1 ms / idle_s``. The price
is paid once, by the first record after a pause, which waits up to ``max_idle_s``.

``hot_s`` is the trade-off between the two (measured 2026-11-28, 72 idle agents, whose
heartbeats and the workers' own beats arrive every second): 1 s kept every process hot
for ever, 16 % of a core each for the worker and the projector, submit -> dispatched
p99 6 ms in the demo; 150 ms (the default) costs 4.5 % each, and the first hop after a
quiet second 20-40 ms.

Against a broker that long-polls an empty answer takes ``fetch.max.wait.ms`` and the
fetcher never waits, so production behaviour is unchanged. Faust builds its consumers
from aiokafka's, so they are covered too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiokafka.consumer.consumer as _consumer_module
from aiokafka.consumer.fetcher import Fetcher

__all__ = ["DEFAULT_IDLE_S", "DEFAULT_MAX_IDLE_S", "install"]

DEFAULT_IDLE_S = 0.005
DEFAULT_MAX_IDLE_S = 0.1
DEFAULT_HOT_S = 0.15


class PatientFetcher(Fetcher):  # type: ignore[misc]  # aiokafka ships no type hints
    idle_s = DEFAULT_IDLE_S
    max_idle_s = DEFAULT_MAX_IDLE_S
    hot_s = DEFAULT_HOT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_data = 0.0
        self._wait = self.idle_s

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got_records: bool = await super()._proc_fetch_request(assignment, node_id, request)
        now = loop.time()
        if got_records:
            self._last_data, self._wait = now, self.idle_s
            return True
        if now - self._last_data > self.hot_s:
            self._wait = min(self.max_idle_s, self._wait * 2)
        rest = self._wait - (now - started)
        if rest > 0:
            try:
                await asyncio.sleep(rest)
            except asyncio.CancelledError:
                # aiokafka cancels in-flight fetches on close and on reassignment and
                # expects this coroutine to return quietly, as its own version does.
                return False
        return False


def install(
    idle_s: float = DEFAULT_IDLE_S,
    max_idle_s: float = DEFAULT_MAX_IDLE_S,
    *,
    hot_s: float = DEFAULT_HOT_S,
) -> None:
    """Use the patient fetcher for every aiokafka consumer created from now on."""
    PatientFetcher.idle_s = idle_s
    PatientFetcher.hot_s = hot_s
    PatientFetcher.max_idle_s = max(idle_s, max_idle_s)
    _consumer_module.Fetcher = PatientFetcher

"""A fetch back-off for brokers that do not long-poll.

Kafka holds an empty fetch for up to ``fetch.max.wait.ms`` until data arrives.
The embedded broker (noida-db) answers at once, and aiokafka then fetches again
immediately: measured here, ~3,000 fetch requests per second and a whole core
per idle consumer, which starves every other process on a 2-core machine and
turned 2 ms hops into 50-130 ms ones.

:func:`install` swaps aiokafka's fetcher for one that, after an empty answer that
came back sooner than ``idle_s``, waits out the rest of ``idle_s`` before the next
fetch. Against a broker that long-polls an empty answer takes ``fetch.max.wait.ms``
and the fetcher never waits, so production behaviour is unchanged. Faust builds
its consumers from aiokafka's, so they are covered too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiokafka.consumer.consumer as _consumer_module
from aiokafka.consumer.fetcher import Fetcher

__all__ = ["DEFAULT_IDLE_S", "install"]

DEFAULT_IDLE_S = 0.005


class PatientFetcher(Fetcher):  # type: ignore[misc]  # aiokafka ships no type hints
    idle_s = DEFAULT_IDLE_S

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got_records: bool = await super()._proc_fetch_request(assignment, node_id, request)
        if not got_records:
            rest = self.idle_s - (loop.time() - started)
            if rest > 0:
                try:
                    await asyncio.sleep(rest)
                except asyncio.CancelledError:
                    # aiokafka cancels in-flight fetches on close and on reassignment and
                    # expects this coroutine to return quietly, as its own version does.
                    return False
        return got_records


def install(idle_s: float = DEFAULT_IDLE_S) -> None:
    """Use the patient fetcher for every aiokafka consumer created from now on."""
    PatientFetcher.idle_s = idle_s
    _consumer_module.Fetcher = PatientFetcher

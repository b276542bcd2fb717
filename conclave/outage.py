"""Riding out an outage: exponential back-off with jitter, and one log line per outage.

A process that loses its broker or database keeps retrying on its own; the operator
reads one WARNING when the outage starts and one INFO line when it ends, not a line
(or a traceback) per attempt -- and not one per component either: a worker's shards,
its feed and its membership all notice the same broker going away, and the process
says so once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import ClassVar

from conclave import metrics

__all__ = ["Backoff", "Outage"]


@dataclass(slots=True)
class Backoff:
    """Delays of ``first`` doubling up to ``cap`` seconds, each with +-20 % jitter so that
    many processes coming back together do not retry in lockstep."""

    first: float = 0.1
    cap: float = 5.0
    _next: float = field(default=0.0, init=False)

    def delay(self) -> float:
        self._next = self.first if self._next == 0.0 else min(self.cap, self._next * 2)
        return self._next * random.uniform(0.8, 1.2)  # jitter, not a secret

    async def wait(self) -> None:
        await asyncio.sleep(self.delay())

    def reset(self) -> None:
        self._next = 0.0


@dataclass(slots=True)
class Outage:
    """One component's view of one dependency (``what``, e.g. "Kafka at host:port").

    The first component of the process to fail logs the outage; the last one to recover
    logs its end, with how long it lasted.
    """

    log: logging.Logger
    component: str
    what: str
    _failing: ClassVar[dict[str, set[int]]] = {}
    """Dependency -> the components (by id) that currently cannot reach it."""
    _since: ClassVar[dict[str, float]] = {}
    _ended: ClassVar[dict[str, float]] = {}
    _aftershock: ClassVar[set[str]] = set()
    AFTERSHOCK_S: ClassVar[float] = 30.0
    """A failure this soon after an outage ended (a request sent during the outage that
    only now times out) is part of that outage: logged at DEBUG, not as a new one."""

    @property
    def ongoing(self) -> bool:
        return id(self) in self._failing.get(self.what, set())

    def failed(self, reason: object) -> None:
        """Record a failed attempt; only the first of an outage is logged."""
        failing = self._failing.setdefault(self.what, set())
        if self.what in self._aftershock and time.monotonic() - self._since[self.what] > 10:
            # Not a straggler of the last outage after all: a new one, say so.
            self._aftershock.discard(self.what)
            self.log.warning("%s: %s unavailable (%s); retrying", self.component, self.what, reason)
        if not failing:
            now = time.monotonic()
            self._since[self.what] = now
            if now - self._ended.get(self.what, -self.AFTERSHOCK_S) < self.AFTERSHOCK_S:
                self._aftershock.add(self.what)
                self.log.debug("%s: %s still unsettled (%s)", self.component, self.what, reason)
            else:
                self.log.warning(
                    "%s: %s unavailable (%s); retrying", self.component, self.what, reason
                )
        failing.add(id(self))

    def recovered(self) -> None:
        """Record a success; the last component to recover logs the end of the outage."""
        failing = self._failing.get(self.what)
        if not failing or id(self) not in failing:
            return
        failing.discard(id(self))
        if not failing:
            now = time.monotonic()
            lasted = now - self._since.pop(self.what, now)
            self._ended[self.what] = now
            if self.what in self._aftershock:
                self._aftershock.discard(self.what)
                self.log.debug("%s: %s settled after %.1f s", self.component, self.what, lasted)
            else:
                self.log.info("%s: %s back after %.1f s", self.component, self.what, lasted)
                # "Kafka at host:port" -> kafka: a label of a handful of values.
                metrics.reconnects.labels(self.what.split()[0].lower()).inc()

    def forget(self) -> None:
        """The component stops: it no longer waits for the dependency (logs nothing)."""
        failing = self._failing.get(self.what)
        if failing is not None:
            failing.discard(id(self))

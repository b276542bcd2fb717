"""Riding out an outage: exponential back-off with jitter, and one log line per outage.

A process that loses its broker or database keeps retrying on its own; the operator
reads one WARNING when the outage starts and one INFO line when it ends, not a line
(or a traceback) per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

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
    """Tracks one dependency (``what``, e.g. "Kafka at host:port") for one component."""

    log: logging.Logger
    component: str
    what: str
    started: float | None = None

    @property
    def ongoing(self) -> bool:
        return self.started is not None

    def failed(self, reason: object) -> None:
        """Record a failed attempt; only the first of an outage is logged."""
        if self.started is None:
            self.started = time.monotonic()
            self.log.warning("%s: %s unavailable (%s); retrying", self.component, self.what, reason)

    def recovered(self) -> None:
        """Record a success; logs the end of an outage if there was one."""
        if self.started is not None:
            lasted = time.monotonic() - self.started
            self.started = None
            self.log.info("%s: %s back after %.1f s", self.component, self.what, lasted)

"""Retry policy: how long a task waits before its next attempt. Pure, stdlib only.

The wait after failed attempt ``n`` is ``min(cap, initial * multiplier ** (n - 1))``,
spread by up to ``jitter`` of itself either way. The spread is drawn from a hash of the
task id and the attempt, not from a random generator: the scheduler decides the same
due time however often the decision is replayed, and tasks that failed together (one
outage) still come back spread out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, TypedDict

__all__ = [
    "DEFAULT_RETRY",
    "MAX_DELAY_MS",
    "RetryFieldValues",
    "RetryFields",
    "RetryPolicy",
    "retry_of",
]

MAX_DELAY_MS = 366 * 24 * 3600 * 1000
"""The longest wait a task may ask for (a retry's back-off, a schedule-to-start limit):
a year. Times stay far inside a 64-bit µs clock, and a read model's columns."""


class RetryFieldValues(TypedDict):
    """A policy as the four flat fields events and task states carry: ``**`` them in."""

    retry_backoff_ms: int
    retry_multiplier: float
    retry_backoff_max_ms: int
    retry_jitter: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A task's retry policy; the defaults are those of Temporal's (1 s, x2, 60 s cap)."""

    backoff_ms: int = 1000
    """Wait before the first retry; 0 retries at once (and ignores the rest)."""
    multiplier: float = 2.0
    """Each further retry waits this many times longer than the one before."""
    max_backoff_ms: int = 60_000
    """No wait is longer than this, before jitter."""
    jitter: float = 0.2
    """Each wait is spread by up to this fraction of itself, either way (0 to 1)."""

    def invalid(self) -> str | None:
        """Why this policy cannot be used, or ``None``."""
        if not 0 <= self.backoff_ms <= MAX_DELAY_MS:
            return f"retry_backoff_ms must be 0-{MAX_DELAY_MS:,} (a year)"
        if self.max_backoff_ms > MAX_DELAY_MS:
            return f"retry_backoff_max_ms must be at most {MAX_DELAY_MS:,} (a year)"
        if not 1.0 <= self.multiplier <= 1000.0:
            return "retry_multiplier must be between 1 and 1000"
        if self.max_backoff_ms < self.backoff_ms:
            return "retry_backoff_max_ms must be at least retry_backoff_ms"
        if not 0.0 <= self.jitter <= 1.0:
            return "retry_jitter must be between 0 and 1"
        return None

    def as_fields(self) -> RetryFieldValues:
        return RetryFieldValues(
            retry_backoff_ms=self.backoff_ms,
            retry_multiplier=self.multiplier,
            retry_backoff_max_ms=self.max_backoff_ms,
            retry_jitter=self.jitter,
        )

    def delay_us(self, task_id: str, failed_attempt: int) -> int:
        """Microseconds to wait after attempt ``failed_attempt`` (1, 2, ...) failed."""
        if self.backoff_ms == 0:
            return 0
        try:
            grown = self.backoff_ms * self.multiplier ** max(0, failed_attempt - 1)
        except OverflowError:  # long past the cap
            grown = float(self.max_backoff_ms)
        base_ms = min(float(self.max_backoff_ms), grown)
        seed = hashlib.sha256(f"{task_id}/{failed_attempt}".encode()).digest()
        spread = int.from_bytes(seed[:8], "big") / 2**64 * 2.0 - 1.0  # in [-1, 1)
        return max(0, round(base_ms * 1000.0 * (1.0 + self.jitter * spread)))


DEFAULT_RETRY = RetryPolicy()


class RetryFields(Protocol):
    """Anything that carries a retry policy as its four flat fields (the submitted and
    queued events, a task in the scheduler's state)."""

    @property
    def retry_backoff_ms(self) -> int: ...
    @property
    def retry_multiplier(self) -> float: ...
    @property
    def retry_backoff_max_ms(self) -> int: ...
    @property
    def retry_jitter(self) -> float: ...


def retry_of(carrier: RetryFields) -> RetryPolicy:
    """The retry policy ``carrier`` holds."""
    return RetryPolicy(
        carrier.retry_backoff_ms,
        carrier.retry_multiplier,
        carrier.retry_backoff_max_ms,
        carrier.retry_jitter,
    )

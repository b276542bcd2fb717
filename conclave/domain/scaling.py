"""How a runtime host sizes its share of a pool (autoscaling). Pure.

A host runs at least ``minimum`` agents (the ones it starts with) and at most as many as
it has ids for. It grows when the scheduler says the pool is starved (``pool.starved``:
tasks could start now, and no agent is idle for them): by its share of the waiting tasks,
``ceil(waiting / hosts)``, first ids first, up to its maximum. It shrinks by retiring
agents idle for ``idle_us``, the last ids first, down to its minimum.

Queue depth drives growth (the scheduler's count of what waits), utilisation drives the
shrinking (an agent idle that long was not needed). Both are judged per host: hosts of a
pool share nothing but the scheduler's word, so several hosts grow at once by their
shares, and each gives back what it does not use.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from conclave.domain.events import PoolStarved

__all__ = ["Scaling"]


@dataclass(frozen=True, slots=True)
class Scaling:
    ids: tuple[str, ...]
    """Every agent id the host may run, in the order it starts them: its first
    ``minimum`` run from its start."""
    minimum: int
    idle_us: int
    """An agent idle this long (µs) retires while the host runs more than ``minimum``."""

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= len(self.ids):
            raise ValueError(f"minimum {self.minimum} is not within 0..{len(self.ids)} agents")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("agent ids repeat")
        if self.idle_us <= 0:
            raise ValueError("the idle timeout must be positive")

    @property
    def maximum(self) -> int:
        return len(self.ids)

    @property
    def elastic(self) -> bool:
        return self.maximum > self.minimum

    def grow(self, running: Collection[str], starved: PoolStarved) -> list[str]:
        """The agents to start now that ``starved`` says tasks wait: this host's share of
        them (the first ids it does not run), within its maximum."""
        share = -(-starved.waiting // max(1, starved.hosts))
        return [a for a in self.ids if a not in running][: max(0, share)]

    def shrink(self, running: Sequence[str], idle_since: Mapping[str, int], now: int) -> list[str]:
        """The agents to retire at ``now``: those of ``running`` idle since at least
        ``idle_us`` ago (``idle_since``: the idle ones, busy ones are absent), the last
        ids first, while more than ``minimum`` would be left."""
        spare = len(running) - self.minimum
        if spare <= 0:
            return []
        order = {a: i for i, a in enumerate(self.ids)}
        idle = [
            a
            for a in running
            if (since := idle_since.get(a)) is not None and now - since >= self.idle_us
        ]
        idle.sort(key=lambda a: order.get(a, len(order)), reverse=True)
        return idle[:spare]

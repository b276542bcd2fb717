"""Which worker runs which processor shard: liveness from beats, placement by hashing.

Pure: the workers' beats and the time come in as arguments. Every worker computes the
same placement from the same view, so no coordinator (and no broker group membership,
which the embedded broker never expires for a member killed with -9) is needed:

* a worker is **alive** while its newest beat is younger than the lease it announced,
  unless that beat said it is leaving;
* each shard belongs to the alive worker with the highest rendezvous hash of
  (worker, shard): adding or removing a worker moves only the shards it gains or loses;
* a worker starts a shard only when no *other* alive worker still claims it in its beat,
  and gives up every shard that is no longer its own, so two alive workers never run
  one shard on purpose. Transactional fencing makes the rare overlap (a worker that
  stalled past its lease) harmless: the newer instance's writes win, the older one's fail.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from conclave.domain.events import WorkerBeat

__all__ = ["Member", "Plan", "alive", "observe", "owner", "plan"]


@dataclass(frozen=True, slots=True)
class Member:
    """What the newest beat of one worker said, and when (µs since the epoch)."""

    worker_id: str
    shards: frozenset[str]
    leaving: bool
    seen_at: int
    lease_us: int

    def alive(self, now: int) -> bool:
        return not self.leaving and now - self.seen_at < self.lease_us


def observe(members: Mapping[str, Member], beat: WorkerBeat, at: int) -> dict[str, Member]:
    """The view after one more beat (an older beat than the one known changes nothing)."""
    known = members.get(beat.worker_id)
    if known is not None and known.seen_at > at:
        return dict(members)
    return {
        **members,
        beat.worker_id: Member(
            beat.worker_id, frozenset(beat.shards), beat.leaving, at, beat.lease_ms * 1000
        ),
    }


def alive(members: Mapping[str, Member], now: int, me: str) -> set[str]:
    """Every alive worker; ``me`` always counts (a worker does not wait for its own beat)."""
    return {m.worker_id for m in members.values() if m.alive(now)} | {me}


def _score(worker_id: str, shard: str) -> bytes:
    return hashlib.sha256(f"{worker_id}\x00{shard}".encode()).digest()


def owner(shard: str, workers: Iterable[str]) -> str | None:
    """The worker that should run ``shard`` (rendezvous hashing), if any is alive."""
    return max(workers, key=lambda w: _score(w, shard), default=None)


@dataclass(frozen=True, slots=True)
class Plan:
    start: frozenset[str]
    stop: frozenset[str]


def plan(
    shards: Iterable[str],
    members: Mapping[str, Member],
    me: str,
    running: Iterable[str],
    now: int,
) -> Plan:
    """What ``me`` should start and stop now, given the view and what it runs."""
    workers = alive(members, now, me)
    mine = {s for s in shards if owner(s, workers) == me}
    running = set(running)
    claimed = {s for m in members.values() if m.worker_id != me and m.alive(now) for s in m.shards}
    return Plan(start=frozenset(mine - running - claimed), stop=frozenset(running - mine))

"""Shard placement: from beats to who runs what (conclave/domain/ownership.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conclave.domain.events import WorkerBeat
from conclave.domain.ownership import Member, alive, observe, owner, plan

SHARDS = [*(f"scheduler-{i}" for i in range(8)), "witness-0"]
LEASE_MS = 5_000
SECOND = 1_000_000


def beat(worker: str, shards: list[str] | None = None, *, leaving: bool = False) -> WorkerBeat:
    return WorkerBeat(
        worker_id=worker, shards=list(shards or []), leaving=leaving, lease_ms=LEASE_MS
    )


def view(*beats: tuple[WorkerBeat, int]) -> dict[str, Member]:
    members: dict[str, Member] = {}
    for b, at in beats:
        members = observe(members, b, at)
    return members


def test_a_worker_alone_runs_every_shard() -> None:
    p = plan(SHARDS, {}, "w1", running=[], now=0)
    assert p.start == set(SHARDS)
    assert p.stop == set()


def test_a_worker_alive_within_its_lease_and_dead_after_it() -> None:
    members = view((beat("w2"), 0))
    assert alive(members, LEASE_MS * 1000 - 1, "w1") == {"w1", "w2"}
    assert alive(members, LEASE_MS * 1000, "w1") == {"w1"}


def test_a_leaving_worker_is_not_alive_at_once() -> None:
    members = view((beat("w2", ["witness-0"]), 0), (beat("w2", leaving=True), 1))
    assert alive(members, 2, "w1") == {"w1"}
    assert plan(SHARDS, members, "w1", running=[], now=2).start == set(SHARDS)


def test_an_older_beat_changes_nothing() -> None:
    members = view((beat("w2", ["witness-0"]), 10), (beat("w2", []), 5))
    assert members["w2"].shards == {"witness-0"}


def test_a_shard_claimed_by_a_live_worker_waits_until_it_is_released() -> None:
    # w2 joined: some shards are now w2's, but w1 still runs them.
    running_w1 = set(SHARDS)
    members = view((beat("w1", sorted(running_w1)), 0), (beat("w2", []), 0))
    p2 = plan(SHARDS, members, "w2", running=[], now=SECOND)
    assert p2.start == set()  # everything is still claimed by w1
    p1 = plan(SHARDS, members, "w1", running=running_w1, now=SECOND)
    handed = {s for s in SHARDS if owner(s, {"w1", "w2"}) == "w2"}
    assert p1.stop == handed
    assert handed  # with 9 shards, both workers get some (fixed hash)
    # w1 gives them up and says so: now w2 starts exactly those.
    members = observe(members, beat("w1", sorted(running_w1 - handed)), SECOND)
    assert plan(SHARDS, members, "w2", running=[], now=2 * SECOND).start == handed


def test_shards_of_a_worker_killed_without_a_word_move_after_its_lease() -> None:
    members = view((beat("w1", ["witness-0"]), 0))
    assert plan(SHARDS, members, "w2", running=[], now=SECOND).start == (
        {s for s in SHARDS if owner(s, {"w1", "w2"}) == "w2"}
    )
    later = plan(SHARDS, members, "w2", running=[], now=LEASE_MS * 1000 + 1)
    assert later.start == set(SHARDS)


@given(
    workers=st.sets(st.sampled_from([f"w{i}" for i in range(6)]), min_size=1),
    gone=st.sampled_from([f"w{i}" for i in range(6)]),
)
def test_placement_is_total_and_removing_a_worker_moves_only_its_shards(
    workers: set[str], gone: str
) -> None:
    before = {s: owner(s, workers) for s in SHARDS}
    assert set(before.values()) <= workers
    rest = workers - {gone}
    if not rest:
        return
    after = {s: owner(s, rest) for s in SHARDS}
    moved = {s for s in SHARDS if before[s] != after[s]}
    assert moved == {s for s in SHARDS if before[s] == gone}


@given(
    running=st.dictionaries(
        st.sampled_from(["w1", "w2", "w3"]), st.sets(st.sampled_from(SHARDS)), min_size=1
    )
)
def test_no_two_live_workers_start_or_keep_the_same_shard_from_the_same_view(
    running: dict[str, set[str]],
) -> None:
    # Each worker runs what it runs and has said so; nobody runs a shard twice to begin with.
    seen: set[str] = set()
    for worker in sorted(running):
        running[worker] -= seen
        seen |= running[worker]
    members = view(*((beat(w, sorted(s)), 0) for w, s in running.items()))
    after: dict[str, set[str]] = {}
    for worker, shards in running.items():
        p = plan(SHARDS, members, worker, running=shards, now=SECOND)
        after[worker] = (shards - p.stop) | p.start
    for a, mine in after.items():
        for b, theirs in after.items():
            if a < b:
                assert not mine & theirs

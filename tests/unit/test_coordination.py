"""The coordination rules (conclave.domain.coordination), without a broker.

A hypothesis state machine drives locks and versioned state with requests at random
times on a fake clock, exactly as the processor does (what time decides first, then the
batch's requests, each decision folded before the next), and checks against a model of
its own: fencing tokens strictly increase per lock, never two holders at once, an expired
or superseded holder's token is refused, waiters are served in the order they queued,
a stale state update is always rejected with the current version, versions have no gaps,
and the state is a fold of the decisions (a snapshot of it, and a replay, agree).
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conclave.domain import coordination as co
from conclave.domain.events import (
    LockDenied,
    LockExpired,
    LockGranted,
    LockReleased,
    LockReleaseRequested,
    LockRenewed,
    LockRenewRequested,
    LockRequested,
    LockWaiting,
    StateCheckpointed,
    StateCheckpointRequested,
    StateRestored,
    StateRestoreRequested,
    StateUpdated,
    StateUpdateRejected,
    StateUpdateRequested,
)

NAMES = ("repo", "file")
HOLDERS = ("alice", "bob", "carol")
KEYS = ("wf-1", "wf-2")
MS = 1000


def step(state: co.CoordinationState, now: int, requests: list[co.Request]) -> list[co.Decision]:
    """What the processor does with one batch."""
    out: list[co.Decision] = []
    for decision in co.due(state, now):
        co.evolve(state, decision)
        out.append(decision)
    for request in requests:
        for decision in co.decide(state, request, now):
            co.evolve(state, decision)
            out.append(decision)
    return out


class Coordination(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = co.CoordinationState()
        self.now = 1_000_000_000_000
        self.ids = itertools.count()
        self.log: list[co.Decision] = []
        # the model
        self.top_token: dict[str, int] = {}
        self.holding: dict[str, tuple[str, int, int] | None] = {}
        self.queue: dict[str, list[str]] = {n: [] for n in NAMES}
        self.granted_tokens: dict[str, list[int]] = {n: [] for n in NAMES}
        self.wait_until: dict[str, int] = {}
        self.versions: dict[str, int] = {}
        self.values: dict[str, dict[int, str]] = {k: {} for k in KEYS}
        self.labels: dict[str, dict[str, int]] = {k: {} for k in KEYS}

    def request_id(self) -> str:
        return f"r{next(self.ids)}"

    def run(self, requests: list[co.Request]) -> list[co.Decision]:
        decided = step(self.state, self.now, requests)
        for decision in decided:
            self.check(decision)
        self.log += decided
        return decided

    def check(self, d: co.Decision) -> None:
        """Every decision against the model, as it is made."""
        match d:
            case LockGranted():
                assert self.holding.get(d.name) is None, f"two holders of {d.name}"
                assert d.fencing_token > self.top_token.get(d.name, 0)
                assert d.fencing_token == self.top_token.get(d.name, 0) + 1
                queue = self.queue[d.name]
                if d.request_id in queue:
                    # Only a waiter whose wait ran out (denied in this step) is passed over.
                    ahead = queue[: queue.index(d.request_id)]
                    passed_over = [r for r in ahead if self.wait_until[r] > self.now]
                    assert not passed_over, "a waiter was served out of order"
                    queue.remove(d.request_id)
                self.top_token[d.name] = d.fencing_token
                self.granted_tokens[d.name].append(d.fencing_token)
                self.holding[d.name] = (d.holder, d.fencing_token, d.expires_at)
                assert d.expires_at > self.now
            case LockWaiting():
                assert self.holding.get(d.name) is not None or self.queue[d.name]
                self.queue[d.name].append(d.request_id)
                self.wait_until[d.request_id] = d.wait_until
            case LockDenied():
                if d.request_id in self.queue[d.name]:
                    self.queue[d.name].remove(d.request_id)
            case LockExpired():
                held = self.holding.get(d.name)
                assert held is not None
                assert held[1] == d.fencing_token
                assert held[2] <= self.now
                self.holding[d.name] = None
            case LockReleased():
                held = self.holding.get(d.name)
                assert held is not None
                assert held[1] == d.fencing_token
                self.holding[d.name] = None
            case LockRenewed():
                held = self.holding.get(d.name)
                assert held is not None
                assert held[1] == d.fencing_token
                self.holding[d.name] = (held[0], held[1], d.expires_at)
            case StateUpdated() | StateRestored():
                version = d.version if isinstance(d, StateUpdated) else d.new_version
                assert version == self.versions.get(d.key, 0) + 1, "a gap in versions"
                self.versions[d.key] = version
                self.values[d.key][version] = d.value_json
            case StateCheckpointed():
                assert d.version == self.versions.get(d.key, 0)
                self.labels[d.key][d.label] = d.version
            case StateUpdateRejected():
                assert d.current_version == self.versions.get(d.key, 0)

    @rule(ms=st.integers(0, 3000))
    def time_passes(self, ms: int) -> None:
        self.now += ms * MS
        self.run([])

    @rule(
        name=st.sampled_from(NAMES),
        holder=st.sampled_from(HOLDERS),
        ttl=st.integers(1, 2000),
        wait=st.sampled_from([0, 0, 500, 5000]),
    )
    def acquire(self, name: str, holder: str, ttl: int, wait: int) -> None:
        held = self.holding.get(name)
        busy = (held is not None and held[2] > self.now) or bool(self.queue[name])
        request_id = self.request_id()
        decided = self.run(
            [
                LockRequested(
                    name=name, holder=holder, ttl_ms=ttl, wait_ms=wait, request_id=request_id
                )
            ]
        )
        answer = [d for d in decided if getattr(d, "request_id", None) == request_id]
        assert len(answer) == 1
        if not busy:
            assert isinstance(answer[0], LockGranted)
        elif wait == 0:
            assert isinstance(answer[0], LockDenied)
            assert "locked by" in answer[0].reason or "in line" in answer[0].reason
        else:
            assert isinstance(answer[0], LockWaiting)

    @rule(
        name=st.sampled_from(NAMES),
        pick=st.integers(0, 50),
        release=st.booleans(),
        holder=st.sampled_from(HOLDERS),
        own=st.booleans(),
    )
    def renew_or_release(self, name: str, pick: int, release: bool, holder: str, own: bool) -> None:
        """With any token ever granted (or the current one): only the live holder's passes."""
        tokens = self.granted_tokens[name]
        if not tokens:
            return
        token = tokens[-1] if own else tokens[pick % len(tokens)]
        held = self.holding.get(name)
        if own and held is not None:
            holder = held[0]
        request_id = self.request_id()
        request: co.Request
        if release:
            request = LockReleaseRequested(
                name=name, holder=holder, fencing_token=token, request_id=request_id
            )
        else:
            request = LockRenewRequested(
                name=name, holder=holder, fencing_token=token, ttl_ms=1000, request_id=request_id
            )
        decided = self.run([request])  # nothing is due: every run already stepped at now
        (answer,) = [d for d in decided if getattr(d, "request_id", None) == request_id]
        live = held is not None and held[:2] == (holder, token) and held[2] > self.now
        if live:
            assert isinstance(answer, LockReleased | LockRenewed), answer
        else:
            assert isinstance(answer, LockDenied), f"a stale token passed: {answer}"

    @rule(key=st.sampled_from(KEYS), off=st.integers(-2, 2), value=st.integers())
    def update(self, key: str, off: int, value: int) -> None:
        current = self.versions.get(key, 0)
        expected = max(0, current + off)
        request_id = self.request_id()
        (answer,) = self.run(
            [
                StateUpdateRequested(
                    key=key,
                    expected_version=expected,
                    value_json=json.dumps(value),
                    request_id=request_id,
                )
            ]
        )
        if expected == current:
            assert isinstance(answer, StateUpdated)
            assert answer.version == current + 1
        else:
            assert isinstance(answer, StateUpdateRejected), "a stale update was accepted"
            assert answer.current_version == current
            assert "stale" in answer.reason

    @rule(key=st.sampled_from(KEYS), label=st.sampled_from(["a", "b", "c"]))
    def checkpoint(self, key: str, label: str) -> None:
        (answer,) = self.run(
            [
                StateCheckpointRequested(
                    key=key, label=label, expected_version=None, request_id=self.request_id()
                )
            ]
        )
        if self.versions.get(key, 0) and label not in self.labels[key]:
            assert isinstance(answer, StateCheckpointed | StateUpdateRejected)

    @rule(key=st.sampled_from(KEYS), label=st.sampled_from(["a", "b", "c"]))
    def restore(self, key: str, label: str) -> None:
        known = self.labels[key].get(label)
        (answer,) = self.run(
            [
                StateRestoreRequested(
                    key=key, label=label, expected_version=None, request_id=self.request_id()
                )
            ]
        )
        if known is None:
            assert isinstance(answer, StateUpdateRejected)
        else:
            assert isinstance(answer, StateRestored)
            assert answer.from_version == known
            assert answer.value_json == self.values[key][known]

    @rule()
    def resend_the_last_request(self) -> None:
        """A request id already decided is not decided again."""
        ids = [getattr(d, "request_id", None) for d in self.log]
        done = [i for i in ids if i is not None]
        if done:
            again = StateUpdateRequested(
                key="wf-1", expected_version=0, value_json="1", request_id=done[-1]
            )
            assert co.decide(self.state, again, self.now) == []

    @invariant()
    def state_is_a_fold_of_the_decisions(self) -> None:
        replayed = co.CoordinationState()
        for decision in self.log:
            co.evolve(replayed, decision)
        assert co.to_snapshot(replayed) == co.to_snapshot(self.state)
        restored = co.from_snapshot(json.loads(json.dumps(co.to_snapshot(self.state))))
        assert co.to_snapshot(restored) == co.to_snapshot(self.state)
        busy = {n for n, lock in self.state.locks.items() if lock.holder or lock.waiters}
        assert self.state.active == replayed.active == restored.active == busy

    @invariant()
    def nothing_overdue_after_a_step(self) -> None:
        due = co.next_due(self.state)
        assert due is None or due > self.now or not self.log

    @invariant()
    def tokens_strictly_increase(self) -> None:
        for tokens in self.granted_tokens.values():
            assert tokens == sorted(set(tokens))


TestCoordination = Coordination.TestCase
TestCoordination.settings = settings(max_examples=150, stateful_step_count=40)


def test_denial_says_who_holds_the_lock_until_when() -> None:
    state = co.CoordinationState()
    now = 1_700_000_000_000_000
    step(
        state,
        now,
        [LockRequested(name="repo", holder="alice", ttl_ms=5000, wait_ms=0, request_id="1")],
    )
    (denied,) = step(
        state,
        now,
        [LockRequested(name="repo", holder="bob", ttl_ms=5000, wait_ms=0, request_id="2")],
    )
    assert isinstance(denied, LockDenied)
    assert denied.reason == "locked by alice until 2023-11-14T22:13:25.000+00:00"
    assert denied.held_by == "alice"


def test_a_waiter_is_granted_when_the_lease_runs_out_and_the_old_token_is_refused() -> None:
    state = co.CoordinationState()
    t0 = 1_700_000_000_000_000
    (a,) = step(
        state, t0, [LockRequested(name="repo", holder="a", ttl_ms=100, wait_ms=0, request_id="1")]
    )
    (w,) = step(
        state,
        t0,
        [LockRequested(name="repo", holder="b", ttl_ms=100, wait_ms=1000, request_id="2")],
    )
    assert isinstance(a, LockGranted)
    assert isinstance(w, LockWaiting)
    assert co.next_due(state) == t0 + 100 * MS
    expired, granted = step(state, t0 + 100 * MS, [])
    assert isinstance(expired, LockExpired)
    assert isinstance(granted, LockGranted)
    assert (granted.holder, granted.fencing_token) == ("b", 2)
    (refused,) = step(
        state,
        t0 + 101 * MS,
        [LockRenewRequested(name="repo", holder="a", fencing_token=1, ttl_ms=100, request_id="3")],
    )
    assert isinstance(refused, LockDenied)
    assert "token 1 is stale" in refused.reason
    assert co.check(state, "repo", 1, t0 + 101 * MS) is not None
    assert co.check(state, "repo", 2, t0 + 101 * MS) is None
    fence = co.Fence()
    assert fence.admit("repo", 2) is None
    assert fence.admit("repo", 1) is not None


def test_a_waiter_still_waiting_when_the_lease_ran_out_is_granted_even_if_the_step_is_late() -> (
    None
):
    state = co.CoordinationState()
    t0 = 1_700_000_000_000_000
    step(state, t0, [LockRequested(name="x", holder="a", ttl_ms=100, wait_ms=0, request_id="1")])
    step(state, t0, [LockRequested(name="x", holder="b", ttl_ms=100, wait_ms=200, request_id="2")])
    decided = step(state, t0 + 5000 * MS, [])  # the processor was down meanwhile
    assert [type(d) for d in decided] == [LockExpired, LockGranted]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (
            LockRequested(name="", holder="a", ttl_ms=1, wait_ms=0, request_id="1"),
            "lock name is empty",
        ),
        (LockRequested(name="x", holder="a", ttl_ms=0, wait_ms=0, request_id="1"), "ttl_ms 0"),
        (LockRequested(name="x", holder="a", ttl_ms=1, wait_ms=-1, request_id="1"), "wait_ms -1"),
        (
            StateUpdateRequested(key="k", expected_version=0, value_json="{", request_id="1"),
            "not JSON",
        ),
        (
            StateUpdateRequested(key="k", expected_version=-1, value_json="1", request_id="1"),
            "negative",
        ),
    ],
)
def test_invalid_requests_are_answered_with_the_reason(request_: co.Request, reason: str) -> None:
    (answer,) = co.decide(co.CoordinationState(), request_, 1)
    assert isinstance(answer, LockDenied | StateUpdateRejected)
    assert answer.reason.startswith("invalid: ")
    assert reason in answer.reason


def test_the_locks_read_model_follows_grants_waiters_and_expiry() -> None:
    """projections.rows.fold_lock over a lock's decisions, as the projector folds them."""
    from conclave.domain.events import new_envelope
    from projections.rows import fold_lock

    state = co.CoordinationState()
    t0 = 1_700_000_000_000_000
    decided = step(
        state,
        t0,
        [
            LockRequested(name="r", holder="a", ttl_ms=100, wait_ms=0, request_id="1"),
            LockRequested(name="r", holder="b", ttl_ms=100, wait_ms=50, request_id="2"),
            LockRequested(name="r", holder="c", ttl_ms=100, wait_ms=900, request_id="3"),
        ],
    )
    decided += step(state, t0 + 100 * MS, [])  # a expires, b's wait is over, c is granted
    row = None
    rows = []
    for decision in decided:
        row = fold_lock(row, new_envelope(decision.TYPE, tenant="t", producer="p"), decision, "r")  # type: ignore[arg-type]
        assert row is not None
        rows.append((row.state, row.holder, row.fencing_token, list(row.waiters)))
    assert rows == [
        ("held", "a", 1, []),
        ("held", "a", 1, ["b"]),
        ("held", "a", 1, ["b", "c"]),
        ("expired", "a", 1, ["b", "c"]),
        ("held", "c", 2, ["b"]),
        ("held", "c", 2, []),  # b denied: its wait ran out while a held the lock
    ]

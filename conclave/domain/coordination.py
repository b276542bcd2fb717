"""Resource locks with expiry and versioned state: the coordination processor's rules.

Pure: no I/O, no clock. ``decide(state, request, now)`` answers one request with events,
``due(state, now)`` says what time alone decides (leases that ran out, waiters whose
wait is over), and ``evolve(state, event)`` folds a decision. The state is a fold of the
decisions, so a restarted processor knows every lock's last fencing token and every
key's version from its log.

**Locks.** A lock is free or held by one holder until ``expires_at``. Each grant carries
a fencing token one larger than the lock's previous one (so tokens strictly increase per
lock, across restarts). A request for a held lock waits in line (first come, first
served) up to its ``wait_ms``, or is denied at once (``locked by X until T``). A lease
ends by release, or by expiry when the processor's clock passes it; the next in line is
granted in the same decision. Renewal and release name the token: a holder whose lease
passed to another (or ran out) is refused, so it learns it lost the lock.

**Versioned state.** Each key has a version (0: never written) that goes up by exactly
one per accepted update. An update names the version it read; any other version
rejects it with the current one (never merged). A checkpoint labels the current version;
a restore writes the checkpoint's value as the next version (history kept).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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

__all__ = [
    "MAX_NAME",
    "MAX_TTL_MS",
    "MAX_VALUE_BYTES",
    "MAX_WAIT_MS",
    "CoordinationState",
    "Decision",
    "Fence",
    "Lock",
    "Request",
    "Versioned",
    "Waiter",
    "check",
    "decide",
    "due",
    "evolve",
    "from_snapshot",
    "invalid_request",
    "next_due",
    "subject",
    "to_snapshot",
]

MAX_NAME = 200
"""Longest lock name, holder, state key, label or request id (characters)."""
MAX_TTL_MS = 24 * 3600 * 1000
MAX_WAIT_MS = 3600 * 1000
MAX_VALUE_BYTES = 256 * 1024
"""Largest state value (UTF-8 bytes of its JSON): it travels in one record and lives in
the processor's memory and snapshots."""
RECENT_REQUESTS = 100_000
"""Request ids remembered to drop a re-sent copy of a request already decided."""

Request = (
    LockRequested
    | LockRenewRequested
    | LockReleaseRequested
    | StateUpdateRequested
    | StateCheckpointRequested
    | StateRestoreRequested
)
Decision = (
    LockGranted
    | LockWaiting
    | LockDenied
    | LockRenewed
    | LockReleased
    | LockExpired
    | StateUpdated
    | StateUpdateRejected
    | StateCheckpointed
    | StateRestored
)


@dataclass(frozen=True, slots=True)
class Waiter:
    holder: str
    request_id: str
    ttl_ms: int
    wait_until: int


@dataclass(slots=True)
class Lock:
    token: int = 0
    """The last fencing token granted (0: never granted)."""
    holder: str | None = None
    expires_at: int = 0
    waiters: list[Waiter] = field(default_factory=list)


@dataclass(slots=True)
class Versioned:
    version: int = 0
    value_json: str = "null"
    checkpoints: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Label -> (version, value)."""


@dataclass(slots=True)
class CoordinationState:
    locks: dict[str, Lock] = field(default_factory=dict)
    states: dict[str, Versioned] = field(default_factory=dict)
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Request ids decided lately (a re-sent request is not decided twice)."""
    active: set[str] = field(default_factory=set)
    """Locks held or waited for: the only ones time can decide about. Every lock name
    ever used is kept (its last token), so timers must not look at all of them."""

    def lock(self, name: str) -> Lock:
        lock = self.locks.get(name)
        if lock is None:
            lock = self.locks[name] = Lock()
        return lock

    def versioned(self, key: str) -> Versioned:
        entry = self.states.get(key)
        if entry is None:
            entry = self.states[key] = Versioned()
        return entry


_LOCK_EVENTS = (
    LockRequested,
    LockRenewRequested,
    LockReleaseRequested,
    LockGranted,
    LockWaiting,
    LockDenied,
    LockRenewed,
    LockReleased,
    LockExpired,
)


def subject(event: Request | Decision) -> str:
    """The lock name or state key an event is about (its record key)."""
    return event.name if isinstance(event, _LOCK_EVENTS) else event.key


def when(us: int) -> str:
    """A time (µs since the epoch) as people read it in a reason."""
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")


def _text(value: str, what: str) -> str | None:
    if not value:
        return f"{what} is empty"
    if len(value) > MAX_NAME:
        return f"{what} is longer than {MAX_NAME} characters"
    return None


def invalid_request(request: Request) -> str | None:
    """Why a well-formed request is refused whatever the state, if it is."""
    texts: list[tuple[str, str]] = [(request.request_id, "request id")]
    if isinstance(request, LockRequested | LockRenewRequested | LockReleaseRequested):
        texts += [(request.name, "lock name"), (request.holder, "holder")]
    else:
        texts.append((request.key, "state key"))
    if isinstance(request, StateCheckpointRequested | StateRestoreRequested):
        texts.append((request.label, "checkpoint label"))
    for value, what in texts:
        if (reason := _text(value, what)) is not None:
            return reason
    if isinstance(request, LockRequested | LockRenewRequested) and not (
        0 < request.ttl_ms <= MAX_TTL_MS
    ):
        return f"ttl_ms {request.ttl_ms} is not within 1..{MAX_TTL_MS}"
    if isinstance(request, LockRequested) and not 0 <= request.wait_ms <= MAX_WAIT_MS:
        return f"wait_ms {request.wait_ms} is not within 0..{MAX_WAIT_MS}"
    if isinstance(request, LockRenewRequested | LockReleaseRequested) and request.fencing_token < 1:
        return f"fencing token {request.fencing_token} was never granted"
    if isinstance(request, StateUpdateRequested):
        if request.expected_version < 0:
            return f"expected version {request.expected_version} is negative"
        if len(request.value_json.encode()) > MAX_VALUE_BYTES:
            return f"value is larger than {MAX_VALUE_BYTES} bytes"
        try:
            json.loads(request.value_json)
        except ValueError as exc:
            return f"value is not JSON: {exc}"
    return None


def decide(state: CoordinationState, request: Request, now: int) -> list[Decision]:
    """The decisions answering ``request`` at ``now`` (call :func:`due` first, so that a
    lease that ran out before ``now`` is free). A request id already decided: nothing."""
    if request.request_id in state.recent:
        return []
    if (reason := invalid_request(request)) is not None:
        return [_refusal(state, request, reason)]
    match request:
        case LockRequested():
            return _acquire(state, request, now)
        case LockRenewRequested() | LockReleaseRequested():
            lock = state.locks.get(request.name, Lock())
            stale = _stale(lock, request.name, request.holder, request.fencing_token)
            if stale is not None:
                return [_denied(lock, request, _action(request), stale)]
            if isinstance(request, LockReleaseRequested):
                released = LockReleased(
                    name=request.name,
                    holder=request.holder,
                    fencing_token=request.fencing_token,
                    request_id=request.request_id,
                )
                return [released, *_hand_over(lock, request.name, now)]
            return [
                LockRenewed(
                    name=request.name,
                    holder=request.holder,
                    fencing_token=request.fencing_token,
                    expires_at=now + request.ttl_ms * 1000,
                    request_id=request.request_id,
                )
            ]
        case StateUpdateRequested():
            entry = state.states.get(request.key, Versioned())
            if request.expected_version != entry.version:
                return [_stale_version(request, entry.version, "update")]
            return [
                StateUpdated(
                    key=request.key,
                    version=entry.version + 1,
                    value_json=request.value_json,
                    request_id=request.request_id,
                )
            ]
        case StateCheckpointRequested() | StateRestoreRequested():
            entry = state.states.get(request.key, Versioned())
            action = "checkpoint" if isinstance(request, StateCheckpointRequested) else "restore"
            expected = request.expected_version
            if expected is not None and expected != entry.version:
                return [_stale_version(request, entry.version, action)]
            if isinstance(request, StateCheckpointRequested):
                if entry.version == 0:
                    return [_rejected(request, 0, action, f"{request.key!r} has no version yet")]
                if request.label in entry.checkpoints:
                    version = entry.checkpoints[request.label][0]
                    reason = f"checkpoint {request.label!r} exists (version {version})"
                    return [_rejected(request, entry.version, action, reason)]
                return [
                    StateCheckpointed(
                        key=request.key,
                        version=entry.version,
                        label=request.label,
                        request_id=request.request_id,
                    )
                ]
            found = entry.checkpoints.get(request.label)
            if found is None:
                reason = f"{request.key!r} has no checkpoint {request.label!r}"
                return [_rejected(request, entry.version, action, reason)]
            return [
                StateRestored(
                    key=request.key,
                    from_version=found[0],
                    new_version=entry.version + 1,
                    label=request.label,
                    value_json=found[1],
                    request_id=request.request_id,
                )
            ]


def due(state: CoordinationState, now: int, names: Iterable[str] | None = None) -> list[Decision]:
    """What time alone decides at ``now``: leases that ran out (and the next in line
    granted), waiters whose wait is over (denied). Folds nothing; the caller folds the
    decisions in order. ``names``: only these locks (default: every lock)."""
    out: list[Decision] = []
    for name in sorted(state.active if names is None else names):
        lock = state.locks.get(name)
        if lock is None:
            continue
        lock = _copy(lock)  # decisions here are folded by the caller, not by us
        decided: list[Decision] = []
        free_since = now
        if lock.holder is not None and lock.expires_at <= now:
            expired = LockExpired(
                name=name, holder=lock.holder, fencing_token=lock.token, expires_at=lock.expires_at
            )
            decided.append(expired)
            _fold_lock(lock, expired)
            free_since = expired.expires_at  # whoever still waited then is next in line
        if lock.holder is None:
            for granted in _hand_over(lock, name, now, after=free_since):
                decided.append(granted)
                _fold_lock(lock, granted)
        for waiter in [w for w in lock.waiters if w.wait_until <= now]:
            denied = LockDenied(
                name=name,
                holder=waiter.holder,
                action="acquire",
                reason=_held_reason(lock, name, waited=True),
                request_id=waiter.request_id,
                held_by=lock.holder,
                held_until=lock.expires_at if lock.holder is not None else None,
            )
            decided.append(denied)
            _fold_lock(lock, denied)
        out += decided
    return out


def next_due(state: CoordinationState) -> int | None:
    """When :func:`due` has something to decide next (µs since the epoch), if ever."""
    locks = [state.locks[name] for name in state.active]
    times = [lock.expires_at for lock in locks if lock.holder is not None]
    times += [w.wait_until for lock in locks for w in lock.waiters]
    return min(times, default=None)


def evolve(state: CoordinationState, event: Decision) -> None:
    """Fold one decision into ``state`` (in place)."""
    request_id = getattr(event, "request_id", None)
    if request_id is not None:
        state.recent[request_id] = None
        while len(state.recent) > RECENT_REQUESTS:
            state.recent.popitem(last=False)
    match event:
        case (
            LockGranted()
            | LockWaiting()
            | LockDenied()
            | LockRenewed()
            | LockReleased()
            | LockExpired()
        ):
            lock = state.lock(event.name)
            _fold_lock(lock, event)
            if lock.holder is not None or lock.waiters:
                state.active.add(event.name)
            else:
                state.active.discard(event.name)
        case StateUpdated():
            entry = state.versioned(event.key)
            entry.version, entry.value_json = event.version, event.value_json
        case StateRestored():
            entry = state.versioned(event.key)
            entry.version, entry.value_json = event.new_version, event.value_json
        case StateCheckpointed():
            entry = state.versioned(event.key)
            entry.checkpoints[event.label] = (event.version, entry.value_json)
        case StateUpdateRejected():
            pass


@dataclass(slots=True)
class Fence:
    """A resource's guard, for resources that cannot ask the lock's state: it remembers
    the largest fencing token it admitted per lock and refuses any smaller one, so a
    holder whose lease passed to another cannot write after its successor did."""

    highest: dict[str, int] = field(default_factory=dict)

    def admit(self, name: str, token: int) -> str | None:
        """``None`` (and the token remembered) if a write with ``token`` may go on."""
        seen = self.highest.get(name, 0)
        if token < seen:
            return f"fencing token {token} is stale: {name!r} already saw token {seen}"
        self.highest[name] = token
        return None


def check(state: CoordinationState, name: str, token: int, now: int) -> str | None:
    """Why a write guarded by lock ``name`` with fencing ``token`` must be refused at
    ``now``, or ``None``: the token is the current holder's and its lease runs."""
    lock = state.locks.get(name)
    if lock is None or lock.token == 0:
        return f"lock {name!r} was never granted"
    if token != lock.token:
        return f"fencing token {token} is stale: lock {name!r} is at token {lock.token}"
    if lock.holder is None:
        return f"the lease of token {token} on {name!r} ended"
    if lock.expires_at <= now:
        return f"the lease of token {token} on {name!r} ran out at {when(lock.expires_at)}"
    return None


# -- locks -------------------------------------------------------------------------------


def _acquire(state: CoordinationState, request: LockRequested, now: int) -> list[Decision]:
    lock = state.locks.get(request.name, Lock())
    if lock.holder is None and not lock.waiters:
        return [_grant(lock, request.name, request.holder, request.ttl_ms, request.request_id, now)]
    if request.wait_ms == 0:
        return [_denied(lock, request, "acquire", _held_reason(lock, request.name))]
    return [
        LockWaiting(
            name=request.name,
            holder=request.holder,
            ttl_ms=request.ttl_ms,
            wait_until=now + request.wait_ms * 1000,
            request_id=request.request_id,
        )
    ]


def _grant(
    lock: Lock, name: str, holder: str, ttl_ms: int, request_id: str, now: int
) -> LockGranted:
    return LockGranted(
        name=name,
        holder=holder,
        fencing_token=lock.token + 1,
        expires_at=now + ttl_ms * 1000,
        request_id=request_id,
    )


def _hand_over(lock: Lock, name: str, now: int, *, after: int | None = None) -> list[Decision]:
    """The lock is free: grant it at ``now`` to the first in line who still waited at
    ``after`` (default ``now``), the time it became free."""
    since = now if after is None else after
    for waiter in lock.waiters:
        if waiter.wait_until > since:
            return [_grant(lock, name, waiter.holder, waiter.ttl_ms, waiter.request_id, now)]
    return []


def _held_reason(lock: Lock, name: str, *, waited: bool = False) -> str:
    prefix = "waited in vain: " if waited else ""
    if lock.holder is None:
        return f"{prefix}lock {name!r} has others in line"
    return f"{prefix}locked by {lock.holder} until {when(lock.expires_at)}"


def _stale(lock: Lock, name: str, holder: str, token: int) -> str | None:
    if lock.holder is None:
        if token <= lock.token and lock.token:
            return f"token {token} is no longer held: lock {name!r} is free"
        return f"lock {name!r} is not held"
    if token != lock.token:
        return (
            f"token {token} is stale: lock {name!r} is held by {lock.holder} "
            f"with token {lock.token} until {when(lock.expires_at)}"
        )
    if holder != lock.holder:
        return f"lock {name!r} (token {token}) is held by {lock.holder}, not {holder}"
    return None


def _action(request: LockRenewRequested | LockReleaseRequested) -> str:
    return "renew" if isinstance(request, LockRenewRequested) else "release"


def _denied(
    lock: Lock,
    request: LockRequested | LockRenewRequested | LockReleaseRequested,
    action: str,
    reason: str,
) -> LockDenied:
    return LockDenied(
        name=request.name,
        holder=request.holder,
        action=action,
        reason=reason,
        request_id=request.request_id,
        held_by=lock.holder,
        held_until=lock.expires_at if lock.holder is not None else None,
    )


def _copy(lock: Lock) -> Lock:
    return Lock(lock.token, lock.holder, lock.expires_at, list(lock.waiters))


def _fold_lock(lock: Lock, event: Decision) -> None:
    request_id = getattr(event, "request_id", None)
    if request_id is not None and any(w.request_id == request_id for w in lock.waiters):
        lock.waiters = [w for w in lock.waiters if w.request_id != request_id]
    match event:
        case LockGranted():
            lock.token, lock.holder, lock.expires_at = (
                event.fencing_token,
                event.holder,
                event.expires_at,
            )
        case LockWaiting():
            lock.waiters.append(
                Waiter(event.holder, event.request_id, event.ttl_ms, event.wait_until)
            )
        case LockRenewed():
            lock.expires_at = event.expires_at
        case LockReleased() | LockExpired():
            if event.fencing_token == lock.token:
                lock.holder, lock.expires_at = None, 0


# -- versioned state ---------------------------------------------------------------------


def _stale_version(
    request: StateUpdateRequested | StateCheckpointRequested | StateRestoreRequested,
    current: int,
    action: str,
) -> StateUpdateRejected:
    reason = f"stale: {request.key!r} is at version {current}, not {request.expected_version}"
    return _rejected(request, current, action, reason)


def _rejected(
    request: StateUpdateRequested | StateCheckpointRequested | StateRestoreRequested,
    current: int,
    action: str,
    reason: str,
) -> StateUpdateRejected:
    return StateUpdateRejected(
        key=request.key,
        action=action,
        expected_version=request.expected_version,
        current_version=current,
        reason=reason,
        request_id=request.request_id,
    )


def _refusal(state: CoordinationState, request: Request, reason: str) -> Decision:
    """The answer to a request refused whatever the state: a denial the client awaits."""
    if isinstance(request, LockRequested | LockRenewRequested | LockReleaseRequested):
        lock = state.locks.get(request.name, Lock())
        action = "acquire" if isinstance(request, LockRequested) else _action(request)
        return _denied(lock, request, action, f"invalid: {reason}")
    entry = state.states.get(request.key, Versioned())
    action = {
        StateUpdateRequested: "update",
        StateCheckpointRequested: "checkpoint",
        StateRestoreRequested: "restore",
    }[type(request)]
    return _rejected(request, entry.version, action, f"invalid: {reason}")


# -- snapshots ---------------------------------------------------------------------------


def to_snapshot(state: CoordinationState) -> dict[str, Any]:
    return {
        "locks": {
            name: [
                lock.token,
                lock.holder,
                lock.expires_at,
                [[w.holder, w.request_id, w.ttl_ms, w.wait_until] for w in lock.waiters],
            ]
            for name, lock in state.locks.items()
        },
        "states": {
            key: [
                entry.version,
                entry.value_json,
                {k: list(v) for k, v in entry.checkpoints.items()},
            ]
            for key, entry in state.states.items()
        },
        "recent": list(state.recent),
    }


def from_snapshot(data: Mapping[str, Any]) -> CoordinationState:
    state = CoordinationState()
    for name, (token, holder, expires_at, waiters) in data["locks"].items():
        state.locks[name] = Lock(
            int(token),
            holder,
            int(expires_at),
            [Waiter(h, r, int(t), int(u)) for h, r, t, u in waiters],
        )
    for key, (version, value, checkpoints) in data["states"].items():
        state.states[key] = Versioned(
            int(version), value, {k: (int(v), s) for k, (v, s) in checkpoints.items()}
        )
    state.recent = OrderedDict.fromkeys(data["recent"])
    state.active = {n for n, lock in state.locks.items() if lock.holder is not None or lock.waiters}
    return state

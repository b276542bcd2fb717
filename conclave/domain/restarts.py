"""Restart budgets: how often a host starts a crashed agent afresh before it gives up.
Pure, stdlib only.

An agent may be restarted ``limit`` times within any ``window_us``; the crash after that
fails it (``agent.failed``) until its host is started again. The rule is the one of
Erlang/OTP supervisors' restart intensity, per agent: a crash now and then is healed by
a restart, a crash loop is stopped and said.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["Failed", "RestartBudget", "Restarted"]


@dataclass(frozen=True, slots=True)
class Restarted:
    restarts: int
    """Restarts within the window, this one included."""


@dataclass(frozen=True, slots=True)
class Failed:
    restarts: int
    """Restarts within the window before this crash: the budget spent."""
    reason: str


@dataclass(slots=True)
class RestartBudget:
    limit: int
    """Restarts allowed within ``window_us``; 0: the first crash fails the agent."""
    window_us: int
    failed: dict[str, str] = field(default_factory=dict)
    """Agents given up on -> why."""
    _restarts: dict[str, deque[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit < 0 or self.window_us <= 0:
            raise ValueError(
                f"a restart budget needs limit >= 0 and a positive window, "
                f"not {self.limit} within {self.window_us} µs"
            )

    def crashed(self, agent_id: str, now_us: int, why: str) -> Restarted | Failed:
        """Agent ``agent_id`` crashed at ``now_us`` (``why``): restart it, or give up on
        it. Only restarts count; an agent given up on stays so."""
        if agent_id in self.failed:
            return Failed(self.limit, self.failed[agent_id])
        recent = self._restarts.setdefault(agent_id, deque())
        while recent and recent[0] <= now_us - self.window_us:
            recent.popleft()
        if len(recent) < self.limit:
            recent.append(now_us)
            return Restarted(len(recent))
        crashes = len(recent) + 1
        times = "once" if crashes == 1 else f"{crashes} times"
        reason = (
            f"crashed {times} within {self.window_us / 1e6:g} s, "
            f"over its restart budget of {self.limit}: {why}"
        )
        self.failed[agent_id] = reason
        del self._restarts[agent_id]
        return Failed(len(recent), reason)

"""A runtime host's resource limits: pure judgements the host applies to what it
measures (psutil) before each beat, and before it starts its agents.

* **Over its limits.** A host whose resident memory or CPU use is over the limit it was
  started with says so in its beats (``HostBeat.over_limit``): the scheduler gives its
  agents no new work, and what they run goes on. It has room again once both are back
  under :data:`ROOM` of their limits, so that a host hovering at its limit does not
  flap between the two with every beat.
* **Spawn check.** A host does not start its agents while the machine's memory is used
  over a threshold: starting more work there is how a machine ends up swapping or
  killed by the OOM killer.
"""

from __future__ import annotations

from dataclasses import dataclass

from conclave.errors import ConclaveError

__all__ = ["ROOM", "HostLimits", "SpawnRefused", "over_limit", "spawn_refusal"]

ROOM = 0.9
"""A host over its limits has room again below this fraction of each."""


class SpawnRefused(ConclaveError):
    """The machine's memory is too full to start a host's agents."""


@dataclass(frozen=True, slots=True)
class HostLimits:
    max_rss_mb: float | None = None
    """The host process's resident memory, at most; ``None``: no limit."""
    max_cpu_percent: float | None = None
    """Its CPU use between two beats, in % of one core (200 = two cores); ``None``: none."""
    spawn_max_memory_percent: float | None = None
    """The machine's memory in use (%) above which the host does not start; ``None``:
    it always starts."""


def over_limit(
    limits: HostLimits, rss_bytes: int, cpu_percent: float, *, was_over: bool
) -> str | None:
    """Why the host should take no new work now, or ``None`` if it has room. A host that
    was over stays over until both measures are under :data:`ROOM` of their limits."""
    share = ROOM if was_over else 1.0
    reasons = [
        reason
        for reason in (
            _judge("memory", rss_bytes / 2**20, "MB", limits.max_rss_mb, share),
            _judge("CPU", cpu_percent, "%", limits.max_cpu_percent, share),
        )
        if reason is not None
    ]
    return "; ".join(reasons) or None


def _judge(what: str, value: float, unit: str, limit: float | None, share: float) -> str | None:
    if limit is None or value <= limit * share:
        return None
    if share < 1:
        return (
            f"{what} {value:.0f} {unit}, not yet under {share:.0%} of its limit of {limit:g} {unit}"
        )
    return f"{what} {value:.0f} {unit}, over its limit of {limit:g} {unit}"


def spawn_refusal(limits: HostLimits, memory_percent: float, agents: int) -> str | None:
    """Why a host must not start ``agents`` agents with the machine's memory
    ``memory_percent`` % used, or ``None``."""
    most = limits.spawn_max_memory_percent
    if most is None or memory_percent <= most:
        return None
    return (
        f"not starting {agents} agent(s): the machine's memory is {memory_percent:.1f} % used,"
        f" over the spawn limit of {most:g} %"
    )

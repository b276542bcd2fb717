"""A runtime host's limits: when it says it takes no new work, and when it has room."""

from __future__ import annotations

from conclave.runtime.limits import HostLimits, over_limit, spawn_refusal

MB = 2**20


def test_no_limits_never_judge_a_host_over() -> None:
    assert over_limit(HostLimits(), 10**12, 10_000.0, was_over=False) is None


def test_a_host_over_a_limit_says_which_and_by_how_much() -> None:
    limits = HostLimits(max_rss_mb=800, max_cpu_percent=150)
    assert over_limit(limits, 800 * MB, 150.0, was_over=False) is None  # at the limit: room
    assert over_limit(limits, 900 * MB, 20.0, was_over=False) == (
        "memory 900 MB, over its limit of 800 MB"
    )
    assert over_limit(limits, 900 * MB, 180.0, was_over=False) == (
        "memory 900 MB, over its limit of 800 MB; CPU 180 %, over its limit of 150 %"
    )


def test_a_host_that_was_over_has_room_again_only_under_90_percent_of_each_limit() -> None:
    limits = HostLimits(max_rss_mb=1000, max_cpu_percent=100)
    # Just under the limit: room for a host that was under, not yet for one that was over.
    assert over_limit(limits, 950 * MB, 50.0, was_over=False) is None
    assert over_limit(limits, 950 * MB, 50.0, was_over=True) == (
        "memory 950 MB, not yet under 90% of its limit of 1000 MB"
    )
    assert over_limit(limits, 899 * MB, 95.0, was_over=True) == (
        "CPU 95 %, not yet under 90% of its limit of 100 %"
    )
    assert over_limit(limits, 899 * MB, 89.0, was_over=True) is None


def test_a_host_does_not_start_while_the_machine_is_used_over_its_spawn_limit() -> None:
    assert spawn_refusal(HostLimits(), 99.9, 72) is None
    limits = HostLimits(spawn_max_memory_percent=90)
    assert spawn_refusal(limits, 90.0, 72) is None
    assert spawn_refusal(limits, 93.14, 72) == (
        "not starting 72 agent(s): the machine's memory is 93.1 % used, over the spawn limit"
        " of 90 %"
    )

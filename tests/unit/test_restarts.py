"""Restart budgets (conclave/domain/restarts.py): a crashed agent is restarted while its
budget allows, then given up on, and says why."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conclave.domain.restarts import Failed, RestartBudget, Restarted

S = 1_000_000


def test_restarts_within_the_budget_then_fails_with_the_reason() -> None:
    budget = RestartBudget(limit=2, window_us=60 * S)
    assert budget.crashed("a", 0, "E: 1") == Restarted(1)
    assert budget.crashed("a", 1 * S, "E: 2") == Restarted(2)
    failed = budget.crashed("a", 2 * S, "E: 3")
    assert failed == Failed(2, "crashed 3 times within 60 s, over its restart budget of 2: E: 3")
    assert budget.failed == {"a": failed.reason}
    # Given up on, it stays so: nothing runs it to crash again, but a report says so.
    assert budget.crashed("a", 500 * S, "E: 4") == failed
    assert budget.crashed("b", 2 * S, "E") == Restarted(1)  # per agent


def test_restarts_older_than_the_window_no_longer_count() -> None:
    budget = RestartBudget(limit=2, window_us=10 * S)
    assert budget.crashed("a", 0, "E") == Restarted(1)
    assert budget.crashed("a", 5 * S, "E") == Restarted(2)
    assert budget.crashed("a", 10 * S, "E") == Restarted(2)  # the first one left the window
    assert budget.crashed("a", 14 * S, "E") == Failed(2, budget.failed["a"])


def test_a_budget_of_zero_fails_at_the_first_crash() -> None:
    budget = RestartBudget(limit=0, window_us=S)
    verdict = budget.crashed("a", 0, "hung")
    assert isinstance(verdict, Failed)
    assert verdict.reason == "crashed once within 1 s, over its restart budget of 0: hung"


@pytest.mark.parametrize(("limit", "window_us"), [(-1, S), (1, 0)])
def test_a_budget_needs_a_limit_and_a_window(limit: int, window_us: int) -> None:
    with pytest.raises(ValueError, match="restart budget needs"):
        RestartBudget(limit=limit, window_us=window_us)


@given(
    limit=st.integers(0, 5),
    gaps=st.lists(st.integers(0, 30 * S), min_size=1, max_size=40),
)
def test_never_more_than_limit_restarts_in_any_window(limit: int, gaps: list[int]) -> None:
    window = 20 * S
    budget = RestartBudget(limit=limit, window_us=window)
    now, restarts = 0, []
    for gap in gaps:
        now += gap
        verdict = budget.crashed("a", now, "E")
        if isinstance(verdict, Failed):
            # Failed only when the window already holds ``limit`` restarts.
            assert sum(1 for t in restarts if t > now - window) == limit
            assert all(isinstance(budget.crashed("a", now + k, "E"), Failed) for k in (0, S))
            return
        restarts.append(now)
        assert verdict.restarts == sum(1 for t in restarts if t > now - window) <= limit

"""The fetch back-off's policy (:class:`conclave.fetching.IdleWait`), with times passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conclave.fetching import IdleWait

MS = 0.001


def _wait() -> IdleWait:
    return IdleWait(idle_s=5 * MS, max_idle_s=100 * MS, hot_s=150 * MS, cold_s=10.0, cold_max_s=0.4)


def _empty_fetches(wait: IdleWait, start: float, until: float) -> list[float]:
    """Answers that come back 1 ms after they were sent, each next fetch after the wait:
    the gaps between fetch starts."""
    gaps, at = [], start
    while at < until:
        rest = wait.after(at, at + MS, heated=False)
        gaps.append(round(MS + rest, 6))
        at += MS + rest
    return gaps


def test_records_that_heat_are_fetched_after_at_once_and_keep_the_short_wait() -> None:
    wait = _wait()
    assert wait.after(0.0, 0.001, heated=True) == 0.0
    gaps = _empty_fetches(wait, 0.001, 0.140)
    assert max(gaps) == 5 * MS


def test_after_the_hot_window_the_wait_doubles_up_to_the_idle_maximum() -> None:
    wait = _wait()
    wait.after(0.0, 0.0, heated=True)
    gaps = _empty_fetches(wait, 0.0, 5.0)
    assert max(gaps) == 100 * MS
    assert 75 <= len(gaps) <= 90  # ~30 hot, 5 doubling, then 10 a second


def test_after_a_long_silence_the_wait_grows_to_the_cold_maximum() -> None:
    wait = _wait()
    wait.after(0.0, 0.0, heated=True)
    gaps = _empty_fetches(wait, 0.0, 30.0)
    first_cold = gaps.index(0.4)
    assert 9.9 < sum(gaps[:first_cold]) < 10.5  # warm (10 a second) for 10 s
    assert set(gaps[first_cold:]) == {0.4}


def test_beats_do_not_heat() -> None:
    """Records on the quiet topics are handed over but keep the fetcher backing off."""
    wait = _wait()
    wait.after(0.0, 0.0, heated=True)
    _empty_fetches(wait, 0.0, 1.0)
    assert wait.wait == 100 * MS
    # a beat arrives: no hot window, the next fetch still waits its turn
    assert wait.after(1.0, 1.001, heated=False) > 90 * MS
    assert wait.wait == 100 * MS


def test_a_fresh_fetcher_is_warm_not_cold() -> None:
    """The cold tier counts from the first fetch, so a process just started answers its
    first record within the idle maximum."""
    wait = _wait()
    gaps = _empty_fetches(wait, 1_000.0, 1_009.0)
    assert max(gaps) == 100 * MS


@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 0.05), st.booleans()), max_size=200))
def test_the_wait_stays_between_the_short_wait_and_the_cold_maximum(
    steps: list[tuple[float, float, bool]],
) -> None:
    wait, at = _wait(), 0.0
    for pause, took, heated in steps:
        at += pause
        rest = wait.after(at, at + took, heated=heated)
        assert 0.0 <= rest <= 0.4
        assert 5 * MS <= wait.wait <= 0.4
        if heated:
            assert rest == 0.0
        at += took + rest

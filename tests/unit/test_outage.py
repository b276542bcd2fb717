"""One log line when an outage starts and one when it ends, however many components of
the process notice it (conclave/outage.py)."""

from __future__ import annotations

import logging
import secrets

import pytest

from conclave.outage import Backoff, Outage

log = logging.getLogger("tests.outage")


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


@pytest.fixture
def what() -> str:
    return f"Kafka at test-{secrets.token_hex(3)}"  # the registry is process-wide


def test_many_components_one_outage_two_lines(caplog: pytest.LogCaptureFixture, what: str) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.outage")
    scheduler, witness = Outage(log, "scheduler-0", what), Outage(log, "witness-0", what)
    scheduler.failed("refused")
    witness.failed("refused")
    scheduler.failed("refused again")
    assert _lines(caplog, logging.WARNING) == [
        f"scheduler-0: {what} unavailable (refused); retrying"
    ]
    scheduler.recovered()
    assert _lines(caplog, logging.INFO) == []  # the witness still cannot reach it
    witness.recovered()
    (back,) = _lines(caplog, logging.INFO)
    assert back.startswith(f"witness-0: {what} back after ")


def test_a_failure_right_after_an_outage_is_part_of_it(
    caplog: pytest.LogCaptureFixture, what: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.outage")
    worker, shard = Outage(log, "w1", what), Outage(log, "scheduler-0", what)
    worker.failed("no acknowledgement")
    worker.recovered()
    shard.failed("a transaction begun during the outage timed out")
    shard.recovered()
    assert len(_lines(caplog, logging.WARNING)) == 1
    assert len(_lines(caplog, logging.INFO)) == 1
    assert len(_lines(caplog, logging.DEBUG)) == 2


def test_a_component_that_stops_while_failing_does_not_hold_the_outage_open(
    caplog: pytest.LogCaptureFixture, what: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.outage")
    gone, staying = Outage(log, "gone", what), Outage(log, "staying", what)
    gone.failed("x")
    staying.failed("x")
    gone.forget()
    staying.recovered()
    assert len(_lines(caplog, logging.INFO)) == 1
    assert not gone.ongoing


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(first=0.1, cap=1.0)
    delays = [backoff.delay() for _ in range(6)]
    for delay, nominal in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0], strict=True):
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    backoff.reset()
    assert backoff.delay() <= 0.12

"""Fixtures of the unit tests that need an external tool (no broker, no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.promtool import PromtoolUnavailable, promtool


@pytest.fixture(scope="session")
def promtool_binary() -> Path:
    """Prometheus' promtool (fetched on first use, see tests/promtool.py).

    A failure, not a skip, when it cannot be had: rules and dashboard queries that
    were never checked are not known to work.
    """
    try:
        return promtool()
    except PromtoolUnavailable as exc:
        reason = str(exc)
    pytest.fail(reason, pytrace=False)

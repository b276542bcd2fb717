"""Session fixtures shared by the whole suite.

``stack`` starts a fresh embedded broker and PostgreSQL for the test session, on free
ports, only when a test asks for it: unit tests never start anything.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from conclave.devstack import EmbeddedStack, StackInfo
from conclave.settings import Settings


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    """A fresh embedded stack for this session, torn down at its end.

    Its home is a ``tempfile`` directory rather than ``tmp_path_factory``'s: under
    root, PostgreSQL runs as another user that must traverse the path to its data,
    and every new pytest session (from anyone on the machine) resets
    ``/tmp/pytest-of-<user>`` to mode 0700, which would lock out a running server
    and its ``pg_ctl stop``.
    """
    home = Path(tempfile.mkdtemp(prefix="conclave-test-"))
    embedded = EmbeddedStack(home)
    info = embedded.up(kafka_port=0, pg_port=0)
    try:
        yield info
    finally:
        embedded.down()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack: StackInfo) -> Settings:
    """Settings pointing at the session's stack, with a topic prefix of its own."""
    return Settings.from_env(
        {
            **stack.env(),
            "CONCLAVE_TOPIC_PREFIX": f"t{secrets.token_hex(4)}",
            # Checkpoints signed within a second of the log growing: tests wait less.
            "CONCLAVE_CHECKPOINT_INTERVAL_S": "1",
            # The worker shares this process with the tests: on a loaded machine its
            # scheduler may read a live host's beats late and judge it lost (its running
            # attempts then stall). Tests of losing hosts set a lease of their own.
            "CONCLAVE_HOST_LEASE_S": "15",
        }
    )


# Property tests check behaviour, not speed: on a shared 2-core machine (integration
# tests' background threads, CI neighbours) hypothesis' default 200 ms deadline flakes.
hypothesis_settings.register_profile("conclave", deadline=None)
hypothesis_settings.load_profile("conclave")

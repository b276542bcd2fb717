"""The main job: ``conclave demo`` with 72 agents, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conclave.settings import Settings
from conclave.topics import Topics

pytestmark = pytest.mark.integration


def test_demo_72_agents_all_answer_and_chain_verifies(settings: Settings) -> None:
    # A topic prefix of its own: the demo starts its own processors (their own faust group).
    env = {
        **os.environ,
        "CONCLAVE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CONCLAVE_DATABASE_URL": settings.database_url,
        "CONCLAVE_TOPIC_PREFIX": f"{settings.topic_prefix}demo",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "conclave.cli",
            "demo",
            "--agents",
            "72",
            "--latency-ms",
            "50",
            "--failure-rate",
            "0.2",
            "--seed",
            "7",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["agents"] == 72
    assert report["completed"] + report["failed"] == 72
    # Agent ids carry a per-run suffix, so which agents fail varies by run; at 20 % the
    # chance that none (0.8**72, ~1e-7) or all (0.2**72) of 72 fail is negligible.
    assert report["completed"] > 0
    assert report["failed"] == len(report["failures"]) > 0
    assert all(
        f["error"] == "SimulatedFailure" and f["agent"] in f["message"] for f in report["failures"]
    )
    assert report["chain_ok"] is True
    assert report["chain_entries"] == 72
    assert len(report["witness_head"]) == 64
    latency = report["agent_latency_ms"]
    assert report["slowest_agent_ms"] == latency["max"] >= latency["p99"] >= latency["p50"] > 0
    assert report["end_to_end_ms"] >= report["slowest_agent_ms"]
    assert report["peak_rss_mb"]["total"] > 0


def test_topics_create_and_db_migrate_are_idempotent(settings: Settings) -> None:
    env = {
        **os.environ,
        "CONCLAVE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CONCLAVE_DATABASE_URL": settings.database_url,
        "CONCLAVE_TOPIC_PREFIX": f"{settings.topic_prefix}idem",
    }

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "conclave.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    declared = len(Topics().specs())
    assert f"created {declared} topic(s)" in run("topics", "create")
    assert "created 0 topic(s)" in run("topics", "create")
    run("db", "migrate")
    assert "applied 0 migration(s)" in run("db", "migrate")

"""``conclave tokens create|list|revoke`` and ``conclave api`` as an operator runs them:
separate processes against the session's stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conclave.devstack import StackInfo
from conclave.settings import Settings

pytestmark = pytest.mark.integration


def _conclave(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conclave.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def env(stack: StackInfo, settings: Settings) -> dict[str, str]:
    return {**os.environ, **stack.env(), "CONCLAVE_TOPIC_PREFIX": settings.topic_prefix}


def test_tokens_and_the_api_from_the_shell(env: dict[str, str]) -> None:
    created = _conclave(env, "tokens", "create", "--tenant", "shell-tenant", "--name", "ci")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    token_id = token.split("_")[1]
    listed = _conclave(env, "tokens", "list", "--json")
    assert token_id in listed.stdout
    assert token.split("_")[2] not in listed.stdout  # never the secret
    refused = _conclave(env, "tokens", "revoke", "nope")
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0  # one line
    assert "no token 'nope'" in refused.stderr

    api = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "api", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert api.stderr is not None
        lines = []
        match = None
        while match is None and len(lines) < 20:  # log lines (metrics) come first
            lines.append(api.stderr.readline())
            match = re.search(r"API serving on http://127\.0\.0\.1:(\d+)", lines[-1])
        assert match, lines
        base = f"http://127.0.0.1:{match[1]}"
        assert api.stderr.readline().strip() == f"dashboard: {base}/dashboard (asks for a token)"
        assert httpx.get(f"{base}/dashboard").headers["content-type"].startswith("text/html")
        with httpx.Client(base_url=base) as http:  # one connection, requests one by one
            times = []
            for _ in range(21):
                started = time.perf_counter()
                http.get("/dashboard/dashboard.css").raise_for_status()
                times.append(time.perf_counter() - started)
        # Nagle's algorithm against delayed ACKs would make each ~40 ms (TCP_NODELAY)
        assert sorted(times)[10] < 0.025, times
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/v1/status", headers=headers).status_code == 200
        assert httpx.get(f"{base}/v1/status").status_code == 401
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "Conclave"
        assert _conclave(env, "tokens", "revoke", token_id).returncode == 0
        assert httpx.get(f"{base}/v1/status", headers=headers).status_code == 401
        api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=20) == 0
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()
        if api.stderr is not None:
            api.stderr.close()


def test_a_port_in_use_is_one_line_and_a_non_zero_exit(env: dict[str, str]) -> None:
    taken = subprocess.Popen(
        [sys.executable, "-c", "import socket,time;s=socket.create_server(('127.0.0.1',0));"
         "print(s.getsockname()[1],flush=True);time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert taken.stdout is not None
        port = taken.stdout.readline().strip()
        started = time.monotonic()
        busy = _conclave(env, "api", "--port", port)
        assert busy.returncode != 0
        assert f"cannot serve the API on 127.0.0.1:{port}" in busy.stderr
        assert busy.stderr.strip().count("\n") == 0
        assert time.monotonic() - started < 30
    finally:
        taken.kill()
        taken.wait()
        if taken.stdout is not None:
            taken.stdout.close()

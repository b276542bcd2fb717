"""The dashboard in headless Chromium (Debian's ``chromium``, driven by playwright),
against the API under uvicorn on the real broker, PostgreSQL and processors.

The page opens with a fresh tenant's token (nothing to show yet), the tenant submits
work through the client SDK, and the tasks and their completion must appear on the page
from the live stream, without a reload; another tenant's task, finished meanwhile in the
same pool, never does.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import Browser, Page, async_playwright, expect

from conclave.api import create_app
from conclave.api.tokens import create_token
from conclave.client import Client
from conclave.settings import Settings
from tests.integration.conftest import RunningProjector, System, eventually
from tests.integration.test_api import _serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_PRESENT = CHROMIUM.exists()

pytestmark = pytest.mark.integration

LIVE_WITHIN_MS = 5_000
"""A submitted task's row, and then its completion, must show within this (the stream
polls every 0.1 s here; an agent answers in ~5 ms)."""


@pytest.fixture(scope="module")
async def app(
    settings: Settings, db: asyncpg.Pool, projector: RunningProjector
) -> AsyncIterator[FastAPI]:
    api = create_app(settings, events_poll_s=0.1)
    async with api.router.lifespan_context(api):
        yield api


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM_PRESENT:  # a failure, not a skip: CI (.ci/run) installs it
        pytest.fail(f"no {CHROMIUM}: apt-get install chromium")
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        await chromium.close()


@pytest.fixture
async def base(app: FastAPI) -> AsyncIterator[str]:
    async with _serving(app) as url:
        yield url


@pytest.fixture
async def page(browser: Browser, base: str) -> AsyncIterator[Page]:
    """A tab of its own; closed before the server stops (which waits for its stream)."""
    context = await browser.new_context()
    tab = await context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    await context.close()
    assert errors == []


async def _open(page: Page, url: str) -> None:
    await page.goto(url)
    await page.wait_for_selector("#live.on", timeout=10_000)  # snapshot loaded, streaming


def _row(table: str, task_id: str, status: str | None = None) -> str:
    selector = f"#{table} tr[data-task-id={json.dumps(task_id)}]"
    return selector + (f"[data-status={json.dumps(status)}]" if status else "")


async def test_submitted_work_appears_live_and_only_for_its_tenant(
    page: Page, base: str, db: asyncpg.Pool, system: System
) -> None:
    alice, bob = f"tenant-{secrets.token_hex(3)}", f"tenant-{secrets.token_hex(3)}"
    _, token = await create_token(db, alice, name="dashboard test")
    _, bob_token = await create_token(db, bob, name="dashboard test")
    await _open(page, f"{base}/dashboard#token={token}")
    # the token went into sessionStorage and out of the address bar (and was never sent
    # in a URL: a fragment stays in the browser)
    assert "token" not in page.url
    assert await page.evaluate("sessionStorage.getItem('conclave.token')") == token
    assert await page.locator("#tasks tbody tr").count() == 0  # a fresh tenant: nothing yet
    await page.evaluate("window.notReloaded = true")

    settings = dataclasses.replace(system.settings, tenant=alice)
    async with (
        system.running(2),
        Client(settings, producer_name="test") as client,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        theirs = await http.post(
            "/v1/tasks",
            json={"input": "bob's", "pool": system.pool},
            headers={"Authorization": f"Bearer {bob_token}"},
        )
        assert theirs.status_code == 202
        ids = [await client.submit(f"question {i}", pool=system.pool) for i in range(3)]
        for task_id in ids:
            await page.wait_for_selector(_row("tasks", task_id), timeout=LIVE_WITHIN_MS)
        for task_id in ids:
            await page.wait_for_selector(
                _row("tasks", task_id, "completed"), timeout=LIVE_WITHIN_MS
            )

        async def bob_done() -> bool:
            answer = await http.get(
                f"/v1/tasks/{theirs.json()['task_id']}",
                headers={"Authorization": f"Bearer {bob_token}"},
            )
            return bool(answer.json()["status"] == "completed")

        await eventually(bob_done)
        # pools, agents and the witness head follow the stream too
        pool_row = page.locator(f"#pools tr[data-pool={json.dumps(system.pool)}]")
        await pool_row.wait_for(timeout=LIVE_WITHIN_MS)
        # alice's three, not bob's: the pool is shared, its counts per tenant
        completed = pool_row.locator("td").nth(10)
        await expect(completed).to_have_text("3", timeout=LIVE_WITHIN_MS)
        await page.wait_for_selector(
            f"#agents tr[data-agent-id^={json.dumps(system.pool)}]", timeout=LIVE_WITHIN_MS
        )
        head = await page.text_content("#witness-head")
        assert head is not None
        assert int(head.removeprefix("#")) > 0
        assert len(await page.text_content("#witness-hash") or "") == 16

    assert await page.evaluate("window.notReloaded") is True
    content = await page.content()
    assert theirs.json()["task_id"] not in content  # bob's task: not on alice's page
    assert "bob's" not in content
    assert await page.locator("#tasks tbody tr").count() == 3


async def test_a_refused_token_asks_for_another(page: Page, base: str) -> None:
    await page.goto(f"{base}/dashboard#token=not-a-token")
    await page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    assert "401" in (await page.text_content("#login-error") or "")
    assert await page.evaluate("sessionStorage.getItem('conclave.token')") is None


async def test_the_files_are_served_with_a_strict_policy(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        for path, kind in [
            ("/dashboard", "text/html"),
            ("/dashboard/dashboard.js", "text/javascript"),
            ("/dashboard/dashboard.css", "text/css"),
        ]:
            answer = await http.get(path)  # no token: the files hold no data
            assert answer.status_code == 200, path
            assert answer.headers["content-type"].startswith(kind)
            assert "script-src 'self'" in answer.headers["content-security-policy"]
        missing = await http.get("/dashboard/secrets.txt")
        assert missing.status_code == 404
        assert missing.json()["detail"]
        assert "/dashboard" not in app.openapi()["paths"]

"""The HTTP API against the running system: real broker, PostgreSQL, processors.

Two tenants with a token each: every endpoint answers one tenant's requests with its own
data only, and another tenant's task or deliberation is a 404 as if it did not exist.
The app runs in the test's event loop (httpx's ASGI transport; its lifespan entered by
hand), and under uvicorn on a free port for the event stream, which the ASGI transport
would buffer whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from conclave.api import create_app
from conclave.api.tokens import create_token, revoke_token
from conclave.runtime.agents import AgentContext, PermanentFailure
from conclave.settings import Settings
from tests.integration.conftest import RunningProjector, System, eventually, has_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def app(
    settings: Settings, db: asyncpg.Pool, projector: RunningProjector
) -> AsyncIterator[FastAPI]:
    api = create_app(settings, events_poll_s=0.1)
    async with api.router.lifespan_context(api):
        yield api


@dataclass(frozen=True)
class Tenant:
    name: str
    token: str
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def _tenant(app: FastAPI, db: asyncpg.Pool, admin: bool = False) -> AsyncIterator[Tenant]:
    name = f"tenant-{secrets.token_hex(3)}"
    _, token = await create_token(db, name, name="test", admin=admin)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=headers) as c:
        yield Tenant(name, token, c)


@pytest.fixture
async def alice(app: FastAPI, db: asyncpg.Pool) -> AsyncIterator[Tenant]:
    async with _tenant(app, db) as tenant:
        yield tenant


@pytest.fixture
async def bob(app: FastAPI, db: asyncpg.Pool) -> AsyncIterator[Tenant]:
    async with _tenant(app, db) as tenant:
        yield tenant


async def _visible(http: httpx.AsyncClient, task_id: str, status: str = "completed") -> bool:
    answer = await http.get(f"/v1/tasks/{task_id}")
    return answer.status_code == 200 and answer.json()["status"] == status


async def test_no_token_no_data(app: FastAPI, db: asyncpg.Pool) -> None:
    _, token = await create_token(db, "tenant-revoked")
    token_id = token.split("_")[1]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        for method, path in [("GET", "/v1/tasks"), ("GET", "/v1/status"), ("POST", "/v1/tasks")]:
            for headers in (
                {},
                {"Authorization": "Bearer nonsense"},
                {"Authorization": f"Bearer {token}x"},
                {"Authorization": f"Basic {token}"},
            ):
                answer = await c.request(method, path, headers=headers, json={"input": "x"})
                assert answer.status_code == 401, (method, path, headers)
                assert answer.json()["detail"]
        assert (await c.get("/v1/tasks", headers={"Authorization": f"Bearer {token}"})).is_success
        await revoke_token(db, token_id)
        answer = await c.get("/v1/tasks", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401


async def test_a_tenant_sees_and_touches_only_its_own_tasks(
    system: System, alice: Tenant, bob: Tenant
) -> None:
    async with system.running(2):
        ids = []
        for i in range(3):
            answer = await alice.http.post(
                "/v1/tasks", json={"input": f"question {i}", "pool": system.pool}
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["task_id"])
        for task_id in ids:
            await eventually(lambda t=task_id: _visible(alice.http, t))

    task = (await alice.http.get(f"/v1/tasks/{ids[0]}")).json()
    assert task["tenant"] == alice.name
    assert task["output"]["witness_sequence"] > 0
    # bob: not found, as if it did not exist; in no listing; not cancellable or redrivable
    for path in (f"/v1/tasks/{ids[0]}", "/v1/tasks/no-such-task"):
        answer = await bob.http.get(path)
        assert answer.status_code == 404
        assert "no task" in answer.json()["detail"]
    assert (await bob.http.post(f"/v1/tasks/{ids[0]}/cancel", json={})).status_code == 404
    assert (await bob.http.post(f"/v1/tasks/{ids[0]}/redrive")).status_code == 404
    # alice's own: a completed task is no dead letter
    assert (await alice.http.post(f"/v1/tasks/{ids[0]}/redrive")).status_code == 409
    assert (await bob.http.get("/v1/tasks", params={"pool": system.pool})).json() == {
        "tasks": [],
        "next_cursor": None,
    }
    bob_pools = {p["pool"]: p for p in (await bob.http.get("/v1/pools")).json()}
    assert bob_pools[system.pool]["completed"] == 0  # the pool is shared, the tasks are not
    alice_pools = {p["pool"]: p for p in (await alice.http.get("/v1/pools")).json()}
    assert alice_pools[system.pool]["completed"] == 3
    # a dependency on another tenant's task is no dependency
    answer = await bob.http.post("/v1/tasks", json={"input": "x", "depends_on": [ids[0]]})
    assert answer.status_code == 400
    assert "no task" in answer.json()["detail"]

    # alice pages through hers, newest first, two at a time
    first = (await alice.http.get("/v1/tasks", params={"pool": system.pool, "limit": 2})).json()
    assert len(first["tasks"]) == 2
    assert first["next_cursor"] is not None
    second = (
        await alice.http.get(
            "/v1/tasks", params={"pool": system.pool, "limit": 2, "cursor": first["next_cursor"]}
        )
    ).json()
    assert second["next_cursor"] is None
    listed = [t["task_id"] for t in first["tasks"] + second["tasks"]]
    assert sorted(listed) == sorted(ids)
    completed = await alice.http.get(
        "/v1/tasks",
        params={"pool": system.pool, "status": "completed", "since": "2000-01-01T00:00:00Z"},
    )
    assert len(completed.json()["tasks"]) == 3
    none = await alice.http.get("/v1/tasks", params={"pool": system.pool, "until": "2000-01-01"})
    assert none.json()["tasks"] == []


async def test_deliberations_agents_and_status_per_tenant(
    system: System, alice: Tenant, bob: Tenant
) -> None:
    async with system.running(3):
        answer = await alice.http.post(
            "/v1/deliberations", json={"motion": "Adjourn?", "pool": system.pool}
        )
        assert answer.status_code == 202, answer.text
        deliberation_id = answer.json()["deliberation_id"]

        async def revealed() -> bool:
            view = await alice.http.get(f"/v1/deliberations/{deliberation_id}")
            return view.status_code == 200 and view.json()["revealed"]

        await eventually(revealed)
        agents = await bob.http.get("/v1/agents", params={"pool": system.pool})
        assert len(agents.json()) == 3
        agent_id = agents.json()[0]["agent_id"]
    view = (await alice.http.get(f"/v1/deliberations/{deliberation_id}")).json()
    assert len(view["answers"]) == 3
    assert (await bob.http.get(f"/v1/deliberations/{deliberation_id}")).status_code == 404
    cancel = await bob.http.post(f"/v1/deliberations/{deliberation_id}/cancel", json={})
    assert cancel.status_code == 404
    # a deliberation's task id has a '/' in it
    agent_task = f"{deliberation_id}/{next(iter(view['statuses']))}"
    assert (await alice.http.get(f"/v1/tasks/{agent_task}")).json()["status"] == "completed"
    assert (await bob.http.get(f"/v1/tasks/{agent_task}")).status_code == 404
    # An agent's history: the same changes for both, the task and why only for its tenant.
    mine = (await alice.http.get(f"/v1/agents/{agent_id}/history")).json()
    theirs = (await bob.http.get(f"/v1/agents/{agent_id}/history")).json()
    assert [c["state"] for c in mine] == [c["state"] for c in theirs]
    assert [c["state"] for c in mine][-2:] == ["busy", "idle"]
    assert mine[-1]["task_id"] == f"{deliberation_id}/{agent_id}"
    assert mine[-1]["reason"] == f"answered {deliberation_id}/{agent_id}"
    assert (theirs[-1]["task_id"], theirs[-1]["reason"]) == (None, "another tenant's task")
    assert theirs[0]["state"] == "registered"
    assert theirs[0]["reason"].startswith("on host ")  # no task: nothing to keep from bob
    assert (await bob.http.get(f"/v1/agents/{system.pool}-x/history")).status_code == 404
    status = (await alice.http.get("/v1/status")).json()
    assert status["witness_head"] > 0
    head_hash = await system.db.fetchval(
        "SELECT entry_hash FROM witness_entries WHERE sequence = $1", status["witness_head"]
    )
    assert status["witness_head_hash"] == bytes(head_hash).hex()
    hosts = (await alice.http.get("/v1/hosts")).json()
    assert hosts


async def _fail(ctx: AgentContext) -> str:
    raise PermanentFailure("no")


async def test_redrive_and_dead_letters_per_tenant(
    system: System, alice: Tenant, bob: Tenant
) -> None:
    async with system.running(1, agent=_fail):
        answer = await alice.http.post("/v1/tasks", json={"input": "x", "pool": system.pool})
        task_id = answer.json()["task_id"]
        await eventually(lambda: _visible(alice.http, task_id, "dead_lettered"))
        assert (await alice.http.get("/v1/status")).json()["dead_lettered_last_hour"] >= 1
        assert (await bob.http.get("/v1/status")).json()["dead_lettered_last_hour"] == 0
        again = await alice.http.post(f"/v1/tasks/{task_id}/redrive", json={"max_attempts": 1})
        assert again.status_code == 202, again.text
        assert again.json()["task_id"] == f"{task_id}~1"
        await eventually(lambda: _visible(alice.http, f"{task_id}~1", "dead_lettered"))
    redriven = (await alice.http.get(f"/v1/tasks/{task_id}~1")).json()
    assert redriven["redrive_of"] == task_id
    assert redriven["tenant"] == alice.name


async def test_cancel_a_waiting_task(system: System, alice: Tenant) -> None:
    answer = await alice.http.post(
        "/v1/tasks", json={"input": "x", "pool": system.pool, "start_within_ms": 60_000}
    )
    task_id = answer.json()["task_id"]  # no agent in the pool: it stays queued
    await eventually(lambda: _visible(alice.http, task_id, "queued"))
    cancel = await alice.http.post(f"/v1/tasks/{task_id}/cancel", json={"reason": "changed mind"})
    assert cancel.status_code == 202
    await eventually(lambda: has_status(system.db, task_id, "cancelled"))


async def test_bad_requests_are_4xx_with_a_message(app: FastAPI, alice: Tenant) -> None:
    http = alice.http
    as_json = {"content-type": "application/json"}
    bad_json = {"content": b"{not json", "headers": as_json}
    surrogate = {"content": b'{"input": "\\ud800"}', "headers": as_json}
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", "/v1/tasks?limit=0", {}, 422),
        ("GET", "/v1/tasks?limit=x", {}, 422),
        ("GET", "/v1/tasks?status=bogus", {}, 422),
        ("GET", "/v1/tasks?since=yesterday", {}, 422),
        ("GET", "/v1/tasks?cursor=not-a-cursor", {}, 400),
        ("GET", "/v1/tasks?pool=a%00b", {}, 400),
        ("GET", "/v1/tasks/a%00b", {}, 404),
        ("GET", "/v1/agents?state=sleepy", {}, 422),
        ("GET", "/v1/nothing-here", {}, 404),
        ("DELETE", "/v1/tasks", {}, 405),
        ("POST", "/v1/tasks", bad_json, 422),
        ("POST", "/v1/tasks", {"json": {}}, 422),
        ("POST", "/v1/tasks", {"json": {"input": "x", "colour": "red"}}, 422),
        ("POST", "/v1/tasks", {"json": {"input": "x", "priority": "urgent"}}, 422),
        ("POST", "/v1/tasks", {"json": {"input": "x", "max_attempts": 2**64}}, 422),
        ("POST", "/v1/tasks", {"json": {"input": "x", "task_id": "a/b"}}, 400),
        ("POST", "/v1/tasks", {"json": {"input": "x", "retry": {"jitter": 2}}}, 400),
        ("POST", "/v1/tasks", surrogate, 422),
        ("POST", "/v1/deliberations", {"json": {"motion": "x" * 950_000}}, 400),
        ("POST", "/v1/tasks", {"json": {"input": "x" * (1024 * 1024)}}, 413),
        ("POST", "/v1/halt", {"json": {"reason": "r"}}, 403),
        ("POST", "/v1/resume", {"json": {"reason": "r"}}, 403),
    ]  # fmt: skip
    for method, path, options, expected in cases:
        answer = await http.request(method, path, **options)
        assert answer.status_code == expected, (method, path, answer.text[:300])
        assert answer.json()["detail"], (method, path)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 100_000

    streamed = await http.post("/v1/tasks", content=chunks())  # no Content-Length
    assert streamed.status_code == 413


async def test_halt_and_resume_with_an_admin_token(
    app: FastAPI, db: asyncpg.Pool, alice: Tenant
) -> None:
    async with _tenant(app, db, admin=True) as admin:
        assert (await admin.http.post("/v1/halt", json={"reason": "api test"})).status_code == 202

        async def halted() -> bool:
            return (await alice.http.get("/v1/status")).json()["halt_reason"] == "api test"

        await eventually(halted)
        assert (await admin.http.post("/v1/resume", json={"reason": "go"})).status_code == 202

        async def resumed() -> bool:
            return (await alice.http.get("/v1/status")).json()["halt_reason"] is None

        await eventually(resumed)


# --- the event stream, under uvicorn ---------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process keeps its own
        yield


@contextlib.asynccontextmanager
async def _serving(app: FastAPI) -> AsyncIterator[str]:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    running = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: _true(server.started))
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await running
        sock.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_submitted_tasks_changes_stream_to_its_tenant_only(
    app: FastAPI, system: System, alice: Tenant, bob: Tenant
) -> None:
    async with _serving(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        seen: dict[str, list[dict[str, Any]]] = {alice.name: [], bob.name: []}
        connected = {alice.name: asyncio.Event(), bob.name: asyncio.Event()}
        arrived: dict[str, float] = {}

        async def listen(tenant: Tenant) -> None:
            headers = {"Authorization": f"Bearer {tenant.token}"}
            async with http.stream("GET", "/v1/events", headers=headers) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith(": connected"):
                        connected[tenant.name].set()
                    elif line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: ") and kind == "task":
                        event = json.loads(line.removeprefix("data: "))
                        seen[tenant.name].append(event)
                        arrived.setdefault(event["status"], time.monotonic())
                        if event["status"] == "completed":
                            return

        listeners = [asyncio.create_task(listen(t)) for t in (alice, bob)]
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(*(e.wait() for e in connected.values()))
            async with system.running(1):
                sent = time.monotonic()
                answer = await alice.http.post(
                    "/v1/tasks", json={"input": "stream me", "pool": system.pool}
                )
                task_id = answer.json()["task_id"]
                async with asyncio.timeout(30):
                    await listeners[0]
        finally:
            for listener in listeners:
                listener.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
    statuses = [e["status"] for e in seen[alice.name] if e["task_id"] == task_id]
    assert statuses[-1] == "completed"
    assert min(arrived.values()) - sent < 2.0, arrived  # its first change within 2 s
    assert seen[bob.name] == []  # nothing of alice's reaches bob


async def test_idempotency_keys_fairness_fields_and_taken_ids_over_http(
    system: System, alice: Tenant, bob: Tenant
) -> None:
    body = {"input": "charge", "pool": system.pool, "idempotency_key": "order-7"}
    async with system.running(2):
        first = await alice.http.post("/v1/tasks", json=body)
        again = await alice.http.post("/v1/tasks", json=body)
        theirs = await bob.http.post("/v1/tasks", json=body)
        assert first.status_code == again.status_code == theirs.status_code == 202, first.text
        task_id = first.json()["task_id"]
        assert again.json()["task_id"] == task_id != theirs.json()["task_id"]
        limited = await alice.http.post(
            "/v1/tasks",
            json={"input": "x", "pool": system.pool, "fairness_key": "c1", "key_limit": 1},
        )
        assert limited.status_code == 202, limited.text
        for accepted in (task_id, theirs.json()["task_id"], limited.json()["task_id"]):
            owner = bob if accepted == theirs.json()["task_id"] else alice
            await eventually(lambda t=accepted, o=owner: _visible(o.http, t))
    # A task id another tenant used is taken: refused, not silently dropped.
    taken = await bob.http.post("/v1/tasks", json={"input": "x", "task_id": task_id})
    assert taken.status_code == 409
    assert "taken" in taken.json()["detail"]
    for bad in (
        {"key_limit": 0},
        {"fairness_key": "a/b"},
        {"task_id": "t", "idempotency_key": "k"},
    ):
        answer = await alice.http.post("/v1/tasks", json={"input": "x", **bad})
        assert answer.status_code in (400, 422), (bad, answer.text)
        assert answer.json()["detail"]


async def test_workflows_over_http_per_tenant(system: System, alice: Tenant, bob: Tenant) -> None:
    pool = system.pool
    definition = {
        "name": "draft and review",
        "steps": [
            {"name": "draft", "pool": pool, "input": "draft:{{ input.topic }}"},
            {"name": "review", "pool": pool, "input": "review:{{ steps.draft.output }}"},
        ],
    }
    body = {"definition": definition, "input": {"topic": "tides"}}
    async with system.running(2):
        answer = await alice.http.post("/v1/workflows", json=body)
        assert answer.status_code == 202, answer.text
        workflow_id = answer.json()["workflow_id"]

        async def ended() -> dict[str, Any] | None:
            got = await alice.http.get(f"/v1/workflows/{workflow_id}")
            shown: dict[str, Any] = got.json()
            return shown if got.status_code == 200 and shown["status"] != "running" else None

        shown = await eventually(ended)
    assert (shown["status"], shown["tenant"], shown["name"]) == (
        "completed",
        alice.name,
        "draft and review",
    )
    steps = {s["step"]: s for s in shown["steps"]}
    assert steps["draft"]["input"] == "draft:tides"
    assert steps["review"]["input"] == f"review:{steps['draft']['output']}"
    assert [s["status"] for s in shown["steps"]] == ["completed", "completed"]
    listed = (await alice.http.get("/v1/workflows", params={"status": "completed"})).json()
    assert workflow_id in [w["workflow_id"] for w in listed]
    # bob: not found, in no listing, not cancellable, its id not reusable
    assert (await bob.http.get(f"/v1/workflows/{workflow_id}")).status_code == 404
    assert workflow_id not in [
        w["workflow_id"] for w in (await bob.http.get("/v1/workflows")).json()
    ]
    assert (await bob.http.post(f"/v1/workflows/{workflow_id}/cancel")).status_code == 404
    taken = await bob.http.post("/v1/workflows", json={**body, "workflow_id": workflow_id})
    assert taken.status_code == 409
    # Refused before anything is sent: a cycle, a reference to no step, a bad id
    for bad, says in (
        (
            {"steps": [{"name": "a", "depends_on": ["b"]}, {"name": "b", "depends_on": ["a"]}]},
            "cycle",
        ),
        ({"steps": [{"name": "a", "input": "{{ steps.x.output }}"}]}, "x"),
    ):
        answer = await alice.http.post("/v1/workflows", json={"definition": bad})
        assert answer.status_code == 400, answer.text
        assert says in answer.json()["detail"]
    answer = await alice.http.post(
        "/v1/workflows", json={"definition": definition, "workflow_id": "a.b"}
    )
    assert answer.status_code == 422
    assert (await alice.http.get("/v1/workflows", params={"status": "nonsense"})).status_code == 422


async def test_a_running_workflow_is_cancelled_over_http(system: System, alice: Tenant) -> None:
    definition = {"steps": [{"name": "only", "pool": system.pool, "input": "wait"}]}
    answer = await alice.http.post("/v1/workflows", json={"definition": definition})
    workflow_id = answer.json()["workflow_id"]
    await eventually(lambda: _workflow_is(alice.http, workflow_id, "running"))
    cancelled = await alice.http.post(
        f"/v1/workflows/{workflow_id}/cancel", json={"reason": "not needed"}
    )
    assert cancelled.status_code == 202, cancelled.text
    await eventually(lambda: _workflow_is(alice.http, workflow_id, "cancelled"))
    shown = (await alice.http.get(f"/v1/workflows/{workflow_id}")).json()
    assert shown["reason"] == "cancelled: not needed"


async def _workflow_is(http: httpx.AsyncClient, workflow_id: str, status: str) -> bool:
    answer = await http.get(f"/v1/workflows/{workflow_id}")
    return answer.status_code == 200 and answer.json()["status"] == status


async def test_a_tenant_sees_the_weights_of_its_own_keys_only(
    system: System, alice: Tenant, bob: Tenant
) -> None:
    pool = system.pool
    weights = {alice.name: 2, f"{bob.name}/batch": 3, "carol": 5}
    await system.client.configure_pool(pool, capacity=4, aging_turns=2, weights=weights)
    await eventually(
        lambda: system.db.fetchval("SELECT weights FROM pool_settings WHERE pool = $1", pool)
    )

    async def shown(tenant: Tenant) -> dict[str, Any]:
        pools = {p["pool"]: p for p in (await tenant.http.get("/v1/pools")).json()}
        return {k: pools[pool][k] for k in ("capacity", "aging_turns", "weights")}

    assert await shown(alice) == {"capacity": 4, "aging_turns": 2, "weights": {alice.name: 2}}
    assert await shown(bob) == {
        "capacity": 4,
        "aging_turns": 2,
        "weights": {f"{bob.name}/batch": 3},
    }

"""The HTTP API's pure parts, without a broker or PostgreSQL: tokens, cursors, the
checks every string passes, and the OpenAPI document the fuzz test starts from."""

from __future__ import annotations

import contextlib
import re
import typing
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conclave.api import create_app
from conclave.api.cursor import BadCursor, decode_cursor, encode_cursor
from conclave.api.models import AgentStateName, WorkflowStatusName, storable
from conclave.api.tokens import hash_secret, new_token, parse_token
from conclave.settings import Settings
from projections.queries import AGENT_STATES
from projections.workflows import WORKFLOW_STATUSES


def test_a_new_token_parses_back_to_its_id_and_secret() -> None:
    token_id, secret, token = new_token()
    assert parse_token(token) == (token_id, secret)
    assert secret not in token_id
    assert len(secret) >= 40
    assert new_token()[2] != token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ccl",
        "ccl_",
        "abc_0123456789ab_x",
        "ccl_0123456789a_x",
        "ccl_0123456789AB_x",
        "ccl_0123456789ab_",
        "ccl_zzzzzzzzzzzz_x",
    ],
)
def test_anything_else_is_not_a_token(text: str) -> None:
    assert parse_token(text) is None


def test_only_a_digest_of_the_secret_is_kept() -> None:
    _, secret, _ = new_token()
    digest = hash_secret(secret)
    assert len(digest) == 32
    assert secret.encode() not in digest
    assert digest == hash_secret(secret) != hash_secret(secret + "x")


@given(
    queued_at=st.integers(0, 2**63 - 1),
    task_id=st.text(
        st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1
    ),
)
def test_a_cursor_round_trips(queued_at: int, task_id: str) -> None:
    position = f"{queued_at}:{task_id}"
    assert decode_cursor(encode_cursor(position)) == position


@pytest.mark.parametrize(
    "position", ["", "12", "x:task", ":task", "12:", "١٢:task", f"{2**63}:task", "1:a\x00b"]
)
def test_a_cursor_of_no_position_is_refused(position: str) -> None:
    with pytest.raises(BadCursor):
        decode_cursor(encode_cursor(position))


@given(st.text(max_size=50))
def test_any_text_is_a_cursor_or_refused_never_an_error(text: str) -> None:
    with contextlib.suppress(BadCursor):
        decode_cursor(text)


def test_text_that_postgresql_cannot_hold_is_refused() -> None:
    assert storable("naïve ☃") == "naïve ☃"
    for bad in ("a\x00b", "\ud800"):
        with pytest.raises(ValueError, match=r"NUL|surrogate"):
            storable(bad)


def test_the_states_the_api_names_are_the_query_layers() -> None:
    assert typing.get_args(AgentStateName) == AGENT_STATES
    assert typing.get_args(WorkflowStatusName) == WORKFLOW_STATUSES


def test_every_endpoint_is_in_the_openapi_document_behind_a_bearer_token() -> None:
    app = create_app(Settings(kafka_bootstrap="localhost:1", database_url="postgresql://x/y"))
    doc = app.openapi()
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = {
        (method.upper(), path): op
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    assert {
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/{task_id}"),
        ("GET", "/v1/deliberations/{deliberation_id}"),
        ("GET", "/v1/pools"),
        ("GET", "/v1/agents"),
        ("GET", "/v1/agents/{agent_id}/history"),
        ("GET", "/v1/hosts"),
        ("GET", "/v1/status"),
        ("GET", "/v1/events"),
        ("POST", "/v1/tasks"),
        ("POST", "/v1/tasks/{task_id}/cancel"),
        ("POST", "/v1/tasks/{task_id}/redrive"),
        ("POST", "/v1/deliberations"),
        ("POST", "/v1/deliberations/{deliberation_id}/cancel"),
        ("GET", "/v1/workflows"),
        ("GET", "/v1/workflows/{workflow_id}"),
        ("POST", "/v1/workflows"),
        ("POST", "/v1/workflows/{workflow_id}/cancel"),
        ("POST", "/v1/halt"),
        ("POST", "/v1/resume"),
    } == set(operations)
    for key, op in operations.items():
        assert op["security"] == [{"HTTPBearer": []}], key
        assert "401" in op["responses"], key


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080/dashboard"),
        ("0.0.0.0", "http://127.0.0.1:8080/dashboard"),
        ("::", "http://[::1]:8080/dashboard"),
        ("fe80::1", "http://[fe80::1]:8080/dashboard"),
        ("conclave.example", "http://conclave.example:8080/dashboard"),
    ],
)
def test_the_dashboard_url_printed_at_start_up_is_one_to_browse_to(host: str, url: str) -> None:
    from conclave.cli_api import _dashboard_url

    assert _dashboard_url(host, 8080) == url


def test_the_dashboard_writes_tenants_text_as_text_only() -> None:
    """Task ids, errors and pool names are tenants' text: the script never parses any of
    it as markup or code, and loads nothing from elsewhere."""
    static = resources.files("conclave.api").joinpath("static")
    script = static.joinpath("dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    page = static.joinpath("dashboard.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == [
        "/dashboard/dashboard.css",
        "/dashboard/dashboard.js",
    ]
    assert "<script>" not in page  # no inline script: the CSP would refuse it

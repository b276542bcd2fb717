"""The message rules (conclave.domain.messaging) and the record's codec, without a broker."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conclave.domain import messaging as dm
from conclave.domain.events import AgentMessage, Priority, new_envelope
from conclave.messaging import RemoteError, UnknownRecipient, _raised, error_payload
from schemas.codec import default_codec

DIRECTORY = {
    "a-1": ("reviewers", "host-1"),
    "a-2": ("reviewers", "host-2"),
    "a-3": ("reviewers", "host-2"),
    "b-1": ("builders", "host-3"),
}


def message(**changes: object) -> AgentMessage:
    base = AgentMessage(
        message_id="m-1",
        kind="query",
        correlation_id=None,
        sender="a-1",
        reply_to="host-1",
        reply_partition=0,
        recipient="b-1",
        agent_id="b-1",
        host_id="host-3",
        pool="builders",
        expires_at=1_000_000,
        priority=Priority.NORMAL,
        expects_reply=True,
        payload="status?",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_every_kind_of_the_protocol_is_valid() -> None:
    kinds = {k.value for k in dm.MessageKind}
    assert kinds == {
        "command",
        "query",
        "response",
        "event",
        "notification",
        "error",
        "data",
        "heartbeat",
    }
    for kind in kinds - dm.ANSWERS:
        assert dm.invalid_message(message(kind=kind)) is None
    for kind in dm.ANSWERS:
        assert (
            dm.invalid_message(message(kind=kind, correlation_id="m-0", expects_reply=False))
            is None
        )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": "gossip"}, "unknown message kind 'gossip'"),
        ({"kind": "response", "expects_reply": False}, "needs the correlation id"),
        ({"kind": "error", "correlation_id": "m-0"}, "cannot expect a reply"),
        ({"sender": ""}, "sender must be 1-200 characters"),
        ({"recipient": "x" * 201}, "recipient must be 1-200 characters"),
        ({"payload": "x" * (dm.MAX_PAYLOAD_BYTES + 1)}, "exceeds 900000"),
        ({"payload": "a\x00b"}, "NUL character"),
    ],
)
def test_a_bad_message_is_refused_with_its_reason(changes: dict[str, object], reason: str) -> None:
    found = dm.invalid_message(message(**changes))
    assert found is not None
    assert reason in found


def test_payload_size_is_counted_in_bytes() -> None:
    assert dm.invalid_message(message(payload="é" * (dm.MAX_PAYLOAD_BYTES // 2))) is None
    assert dm.invalid_message(message(payload="é" * (dm.MAX_PAYLOAD_BYTES // 2 + 1))) is not None


@given(st.integers(-(10**6), 10**6))
def test_a_message_expires_strictly_after_its_deadline(delta: int) -> None:
    deadline = 5_000_000
    assert dm.expired(message(expires_at=deadline), deadline + delta) is (delta > 0)


def test_a_message_without_ttl_never_expires() -> None:
    assert not dm.expired(message(expires_at=None), 2**62)


def test_addresses() -> None:
    assert dm.parse_address("a-1") == dm.Address("agent", "a-1")
    assert dm.parse_address("pool:reviewers") == dm.Address("pool", "reviewers")
    assert dm.parse_address("broadcast:reviewers") == dm.Address("broadcast", "reviewers")
    for bad in ("", "pool:", "broadcast:", "x" * 201):
        with pytest.raises(ValueError, match="1-200 characters"):
            dm.parse_address(bad)


def test_resolution() -> None:
    assert dm.resolve(dm.Address("agent", "a-2"), DIRECTORY, "m") == dm.Route(
        "a-2", "host-2", "reviewers"
    )
    assert dm.resolve(dm.Address("broadcast", "reviewers"), DIRECTORY, "m") == dm.Route(
        None, None, "reviewers"
    )
    for unknown in (
        dm.Address("agent", "zz"),
        dm.Address("pool", "zz"),
        dm.Address("broadcast", "zz"),
    ):
        assert dm.resolve(unknown, DIRECTORY, "m") is None


def test_a_pool_address_picks_one_member_by_message_id_and_spreads() -> None:
    picked = [dm.resolve(dm.Address("pool", "reviewers"), DIRECTORY, f"m-{i}") for i in range(300)]
    assert all(r is not None and r.pool == "reviewers" for r in picked)
    counts = {
        a: sum(r is not None and r.agent_id == a for r in picked) for a in ("a-1", "a-2", "a-3")
    }
    assert min(counts.values()) > 50, counts
    again = dm.resolve(dm.Address("pool", "reviewers"), DIRECTORY, "m-7")
    assert again == picked[7]  # a replay makes the same choice


def test_an_answer_is_correlated_and_goes_to_the_askers_inbox() -> None:
    asked = message(reply_to="host-1", reply_partition=3, expires_at=9_000)
    reply = dm.answer(
        asked,
        kind=dm.MessageKind.RESPONSE,
        payload="green",
        message_id="m-2",
        sender="b-1",
        reply_to="host-3",
        reply_partition=1,
    )
    assert reply.correlation_id == asked.message_id
    assert (reply.host_id, reply.recipient, reply.agent_id) == ("host-1", "a-1", None)
    assert reply.expires_at == asked.expires_at  # nobody waits for it after the ask's end
    assert reply.kind == "response"
    assert not reply.expects_reply
    assert dm.invalid_message(reply) is None


def test_error_answers_raise_what_they_name() -> None:
    unknown = _raised(error_payload("UnknownRecipient", "no agent or pool named 'zz'"))
    assert isinstance(unknown, UnknownRecipient)
    assert "'zz'" in str(unknown)
    remote = _raised(error_payload("ValueError", "bad query"))
    assert isinstance(remote, RemoteError)
    assert remote.error_type == "ValueError"
    assert str(remote) == "ValueError: bad query"


def test_a_message_survives_the_codec() -> None:
    codec = default_codec()
    event = message()
    _, decoded = codec.decode(
        codec.encode(new_envelope(event.TYPE, tenant="t", producer="t"), event)
    )
    assert decoded == event

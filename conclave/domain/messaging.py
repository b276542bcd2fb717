"""Agent-to-agent messages: kinds, addresses, validation, expiry and answers. Pure.

A message is one :class:`~conclave.domain.events.AgentMessage` record. Its recipient is
written as addressed and resolved by the sender against the agent directory (who is
registered in which pool on which host):

- ``AGENT_ID``: that agent;
- ``pool:NAME``: any one agent of pool NAME (chosen by the message id, so the choice
  spreads and a replay makes the same one);
- ``broadcast:NAME``: every agent of pool NAME, once each.

An ``ask`` sets ``expects_reply``; the recipient's answer is a ``response`` (or an
``error``) whose ``correlation_id`` is the asked message's id, addressed to the asker's
inbox. A message is never delivered after ``expires_at``: :func:`expired` is the one rule,
applied when the message would be delivered.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from conclave.domain.events import AgentMessage
from conclave.domain.validation import MAX_ID_LENGTH, MAX_INPUT_BYTES

__all__ = [
    "ANSWERS",
    "BROADCAST_PREFIX",
    "MAX_PAYLOAD_BYTES",
    "POOL_PREFIX",
    "Address",
    "Directory",
    "MessageKind",
    "Route",
    "answer",
    "expired",
    "invalid_message",
    "parse_address",
    "resolve",
]

MAX_PAYLOAD_BYTES = MAX_INPUT_BYTES
"""A payload must fit one Kafka record with its envelope, like a task's input."""
POOL_PREFIX = "pool:"
BROADCAST_PREFIX = "broadcast:"


class MessageKind(enum.StrEnum):
    COMMAND = "command"
    QUERY = "query"
    RESPONSE = "response"
    EVENT = "event"
    NOTIFICATION = "notification"
    ERROR = "error"
    DATA = "data"
    HEARTBEAT = "heartbeat"

    @property
    def answers(self) -> bool:
        """A response or an error: it answers another message (its correlation id)."""
        return self in (MessageKind.RESPONSE, MessageKind.ERROR)


ANSWERS = frozenset((MessageKind.RESPONSE.value, MessageKind.ERROR.value))
"""The kinds that answer another message (by its id, in ``correlation_id``)."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed recipient: ``kind`` is ``agent``, ``pool`` or ``broadcast``."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where one copy of a message goes: an agent on a host, or (broadcast) a pool."""

    agent_id: str | None
    host_id: str | None
    pool: str


Directory = Mapping[str, tuple[str, str]]
"""Agent id -> (pool, host id), as the agents topic says (the latest registration)."""


def parse_address(recipient: str) -> Address:
    """The address in ``recipient``; :class:`ValueError` with a one-line reason if bad."""
    kind, name = "agent", recipient
    for prefix, prefixed in ((POOL_PREFIX, "pool"), (BROADCAST_PREFIX, "broadcast")):
        if recipient.startswith(prefix):
            kind, name = prefixed, recipient.removeprefix(prefix)
    if not name or len(name) > MAX_ID_LENGTH:
        raise ValueError(f"recipient {recipient[:MAX_ID_LENGTH]!r}: name must be 1-200 characters")
    return Address(kind, name)


def resolve(address: Address, directory: Directory, message_id: str) -> Route | None:
    """Where a message to ``address`` goes, or ``None``: nobody by that name."""
    if address.kind == "agent":
        found = directory.get(address.name)
        return None if found is None else Route(address.name, found[1], found[0])
    members = sorted(a for a, (pool, _) in directory.items() if pool == address.name)
    if not members:
        return None
    if address.kind == "broadcast":
        return Route(None, None, address.name)
    pick = int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:4], "big")
    chosen = members[pick % len(members)]
    return Route(chosen, directory[chosen][1], address.name)


def expired(message: AgentMessage, now: int) -> bool:
    """Whether ``message`` may no longer be delivered at ``now`` (µs since the epoch)."""
    return message.expires_at is not None and now > message.expires_at


def invalid_message(message: AgentMessage) -> str | None:
    """Why ``message`` cannot be sent (one line), or ``None``."""
    if message.kind not in MessageKind.__members__.values():
        kinds = ", ".join(k.value for k in MessageKind)
        return f"unknown message kind {message.kind!r} (expected one of {kinds})"
    if MessageKind(message.kind).answers:
        if not message.correlation_id:
            return f"a {message.kind} needs the correlation id of the message it answers"
        if message.expects_reply:
            return f"a {message.kind} cannot expect a reply"
    for name in ("message_id", "sender", "recipient"):
        value = getattr(message, name)
        if not value or len(value) > MAX_ID_LENGTH:
            return f"{name} must be 1-{MAX_ID_LENGTH} characters"
    size = len(message.payload.encode())
    if size > MAX_PAYLOAD_BYTES:
        return f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}"
    if "\x00" in message.payload:
        return "payload contains a NUL character, which no read model can store"
    return None


def answer(
    asked: AgentMessage,
    *,
    kind: MessageKind,
    payload: str,
    message_id: str,
    sender: str,
    reply_to: str,
    reply_partition: int,
) -> AgentMessage:
    """The response (or error) to ``asked``: correlated by its id, addressed to its
    sender's inbox, expiring when the ask does (an answer nobody waits for is useless)."""
    return AgentMessage(
        message_id=message_id,
        kind=kind.value,
        correlation_id=asked.message_id,
        sender=sender,
        reply_to=reply_to,
        reply_partition=reply_partition,
        recipient=asked.sender,
        agent_id=None,  # for the asker's inbox, which awaits it: no agent's handler
        host_id=asked.reply_to,
        pool=None,
        expires_at=asked.expires_at,
        priority=asked.priority,
        expects_reply=False,
        payload=payload,
    )

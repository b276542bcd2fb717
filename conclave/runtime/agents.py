"""Agents: any async callable ``(AgentContext) -> str``, named ``module:function``.

Each agent owns an :class:`AgentContext` per task and a private ``memory``
that lives as long as the agent; no other agent can reach either.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conclave.errors import AgentLoadError
from conclave.runtime.genai import model_call

if TYPE_CHECKING:
    from conclave.coordination import Coordinator
    from conclave.domain.events import AgentMessage
    from conclave.messaging import Messenger

SIMULATED_MODEL = "simulated"

__all__ = [
    "AgentContext",
    "AgentFn",
    "MessageHandler",
    "PermanentFailure",
    "SimulatedAgent",
    "SimulatedFailure",
    "TransientFailure",
    "load_agent",
    "load_handler",
]


@dataclass(slots=True)
class AgentContext:
    """Everything one agent sees while working on one task."""

    agent_id: str
    task_id: str
    attempt: int
    input: str
    deliberation_id: str | None
    memory: dict[str, Any] = field(default_factory=dict)
    """The agent's own memory, kept across its tasks, never shared with another agent;
    empty again after it crashed and its host restarted it."""
    coordination: Coordinator | None = None
    """Resource locks and versioned state shared with other agents and processes
    (``await ctx.coordination.acquire_lock(...)``, ``update_state(...)``), through the
    coordination processor: its host's, connected on first use. ``None`` outside a host."""
    messenger: Messenger | None = None
    """Its host's messaging (what :meth:`ask`, :meth:`tell` and :meth:`broadcast` use)."""
    message: AgentMessage | None = None
    """In a message handler (``on_message``): the message being handled (``task_id`` is
    then empty and ``input`` is the message's payload)."""

    def _messages(self) -> Messenger:
        if self.messenger is None:
            raise RuntimeError("messaging needs a runtime host: this context has none")
        return self.messenger

    async def ask(
        self,
        recipient: str,
        payload: str,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 - the ask's own deadline, also its TTL
        **options: Any,
    ) -> str:
        """Ask ``recipient`` (an agent id, ``pool:NAME`` for any one agent of a pool) and
        return its answer; :class:`~conclave.messaging.AskTimeout` after ``timeout``
        seconds, :class:`~conclave.messaging.RemoteError` if it answered with an error,
        :class:`~conclave.messaging.UnknownRecipient` if nobody has that name."""
        return await self._messages().ask(
            recipient, payload, timeout=timeout, sender=self.agent_id, **options
        )

    async def tell(self, recipient: str, payload: str, **options: Any) -> str:
        """Send without awaiting an answer (``ttl=`` seconds: not delivered after it);
        returns the message id."""
        return await self._messages().tell(recipient, payload, sender=self.agent_id, **options)

    async def broadcast(self, pool: str, payload: str, **options: Any) -> str:
        """Send to every agent of ``pool`` but this one, once each."""
        return await self._messages().broadcast(pool, payload, sender=self.agent_id, **options)


AgentFn = Callable[[AgentContext], Awaitable[str]]
MessageHandler = Callable[[AgentContext, "AgentMessage"], Awaitable[str | None]]
"""``async def on_message(ctx, message) -> str | None``: an agent's answer to a message.
For an ask, a string is the response and an exception the error answer; ``None`` answers
nothing (the asker times out). Found as the attribute ``on_message`` of the agent
callable, or next to it in its module."""


class PermanentFailure(Exception):
    """Raised by an agent when retrying cannot help (bad input, a refusal): the task is
    dead-lettered at once, whatever attempts it has left."""


class TransientFailure(Exception):
    """Raised by an agent when another attempt may succeed (a rate limit, an outage): the
    task is retried after its back-off while attempts remain. Any other exception, and a
    timeout, counts as transient too; raise this one to say so explicitly."""


class SimulatedFailure(TransientFailure):
    """The simulated agent's configured failure: a model endpoint failing now and then
    (transient, not a crash of the agent)."""


@dataclass(frozen=True, slots=True)
class SimulatedAgent:
    """A stand-in for an LLM agent: latency, failures and output all derive from a seed.

    Output is deterministic in (seed, agent, input); latency is log-normal around
    ``latency_ms`` with spread ``jitter``; each attempt fails with ``failure_rate``.
    """

    latency_ms: float = 100.0
    jitter: float = 0.1
    failure_rate: float = 0.0
    seed: int = 0

    async def __call__(self, ctx: AgentContext) -> str:
        if self.latency_ms or self.failure_rate:  # seeding costs more than a no-op agent
            rng = random.Random(f"{self.seed}/{ctx.agent_id}/{ctx.task_id}/{ctx.attempt}")
            delay = self.latency_ms * rng.lognormvariate(0.0, self.jitter)
            # What a real agent's model call looks like in its trace.
            with model_call(SIMULATED_MODEL, provider="conclave") as call:
                await asyncio.sleep(delay / 1000.0)
                if rng.random() < self.failure_rate:
                    raise SimulatedFailure(
                        f"simulated failure of {ctx.agent_id} (seed {self.seed})"
                    )
                call.usage(len(ctx.input.split()), 4, SIMULATED_MODEL)
        else:
            await asyncio.sleep(0)  # an answer at once, yet after a turn of the loop
        seen = ctx.memory.setdefault("answered", 0)
        ctx.memory["answered"] = seen + 1
        verdict = hashlib.sha256(f"{self.seed}/{ctx.agent_id}/{ctx.input}".encode()).digest()
        stance = ("aye", "nay", "abstain")[verdict[0] % 3]
        return f"{ctx.agent_id} votes {stance} on {ctx.input!r} [{verdict[:4].hex()}]"

    async def on_message(self, ctx: AgentContext, message: AgentMessage) -> str | None:
        """Answers an ask at once, with who answered what; anything else is just taken."""
        if not message.expects_reply:
            return None
        return f"{ctx.agent_id} heard {message.payload!r}"


def load_agent(ref: str, **options: Any) -> AgentFn:
    """Resolve ``simulated`` or ``module:function`` to an async agent callable."""
    if ref == "simulated":
        return SimulatedAgent(**options)
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise AgentLoadError(f"agent reference {ref!r} must look like module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an agent module can fail to import in any way
        raise AgentLoadError(f"cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attr, None)
    if target is None:
        raise AgentLoadError(f"{module_name!r} has no attribute {attr!r}")
    if inspect.isclass(target):
        raise AgentLoadError(f"{ref!r} is a class; name an async function or an instance")
    call = getattr(target, "__call__", None)  # noqa: B004 - instances with async __call__ count
    if not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)):
        raise AgentLoadError(f"{ref!r} is not an async callable")
    fn: AgentFn = target
    return fn


def load_handler(ref: str, agent: AgentFn) -> MessageHandler | None:
    """The message handler of agent ``ref``: ``agent.on_message``, or ``on_message`` in
    its module (``module:function`` refs), or ``None`` (the agent takes no messages)."""
    handler = getattr(agent, "on_message", None)
    if handler is None and ":" in ref:
        module = importlib.import_module(ref.partition(":")[0])
        handler = getattr(module, "on_message", None)
    if handler is not None and not inspect.iscoroutinefunction(handler):
        raise AgentLoadError(f"on_message of {ref!r} is not an async function")
    found: MessageHandler | None = handler
    return found

"""A span for each call an agent makes to a model, with OpenTelemetry's GenAI attributes.

An agent runs inside its task's trace (``agent.run``); wrapping a model call in
:func:`model_call` adds a child span a trace viewer shows as an LLM call::

    async def agent(ctx: AgentContext) -> str:
        with model_call("gpt-4o", provider="openai") as call:
            reply = await client.chat.completions.create(model="gpt-4o", messages=...)
            call.usage(reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.model)
        return reply.choices[0].message.content

Attributes follow the GenAI semantic conventions (``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens`` / ``output_tokens``). Prompts and answers are not
recorded: they are payloads, and may be secrets. In an unsampled trace the span costs
next to nothing and records nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import trace

from conclave.tracing import tracer

__all__ = ["ModelCall", "model_call"]


@dataclass(frozen=True, slots=True)
class ModelCall:
    """The span of one model call, for what is known only once it answered."""

    span: trace.Span

    def usage(
        self, input_tokens: int, output_tokens: int, response_model: str | None = None
    ) -> None:
        self.span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        self.span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if response_model is not None:
            self.span.set_attribute("gen_ai.response.model", response_model)


@contextmanager
def model_call(model: str, *, provider: str, operation: str = "chat") -> Iterator[ModelCall]:
    """A ``{operation} {model}`` client span around the block (an exception ends it as
    an error, and goes on)."""
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    with tracer().start_as_current_span(
        f"{operation} {model}", kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield ModelCall(span)

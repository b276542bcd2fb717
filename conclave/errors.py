"""Conclave's error family.

One root, one family per layer; behaviour lives on the class so that callers
decide on ``retriable`` / ``permanent`` rather than on message text::

    ConclaveError
    ├── ConfigError            settings missing or malformed (permanent)
    ├── StackError             embedded broker / PostgreSQL not running or failed to start
    ├── SchemaError            bytes that do not decode, unknown fingerprint (permanent)
    ├── BrokerUnavailable      Kafka not reachable (retriable)
    ├── Fenced                 another instance took over this processor's transactional id
    ├── DatabaseUnavailable    PostgreSQL not reachable (retriable)
    ├── NotFound               a queried entity does not exist (permanent)
    ├── AgentLoadError         an agent reference ``module:function`` cannot be loaded
    ├── WitnessChainError      the witness chain does not verify; names the first bad sequence
    └── WitnessProofError      a key, signed checkpoint or proof is refused; ``reason`` says
                               which check failed (a :class:`ProofFailure`)
"""

from __future__ import annotations

import enum

__all__ = [
    "AgentLoadError",
    "BrokerUnavailable",
    "ConclaveError",
    "ConfigError",
    "DatabaseUnavailable",
    "Fenced",
    "NotFound",
    "ProofFailure",
    "SchemaError",
    "StackError",
    "WitnessChainError",
    "WitnessProofError",
]


class ConclaveError(Exception):
    """Root of every error Conclave raises on purpose."""

    retriable: bool = False
    permanent: bool = True


class ConfigError(ConclaveError):
    """A setting is missing or malformed."""


class StackError(ConclaveError):
    """The embedded development stack is not running or could not start."""


class SchemaError(ConclaveError):
    """Bytes that are not a valid Conclave event: bad magic, unknown schema, bad body."""


class BrokerUnavailable(ConclaveError):
    """The Kafka bootstrap servers did not answer."""

    retriable = True
    permanent = False


class Fenced(ConclaveError):
    """A newer instance with the same transactional id took over; this one must stop
    writing (it is a zombie) and give up what it owned."""


class DatabaseUnavailable(ConclaveError):
    """PostgreSQL did not answer."""

    retriable = True
    permanent = False


class NotFound(ConclaveError):
    """A queried entity (task, agent, witness entry) does not exist."""


class Rejected(NotFound):
    """The command for a queried task was refused by the scheduler: there is no task."""


class InvalidCommand(ConclaveError, ValueError):
    """A command the scheduler would refuse, caught by the client before sending it."""


class AgentLoadError(ConclaveError):
    """An agent reference ``module:function`` does not name an async callable."""


class WitnessChainError(ConclaveError):
    """The witness chain does not verify."""

    def __init__(self, message: str, *, sequence: int) -> None:
        super().__init__(message)
        self.sequence = sequence


class ProofFailure(enum.StrEnum):
    """Which check refused a key, a signed checkpoint or a proof."""

    MALFORMED = "malformed"
    """Not in the documented format: a note, checkpoint, key or bundle that does not parse."""
    UNKNOWN_KEY = "unknown key"
    """Signed by no key the verifier holds."""
    BAD_SIGNATURE = "bad signature"
    """A signature by a key the verifier holds does not verify."""
    WRONG_ORIGIN = "wrong origin"
    """The checkpoint is for another log."""
    WRONG_CHECKPOINT = "wrong checkpoint"
    """The proof is for another tree size or tree than the checkpoint's."""
    BAD_PROOF = "bad proof"
    """The Merkle path does not lead from the entry (or old tree) to the checkpoint's root."""
    WRONG_ENTRY = "wrong entry"
    """The entry bytes do not belong at the proven index."""


class WitnessProofError(ConclaveError):
    """A key, a signed checkpoint or a proof is refused (see docs/witness.md)."""

    def __init__(self, message: str, *, reason: ProofFailure) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason

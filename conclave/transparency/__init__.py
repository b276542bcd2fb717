"""The witness log as a transparency log: Ed25519 keys and signed notes (C2SP
``signed-note``), signed checkpoints, and proof bundles anyone can check offline.

The Merkle math and the checkpoint text are pure and live in ``conclave.domain``
(``merkle``, ``checkpoint``); this package adds what needs a crypto library or JSON.
docs/witness.md gives every byte rule.
"""

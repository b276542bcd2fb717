"""Signed checkpoints published by the witness processor, as a third party uses them:
the note opens with nothing but the log's public key, its root is the tree of the
entries on the topic, and an output's inclusion proof against it checks."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from conclave.devstack import DEV_WITNESS_ORIGIN
from conclave.domain.witness import leaf_bytes
from conclave.transparency.bundle import load_bundle
from conclave.transparency.keyfiles import read_verifier
from conclave.transparency.proofs import (
    InclusionChecked,
    check_proof,
    open_checkpoint,
    tree_of,
)
from conclave.verify import published_checkpoints, topic_entries
from tests.integration.conftest import System, eventually
from tests.integration.test_skeleton import cli

pytestmark = pytest.mark.integration


async def covered(db: asyncpg.Pool, size: int) -> bool:
    found = await db.fetchval("SELECT max(tree_size) FROM checkpoints")
    return found is not None and found >= size


async def test_the_witness_publishes_signed_checkpoints_that_prove_its_outputs(
    system: System, tmp_path: Path
) -> None:
    settings, db = system.settings, system.db
    async with system.running(2):
        task_id = await system.submit_visible("checkpoint me")
    entries, _ = await topic_entries(settings)
    # Within the checkpoint interval (1 s in the tests) the log's head is signed.
    await eventually(lambda: covered(db, len(entries)))

    assert settings.witness_key is not None
    public = read_verifier(str(settings.witness_key.with_suffix(".vkey")))
    published = await published_checkpoints(settings)
    assert published
    tree = tree_of((await topic_entries(settings))[0])
    for checkpoint in published:  # every one of them, not only the last
        opened = open_checkpoint(checkpoint.note, [public])
        assert opened.checkpoint.origin == checkpoint.origin == DEV_WITNESS_ORIGIN
        assert opened.checkpoint.size == checkpoint.tree_size
        assert opened.checkpoint.root == checkpoint.root_hash == tree.root(checkpoint.tree_size)
        assert any(line.startswith("time ") for line in opened.checkpoint.extensions)
    sizes = [c.tree_size for c in published]
    assert sizes == sorted(sizes)  # a log only grows

    # `conclave witness prove TASK` proves against the latest published checkpoint, and
    # `check-proof` accepts it with the public key alone.
    proof = tmp_path / "proof.json"
    made = cli(settings, "witness", "prove", task_id, "--out", str(proof))
    assert made.returncode == 0, made.stderr
    bundle = load_bundle(proof.read_text())
    assert json.loads(proof.read_text())["checkpoint"] in {c.note for c in published}
    checked = check_proof(bundle, [public])
    (entry,) = [e for e in entries if e.task_id == task_id and e.subject_type == "agent.output"]
    assert isinstance(checked, InclusionChecked)
    assert checked.entry.sequence == entry.sequence
    assert bundle.entry == leaf_bytes(entry)
    verified = cli(settings, "witness", "check-proof", str(proof), "--vkey", public.text())
    assert verified.returncode == 0, verified.stderr

    # The read models and `conclave status` know the last one.
    shown = json.loads(cli(settings, "status", "--json").stdout)
    assert shown["checkpoint_origin"] == DEV_WITNESS_ORIGIN
    assert shown["checkpoint_size"] >= len(entries)

"""``conclave witness keygen`` and ``check-proof``: files in, one line out, exit codes;
never a traceback. No broker needed."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conclave.cli import app
from conclave.domain.witness import leaf_bytes
from conclave.transparency.keyfiles import read_signer, read_verifier
from conclave.transparency.keys import SignerKey
from conclave.transparency.proofs import (
    consistency_bundle,
    find_entry,
    prove_inclusion,
    sign_checkpoint,
    tree_of,
)
from tests.unit.test_witness_proofs import chain

NAME = "conclave.test/witness"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[SignerKey, Path]:
    result = CliRunner().invoke(app, ["witness", "keygen", "--name", NAME, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    private, public = (
        tmp_path / "conclave.test_witness.key",
        tmp_path / "conclave.test_witness.vkey",
    )
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signer = read_signer(private)
    assert signer.name == NAME
    assert public.read_text().strip() == signer.verifier.text()
    assert signer.verifier.text() in result.stdout
    assert "PRIVATE" not in result.stdout
    return signer, public


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["witness", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_keygen_never_overwrites(keys: tuple[SignerKey, Path]) -> None:
    _, public = keys
    code, _, err = run("keygen", "--name", NAME, "--out", str(public.parent))
    assert code == 1
    assert "never overwritten" in err
    assert len(err.strip().splitlines()) == 1


def test_check_proof_accepts_a_good_bundle(keys: tuple[SignerKey, Path], tmp_path: Path) -> None:
    signer, public = keys
    bundle = tmp_path / "proof.json"
    bundle.write_text(prove_inclusion(chain(6), 3, NAME, [signer]).to_json())
    code, out, _ = run("check-proof", str(bundle), "--vkey", str(public))
    assert code == 0
    assert out.startswith("OK: entry 3 ")
    assert len(out.strip().splitlines()) == 1
    code, out, _ = run("check-proof", str(bundle), "--vkey", signer.verifier.text())
    assert code == 0


def test_check_proof_accepts_a_consistency_bundle_across_a_rotation(
    keys: tuple[SignerKey, Path], tmp_path: Path
) -> None:
    signer, public = keys
    rotated = SignerKey.generate(NAME)
    tree = tree_of(chain(9))
    old = sign_checkpoint(tree, NAME, [signer], size=4)
    new = sign_checkpoint(tree, NAME, [rotated])
    bundle = tmp_path / "consistency.json"
    bundle.write_text(consistency_bundle(tree, old, new).to_json())
    code, out, err = run("check-proof", str(bundle), "--vkey", str(public))
    assert code == 1
    assert "unknown key" in err
    code, out, _ = run(
        "check-proof", str(bundle), "--vkey", str(public), "--vkey", rotated.verifier.text()
    )
    assert code == 0, out
    assert "extends tree size 4" in out
    assert rotated.verifier.label in out


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d: d.update(index=d["index"] + 1), "wrong entry"),
        (lambda d: d.update(tree_size=d["tree_size"] + 1), "wrong checkpoint"),
        (lambda d: d.update(path=d["path"][:-1]), "bad proof"),
        (lambda d: d.update(path=["A" + p[1:] for p in d["path"]]), "bad proof"),
        (lambda d: d.update(checkpoint=d["checkpoint"].replace("\n6\n", "\n7\n")), "bad signature"),
        (lambda d: d.pop("entry"), "malformed"),
    ],
)
def test_check_proof_refuses_with_one_line(
    keys: tuple[SignerKey, Path], tmp_path: Path, tamper: object, reason: str
) -> None:
    signer, public = keys
    data = json.loads(prove_inclusion(chain(6), 3, NAME, [signer]).to_json())
    tamper(data)  # type: ignore[operator]
    bundle = tmp_path / "proof.json"
    bundle.write_text(json.dumps(data))
    code, out, err = run("check-proof", str(bundle), "--vkey", str(public))
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert reason in err
    assert "Traceback" not in err


def test_check_proof_refuses_unreadable_inputs(
    keys: tuple[SignerKey, Path], tmp_path: Path
) -> None:
    _, public = keys
    code, _, err = run("check-proof", str(tmp_path / "missing.json"), "--vkey", str(public))
    assert code == 1
    assert "cannot read" in err
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe")
    code, _, err = run("check-proof", str(tmp_path / "binary.json"), "--vkey", str(public))
    assert code == 1
    code, _, err = run("check-proof", str(tmp_path / "binary.json"), "--vkey", "not+a+key")
    assert code == 1
    assert "malformed" in err


def test_read_verifier_takes_text_or_a_file(keys: tuple[SignerKey, Path]) -> None:
    signer, public = keys
    assert read_verifier(str(public)) == signer.verifier
    assert read_verifier(signer.verifier.text()) == signer.verifier


def test_find_entry_by_sequence_or_task() -> None:
    entries = chain(6)
    entries[3] = dataclasses.replace(entries[3], task_id="task-x")
    assert find_entry(entries, "2") == 2
    assert find_entry(entries, "task-x") == 4
    with pytest.raises(ValueError, match="no entry 7"):
        find_entry(entries, "7")
    with pytest.raises(ValueError, match="no witnessed output"):
        find_entry(entries, "task-y")
    assert leaf_bytes(entries[3])  # task_id is not hashed: the leaf is unchanged


# -- the topic commands, over a chain handed in instead of read from the broker ----------


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What ``conclave.verify.topic_entries`` returns, set by the test (the broker-backed
    read itself is covered by the integration suite)."""
    import conclave.verify

    entries: list[Any] = []

    async def from_list(_settings: object) -> tuple[list[Any], list[str]]:
        return list(entries), []

    monkeypatch.setattr(conclave.verify, "topic_entries", from_list)
    # Settings are read as for any command; nothing connects to these.
    monkeypatch.setenv("CONCLAVE_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("CONCLAVE_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    return entries


def test_prove_then_check_proof(
    keys: tuple[SignerKey, Path], tmp_path: Path, topic: list[Any]
) -> None:
    _, public = keys
    topic.extend(chain(12))
    topic[6] = dataclasses.replace(topic[6], task_id="task-7")
    private = public.with_suffix(".key")
    proof = tmp_path / "proof.json"
    code, _, err = run("prove", "task-7", "--key", str(private), "--out", str(proof))
    assert code == 0, err
    code, out, _ = run("check-proof", str(proof), "--vkey", str(public))
    assert code == 0
    assert out.startswith("OK: entry 7 ")
    assert "at tree size 12" in out


def test_checkpoint_then_consistency_then_check_proof(
    keys: tuple[SignerKey, Path], tmp_path: Path, topic: list[Any]
) -> None:
    _, public = keys
    private = public.with_suffix(".key")
    topic.extend(chain(5))
    code, old, _ = run("checkpoint", "--key", str(private))
    assert code == 0
    assert old.startswith(f"{NAME}\n5\n")
    topic.extend(chain(9)[5:])
    code, new, _ = run("checkpoint", "--key", str(private))
    assert code == 0
    (tmp_path / "old.note").write_text(old)
    (tmp_path / "new.note").write_text(new)
    bundle = tmp_path / "consistency.json"
    code, _, err = run(
        "consistency", str(tmp_path / "old.note"), str(tmp_path / "new.note"), "--out", str(bundle)
    )
    assert code == 0, err
    code, out, _ = run("check-proof", str(bundle), "--vkey", str(public))
    assert code == 0
    assert "at tree size 9 extends tree size 5" in out


def test_topic_commands_refuse_a_broken_chain_in_one_line(
    keys: tuple[SignerKey, Path], topic: list[Any]
) -> None:
    _, public = keys
    topic.extend(chain(4))
    del topic[1]
    code, out, err = run("prove", "1", "--key", str(public.with_suffix(".key")))
    assert code == 1
    assert out == ""
    assert "broken at sequence 2" in err
    assert len(err.strip().splitlines()) == 1


def test_prove_refuses_an_unknown_task(keys: tuple[SignerKey, Path], topic: list[Any]) -> None:
    _, public = keys
    topic.extend(chain(3))
    code, _, err = run("prove", "task-nope", "--key", str(public.with_suffix(".key")))
    assert code == 1
    assert "no witnessed output of task 'task-nope'" in err

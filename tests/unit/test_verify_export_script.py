"""docs/verify_export.py, the standalone export verifier written from docs/witness.md
alone: it imports nothing of Conclave, accepts what Conclave's checker accepts and
refuses what it refuses, at the same line."""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.transparency.export import LogBroken, verify_export
from tests.unit.test_witness_export import KEY, OTHER, export

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "verify_export.py"


@functools.cache
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verify_export", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_needs_only_the_standard_library_and_cryptography() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"cryptography", "__future__"}, imported


def first_bad_line(lines: list[str], tmp_path: Path, vkey: str) -> tuple[int | None, int | None]:
    """(Conclave's first bad line, the script's), None where it accepts."""
    path = tmp_path / "export.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines))
    ours: int | None = None
    try:
        verify_export(path.read_bytes().splitlines(keepends=True), [KEY.verifier])
    except LogBroken as exc:
        ours = int(exc.where.split()[1])
    theirs: int | None = None
    try:
        script().verify(str(path), [vkey])
    except script().Bad as exc:
        theirs = int(str(exc).split()[1].rstrip(":"))
    return ours, theirs


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 8, 9, 16, 17])
def test_the_script_accepts_sound_exports(n: int, tmp_path: Path) -> None:
    lines = export(n, tuple(sorted({0, n // 3, n})))
    assert first_bad_line(lines, tmp_path, KEY.verifier.text()) == (None, None)


@settings(max_examples=80)
@given(
    n=st.integers(1, 12),
    data=st.data(),
    how=st.sampled_from(["delete", "duplicate", "swap", "flip", "rehash"]),
)
def test_the_script_refuses_what_conclave_refuses_at_the_same_line(
    n: int, data: st.DataObject, how: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp_path = tmp_path_factory.mktemp("x")
    sizes = tuple(sorted(set(data.draw(st.lists(st.integers(0, n), max_size=3), label="sizes"))))
    lines = export(n, sizes)
    i = data.draw(st.integers(1, len(lines) - 1), label="i")
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "rehash":  # an entry changed with its entry_hash: the next link breaks
        entries = [k for k, line in enumerate(lines) if line.startswith('{"sequence":')]
        k = data.draw(st.sampled_from(entries), label="entry")
        fields = json.loads(lines[k])
        raw = bytearray(base64.b64decode(fields["entry"]))
        raw[-1] ^= 1
        fields["entry"] = base64.b64encode(bytes(raw)).decode()
        fields["entry_hash"] = hashlib.sha256(bytes(raw)).hexdigest()
        fields["recorded_at"] ^= 1
        lines[k] = json.dumps(fields)
    elif how == "swap":
        j = data.draw(st.integers(1, len(lines) - 1).filter(lambda j: lines[j] != lines[i]))
        lines[i], lines[j] = lines[j], lines[i]
    else:
        fields = json.loads(lines[i])
        key = data.draw(st.sampled_from(sorted(fields)), label="key")
        if key in ("entry", "entry_hash", "previous_hash", "subject_digest", "checkpoint"):
            text = fields[key]
            at = data.draw(st.integers(0, len(text) - 1), label="at")
            fields[key] = text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]
        elif key in ("sequence", "recorded_at"):
            fields[key] += 1
        elif key in ("subject_type", "subject_event_id"):
            fields[key] += "x"
        else:
            return  # not hashed, or the closing line: covered elsewhere
        lines[i] = json.dumps(fields)
    ours, theirs = first_bad_line(lines, tmp_path, KEY.verifier.text())
    assert ours is not None
    assert ours == theirs


def test_the_script_refuses_a_rewritten_log_under_an_old_checkpoint(tmp_path: Path) -> None:
    sound = export(6, (6,))
    rewritten = [*export(6, (), salt="x")[:-1], sound[-2], sound[-1]]
    assert first_bad_line(rewritten, tmp_path, KEY.verifier.text()) == (8, 8)


def test_the_script_from_the_shell(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(f"{line}\n" for line in export(5, (5,))))
    run = [sys.executable, str(SCRIPT), str(good), "--vkey", KEY.verifier.text()]
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("OK: 5 entries, 1 checkpoints, root ")
    run[-1] = OTHER.verifier.text()
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout.strip() == (
        "line 7: checkpoint refused, unknown key: the checkpoint is signed by no key given to "
        "check with"
    )
    (tmp_path / "cut.jsonl").write_text(good.read_text()[:-40])
    run[2], run[-1] = str(tmp_path / "cut.jsonl"), KEY.verifier.text()
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout.strip() == "line 8: not JSON"
    assert not done.stderr

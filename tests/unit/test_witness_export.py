"""The witness export and its checker, no broker: an export of a sound log verifies at
every size (0, 1, powers of two and one past them); every alteration, removal,
insertion or reordering of a line, a checkpoint by an unknown key or with a bad
signature, and malformed input (bad JSON, bad base64, truncation, not UTF-8) are each
refused naming the first bad line and why; ``conclave witness verify --export`` says it
in one line and exits 1, never a traceback."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conclave.cli import app
from conclave.transparency.export import LogBroken, export_lines, verify_export
from conclave.transparency.keys import SignerKey
from conclave.transparency.proofs import sign_checkpoint, tree_of
from schemas.codec import default_codec
from tests.unit.test_witness_proofs import chain

ORIGIN = "conclave.example/witness"
KEY = SignerKey(ORIGIN, bytes(range(32)))
OTHER = SignerKey(ORIGIN, bytes(range(1, 33)))  # same name, another key


def export(n: int, sizes: tuple[int, ...] = (), salt: str = "") -> list[str]:
    entries = chain(n, salt)
    tree = tree_of(entries)
    notes = [sign_checkpoint(tree, ORIGIN, [KEY], size=size) for size in sizes]
    return list(
        export_lines(
            entries,
            notes,
            [KEY.verifier],
            origin=ORIGIN,
            schemas=dict(list(default_codec().registry.canonical_forms().items())[:3]),
        )
    )


def broken(lines: Sequence[str | bytes], **kw: object) -> LogBroken:
    with pytest.raises(LogBroken) as caught:
        verify_export(lines, **kw)  # type: ignore[arg-type]
    return caught.value


def entry_fields(line: str) -> dict[str, object]:
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_an_export_of_a_sound_log_verifies_at_every_size(n: int) -> None:
    sizes = tuple(sorted({0, n // 2, n}))
    lines = export(n, sizes)
    assert len(lines) == 1 + n + len(sizes) + 1
    checked = verify_export(lines, [KEY.verifier])
    tree = tree_of(chain(n))
    assert checked.checker.size == n
    assert checked.checker.checkpoints == len(sizes)
    assert checked.checker.root == tree.root()
    head = chain(n)[-1].entry_hash if n else bytes(32)
    assert checked.checker.head == head
    assert not checked.keys_from_export
    # Without a trusted key, the export's own key checks the signatures (and says so).
    assert verify_export(lines).keys_from_export
    # Read as bytes (how the CLI reads a file) it is the same.
    assert verify_export([line.encode() + b"\n" for line in lines]).checker.size == n


def test_each_checkpoint_follows_the_entry_that_completes_its_size() -> None:
    lines = export(5, (0, 2, 5))
    kinds = [next(iter(entry_fields(line))) for line in lines]
    assert kinds == ["format", "checkpoint", "sequence", "sequence", "checkpoint"] + [
        "sequence"
    ] * 3 + ["checkpoint", "end"]


def _reencode(line: str, change: int, at: int) -> str:
    fields = entry_fields(line)
    data = bytearray(base64.b64decode(str(fields["entry"])))
    data[at] ^= change
    fields["entry"] = base64.b64encode(bytes(data)).decode()
    return json.dumps(fields)


def test_altering_an_entry_is_found_at_its_line() -> None:
    lines = export(9, (4, 9))
    # Line 1 header, 2-5 entries 1-4, 6 checkpoint 4, 7.. entries 5-9.
    assert entry_fields(lines[7])["sequence"] == 6
    lines[7] = _reencode(lines[7], 1, -9)  # a byte of subject_digest
    found = broken(lines)
    assert found.where == "line 8 (sequence 6)"
    assert found.reason == "entry_hash does not match its contents"


def test_altering_an_entry_and_its_hash_breaks_the_next_link() -> None:
    lines = export(9)
    fields = entry_fields(lines[3])
    data = bytearray(base64.b64decode(str(fields["entry"])))
    data[-1] ^= 1  # recorded_at
    fields["entry"] = base64.b64encode(bytes(data)).decode()
    fields["entry_hash"] = hashlib.sha256(bytes(data)).hexdigest()
    fields["recorded_at"] = int(str(fields["recorded_at"])) ^ 1
    lines[3] = json.dumps(fields)
    found = broken(lines)
    assert found.where == "line 5 (sequence 4)"
    assert found.reason == "previous_hash does not match the prior entry"


def test_rewriting_every_later_entry_is_caught_by_the_checkpoint() -> None:
    """A rewritten tail verifies as a chain: only the signed root catches it."""
    sound = export(6, (6,))
    rewritten = export(6, (), salt="x")[:-1]  # another chain, no checkpoint, no end line
    lines = [*rewritten, sound[-2], sound[-1]]
    found = broken(lines)
    assert found.where == "line 8"
    assert "the log was rewritten" in found.reason


@pytest.mark.parametrize(
    ("edit", "where", "reason"),
    [
        (lambda ls: ls.pop(3), "line 4 (sequence 3)", "expected sequence 3, found 4"),
        (lambda ls: ls.insert(3, ls[2]), "line 4 (sequence 3)", "expected sequence 3, found 2"),
        (
            lambda ls: ls.insert(4, ls.pop(3)),
            "line 4 (sequence 3)",
            "expected sequence 3, found 4",
        ),
        (lambda ls: ls.pop(0), "line 1", "not a witness export"),
        (lambda ls: ls.pop(), "line 13", "truncated"),
        (lambda ls: ls.__setitem__(-1, ls[-1][:20]), "line 13", "not JSON"),
        (lambda ls: ls.append(ls[-1]), "line 14", "after the closing line"),
        (lambda ls: ls.insert(5, "{not json"), "line 6", "not JSON"),
        (lambda ls: ls.insert(5, "[1, 2]"), "line 6", "not a JSON object"),
        (lambda ls: ls.insert(5, ""), "line 6", "not JSON"),
        (
            lambda ls: ls.__setitem__(4, ls[4].replace('"entry":"', '"entry":"!')),
            "line 5 (sequence 4)",
            "entry is not base64",
        ),
        (
            lambda ls: ls.__setitem__(4, ls[4].replace('"entry":"', '"entry":"AAAA')),
            "line 5 (sequence 4)",
            "entry bytes are malformed",
        ),
        (
            lambda ls: ls.__setitem__(4, ls[4].replace('"subject_type":"', '"subject_type":"x')),
            "line 5 (sequence 4)",
            "subject_type is not what the entry bytes say",
        ),
        (
            lambda ls: ls.__setitem__(4, ls[4].replace('"sequence":4', '"sequence":"4"')),
            "line 5 (sequence 4)",
            "sequence is not what the entry bytes say",
        ),
        (
            lambda ls: ls.__setitem__(4, ls[4].replace('"detail":""', '"detail":"","x":1')),
            "line 5 (sequence 4)",
            "other keys than expected: x",
        ),
        (
            lambda ls: ls.__setitem__(4, ls[4].replace('"entry_hash":"', '"entry_hash":"A')),
            "line 5 (sequence 4)",
            "entry_hash is not 32 bytes in lowercase hex",
        ),
        (
            lambda ls: ls.__setitem__(-1, ls[-1].replace('"entries":10', '"entries":11')),
            "line 13",
            "the export says 11 entries",
        ),
        (
            lambda ls: ls.insert(7, ls.pop(6)),  # a checkpoint line moved one entry on
            "line 8",
            "checkpoint of tree size 5 placed after 6 entries",
        ),
        (lambda ls: ls.insert(7, ls[6]), "line 14", "it holds 10 and 2"),  # a checkpoint twice
    ],
)
def test_each_edit_of_a_line_is_found_at_the_first_bad_line(
    edit: object, where: str, reason: str
) -> None:
    lines = export(10, (5,))
    assert "checkpoint" in entry_fields(lines[6])  # line 7 is the checkpoint of size 5
    edit(lines)  # type: ignore[operator]
    found = broken(list(lines))
    assert found.where == where, str(found)
    assert reason in found.reason, str(found)


def test_checkpoints_by_an_unknown_key_or_with_a_bad_signature_are_refused() -> None:
    lines = export(4, (4,))
    other = sign_checkpoint(tree_of(chain(4)), ORIGIN, [OTHER])
    lines[5] = json.dumps({"checkpoint": other})
    found = broken(lines, trusted=[KEY.verifier])
    assert found.where == "line 6"
    assert "unknown key" in found.reason
    # The export's own keys are KEY's: OTHER is unknown to them too.
    assert "unknown key" in broken(lines).reason

    lines = export(4, (4,))
    note = str(entry_fields(lines[5])["checkpoint"])
    text, _, signature = note.rpartition("\n\n")
    name, encoded = signature.rstrip("\n").rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 1
    forged = f"{text}\n\n{name} {base64.b64encode(bytes(raw)).decode()}\n"
    lines[5] = json.dumps({"checkpoint": forged})
    found = broken(lines)
    assert found.where == "line 6"
    assert "bad signature" in found.reason


def test_malformed_headers_and_files_are_findings() -> None:
    lines = export(2)
    assert broken([]).where == "line 1"
    assert "empty" in broken([]).reason
    header = entry_fields(lines[0])
    changes: list[tuple[dict[str, object], str]] = [
        ({"keys": ["nonsense"]}, "a key is refused"),
        ({"keys": "x"}, "not a list"),
        ({"origin": 3}, "origin"),
        ({"schemas": {"00" * 8: "{}"}}, "not the fingerprint of its form"),
        ({"extra": 1}, "exactly the keys"),
    ]
    for change, reason in changes:
        bad = json.dumps(header | change)
        found = broken([bad, *lines[1:]])
        assert (found.where, reason in found.reason) == ("line 1", True), str(found)
    found = broken([lines[0].encode(), b"\xff\xfe not utf-8\n", *(x.encode() for x in lines[1:])])
    assert found.where == "line 2"
    assert "not JSON" in found.reason


@settings(max_examples=60)
@given(
    st.integers(1, 20),
    st.data(),
    st.sampled_from(["delete", "duplicate", "swap", "flip"]),
)
def test_any_removal_insertion_reordering_or_flip_is_found(
    n: int, data: st.DataObject, how: str
) -> None:
    sizes = tuple(sorted(set(data.draw(st.lists(st.integers(0, n), max_size=3), label="sizes"))))
    lines = export(n, sizes)
    i = data.draw(st.integers(0, len(lines) - 1), label="i")
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "swap":
        j = data.draw(st.integers(0, len(lines) - 1).filter(lambda j: lines[j] != lines[i]))
        lines[i], lines[j] = lines[j], lines[i]
    else:
        raw = bytearray(lines[i].encode())
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= data.draw(st.sampled_from([1, 2, 4, 8, 16, 32]), label="bit")
        if bytes(raw).decode(errors="replace").strip() == lines[i].strip():
            return
        try:
            same = json.loads(bytes(raw)) == json.loads(lines[i])
        except ValueError:
            same = False
        if same:
            return  # e.g. a flipped case in a JSON escape: the same value
        lines[i] = bytes(raw).decode("utf-8", errors="surrogateescape")
    with pytest.raises(LogBroken):
        verify_export(lines, [KEY.verifier])


# -- the command line ----------------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["witness", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_verify_export_from_the_command_line(tmp_path: Path) -> None:
    good = write(tmp_path / "good.jsonl", export(9, (3, 9)))
    code, out, err = run("verify", "--export", str(good), "--vkey", KEY.verifier.text())
    assert code == 0, err
    root = tree_of(chain(9)).root().hex()
    assert out.strip() == (
        f"export {good}: chain intact, 9 entries, 2 checkpoints checked, root {root}, "
        f"head {chain(9)[-1].entry_hash.hex()}"
    )
    code, _, err = run("verify", "--export", str(good))
    assert code == 0
    assert "keys the export carries" in err

    lines = export(9, (3, 9))
    lines[5] = _reencode(lines[5], 4, 40)
    bad = write(tmp_path / "bad.jsonl", lines)
    code, out, err = run("verify", "--export", str(bad))
    assert code == 1
    assert err.strip() == (
        f"export {bad}: broken at line 6 (sequence 4): previous_hash does not match the prior entry"
    )
    assert "Traceback" not in err
    code, _, err = run("verify", "--export", str(bad), "--jobs", "2")  # the same, in 2
    assert code == 1
    assert err.strip() == (
        f"export {bad}: broken at line 6 (sequence 4): previous_hash does not match the prior entry"
    )
    code, out, err = run(
        "verify", "--export", str(good), "--jobs", "3", "--vkey", KEY.verifier.text()
    )
    assert code == 0, err
    assert out.strip().startswith(f"export {good}: chain intact, 9 entries, 2 checkpoints checked")

    code, _, err = run("verify", "--export", str(tmp_path / "missing.jsonl"))
    assert code == 1
    assert "cannot read" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "garbage").write_bytes(b"\x00\xff" * 100)
    code, _, err = run("verify", "--export", str(tmp_path / "garbage"))
    assert code == 1
    assert "line 1" in err
    assert "Traceback" not in err
    code, _, err = run("verify", "--export", str(good), "--from", "topic")
    assert code == 1
    assert "not both" in err


def test_lines_as_conclave_writes_them_take_the_fast_path() -> None:
    from conclave.transparency.export import LogChecker, _fast_entry

    checker = LogChecker([KEY.verifier])
    lines = [line for line in export(9) if line.startswith('{"sequence":')]
    assert all(_fast_entry(checker, line) for line in lines)
    assert checker.size == 9
    assert checker.root == tree_of(chain(9)).root()
    # Out of turn, nothing changes and the line is left to the field-by-field checks.
    assert not _fast_entry(checker, lines[0])
    assert checker.size == 9


@pytest.mark.parametrize(
    ("attribution", "reason"),
    [
        ('"task_id":"t\\u00e9\\n","agent_id":null,"attempt":-0,"detail":"\\"x\\""}', None),
        ('"task_id":null, "agent_id":null,"attempt":null,"detail":""} \t', None),
        ('"task_id":"é","agent_id":"a","attempt":12,"detail":"d/\\/"}', None),
        ('"task_id":1,"agent_id":null,"attempt":null,"detail":""}', "task_id is not a string"),
        ('"task_id":null,"agent_id":null,"attempt":"1","detail":""}', "attempt is not an integer"),
        ('"task_id":null,"agent_id":null,"attempt":1.0,"detail":""}', "attempt is not an integer"),
        ('"task_id":null,"agent_id":null,"attempt":01,"detail":""}', "not JSON"),
        ('"task_id":null,"agent_id":null,"attempt":null,"detail":"\\x"}', "not JSON"),
        ('"task_id":null,"agent_id":null,"attempt":null,"detail":"\t"}', "not JSON"),
        ('"task_id":null,"agent_id":null,"attempt":null,"detail":""}x', "not JSON"),
        ('"task_id":null,"agent_id":null,"attempt":null,"detail":null}', "detail is not a string"),
        ('"task_id":null,"agent_id":null,"attempt":null}', "other keys than expected: detail"),
    ],
)
def test_attribution_is_json_of_the_right_types(attribution: str, reason: str | None) -> None:
    """The fast path and the field-by-field checks agree on every way of writing it."""
    lines = export(3)
    head, _, _ = lines[2].partition('"task_id":')
    lines[2] = head + attribution
    if reason is None:
        assert verify_export(lines).checker.size == 3
    else:
        found = broken(lines)
        where = "line 3" if reason == "not JSON" else "line 3 (sequence 2)"
        assert (found.where, reason in found.reason) == (where, True), str(found)


def test_a_line_that_only_looks_like_its_rendering_is_not_taken_for_it() -> None:
    """An event id with a quote, written raw instead of escaped: not JSON, whatever the
    fast path's rendering of the entry bytes would look like."""
    from conclave.domain.witness import ChainHead, digest, next_entry

    entry = next_entry(
        ChainHead(),
        subject_type="agent.output",
        subject_event_id='a","x":"b',
        subject_digest=digest(b"r"),
        recorded_at=1,
    )
    lines = list(export_lines([entry], [], [KEY.verifier], schemas={}))
    assert verify_export(lines).checker.size == 1
    lines[1] = lines[1].replace('a\\",\\"x\\":\\"b', 'a","x":"b')
    found = broken(lines)
    assert found.where == "line 2 (sequence 1)"
    assert "other keys than expected: x" in found.reason

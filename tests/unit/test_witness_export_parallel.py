"""``verify --export FILE --jobs N``: ranges of the file checked in several processes
give the verdict of the one-process checker, naming the same first bad line for the
same reason, whatever the cuts; the Merkle nodes of ranges join into the tree's root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.domain.merkle import MerkleTree, leaf_hash
from conclave.transparency.export import LogBroken, verify_export
from conclave.transparency.parallel import NodeRange, verify_export_parallel
from tests.unit.test_witness_export import KEY, export


@given(st.integers(0, 70), st.data())
def test_ranges_join_into_the_root_of_every_size(n: int, data: st.DataObject) -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(n)]
    tree = MerkleTree()
    for leaf in leaves:
        tree.append_hash(leaf)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4), label="cuts"))
    joined = NodeRange()
    for begin, end in zip([0, *cuts], [*cuts, n], strict=True):
        part = NodeRange(begin)
        for leaf in leaves[begin:end]:
            part.append_hash(leaf)
        joined = joined.joined(part.nodes, end)
        assert joined.root() == tree.root(end)


def outcome(run: object) -> tuple[str, str] | tuple[int, int, bytes, bytes]:
    try:
        checked = run()  # type: ignore[operator]
    except LogBroken as exc:
        return exc.where, exc.reason
    c = checked.checker
    return c.size, c.checkpoints, c.root, c.head


def both(lines: list[str], path: Path, jobs: int) -> tuple[object, object]:
    path.write_text("".join(f"{line}\n" for line in lines))
    one = outcome(lambda: verify_export(path.read_bytes().splitlines(True), [KEY.verifier]))
    many = outcome(lambda: verify_export_parallel(path, [KEY.verifier], jobs=jobs))
    return one, many


@pytest.mark.parametrize("jobs", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 8, 9, 17])
def test_sound_exports_verify_the_same(n: int, jobs: int, tmp_path: Path) -> None:
    one, many = both(export(n, tuple(sorted({0, n // 2, n}))), tmp_path / "e.jsonl", jobs)
    assert one == many
    assert isinstance(one, tuple)
    assert one[0] == n


@settings(max_examples=150)
@given(
    n=st.integers(0, 14),
    jobs=st.integers(2, 6),
    how=st.sampled_from(["delete", "duplicate", "swap", "flip", "cut", "rehash"]),
    data=st.data(),
)
def test_any_edit_is_named_as_the_one_process_checker_names_it(
    n: int, jobs: int, how: str, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import base64
    import hashlib

    sizes = tuple(sorted(set(data.draw(st.lists(st.integers(0, n), max_size=3), label="sizes"))))
    lines = export(n, sizes)
    i = data.draw(st.integers(1, len(lines) - 1), label="i")
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "swap":
        j = data.draw(st.integers(1, len(lines) - 1), label="j")
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "cut":
        lines[i] = lines[i][: data.draw(st.integers(0, len(lines[i]) - 1), label="at")]
    elif how == "rehash" and lines[i].startswith('{"sequence":'):
        fields = json.loads(lines[i])
        raw = bytearray(base64.b64decode(fields["entry"]))
        raw[-1] ^= 1
        fields["entry"] = base64.b64encode(bytes(raw)).decode()
        fields["entry_hash"] = hashlib.sha256(bytes(raw)).hexdigest()
        fields["recorded_at"] ^= 1
        lines[i] = json.dumps(fields)
    else:
        at = data.draw(st.integers(0, len(lines[i]) - 1), label="at")
        lines[i] = lines[i][:at] + ("0" if lines[i][at] != "0" else "1") + lines[i][at + 1 :]
    one, many = both(lines, tmp_path_factory.mktemp("p") / "e.jsonl", jobs)
    assert one == many


@pytest.mark.parametrize("jobs", [1, 2, 3, 64])
def test_a_rewritten_log_under_an_old_checkpoint_is_found_by_the_root(
    jobs: int, tmp_path: Path
) -> None:
    sound = export(6, (6,))
    rewritten = [*export(6, (), salt="x")[:-1], sound[-2], sound[-1]]
    one, many = both(rewritten, tmp_path / "e.jsonl", jobs)
    assert one == many
    assert one[0] == "line 8"


@pytest.mark.parametrize("jobs", [2, 64])
def test_a_line_wrong_twice_is_named_for_what_comes_first(jobs: int, tmp_path: Path) -> None:
    """Where each line is a range of its own: an entry that is both out of sequence and
    has a readable field that its bytes do not say is out of sequence, as in one process."""
    lines = export(6)
    stale = json.loads(lines[3])  # entry 3 again, where entry 5 should be
    stale["subject_type"] = "edited"
    lines[5] = json.dumps(stale)
    one, many = both(lines, tmp_path / "e.jsonl", jobs)
    assert one == many
    assert one == ("line 6 (sequence 5)", "expected sequence 5, found 3")

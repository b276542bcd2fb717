"""References to inputs larger than one record (the pure part of conclave.payloads)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conclave import payloads
from conclave.payloads import PayloadRef, PayloadUnavailable


@given(
    offsets=st.lists(st.integers(0, 2**40), min_size=1, max_size=128).map(tuple),
    size=st.integers(0, payloads.MAX_PAYLOAD_BYTES),
)
def test_a_reference_reads_back_as_itself(offsets: tuple[int, ...], size: int) -> None:
    ref = PayloadRef("p.payloads", 0, offsets, size, "ab" * 32)
    assert ref.text().startswith(payloads.PREFIX)
    assert payloads.parse(ref.text()) == ref


def test_an_ordinary_input_is_no_reference() -> None:
    assert payloads.parse("hello") is None
    assert payloads.parse("conclave-payload:v2:{}") is None  # another version's prefix


@pytest.mark.parametrize(
    "body",
    [
        "",
        "{",
        "[]",
        '{"topic": "t"}',
        '{"topic":"t","partition":0,"offsets":[],"size":1,"sha256":"x"}',
    ],
)
def test_a_text_that_only_looks_like_a_reference_is_refused(body: str) -> None:
    with pytest.raises(PayloadUnavailable, match="not a payload reference"):
        payloads.parse(payloads.PREFIX + body)

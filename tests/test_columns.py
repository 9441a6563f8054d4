"""Result columns built for the output: the Arrow types the output declares."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from pipeline.columns import arrow_array

TEXTS = st.lists(st.none() | st.text(max_size=30), max_size=50)


@given(TEXTS)
def test_text_is_built_as_string_whatever_polars_hands_back(values: list[str | None]) -> None:
    array = arrow_array(values, pa.string())
    array.validate(full=True)
    assert array.type == pa.string()
    assert array.to_pylist() == values


@given(st.lists(st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=50))
def test_integers_keep_their_nulls(values: list[int | None]) -> None:
    array = arrow_array(values, pa.int64())
    assert array.type == pa.int64()
    assert array.to_pylist() == values

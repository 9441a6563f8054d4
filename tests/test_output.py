"""The output writer: one registry of formats, one atomic file, the same rows in each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa
import pytest

from pipeline.checkpoint import Checkpoint
from pipeline.columns import NOT_PROCESSED, RESULT_NAMES
from pipeline.errors import SpecError
from pipeline.inputs import InputTable
from pipeline.output import (
    FORMATS,
    CsvOutput,
    JsonLinesOutput,
    Layout,
    OutputFile,
    ParquetOutput,
    output_format,
    scan_output,
    write_output,
)
from pipeline.structured import OutputSchema
from pipeline.types import Completion, RowResult, Usage

SCHEMA = {"label": {"enum": ["positive", "negative"]}, "confidence": "number"}


@pytest.fixture
def table(tmp_path: Path) -> InputTable:
    pl.DataFrame({"review_id": ["007", "010", "011"], "text": ["good", "bad", "lost"]}).write_csv(
        tmp_path / "reviews.csv"
    )
    return InputTable(str(tmp_path / "reviews.csv"), "review_id")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Iterator[Checkpoint]:
    """Answers for rows 007 and 010; none for 011."""
    store = Checkpoint(tmp_path / "run" / "checkpoint.sqlite")
    answers = [("007", "positive", 0.9), ("010", "negative", 0.25)]
    store.write(
        RowResult(
            i,
            key,
            f"hash-{key}",
            1,
            0.5,
            Completion(f'{{"label": "{label}"}}', None, Usage(10, 4, 0, 0, 14), "stop", "m"),
            cost_usd=1e-5,
            parsed={"label": label, "confidence": confidence},
        )
        for i, (key, label, confidence) in enumerate(answers)
    )
    yield store
    store.close()


def layout() -> Layout:
    return Layout(schema=OutputSchema(SCHEMA))


@pytest.mark.parametrize("extension", list(FORMATS))
def test_every_format_holds_the_same_rows(
    tmp_path: Path, table: InputTable, checkpoint: Checkpoint, extension: str
) -> None:
    reference = tmp_path / "out" / "reference.parquet"
    write_output(table, checkpoint, reference, layout=layout())
    path = tmp_path / "out" / f"result{extension}"

    rows = write_output(table, checkpoint, path, layout=layout())

    assert rows == 3
    expected = pl.read_parquet(reference)
    assert expected.columns == ["review_id", "text", *RESULT_NAMES, "label", "confidence"]
    assert expected["error"].to_list() == [None, None, NOT_PROCESSED]
    assert expected["label"].cast(pl.String).to_list() == ["positive", "negative", None]
    out = scan_output(path).collect()
    assert out.columns == expected.columns
    # Text holds no types: the ids and the enum come back as what was written.
    assert out["review_id"].cast(pl.String).str.zfill(3).to_list() == ["007", "010", "011"]
    assert out["label"].cast(pl.String).to_list() == ["positive", "negative", None]
    assert out.drop("review_id", "label").equals(expected.drop("review_id", "label"))
    assert sorted(p.name for p in path.parent.iterdir()) == sorted({"reference.parquet", path.name})


def test_export_writes_only_the_finished_rows_and_leaves_the_output_stamp(
    tmp_path: Path, table: InputTable, checkpoint: Checkpoint
) -> None:
    path = tmp_path / "export.jsonl"

    rows = write_output(table, checkpoint, path, layout=layout(), finished_only=True)

    assert rows == 2
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["review_id"] for line in lines] == ["007", "010"]
    assert [line["confidence"] for line in lines] == [0.9, 0.25]
    assert checkpoint.get_meta("output_stamp") is None


@pytest.mark.parametrize("extension", list(FORMATS))
def test_a_write_that_fails_leaves_the_previous_output_and_no_temporary_file(
    tmp_path: Path, extension: str
) -> None:
    path = tmp_path / f"result{extension}"
    first = pa.table({"id": ["a", "b"], "n": [1, 2]})
    with OutputFile(path) as output:
        output.write(first)
    before = path.read_bytes()

    with pytest.raises(RuntimeError), OutputFile(path) as output:
        output.write(pa.table({"id": ["c"], "n": [3]}))
        raise RuntimeError("the disk went away")

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_temporary_file_left_by_a_killed_writer_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "result.csv"
    leftover = tmp_path / ".result.csv.4242.tmp"
    leftover.write_bytes(b"half a file")

    with OutputFile(path) as output:
        output.write(pa.table({"id": ["a"]}))

    assert not leftover.exists()
    assert path.read_text() == "id\na\n"


def test_csv_refuses_list_and_object_columns_which_jsonl_keeps_as_json(tmp_path: Path) -> None:
    nested = Layout(schema=OutputSchema({"tags": {"type": "array", "items": {"type": "string"}}}))
    with pytest.raises(SpecError, match=r"CSV cannot hold the list or object column\(s\) tags"):
        output_format(tmp_path / "x.csv", nested)
    assert output_format(tmp_path / "x.jsonl", nested) is JsonLinesOutput
    path = tmp_path / "x.jsonl"
    tags = pa.array([["a", "b"], None], pa.list_(pa.string()))
    point = pa.array([{"x": 1}, {"x": 2}], pa.struct([("x", pa.int64())]))

    with OutputFile(path) as output:
        output.write(pa.table({"tags": tags, "point": point}))

    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert lines == [{"tags": ["a", "b"], "point": {"x": 1}}, {"tags": None, "point": {"x": 2}}]


def test_an_input_without_rows_writes_every_column(tmp_path: Path, checkpoint: Checkpoint) -> None:
    (tmp_path / "empty.csv").write_text("review_id,text\n")
    table = InputTable(str(tmp_path / "empty.csv"), "review_id")

    for extension in FORMATS:
        write_output(table, checkpoint, tmp_path / f"out{extension}", layout=layout())

    assert pl.read_parquet(tmp_path / "out.parquet").columns == [
        "review_id",
        "text",
        *RESULT_NAMES,
        "label",
        "confidence",
    ]
    header = (tmp_path / "out.csv").read_text().splitlines()
    assert header == [",".join(["review_id", "text", *RESULT_NAMES, "label", "confidence"])]
    assert (tmp_path / "out.jsonl").read_bytes() == b""


def test_the_extension_picks_the_format_and_an_unknown_one_names_them_all() -> None:
    assert output_format(Path("x.parquet")) is ParquetOutput
    assert output_format(Path("X.CSV")) is CsvOutput
    assert output_format(Path("x.jsonl")) is JsonLinesOutput
    with pytest.raises(SpecError, match=r"does not end in \.parquet, \.csv or \.jsonl"):
        output_format(Path("x.txt"))

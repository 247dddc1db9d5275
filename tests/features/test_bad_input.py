"""Bad input raises InputDataError naming the file and the column or line, or is an accounted drop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from features.policies import apply_policies
from features.readers import InputDataError, read_events
from recsys.config import DataConfig, FeaturesConfig

HEADER = "user_id,item_id,timestamp\n"


def _parquet_bytes(tmp: Path, frame: pl.DataFrame) -> bytes:
    path = tmp / "source.parquet"
    frame.write_parquet(path)
    return path.read_bytes()


@dataclass(frozen=True)
class Case:
    name: str
    content: str | bytes | None  # None: the file is not written; "parquet:<kind>": built in the test
    expected: tuple[str, ...]  # substrings of the error message, besides the file name
    data: dict[str, Any] = field(default_factory=dict)
    filename: str = "events.csv"


CASES = [
    Case("missing_file", None, ("does not exist", "data.path")),
    Case("empty_file", "", ("is empty",)),
    Case("header_only", HEADER, ("no rows",)),
    Case("missing_user_column", "uid,item_id,timestamp\n1,2,3\n", ("'user_id'", "data.user_col", "'uid'")),
    Case(
        "renamed_item_column",
        "user_id,product,timestamp\n1,2,3\n",
        ("'item_id'", "data.item_col", "'product'"),
    ),
    Case("null_user_id", HEADER + "1,2,3\n,3,4\n", ("'user_id'", "empty/null", "data row 2")),
    Case("non_integer_item_id", HEADER + "1,2,3\n1,abc,4\n", ("'item_id'", "'abc'", "data row 2")),
    Case("float_item_id", HEADER + "1,1.5,3\n", ("'item_id'", "'1.5'", "whole numbers")),
    Case(
        "unparsable_timestamp", HEADER + "1,2,yesterday\n", ("'timestamp'", "'yesterday'", "timestamp_format")
    ),
    Case(
        "timestamp_not_in_format",
        HEADER + "1,2,2020-01-02\n",
        ("'timestamp'", "'2020-01-02'"),
        {"timestamp_format": "%d/%m/%Y"},
    ),
    Case(
        "non_utf8_bytes", HEADER.encode() + b"1,2,3\n1,caf\xe9,4\n", ("UTF-8", "line 3", "column 'item_id'")
    ),
    Case(
        "mixed_timestamp_kinds",
        HEADER + "1,2,100\n1,3,2020-01-01\n",
        ("'timestamp'", "'2020-01-01'", "data row 2"),
    ),
    Case("ragged_line", HEADER + "1,2,3\n1,2,3,4\n", ("cannot be parsed", "data.format")),
    Case(  # an export cut after the timestamp: the event would lose its type
        "short_line_without_its_last_field",
        "user_id,item_id,timestamp,kind\n1,10,100,view\n1,11,101,buy\n1,12,102",
        ("line 4 has 3 field(s), fewer than the 4 of the first line", "complete or remove the line"),
        {"event_type_col": "kind"},
    ),
    Case(  # cut inside the timestamp ('102' -> '1'): every value parses, only the field count tells
        "short_line_cut_in_a_value",
        'user_id,item_id,timestamp,kind\n1,"10,a",100,view\n\n1,11,1',
        ("line 4 has 3 field(s)",),
        {"event_type_col": "kind", "item_id_type": "string"},
    ),
    Case("wrong_separator", "user_id\titem_id\ttimestamp\n1\t2\t3\n", ("'user_id'", "data.separator")),
    Case(
        "truncated_parquet",
        "parquet:truncated",
        ("parquet", "truncated"),
        {"format": "parquet"},
        "events.parquet",
    ),
    Case(
        "boolean_id_parquet",
        "parquet:boolean",
        ("'user_id'", "Boolean"),
        {"format": "parquet"},
        "events.parquet",
    ),
    Case(
        "bad_rating",
        "userId,movieId,rating,timestamp\n1,2,five,3\n",
        ("'rating'", "'five'"),
        {"format": "movielens_csv"},
    ),
    Case(  # the default data.format=csv on a Parquet export: its magic bytes said "column 'PAR1...' not found"
        "parquet_read_as_csv",
        "parquet:good",
        ("is a Parquet file", "data.format=parquet"),
        {},
        "events.parquet",
    ),
    Case("pairs_one_field", "1 1\n1\n1 2\n", ("line 2", "1 field"), {"format": "pairs"}, "ml-1m.txt"),
    Case("pairs_non_utf8", b"1 1\n1 \xff\n", ("UTF-8", "line 2"), {"format": "pairs"}, "ml-1m.txt"),
    Case(
        "sequence_bad_token",
        "1 2 3\n2 4 x9\n",
        ("'item'", "'x9'", "line 2"),
        {"format": "sequence_lines"},
        "Beauty.txt",
    ),
]


def _content(case: Case, tmp_path: Path) -> str | bytes | None:
    if not isinstance(case.content, str) or not case.content.startswith("parquet:"):
        return case.content
    if case.content == "parquet:truncated":
        good = _parquet_bytes(tmp_path, pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}))
        return good[: len(good) // 2]
    if case.content == "parquet:good":
        return _parquet_bytes(tmp_path, pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}))
    return _parquet_bytes(tmp_path, pl.DataFrame({"user_id": [True], "item_id": [2], "timestamp": [3]}))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_raises_a_precise_error(case: Case, tmp_path: Path, write_file):
    content = _content(case, tmp_path)
    path = tmp_path / case.filename if content is None else write_file(case.filename, content)
    with pytest.raises(InputDataError) as info:
        read_events(DataConfig(**case.data), path).collect()
    message = str(info.value)
    assert case.filename in message
    for expected in case.expected:
        assert expected in message, f"{expected!r} not in: {message}"


ACCOUNTED = [
    ("duplicated_rows", HEADER + "1,2,3\n1,2,3\n1,4,5\n", FeaturesConfig(), {"duplicate": 1}),
    (
        "event_type_filter",
        "user_id,item_id,timestamp,type\n1,2,3,view\n1,4,5,click\n1,5,6,\n",
        FeaturesConfig(event_types=("view",)),
        {"event_type_filtered": 2},
    ),
]


@pytest.mark.parametrize(
    ("text", "features", "expected"), [a[1:] for a in ACCOUNTED], ids=[a[0] for a in ACCOUNTED]
)
def test_bad_rows_are_accounted_drops(write_file, text, features, expected):
    path = write_file("events.csv", text)
    events = read_events(DataConfig(event_type_col="type" if "type" in text else None), path)
    kept, accounting = apply_policies(events, features)
    assert {k: v for k, v in accounting.dropped.items() if v} == expected
    assert accounting.rows_in == 3 == accounting.rows_kept + sum(accounting.dropped.values())
    assert kept.height == accounting.rows_kept


def test_a_file_column_named_like_the_readers_row_counter_is_read(write_file):
    """The reader numbers rows in a column of its own: a file column '_pos' used to clash with it ('duplicate
    column name _pos')."""
    path = write_file("events.csv", "user_id,item_id,timestamp,_pos\n1,2,3,x\n1,4,5,y\n")
    frame = read_events(DataConfig(), path).collect()
    assert frame.select("user_id", "item_id", "timestamp").rows() == [(1, 2, 3), (1, 4, 5)]


@pytest.mark.parametrize(("row", "line", "field", "problem"), [
    ('1,10,5000,Samsung 55" TV\n', 2002, "4 ('title')", 'a " inside a field that is not quoted'),
    ('1,10,5000,"Samsung 55" TV"\n', 2002, "4 ('title')", "text (' ') right after the closing \""),
    ('1,10,5000,"Samsung 55 TV\n', 2002, "4 ('title')", 'a field opened with " is never closed'),
])
def test_a_misplaced_quote_is_named_by_line_and_field(tmp_path, row, line, field, problem):
    """A stray quote in an export (a product title) gave polars' "CSV malformed: expected 0 rows, actual 2001
    rows, in chunk starting at row_offset 2000", no line, no column, and advice about field counts."""
    good = "".join(f"{i % 7},{i % 5},{100 + i},ok\n" for i in range(2000))
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp,title\n" + good + row + good)
    with pytest.raises(InputDataError) as caught:
        apply_policies(read_events(DataConfig(), path), FeaturesConfig())
    message = str(caught.value)
    assert f"line {line}, field {field}: {problem}" in message and "data.quote_char: null" in message, message


def test_quote_char_null_reads_quotes_as_text_and_a_quoted_multiline_field_is_fine(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text('user_id,item_id,timestamp,title\n1,10,1,Samsung 55" TV\n1,11,2,"x\n2,12,3,y\n')
    frame = read_events(DataConfig(quote_char=None), path).collect()
    assert frame["item_id"].to_list() == [10, 11, 12]
    from features.readers import _first_quote_problem

    quoted = tmp_path / "quoted.csv"
    quoted.write_text('user_id,item_id,timestamp,title\n1,11,2,"a ""b""\nc",\n2,12,3,x"y\n')
    assert _first_quote_problem(quoted, ",", '"') == (4, 4, 'a " inside a field that is not quoted')


@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp"])
@pytest.mark.parametrize("id_type", ["int", "string"])
def test_a_parquet_column_with_no_value_at_all_is_missing_values_not_a_dtype(tmp_path, column, id_type):
    """An upstream join that lost every id writes a Null-typed column: the message blamed the dtype and advised
    data.user_id_type: string, which does not help; it is N rows with no value, as in a csv."""
    frame = pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [5, 6]})
    frame = frame.with_columns(pl.lit(None).alias(column))
    assert frame.schema[column] == pl.Null
    path = tmp_path / "day.parquet"
    frame.write_parquet(path)
    data = DataConfig(format="parquet", user_id_type=id_type, item_id_type=id_type)
    with pytest.raises(InputDataError) as caught:
        apply_policies(read_events(data, path), FeaturesConfig())
    message = str(caught.value)
    assert f"column '{column}'" in message and "2 row(s) have an empty/null value (first at data row 1)" in message
    assert "dtype" not in message, message


def test_a_relative_path_that_does_not_exist_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch) -> None:
    """Config paths are relative to the current directory: a scheduler that starts the job elsewhere (Airflow's
    temporary directory) got "data/events does not exist" for a file that is there, relative to the project."""
    from pipelines.cli import EXIT_USAGE, main

    monkeypatch.chdir(tmp_path)
    assert main(["features", "--quiet", f"work_dir={tmp_path / 'work'}", "data.path=data/events.csv",
                 "tracking.enabled=false"]) == EXIT_USAGE
    err = (tmp_path / "work" / "logs").glob("features-*.log")
    text = "".join(p.read_text() for p in err)
    assert f"data/events.csv (that is {tmp_path / 'data' / 'events.csv'}: relative paths are relative to the current " \
           "directory) does not exist" in text

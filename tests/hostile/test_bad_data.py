"""Malformed event files through ``recsys features``: exit 3 (2 for a bad data.path), a message naming the
file and the column or line and saying what to do, no traceback, and no feature set written."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from pipelines.cli import EXIT_INPUT, EXIT_USAGE
from tests.hostile.cli_run import assert_no_output, assert_user_error, features_argv, run_cli

HEADER = "user_id,item_id,timestamp\n"
INT64_MAX = 2**63 - 1


def _parquet(**columns: pl.Series | list) -> bytes:
    buffer = io.BytesIO()
    pl.DataFrame(columns).write_parquet(buffer)
    return buffer.getvalue()


_GOOD_PARQUET = _parquet(user_id=[1, 1], item_id=[2, 3], timestamp=[3, 4])


@dataclass(frozen=True)
class Case:
    name: str
    content: str | bytes
    expected: tuple[str, ...]  # texts on stderr besides the file's path
    overrides: tuple[str, ...] = ()
    filename: str = "events.csv"
    code: int = EXIT_INPUT


PARQUET = ("data.format=parquet",)
CASES = [
    Case("empty_file_0_bytes", "", ("is empty", "data.path")),
    Case("header_only", HEADER, ("no rows", "data.path")),
    Case("missing_user_column", "uid,item_id,timestamp\n1,2,3\n", ("'user_id'", "data.user_col", "'uid'")),
    Case(
        "renamed_item_column",
        "user_id,product,timestamp\n1,2,3\n",
        ("'item_id'", "data.item_col", "'product'"),
    ),
    Case(
        "string_ids",
        HEADER + "u1,2,3\n",
        ("'user_id'", "'u1'", "data row 1", "set data.user_id_type: string"),
    ),
    Case("float_ids", HEADER + "1,1.5,3\n", ("'item_id'", "'1.5'", "whole numbers")),
    Case("boolean_ids", HEADER + "true,2,3\n", ("'user_id'", "'true'", "whole numbers")),
    Case(
        "null_user_id", HEADER + "1,2,3\n,3,4\n", ("'user_id'", "empty/null", "data row 2", "needs a user_id")
    ),
    Case(
        "unparsable_timestamp", HEADER + "1,2,yesterday\n", ("'timestamp'", "'yesterday'", "timestamp_format")
    ),
    Case("impossible_date", HEADER + "1,2,2020-13-45\n", ("'timestamp'", "'2020-13-45'", "ISO-8601")),
    Case("nan_timestamp", HEADER + "1,2,nan\n", ("'timestamp'", "'nan'", "epoch seconds")),
    Case(
        # the '%' would stop YAML; the override is still read as the format text
        "timestamp_not_in_format",
        HEADER + "1,2,2020-01-02\n",
        ("'timestamp'", "'2020-01-02'", "data row 1"),
        ("data.timestamp_format=%d/%m/%Y",),
    ),
    Case("huge_id_as_text", HEADER + f"{2**63},2,3\n", ("'user_id'", f"'{2**63}'", f"at most {INT64_MAX}")),
    Case(
        "non_utf8_bytes",
        HEADER.encode() + b"1,2,3\n1,caf\xe9,4\n",
        ("UTF-8", "line 3", "column 'item_id'", "iconv"),
    ),
    Case("ragged_long_line", HEADER + "1,2,3\n1,2,3,4\n", ("line 3 has 4 fields", "same number of fields")),
    Case("ragged_short_line", HEADER + "1,2,3\n1,2\n", ("'timestamp'", "empty/null", "data row 2")),
    Case("unclosed_quote", HEADER + '1,"2,3\n1,3,4\n',
         ("line 2, field 2 ('item_id')", "is never closed", "data.quote_char: null")),
    Case("wrong_separator", "user_id;item_id;timestamp\n1;2;3\n", ("'user_id'", "data.separator")),
    Case(
        "duplicated_header_column",
        "user_id,user_id,item_id,timestamp\n1,2,3,4\n",
        ("more than once", "data.user_col"),
    ),
    Case(
        "bad_weight",
        "user_id,item_id,timestamp,w\n1,2,3,x\n",
        ("'w'", "'x'", "numbers"),
        ("data.weight_col=w",),
    ),
    Case("truncated_parquet", _GOOD_PARQUET[: len(_GOOD_PARQUET) // 2], ("truncated", "Re-export"), PARQUET),
    Case("csv_read_as_parquet", HEADER + "1,2,3\n", ("not a readable parquet file", "data.format"), PARQUET),
    Case(
        "parquet_boolean_ids",
        _parquet(user_id=[True], item_id=[2], timestamp=[3]),
        ("'user_id'", "Boolean"),
        PARQUET,
    ),
    Case(
        "parquet_string_ids",
        _parquet(user_id=["a"], item_id=[2], timestamp=[3]),
        ("'user_id'", "'a'"),
        PARQUET,
    ),
    Case(
        "parquet_list_ids",
        _parquet(user_id=[[1]], item_id=[2], timestamp=[3]),
        ("'user_id'", "List"),
        PARQUET,
    ),
    Case(
        "parquet_float_ids",
        _parquet(user_id=[1], item_id=[1.5], timestamp=[3]),
        ("'item_id'", "'1.5'"),
        PARQUET,
    ),
    Case(
        "parquet_null_ids",
        _parquet(user_id=[1, 1], item_id=[2, None], timestamp=[3, 4]),
        ("'item_id'", "empty/null"),
        PARQUET,
    ),
    Case(
        "parquet_boolean_timestamp",
        _parquet(user_id=[1], item_id=[2], timestamp=[True]),
        ("'timestamp'", "Boolean", "epoch seconds"),
        PARQUET,
    ),
    Case(
        "parquet_huge_uint64_id",
        _parquet(user_id=pl.Series([2**64 - 1], dtype=pl.UInt64), item_id=[2], timestamp=[3]),
        ("'user_id'", f"'{2**64 - 1}'", "Int64"),
        PARQUET,
    ),
    Case(
        "pairs_one_field",
        "1 1\n1\n1 2\n",
        ("line 2", "1 field", "'user item'"),
        ("data.format=pairs",),
        "ml-1m.txt",
    ),
    Case(
        "sequence_lines_non_integer_token",
        "1 2 3\n2 4 x9\n",
        ("'item'", "'x9'", "line 2"),
        ("data.format=sequence_lines",),
        "Beauty.txt",
    ),
    Case(
        "sequence_lines_huge_id",
        f"1 2 {2**64}\n",
        ("'item'", f"'{2**64}'", "Int64"),
        ("data.format=sequence_lines",),
        "Beauty.txt",
    ),
    Case(
        "movielens_dat_with_commas",
        "1,2,5,978300760\n",
        ("movielens_dat", "user::item::rating::timestamp", "different number of fields"),
        ("data.format=movielens_dat",),
        "ratings.dat",
    ),
    Case(
        "kcore_removes_every_user",
        HEADER + "1,2,3\n1,3,4\n2,3,5\n",
        ("no events left", "features.min_user_events (now 5)", "'user_kcore': 3"),
        ("features.min_user_events=5",),
    ),
    Case(
        "event_types_remove_everything",
        "user_id,item_id,timestamp,kind\n1,2,3,view\n1,3,4,click\n",
        ("no events left", "features.event_types (now ['buy'])", "'event_type_filtered': 2"),
        ("data.event_type_col=kind", "features.event_types=[buy]"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_a_clear_error_and_writes_nothing(case: Case, tmp_path: Path, capsys):
    path = tmp_path / "input" / case.filename
    path.parent.mkdir()
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    else:
        path.write_text(case.content, encoding="utf-8")
    work = tmp_path / "work"
    outcome = run_cli(capsys, *features_argv(work, path, *case.overrides))
    assert_user_error(outcome, case.code, str(path), "bad input data", *case.expected)
    assert_no_output(work)


@pytest.mark.parametrize("kind", ["does_not_exist", "directory"])
def test_bad_data_path_is_a_usage_error(kind: str, tmp_path: Path, capsys):
    path = tmp_path / "missing.csv" if kind == "does_not_exist" else tmp_path
    work = tmp_path / "work"
    outcome = run_cli(capsys, *features_argv(work, path))
    what = "does not exist" if kind == "does_not_exist" else "is a directory"
    assert_user_error(outcome, EXIT_USAGE, f"data.path: {path} {what}", "set data.path")
    assert_no_output(work)

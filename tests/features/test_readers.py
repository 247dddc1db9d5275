"""Every input format read into the canonical event columns on tiny files with known content."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from features.readers import InputDataError, read_events, read_item_ids
from features.schema import EVENTS, EVENTS_OPTIONAL, ID_DTYPES
from recsys.config import DataConfig


def _read(data: DataConfig, path) -> pl.DataFrame:
    lf = read_events(data, path)
    assert isinstance(lf, pl.LazyFrame)
    df = lf.collect()
    for col, dtype in (EVENTS | EVENTS_OPTIONAL).items():
        if col in df.columns:
            assert df.schema[col] in (dtype if isinstance(dtype, tuple) else (dtype,)), col
    want = {"user_id": ID_DTYPES[data.user_id_type], "item_id": ID_DTYPES[data.item_id_type]}
    assert {c: df.schema[c] for c in want} == want
    return df


def _triples(df: pl.DataFrame) -> list[tuple[int, int, int]]:
    return list(df.select("user_id", "item_id", "timestamp").iter_rows())


def test_csv_integer_timestamps(write_file):
    path = write_file("events.csv", "user_id,item_id,timestamp\n1,10,100\n2, 20 ,200\n")
    df = _read(DataConfig(), path)
    assert df.columns == ["user_id", "item_id", "timestamp"]
    assert _triples(df) == [(1, 10, 100), (2, 20, 200)]


def test_csv_configured_columns_separator_event_type_and_weight(write_file):
    text = "ts;kind;uid;iid;w\n5;view;7;70;0.5\n6;buy;8;80;2\n"
    path = write_file("events.csv", text)
    data = DataConfig(
        user_col="uid",
        item_col="iid",
        timestamp_col="ts",
        event_type_col="kind",
        weight_col="w",
        separator=";",
    )
    df = _read(data, path)
    assert _triples(df) == [(7, 70, 5), (8, 80, 6)]
    assert df["event_type"].to_list() == ["view", "buy"]
    assert df["weight"].to_list() == [0.5, 2.0]


def test_csv_without_a_header_line_reads_its_first_line_as_an_event(write_file):
    """data.columns names the columns of a header-less file (the Taobao UserBehavior export); before, its first
    event could only be read as the header, so it was lost without being counted."""
    path = write_file("events.csv", "1,10,cat,pv,100\n2,20,cat,buy,200\n")
    data = DataConfig(columns=("user", "item", "category", "behavior", "ts"), user_col="user", item_col="item",
                      timestamp_col="ts", event_type_col="behavior")
    df = _read(data, path)
    assert _triples(df) == [(1, 10, 100), (2, 20, 200)] and df["event_type"].to_list() == ["pv", "buy"]


@pytest.mark.parametrize("header, quote", [("user_id,item_id", '"'), ("'USER_ID';'Item_Id'", "'")])
def test_data_columns_on_a_file_with_a_header_is_refused(write_file, header, quote):
    """The header would be read as an event (with text ids and no timestamp column, silently); in any case, and
    quoted with data.quote_char."""
    separator = ";" if ";" in header else ","
    path = write_file("events.csv", f"{header}\nu1{separator}a\n")
    with pytest.raises(InputDataError, match=r"its first line names the columns \['user_id', 'item_id'\]: a header"):
        _read(DataConfig(columns=("user_id", "item_id"), timestamp_col=None, user_id_type="string",
                         item_id_type="string", separator=separator, quote_char=quote), path)


@pytest.mark.parametrize("columns, match", [
    (None, r"column 'user_id' \(data.user_col\) not found; the file has columns \['1', '10', 'cat', 'pv', '100'\]\. "
           r"That first line looks like an event, not a header: .* set data.columns"),
    (("user_id", "item_id"), r"data.columns names 2 columns \['user_id', 'item_id'\], but the file's first line has 5 "
                             "fields"),
])
def test_a_header_less_file_is_explained(write_file, columns, match):
    path = write_file("events.csv", "1,10,cat,pv,100\n2,20,cat,buy,200\n")
    with pytest.raises(InputDataError, match=match):
        _read(DataConfig(columns=columns, timestamp_col=None), path)


def test_data_columns_is_checked():
    with pytest.raises(ValueError, match=r"data.columns names \['a'\] more than once"):
        DataConfig(columns=["a", "b", "a"])
    from recsys.config import load_config

    # another format reads no header: named as unused, as other keys are
    assert load_config(None, ["data.format=parquet", "data.columns=[a,b]"]).ignored() == [
        "data.columns=['a', 'b'] has no effect with data.format=parquet (it names the columns of a csv file without "
        "a header)"]


def test_column_names_and_event_types_given_as_numbers_are_their_text():
    """`data.user_col=1` (a header of numbers) and `features.event_types=[1,4]` (type codes): YAML reads numbers,
    which were refused as 'Input should be a valid string'."""
    from recsys.config import FeaturesConfig, ItemFeaturesConfig, TrainConfig

    assert DataConfig(user_col=1, item_col=2, columns=[1, 2]).user_col == "1"
    assert FeaturesConfig(event_types=[1, 4.5]).event_types == ("1", "4.5")
    assert TrainConfig(type_weights={1: 2.0}).type_weights == {"1": 2.0}
    with pytest.raises(ValueError, match="names one key twice"):  # a number and its text: one type, two weights
        TrainConfig(type_weights={1: 2.0, "1": 3.0})
    assert DataConfig(path=2024, separator=1).path == "2024"  # took as text before (pydantic's coercion)
    assert ItemFeaturesConfig(path="a.csv", item_col=0, columns=[2, 3]).columns == ("2", "3")
    with pytest.raises(ValueError, match="valid string"):  # YAML's .inf is no name
        FeaturesConfig(event_types=[float("inf")])


def test_csv_timestamp_format(write_file):
    path = write_file("events.csv", "user_id,item_id,timestamp\n1,2,02/01/2020 10:30\n")
    df = _read(DataConfig(timestamp_format="%d/%m/%Y %H:%M"), path)
    assert df["timestamp"].item() == int(datetime(2020, 1, 2, 10, 30, tzinfo=UTC).timestamp())


def test_csv_iso_timestamps_without_format(write_file):
    rows = ["2020-01-01T00:00:00Z", "2020-01-01 00:00:00", "2020-01-01T02:00:00+02:00", "2020-01-01"]
    path = write_file("events.csv", "user_id,item_id,timestamp\n" + "".join(f"1,2,{r}\n" for r in rows))
    expected = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
    assert _read(DataConfig(), path)["timestamp"].to_list() == [expected] * 4


def test_csv_without_timestamp_column_uses_row_order(write_file):
    path = write_file("events.csv", "user_id,item_id\n3,1\n1,2\n3,3\n")
    assert _triples(_read(DataConfig(timestamp_col=None), path)) == [(3, 1, 0), (1, 2, 1), (3, 3, 2)]


def test_parquet_native_dtypes(tmp_path):
    path = tmp_path / "events.parquet"
    pl.DataFrame(
        {
            "user_id": pl.Series([1, 2], dtype=pl.UInt32),
            "item_id": [10.0, 20.0],  # integral floats (e.g. written by pandas) are accepted
            "timestamp": [datetime(2020, 1, 1), datetime(2020, 1, 1, 0, 0, 5)],
        }
    ).write_parquet(path)
    df = _read(DataConfig(format="parquet"), path)
    start = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
    assert _triples(df) == [(1, 10, start), (2, 20, start + 5)]


def test_movielens_dat(write_file):
    path = write_file("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    df = _read(DataConfig(format="movielens_dat"), path)
    assert _triples(df) == [(1, 1193, 978300760), (1, 661, 978302109)]
    assert df["weight"].to_list() == [5.0, 3.0]


def test_movielens_udata(write_file):
    path = write_file("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    df = _read(DataConfig(format="movielens_udata"), path)
    assert _triples(df) == [(196, 242, 881250949), (186, 302, 891717742)]
    assert df["weight"].to_list() == [3.0, 3.0]


def test_movielens_csv(write_file):
    path = write_file(
        "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
    )
    df = _read(DataConfig(format="movielens_csv"), path)
    assert _triples(df) == [(1, 1, 964982703), (1, 3, 964981247)]
    assert df["weight"].to_list() == [4.0, 4.5]


def test_pairs_timestamp_is_line_number(write_file):
    path = write_file("ml-1m.txt", "1 1\n1 2\n\n2  5\r\n1\t3\n")
    assert _triples(_read(DataConfig(format="pairs"), path)) == [(1, 1, 1), (1, 2, 2), (2, 5, 4), (1, 3, 5)]


def test_sequence_lines_timestamp_is_position(write_file):
    path = write_file("Beauty.txt", "1 10 11 12\n2 20\n3\n1 13\n")
    df = _read(DataConfig(format="sequence_lines"), path)
    # user 1 continues on its second line; the item-less line of user 3 adds nothing
    assert _triples(df) == [(1, 10, 0), (1, 11, 1), (1, 12, 2), (2, 20, 0), (1, 13, 3)]


def test_sequence_lines_positions_follow_the_parsed_user_not_its_spelling(write_file):
    path = write_file("Beauty.txt", "07 10 11 12\n7 13\n+7 14\n")
    # one user written three ways: its items keep file order (as written, '7 13' would restart at 0)
    assert _triples(_read(DataConfig(format="sequence_lines"), path)) == [(7, 10, 0), (7, 11, 1), (7, 12, 2),
                                                                          (7, 13, 3), (7, 14, 4)]


def test_text_ids_in_every_format(write_file, tmp_path):
    text = DataConfig(user_id_type="string", item_id_type="string")
    path = write_file("events.csv", "user_id,item_id,timestamp\n u-1 ,B00X7,1\n42,0042,2\n")
    assert _triples(_read(text, path)) == [("u-1", "B00X7", 1), ("42", "0042", 2)]  # stripped, text kept as is
    pq = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": pl.Series([7, 8], dtype=pl.UInt32), "item_id": [3.0, 4.0], "timestamp": [1, 2]}
                 ).write_parquet(pq)  # numbers in a text-id column are written in decimal
    assert _triples(_read(text.model_copy(update={"format": "parquet"}), pq)) == [("7", "3", 1), ("8", "4", 2)]
    seq = write_file("Beauty.txt", "alice B001 B002\nbob B003\n")
    assert _triples(_read(text.model_copy(update={"format": "sequence_lines"}), seq)) == [
        ("alice", "B001", 0), ("alice", "B002", 1), ("bob", "B003", 0)]
    mixed = DataConfig(item_id_type="string")  # whole-number users, text items
    path2 = write_file("mixed.csv", "user_id,item_id,timestamp\n1,B00X7,1\n")
    assert _triples(_read(mixed, path2)) == [(1, "B00X7", 1)]


def test_uint64_ids_above_int64_are_read_as_text_ids(tmp_path):
    """A hash stored as UInt64 above 2**63-1 needs data.*_id_type: string, which then reads it in decimal."""
    path = tmp_path / "events.parquet"
    big = pl.Series([2**63 + 5, 2**64 - 1], dtype=pl.UInt64)
    pl.DataFrame({"user_id": big, "item_id": big, "timestamp": [1, 2]}).write_parquet(path)
    with pytest.raises(InputDataError, match=r"'user_id'.*'9223372036854775813'.*set data.user_id_type: string"):
        read_events(DataConfig(format="parquet"), path)
    text = DataConfig(format="parquet", user_id_type="string", item_id_type="string")
    ids = [str(2**63 + 5), str(2**64 - 1)]
    assert _triples(_read(text, path)) == [(ids[0], ids[0], 1), (ids[1], ids[1], 2)]
    pl.DataFrame({"item_id": big}).write_parquet(tmp_path / "allowed.parquet")
    assert read_item_ids(tmp_path / "allowed.parquet", "candidates.allowed_items", "string").to_list() == sorted(ids)


def test_integral_floats_written_as_text_are_whole_number_ids(write_file):
    """What pandas writes for an int column that had a NaN; exact, not through a float (2**63-1 stays)."""
    path = write_file("events.csv", f"user_id,item_id,timestamp\n1.0,2.0,10\n 1. ,-3.000,11\n1,{2**63 - 1}.0,12\n")
    assert _triples(_read(DataConfig(), path)) == [(1, 2, 10), (1, -3, 11), (1, 2**63 - 1, 12)]
    for bad in ("2.5", "1e3", "nan", f"{2**63}.0"):
        path = write_file("events.csv", f"user_id,item_id,timestamp\n1,2.0,10\n1,{bad},11\n")
        with pytest.raises(InputDataError, match=rf"'item_id' \(data.item_col\).*'{bad}' at data row 2.*whole numbers"):
            read_events(DataConfig(), path)


def test_complete_lines_are_read_whatever_their_quotes_blank_lines_and_empty_last_fields(write_file):
    """Only a line with fewer fields than the header is short: not a quoted separator or line break, an empty
    last field, a blank line or a missing final newline."""
    text = 'user_id,item_id,timestamp,kind\n1,"a,b",100,\n\n1,"c\nd",101,view\n1,e,102,""\n\n1,f,103,buy'
    df = _read(DataConfig(event_type_col="kind", item_id_type="string"), write_file("events.csv", text))
    assert df.select("item_id", "timestamp", "event_type").rows() == [
        ("a,b", 100, None), ("c\nd", 101, "view"), ("e", 102, None), ("f", 103, "buy")]


@pytest.mark.parametrize(("content", "match"), [
    ("user_id,item_id,timestamp\n1,B00X7,1\n", r"'item_id' \(data.item_col\).*'B00X7'.*set data.item_id_type: string"),
    ("user_id,item_id,timestamp\nu1,7,1\n", r"'user_id' \(data.user_col\).*'u1'.*set data.user_id_type: string"),
])
def test_text_in_a_whole_number_id_column_says_which_key_to_set(write_file, content, match):
    with pytest.raises(InputDataError, match=match):
        read_events(DataConfig(), write_file("events.csv", content))


@pytest.mark.parametrize(("content", "match"), [
    ("user_id,item_id,timestamp\nu1,   ,1\n", r"'item_id'.*'   ' at data row 1.*ids must not be blank"),
    ("user_id,item_id,timestamp\nu1,,1\n", r"'item_id'.*empty/null value \(first at data row 1\)"),
    # MySQL's \N, SQL's NULL, pandas' NaN: one "item" shared by every row without an id, read as a real id before
    ("user_id,item_id,timestamp\nu1,a,1\nu1,\\N,2\n", r"'item_id'.*'\\\\N' at data row 2.*missing-value marker"),
    ("user_id,item_id,timestamp\nNULL,a,1\n", r"'user_id'.*'NULL' at data row 1.*missing-value marker"),
    ("user_id,item_id,timestamp\nu1,NaN,1\n", r"'item_id'.*'NaN' at data row 1"),
    # Excel's #N/A, pandas' <NA> as printed, a hand-typed N/A: accepted as ids before
    ("user_id,item_id,timestamp\nu1,a,1\nu1,#N/A,2\n", r"'item_id'.*'#N/A' at data row 2.*missing-value marker"),
    ("user_id,item_id,timestamp\n<NA>,a,1\n", r"'user_id'.*'<NA>' at data row 1"),
    ("user_id,item_id,timestamp\nu1,N/A,1\n", r"'item_id'.*'N/A' at data row 1"),
])
def test_blank_text_ids_are_bad_input(write_file, content, match):
    with pytest.raises(InputDataError, match=match):
        read_events(DataConfig(user_id_type="string", item_id_type="string"), write_file("events.csv", content))


def test_a_missing_value_marker_in_the_event_type_column_is_no_type(write_file):
    """An export's NULL (or NaN, N/A) became a type named "NULL", with its own embedding and loss weight."""
    path = write_file("events.csv", "user_id,item_id,timestamp,kind\n1,2,3,view\n1,3,4,NULL\n1,4,5, N/A \n1,5,6,\n")
    df = read_events(DataConfig(event_type_col="kind"), path).collect()
    assert df["event_type"].to_list() == ["view", None, None, None]


@pytest.mark.parametrize("fmt", ["csv", "pairs"])
def test_read_is_lazy_and_repeatable(write_file, fmt):
    text = "user_id,item_id,timestamp\n1,2,3\n" if fmt == "csv" else "1 2\n"
    path = write_file("events.txt", text)
    lf = read_events(DataConfig(format=fmt), path)
    assert lf.collect().equals(lf.collect())


# ---- item lists (candidates.allowed_items) ------------------------------------------------------------


def test_item_list_from_csv_or_parquet_is_distinct_and_sorted(tmp_path):
    csv_file = tmp_path / "allowed.csv"
    csv_file.write_text("item_id,in_stock\n30,1\n 10 ,1\n30,1\n-5,1\n")
    got = read_item_ids(csv_file, "candidates.allowed_items")
    assert got.dtype == pl.Int64 and got.to_list() == [-5, 10, 30]
    pq = tmp_path / "allowed.parquet"
    pl.DataFrame({"item_id": [7, 3, 7]}, schema={"item_id": pl.Int64}).write_parquet(pq)
    assert read_item_ids(pq, "candidates.allowed_items").to_list() == [3, 7]


def test_item_list_of_text_ids(tmp_path):
    path = tmp_path / "allowed.csv"
    path.write_text("item_id\nB002\n B001 \nB002\n17\n")
    got = read_item_ids(path, "candidates.allowed_items", "string")
    assert got.dtype == pl.String and got.to_list() == ["17", "B001", "B002"]
    path.write_text("item_id\nB002\n  \n")
    with pytest.raises(InputDataError, match=r"data row 2: '  ' is not an item id; ids must not be blank"):
        read_item_ids(path, "candidates.allowed_items", "string")


@pytest.mark.parametrize(("text", "match"), [
    ("item,x\n1,2\n", r"allowed\.csv \(candidates\.allowed_items\) has no column 'item_id'"),
    ("item_id\n1\nabc\n", r"allowed\.csv \(candidates\.allowed_items\), column 'item_id', data row 2: 'abc'"),
    ("item_id\n1\n2\n1.5\n", r"column 'item_id', data row 3: '1.5' is not an item id"),
    ("item_id\n", r"lists no items.*candidates\.allowed_items=null"),
    ("", r"allowed\.csv \(candidates\.allowed_items\) cannot be read as CSV"),
])
def test_bad_item_list_names_the_file_key_and_column(tmp_path, text, match):
    path = tmp_path / "allowed.csv"
    path.write_text(text)
    with pytest.raises(InputDataError, match=match):
        read_item_ids(path, "candidates.allowed_items")


def test_missing_item_list_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.csv does not exist.*fix candidates\.allowed_items"):
        read_item_ids(tmp_path / "nothere.csv", "candidates.allowed_items")


def test_a_byte_order_mark_is_not_part_of_the_first_id(write_file):
    path = write_file("pairs.txt", "\ufeffu1 i1\nu1 i2\n")
    df = _read(DataConfig(format="pairs", user_id_type="string", item_id_type="string"), path)
    assert df["user_id"].to_list() == ["u1", "u1"]


def test_event_types_of_a_type_that_holds_no_name_are_rejected_naming_the_column(tmp_path):
    data = DataConfig(format="parquet", event_type_col="et")
    base = {"user_id": [1, 1], "item_id": [2, 3], "timestamp": [100, 101]}
    path = tmp_path / "events.parquet"
    pl.DataFrame(base | {"et": [["view"], ["buy"]]}).write_parquet(path)
    with pytest.raises(InputDataError, match=r"column 'et' \(data.event_type_col\) has dtype List\(String\).*"
                                             r"event types must be text"):
        read_events(data, path)
    pl.DataFrame(base | {"et": pl.Series(["view", "buy"], dtype=pl.Categorical)}).write_parquet(path)
    assert _read(data, path)["event_type"].to_list() == ["view", "buy"]
    pl.DataFrame(base | {"et": [1, 2]}).write_parquet(path)
    assert _read(data, path)["event_type"].to_list() == ["1", "2"]


def test_ids_stored_as_category_or_decimal_and_an_empty_weight_column_are_read(tmp_path):
    from decimal import Decimal

    path = tmp_path / "events.parquet"
    pl.DataFrame({
        "user_id": pl.Series([Decimal(7), Decimal(8)], dtype=pl.Decimal(20, 0)),  # SQL decimal(20, 0)
        "item_id": pl.Series(["a", "b"], dtype=pl.Categorical),  # pandas category
        "timestamp": [100, 101],
        "rating": pl.Series([None, None], dtype=pl.Null),  # an optional column left empty
    }).write_parquet(path)
    df = _read(DataConfig(format="parquet", item_id_type="string", weight_col="rating"), path)
    assert df.select("user_id", "item_id", "timestamp").rows() == [(7, "a", 100), (8, "b", 101)]
    assert df["weight"].null_count() == 2


def test_a_duration_is_no_timestamp_and_the_error_names_the_column(tmp_path):
    path = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [1], "item_id": [2],
                  "timestamp": pl.Series([5_000], dtype=pl.Duration("ms"))}).write_parquet(path)
    with pytest.raises(InputDataError, match=r"column 'timestamp' \(data.timestamp_col\) has dtype Duration"):
        read_events(DataConfig(format="parquet"), path)


@pytest.mark.parametrize(("timestamps", "fractions"), [
    (["100.9", "100.1", "101"], 2),  # float seconds
    (["2024-05-01T12:00:00.250", "2024-05-01 12:00:00.5", "2024-05-01T12:00:01"], 2),  # ISO-8601
    (["100.0", "101", "102.000"], 0),  # whole seconds written as floats: nothing dropped
])
def test_a_fraction_of_a_second_dropped_from_timestamps_is_reported(write_file, caplog, timestamps, fractions):
    rows = "".join(f"1,{item},{ts}\n" for item, ts in zip((5, 6, 7), timestamps, strict=True))
    path = write_file("events.csv", "user_id,item_id,timestamp\n" + rows)
    with caplog.at_level("WARNING", logger="features.validation"):
        _read(DataConfig(format="csv"), path)
    if fractions:
        assert f"{fractions} timestamp(s) have a fraction of a second" in caplog.text
    else:
        assert "fraction of a second" not in caplog.text


def test_a_fraction_of_a_second_in_a_parquet_datetime_is_reported(tmp_path, caplog):
    path = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [1, 1], "item_id": [5, 6],
                  "timestamp": pl.Series([datetime(2024, 5, 1, 12, 0, 0, 250_000), datetime(2024, 5, 1, 12, 0, 1)],
                                         dtype=pl.Datetime("ms"))}).write_parquet(path)
    with caplog.at_level("WARNING", logger="features.validation"):
        _read(DataConfig(format="parquet"), path)
    assert "1 timestamp(s) have a fraction of a second" in caplog.text


def test_decimal_ids_with_a_scale_are_whole_numbers_and_decimal_timestamps_report_their_fractions(tmp_path, caplog):
    """SQL NUMBER(p, s) exports (Spark's JDBC reads Oracle NUMBER as decimal(38, 10)): the text id of 7.00 was
    "7.00", another user than the 7 of an integer partition; a fraction (7.50) was an id; timestamp fractions
    were dropped without the warning a float column gets."""
    from decimal import Decimal

    path = tmp_path / "events.parquet"
    frame = {"user_id": pl.Series([Decimal("7.00"), Decimal("-3.00"), Decimal("12")], dtype=pl.Decimal(12, 2)),
             "item_id": [5, 6, 7],
             "timestamp": pl.Series([Decimal("100.900"), Decimal("100.000"), Decimal("100.100")],
                                    dtype=pl.Decimal(14, 3))}
    pl.DataFrame(frame).write_parquet(path)
    with caplog.at_level("WARNING", logger="features.validation"):
        for kind, ids in (("string", ["7", "-3", "12"]), ("int", [7, -3, 12])):
            df = _read(DataConfig(format="parquet", user_id_type=kind), path)
            assert df["user_id"].to_list() == ids and df["timestamp"].to_list() == [100, 100, 100]
    assert "2 timestamp(s) have a fraction of a second" in caplog.text
    frame["user_id"] = pl.Series([Decimal("7.50"), Decimal("1"), Decimal("2")], dtype=pl.Decimal(12, 2))
    pl.DataFrame(frame).write_parquet(path)
    for kind in ("string", "int"):
        with pytest.raises(InputDataError, match="user_id"):
            _read(DataConfig(format="parquet", user_id_type=kind), path)


def test_gzip_files_read_as_their_plain_text(tmp_path):
    """A .csv.gz with an empty last field was refused as "a line cut short": the short-line check read the
    compressed bytes. The line formats read the decompressed text too."""
    import gzip

    rows = "user_id,item_id,timestamp,event_type\n1,10,100,view\n1,11,101,\n2,10,102,buy\n"
    plain, packed = tmp_path / "events.csv", tmp_path / "events.csv.gz"
    plain.write_text(rows)
    packed.write_bytes(gzip.compress(rows.encode()))
    data = DataConfig(event_type_col="event_type")
    assert _read(data, packed).equals(_read(data, plain))
    short = tmp_path / "short.csv.gz"  # a real short line is still found in a compressed file
    short.write_bytes(gzip.compress(b"user_id,item_id,timestamp,event_type\n1,10,100,view\n1,11\n"))
    with pytest.raises(InputDataError, match="line 3 has 2 field"):
        read_events(data, short).collect()
    lines = tmp_path / "seq.txt.gz"
    lines.write_bytes(gzip.compress(b"1 10 11\n2 12\n"))
    assert _triples(_read(DataConfig(format="sequence_lines"), lines)) == [(1, 10, 0), (1, 11, 1), (2, 12, 0)]


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 1 << 20])
def test_the_first_invalid_utf8_byte_is_found_piece_by_piece(tmp_path, piece):
    """The file is scanned in pieces (not read whole): the line and column of the first bad byte do not depend
    on where the pieces end, also when a valid multi-byte character or the bad sequence spans two pieces."""
    from features.readers import _first_invalid_utf8, _utf8_error

    path = tmp_path / "events.csv"
    path.write_bytes("user_id,item_id,title\n1,2,café\n3,4,naïve €\n".encode() + b"5,6,t\xc3(x\n7,8,z\n")
    assert _first_invalid_utf8(path, piece) == (4, 0xC3, b"5,6,t")
    assert "byte 0xc3 at line 4, column 'title'" in str(_utf8_error(path, DataConfig()))  # the header's name
    good = tmp_path / "good.csv"
    good.write_bytes("user_id,item_id\n1,é\n".encode())
    assert _first_invalid_utf8(good, piece) is None
    truncated = tmp_path / "truncated.csv"  # a character cut off by the end of the file
    truncated.write_bytes(b"user_id,item_id\n1,2\n3,\xe2\x82")
    assert _first_invalid_utf8(truncated, piece)[:2] == (3, 0xE2)


def test_a_directory_of_gzip_csv_parts_is_read(tmp_path):
    """A Spark-style folder of part-N.csv.gz was "a directory with no *.csv file under it"."""
    import gzip

    from features.readers import input_files

    parts = tmp_path / "events"
    parts.mkdir()
    (parts / "part-0.csv.gz").write_bytes(gzip.compress(b"user_id,item_id,timestamp\n1,10,100\n"))
    (parts / "part-1.csv").write_text("user_id,item_id,timestamp\n2,11,101\n")
    (parts / "_SUCCESS").write_text("")
    assert [f.name for f in input_files(DataConfig(), parts)] == ["part-0.csv.gz", "part-1.csv"]
    assert _triples(_read(DataConfig(), parts)) == [(1, 10, 100), (2, 11, 101)]


@pytest.mark.parametrize("encoding, gz", [("utf-16", False), ("utf-16-be", False), ("utf-16", True)])
def test_utf16_text_is_named_as_such(tmp_path, encoding, gz):
    """Excel's 'Unicode text' and PowerShell's `>` write UTF-16: the header read as UTF-8 was garbage and the error
    said a column was missing, listing names full of NUL characters."""
    import gzip

    raw = "user_id,item_id,timestamp\n1,10,100\n".encode(encoding)
    path = tmp_path / ("events.csv.gz" if gz else "events.csv")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    for data in (DataConfig(), DataConfig(format="pairs")):
        with pytest.raises(InputDataError, match=r"events.csv(.gz)? is UTF-16 text .* `iconv -f utf-16 -t utf-8`"):
            _read(data, path)


def test_a_truncated_gzip_file_is_named_truncated_not_a_permission_problem(tmp_path):
    import gzip

    path = tmp_path / "events.csv.gz"
    text = "user_id,item_id,timestamp\n" + "".join(f"{u},{u % 97},{u}\n" for u in range(20_000))
    path.write_bytes(gzip.compress(text.encode())[:20_000])
    for data in (DataConfig(), DataConfig(format="pairs")):  # the line formats: an EOFError, not an OSError
        with pytest.raises(InputDataError, match="is gzip-compressed but cannot be decompressed .* truncated"):
            _read(data, path)


def test_a_directory_reads_upper_case_suffixes_and_logs_what_it_skips(tmp_path, caplog):
    """A Windows export's B.CSV was skipped without a word: half the events silently missing."""
    from features.readers import input_files

    parts = tmp_path / "events"
    parts.mkdir()
    (parts / "a.csv").write_text("user_id,item_id,timestamp\n1,10,100\n")
    (parts / "B.CSV").write_text("user_id,item_id,timestamp\n2,11,101\n")
    (parts / "notes.txt").write_text("not events")
    with caplog.at_level("INFO", logger="features.readers"):
        assert [f.name for f in input_files(DataConfig(), parts)] == ["B.CSV", "a.csv"]
    assert "1 file(s) not named *.csv / *.csv.gz skipped, e.g." in caplog.text and "notes.txt" in caplog.text
    assert sorted(_triples(_read(DataConfig(), parts))) == [(1, 10, 100), (2, 11, 101)]

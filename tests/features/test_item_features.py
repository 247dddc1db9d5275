"""data.item_features: the item attribute table read, checked, encoded and accounted for, in memory and out of core."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features.artifacts import load_features
from features.build import build_features
from features.readers import InputDataError
from features.schema import ITEM_FEATURE_FILES
from recsys.config import ConfigError, load_config

# Items 10, 20, 30, 40 have events; 99 has none (its attribute row is dropped as not_in_catalogue).
EVENTS = "user_id,item_id,timestamp\n" + "".join(
    f"{u},{i},{t}\n" for u in (1, 2, 3) for t, i in enumerate((10, 20, 30, 40, 10))
)
# 10: two genres (one padded with spaces) and a brand; 20: listed twice (rows merged), "b" repeated in one cell;
# 30: blank genres, brand 7 (written as a number); 40: not listed at all; 99: not in the catalogue.
ITEMS = """item_id,genres,brand
10, Action |Comedy,acme
20,Comedy|b|b,
99,Drama,acme
30,,7
20,Action,zen
"""


def _config(tmp_path: Path, items: Path, *extra: str):
    return load_config(overrides=[
        f"work_dir={tmp_path / 'work'}", f"data.path={tmp_path / 'events.csv'}", f"data.item_features.path={items}",
        "data.item_features.columns=[genres,brand]", 'data.item_features.list_separator="|"', *extra])


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "events.csv").write_text(EVENTS)
    (tmp_path / "items.csv").write_text(ITEMS)
    return tmp_path


def _attributes(features_dir: Path) -> dict[int, set[tuple[str, str]]]:
    """item_id -> {(column, value)} read back from the written files."""
    feats = load_features(features_dir)
    assert feats.item_features is not None and feats.item_feature_values is not None
    values = {row["feature_idx"]: (row["column"], row["value"]) for row in feats.item_feature_values.iter_rows(named=True)}
    ids = dict(feats.item_map.select("item_idx", "item_id").iter_rows())
    return {ids[row["item_idx"]]: {values[f] for f in row["feature_idx"]}
            for row in feats.item_features.iter_rows(named=True)}


@pytest.mark.parametrize("partitions", [1, 2])
def test_attributes_are_encoded_per_item_with_every_row_accounted_for(files, partitions):
    cfg = _config(files, files / "items.csv", f"features.partitions={partitions}")
    manifest = build_features(cfg)
    assert _attributes(files / "work" / "features") == {
        10: {("genres", "Action"), ("genres", "Comedy"), ("brand", "acme")},
        20: {("genres", "Comedy"), ("genres", "b"), ("genres", "Action"), ("brand", "zen")},
        30: {("brand", "7")},
        40: set(),
    }
    section = manifest["item_features"]
    assert section["rows_in"] == 5
    assert section["rows_in"] == section["rows_used"] + sum(section["dropped"].values())
    assert section["dropped"] == {"not_in_catalogue": 1}
    assert section["duplicate_item_rows"] == 1
    assert section["empty_cells"] == {"genres": 1, "brand": 1}
    assert section["n_values"] == {"genres": 3, "brand": 3}  # Drama belongs to item 99 only: not a value
    assert (section["items_with_features"], section["items_without_features"]) == (3, 1)
    assert section["max_values_per_item"] == 4
    assert section["cold_items"] == 0
    assert section["values_over_cap"] == {"genres": 0, "brand": 0}
    assert section["input"]["sha256"]
    values = load_features(files / "work" / "features").item_feature_values
    assert values is not None
    # ordered by column (as configured), then value; n_items counts catalogue items
    assert values.rows() == [(1, "genres", "Action", 2), (2, "genres", "Comedy", 2), (3, "genres", "b", 1),
                             (4, "brand", "7", 1), (5, "brand", "acme", 1), (6, "brand", "zen", 1)]


@pytest.mark.parametrize("partitions", [1, 2])
def test_cold_items_join_the_catalogue(files, partitions):
    (files / "items.csv").write_text(ITEMS + "77,,\n")  # 77: no event and no value, so not a catalogue item
    manifest = build_features(_config(files, files / "items.csv", "data.item_features.cold_items=true",
                                      f"features.partitions={partitions}"))
    item_map = load_features(files / "work" / "features").item_map
    assert dict(item_map.select("item_id", "train_count").iter_rows()) == {10: 3, 20: 3, 30: 3, 40: 0, 99: 0}
    assert manifest["n_items"] == 5
    section = manifest["item_features"]
    assert section["cold_items"] == 1 and section["dropped"] == {"not_in_catalogue": 1}  # row 77
    assert _attributes(files / "work" / "features")[99] == {("genres", "Drama"), ("brand", "acme")}
    assert section["n_values"] == {"genres": 4, "brand": 3}
    assert section["not_cold_events_removed"] == 0


@pytest.mark.parametrize("partitions", [1, 2])
def test_an_item_whose_events_the_policies_removed_is_no_cold_item(files, partitions):
    """Item 50's only event is user 4's only one, which features.min_user_events=2 removes: listed with a value,
    item 50 stays out of the catalogue as without attributes (it used to come back as a 'new' item)."""
    (files / "events.csv").write_text(EVENTS + "4,50,9\n")
    (files / "items.csv").write_text(ITEMS + "50,Drama,acme\n")
    manifest = build_features(_config(files, files / "items.csv", "data.item_features.cold_items=true",
                                      "features.min_user_events=2", f"features.partitions={partitions}"))
    item_map = load_features(files / "work" / "features").item_map
    assert sorted(item_map["item_id"]) == [10, 20, 30, 40, 99]  # 99: cold (no event at all); 50: not
    section = manifest["item_features"]
    assert manifest["dropped"]["user_kcore"] == 1
    assert section["cold_items"] == 1 and section["not_cold_events_removed"] == 1
    assert section["dropped"] == {"not_in_catalogue": 1}  # the row of 50


@pytest.mark.parametrize("partitions", [1, 2])
def test_an_item_whose_events_all_predate_the_history_window_is_a_cold_item(files, partitions):
    """features.max_history_age drops item 50's only event (t = 0, before the window): listed with a value, it is
    as new to the model as item 99 and joins the catalogue as cold (it used to leave the catalogue, counted as
    not_cold_events_removed, until someone bought it again, which nobody could once it was never recommended)."""
    import datetime as dt

    shifted = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{1000 + t}\n" for u in (1, 2, 3)
                                                      for t, i in enumerate((10, 20, 30, 40, 10)))
    (files / "events.csv").write_text(shifted + "3,50,0\n")
    (files / "items.csv").write_text(ITEMS + "50,Drama,acme\n")
    # run date 1970-01-01: the window starts at 86400 - 85900 = 500, after t = 0 and before every other event
    manifest = build_features(_config(files, files / "items.csv", "data.item_features.cold_items=true",
                                      "features.max_history_age=85900", f"features.partitions={partitions}"),
                              run_date=dt.date(1970, 1, 1))
    assert manifest["dropped"]["older_than_history"] == 1
    item_map = load_features(files / "work" / "features").item_map
    assert dict(item_map.select("item_id", "train_count").iter_rows()) == {10: 3, 20: 3, 30: 3, 40: 0, 50: 0, 99: 0}
    section = manifest["item_features"]
    assert section["cold_items"] == 2 and section["not_cold_events_removed"] == 0
    assert _attributes(files / "work" / "features")[50] == {("genres", "Drama"), ("brand", "acme")}


def test_values_beyond_the_cap_are_dropped_and_counted(files):
    manifest = build_features(_config(files, files / "items.csv", "data.item_features.max_values=1"))
    # 10: Action|Comedy keeps Action; 20: Comedy|b|b then (merged row) Action keeps Comedy; brands are single
    assert _attributes(files / "work" / "features") == {
        10: {("genres", "Action"), ("brand", "acme")}, 20: {("genres", "Comedy"), ("brand", "zen")},
        30: {("brand", "7")}, 40: set()}
    assert manifest["item_features"]["values_over_cap"] == {"genres": 3, "brand": 0}
    assert manifest["item_features"]["max_values_per_item"] == 2


def test_without_item_features_nothing_is_written(files):
    cfg = load_config(overrides=[f"work_dir={files / 'work'}", f"data.path={files / 'events.csv'}"])
    manifest = build_features(cfg)
    assert manifest["item_features"] is None
    assert not any((files / "work" / "features" / name).exists() for name in ITEM_FEATURE_FILES.values())
    assert load_features(files / "work" / "features").item_features is None


def test_parquet_list_columns_and_text_ids(files):
    pl.DataFrame({"sku": ["10", "20"], "tags": [["x", " y "], []]}).write_parquet(files / "items.parquet")
    cfg = load_config(overrides=[
        f"work_dir={files / 'work'}", f"data.path={files / 'events.csv'}", "data.item_id_type=string",
        f"data.item_features.path={files / 'items.parquet'}", "data.item_features.item_col=sku",
        "data.item_features.columns=[tags]"])
    build_features(cfg)
    assert _attributes(files / "work" / "features") == {
        "10": {("tags", "x"), ("tags", "y")}, "20": set(), "30": set(), "40": set()}


@pytest.mark.parametrize(("items", "expected"), [
    ("item_id,genre\n10,a\n", ["'genres'", "data.item_features.columns", "['item_id', 'genre']"]),
    ("id,genres,brand\n10,a,b\n", ["'item_id'", "data.item_features.item_col"]),
    ("item_id,genres,brand\n10,a,b\nten,c,d\n", ["data row 2", "'ten'", "is not an item id"]),
    ("item_id,genres,brand\n99,a,b\n", ["no attribute value for any item of the catalogue", "0 of 1 rows"]),
    ("item_id,genres,brand\n", ["has no rows"]),
    # as the events: a line cut short (an unfinished export) and a header naming a column twice are errors
    ("item_id,genres,brand\n10,a,b\n20,c\n", ["line 3 has 2 field(s), fewer than the 3", "cut short"]),
    ("item_id,genres,brand,genres\n10,a,b,c\n", ["column 'genres' appears more than once in the header"]),
])
def test_bad_item_files_name_the_file_and_column(files, items, expected):
    (files / "items.csv").write_text(items)
    with pytest.raises(InputDataError) as info:
        build_features(_config(files, files / "items.csv"))
    message = str(info.value)
    assert str(files / "items.csv") in message
    for part in expected:
        assert part in message
    assert not (files / "work" / "features").exists()  # nothing written


def test_blank_lines_and_empty_last_cells_are_read(files):
    """A blank line (a trailing one too) holds no item: it used to fail as 'None is not an item id'. An empty
    last cell of a complete line is an empty cell, not a short line."""
    (files / "items.csv").write_text("item_id,genres,brand\n10,a,\n\n20,b,zen\n\n")
    manifest = build_features(_config(files, files / "items.csv"))
    section = manifest["item_features"]
    assert section["rows_in"] == 2 and section["empty_cells"] == {"genres": 0, "brand": 1}
    assert _attributes(files / "work" / "features")[20] == {("genres", "b"), ("brand", "zen")}


def test_a_missing_value_marker_is_no_value(files):
    """An export's NULL (or N/A, NaN) in an attribute cell was a value "NULL" shared by every such item."""
    (files / "items.csv").write_text("item_id,genres,brand\n10,a|NULL,NULL\n20,N/A,zen\n")
    manifest = build_features(_config(files, files / "items.csv"))
    assert manifest["item_features"]["empty_cells"] == {"genres": 1, "brand": 1}
    attributes = _attributes(files / "work" / "features")
    assert attributes[10] == {("genres", "a")} and attributes[20] == {("brand", "zen")}


def test_missing_item_file_is_a_config_error(files):
    with pytest.raises(ConfigError, match="data.item_features.path"):
        build_features(_config(files, files / "nope.csv"))


def test_config_rejects_the_id_column_among_the_attributes():
    with pytest.raises(ConfigError, match="item id column"):
        load_config(overrides=["data.item_features.path=x.csv", "data.item_features.columns=[item_id,genre]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(overrides=["data.item_features.path=x.csv", "data.item_features.columns=[genre,genre]"])


def test_a_bad_id_after_blank_lines_is_named_by_its_data_row_as_in_the_events(tmp_path):
    """The blank lines were dropped before the row was counted: 'xx' on data row 5 was reported at row 3."""
    from features.item_features import read_item_rows
    from features.readers import read_item_ids
    from recsys.config import ItemFeaturesConfig

    path = tmp_path / "items.csv"
    path.write_text("item_id,category\n10,a\n\n\n11,b\nxx,c\n")
    with pytest.raises(InputDataError, match=r"data row 5: 'xx' is not an item id"):
        read_item_rows(ItemFeaturesConfig(path=str(path), columns=("category",)), "int")
    with pytest.raises(InputDataError, match=r"data row 5: 'xx' is not an item id"):
        read_item_ids(path, "candidates.allowed_items")

"""Event types (data.event_type_col): the type table, the type lists aligned with the item lists and the
manifest's section, on a hand-made file with the answer worked out by hand; in memory and out of core."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features import build
from features.artifacts import load_features
from features.build import build_features
from features.readers import InputDataError
from features.schema import EVENT_TYPE_FILES, FEATURE_FILES, SEQUENCE_TYPES, SEQUENCES
from recsys.config import load_config

# Rows out of time order; user 1's item 50 has no type; (2, 10, 1, view) comes twice: an exact duplicate, the
# first row in the input is kept. Items 10..50 are item_idx 1..5, users 1..3 are
# user_idx 0..2 (both by external id). Per user in time order, with leave-one-out (test = last, val = the one
# before, for users with 3 or more events):
#   user 1: 10 view, 20 cart, 30 view, 40 buy, 50 (none) -> train 10 20 30 | val 40 | test 50
#   user 2: 10 view, 30 buy, 20 view                     -> train 10 | val 30 | test 20
#   user 3: 20 cart, 50 view                             -> train 20 50 (too short for val and test)
EVENTS = """user_id,item_id,timestamp,event_type
1,10,1,view
1,20,2,cart
2,30,2,buy
1,30,3,view
2,10,1,view
1,40,4,buy
2,10,1,view
1,50,5,
3,20,7,cart
2,20,3,view
3,50,8,view
"""
SEQUENCE_COLUMNS = [*SEQUENCES, *SEQUENCE_TYPES]


@pytest.fixture
def events_csv(write_file) -> Path:
    return write_file("events.csv", EVENTS)


def _build(work: Path, events: Path, *overrides: str) -> dict:
    return build_features(load_config(overrides=[f"work_dir={work}", f"data.path={events}", *overrides]))


def _typed(work: Path, events: Path, *overrides: str) -> dict:
    return _build(work, events, "data.event_type_col=event_type", *overrides)


def _sequences(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SEQUENCES | SEQUENCE_TYPES, orient="row")


@pytest.mark.parametrize("partitions", [1, 2])
def test_types_are_indexed_by_name_and_aligned_with_the_items(tmp_path, events_csv, partitions):
    manifest = _typed(tmp_path / "work", events_csv, f"features.partitions={partitions}")
    feats = load_features(tmp_path / "work" / "features")
    assert feats.event_types is not None
    # buy = 1, cart = 2, view = 3; counts are kept events (user 2's duplicate 'view' is not one of them)
    assert feats.event_types.rows() == [("buy", 1, 2), ("cart", 2, 2), ("view", 3, 5)]
    assert feats.event_types.columns == ["event_type", "type_idx", "n_events"]
    expected = _sequences([
        (0, [1, 2, 3], [4], [5], [3, 2, 3], [1], [0]),  # item 50's missing type is 0
        (1, [1], [3], [2], [3], [1], [3]),
        (2, [2, 5], [], [], [2, 3], [], []),
    ])
    assert feats.sequences.select(SEQUENCE_COLUMNS).equals(expected)
    assert manifest["event_types"] == {"n_types": 3, "n_events": {"buy": 2, "cart": 2, "view": 5},
                                       "null_types": 1}
    assert feats.manifest["event_types"] == manifest["event_types"]  # as written to manifest.json
    assert (manifest["rows_in"], manifest["rows_kept"], manifest["dropped"]["duplicate"]) == (11, 10, 1)
    assert sum(manifest["event_types"]["n_events"].values()) + manifest["event_types"]["null_types"] == 10


@pytest.mark.parametrize("partitions", [1, 2])
@pytest.mark.parametrize("has_column", [False, True], ids=["no_type_column", "type_column_not_configured"])
def test_without_types_nothing_typed_is_written(tmp_path, write_file, events_csv, partitions, has_column):
    """A file without the column, or with it but no data.event_type_col; a typed build in the same work
    directory before must leave no type table behind."""
    untyped = events_csv if has_column else write_file("plain.csv", "".join(
        ",".join(line.split(",")[:3]) + "\n" for line in EVENTS.splitlines()))
    work = tmp_path / "work"
    _typed(work, events_csv)
    manifest = _build(work, untyped, f"features.partitions={partitions}")
    assert manifest["event_types"] is None
    assert not (work / "features" / EVENT_TYPE_FILES["event_types"]).exists()
    feats = load_features(work / "features")
    assert feats.event_types is None
    assert feats.sequences.columns == list(SEQUENCES)
    assert feats.sequences.rows() == [(0, [1, 2, 3], [4], [5]), (1, [1], [3], [2]), (2, [2, 5], [], [])]


@pytest.mark.parametrize("partitions", [1, 2])
def test_the_type_filter_leaves_only_listed_types_in_the_table(tmp_path, events_csv, partitions):
    # 'purchase' is listed but never occurs; cart and the untyped row are filtered out, so buy = 1, view = 2:
    #   user 1: 10 view, 30 view, 40 buy -> train 10 | val 30 | test 40
    #   user 2: 10 view, 30 buy, 20 view -> train 10 | val 30 | test 20
    #   user 3: 50 view                  -> train 50
    manifest = _typed(tmp_path / "work", events_csv, "features.event_types=[view,purchase,buy]",
                      f"features.partitions={partitions}")
    feats = load_features(tmp_path / "work" / "features")
    assert feats.event_types is not None
    assert feats.event_types.rows() == [("buy", 1, 2), ("view", 2, 5)]
    assert manifest["dropped"]["event_type_filtered"] == 3
    assert manifest["event_types"] == {"n_types": 2, "n_events": {"buy": 2, "view": 5}, "null_types": 0}
    expected = _sequences([
        (0, [1], [3], [4], [2], [2], [1]),
        (1, [1], [3], [2], [2], [1], [2]),
        (2, [5], [], [], [2], [], []),
    ])
    assert feats.sequences.select(SEQUENCE_COLUMNS).equals(expected)


@pytest.mark.parametrize("partitions", [2, 3])
@pytest.mark.parametrize("overrides", [[], ["features.event_types=[view,buy]"], ["features.dedup=none"]],
                         ids=["all_types", "filtered", "no_dedup"])
def test_out_of_core_gives_the_same_types_and_sequences(tmp_path, events_csv, partitions, overrides):
    whole = _typed(tmp_path / "p1", events_csv, *overrides)
    parted = _typed(tmp_path / "pn", events_csv, *overrides, f"features.partitions={partitions}")
    expected, got = load_features(tmp_path / "p1" / "features"), load_features(tmp_path / "pn" / "features")
    assert got.event_types is not None and expected.event_types is not None
    assert got.event_types.equals(expected.event_types)
    assert got.sequences.equals(expected.sequences)
    assert got.sequences.columns == SEQUENCE_COLUMNS
    events = [pl.read_parquet(tmp_path / name / "features" / FEATURE_FILES["events"]) for name in ("p1", "pn")]
    assert events[1].equals(events[0])
    assert parted["event_types"] == whole["event_types"]


@pytest.mark.parametrize("partitions", [1, 2])
def test_too_many_types_name_the_file_and_the_setting(tmp_path, events_csv, monkeypatch, partitions):
    monkeypatch.setattr(build, "MAX_EVENT_TYPES", 3)  # exactly the three types of the file: accepted
    assert _typed(tmp_path / "ok", events_csv, f"features.partitions={partitions}")["event_types"]["n_types"] == 3
    monkeypatch.setattr(build, "MAX_EVENT_TYPES", 2)
    with pytest.raises(InputDataError) as info:
        _typed(tmp_path / "work", events_csv, f"features.partitions={partitions}")
    message = str(info.value)
    assert str(events_csv) in message and "data.event_type_col" in message
    assert "3 distinct values, more than 2" in message
    assert not (tmp_path / "work" / "features").exists()  # nothing published


def test_the_type_table_is_checked_when_loaded(tmp_path, events_csv):
    _typed(tmp_path / "work", events_csv)
    features_dir = tmp_path / "work" / "features"
    sequences = pl.read_parquet(features_dir / FEATURE_FILES["sequences"])
    sequences.drop("val_types").write_parquet(features_dir / FEATURE_FILES["sequences"])
    with pytest.raises(ValueError, match="sequences.parquet: missing column 'val_types'"):
        load_features(features_dir)
    (features_dir / EVENT_TYPE_FILES["event_types"]).unlink()
    with pytest.raises(FileNotFoundError, match="event_types.parquet does not exist"):
        load_features(features_dir)


def test_type_names_are_trimmed_like_ids(tmp_path, write_file):
    """' view' and 'view ' are the same type as 'view'; a cell of spaces is no type (0), as an empty one."""
    padded = EVENTS.replace("1,10,1,view", "1,10,1, view").replace("1,30,3,view", "1,30,3,view  ") \
        .replace("1,50,5,", "1,50,5,   ")
    manifest = _typed(tmp_path / "work", write_file("padded.csv", padded))
    feats = load_features(tmp_path / "work" / "features")
    assert feats.event_types is not None
    assert feats.event_types.rows() == [("buy", 1, 2), ("cart", 2, 2), ("view", 3, 5)]
    assert feats.sequences["train_types"].to_list()[0] == [3, 2, 3]
    assert manifest["event_types"]["null_types"] == 1
    kept = _build(tmp_path / "filtered", write_file("padded2.csv", padded), "data.event_type_col=event_type",
                  "features.event_types=[view]")
    assert kept["rows_kept"] == 5  # the padded views pass the filter


def test_a_buy_in_the_same_second_as_its_view_is_another_event_not_a_duplicate(tmp_path, write_file):
    """dedup=exact drops identical rows only: the event type is part of the row."""
    events = write_file("same_second.csv", "user_id,item_id,timestamp,event_type\n"
                        "1,10,1,view\n1,10,1,buy\n1,10,1,buy\n1,20,2,view\n1,30,3,view\n")
    manifest = _typed(tmp_path / "work", events)
    assert (manifest["rows_kept"], manifest["dropped"]["duplicate"]) == (4, 1)
    feats = load_features(tmp_path / "work" / "features")
    assert feats.sequences.select(SEQUENCE_COLUMNS).rows() == [(0, [1, 1], [2], [3], [2, 1], [2], [2])]


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_listed_event_type_no_event_has_is_named(tmp_path, events_csv, partitions, caplog):
    """`features.event_types=[view,purchase]` where the file says `buy`: every buy was filtered, counted as
    event_type_filtered, without a word. A warning names it with the types the events have, and the manifest lists
    it (a quiet night may just lack a rare type: no failure); one user range holding a type is enough for it to
    count as present."""
    with caplog.at_level("WARNING", logger="features.build"):
        manifest = _typed(tmp_path / "work", events_csv, "features.event_types=[view,purchase]",
                          f"features.partitions={partitions}")
    assert "features.event_types lists ['purchase'], which no event of" in caplog.text
    assert "(its event types: ['buy', 'cart', 'view'])" in caplog.text
    assert manifest["event_types_unmatched"] == ["purchase"]
    caplog.clear()
    # buy only in users 1 and 2, cart in users 1 and 3: with 2 ranges each range holds some of the listed types
    manifest = _typed(tmp_path / "work", events_csv, "features.event_types=[buy,cart]",
                      f"features.partitions={partitions}")
    assert manifest["dropped"]["event_type_filtered"] == 7 and manifest["event_types_unmatched"] == []
    assert "features.event_types lists" not in caplog.text

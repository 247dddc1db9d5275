"""Id maps: contiguous, deterministic, 0 reserved for padding; train_count counts TRAIN events only."""

from __future__ import annotations

import polars as pl

from features.encode import add_train_count, build_item_index, build_user_map, encode_events
from features.schema import ITEM_MAP, PAD_IDX, USER_MAP, check_schema

EVENTS = pl.DataFrame(
    {"user_id": [42, 7, 42, 1000], "item_id": [900, 15, 15, 3], "timestamp": [1, 2, 3, 4]},
    schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
)


def test_maps_are_contiguous_sorted_and_reserve_padding():
    users, items = build_user_map(EVENTS), build_item_index(EVENTS)
    assert list(users.iter_rows()) == [(7, 0), (42, 1), (1000, 2)]
    assert list(items.iter_rows()) == [(3, 1), (15, 2), (900, 3)]
    assert PAD_IDX not in items["item_idx"].to_list()
    assert users.schema == pl.Schema({"user_id": pl.Int64, "user_idx": pl.Int32})
    check_schema(users, USER_MAP, "user_map")


def test_maps_do_not_depend_on_row_order():
    shuffled = EVENTS.sample(fraction=1.0, shuffle=True, seed=1)
    assert build_user_map(shuffled).equals(build_user_map(EVENTS))
    assert build_item_index(shuffled).equals(build_item_index(EVENTS))


def test_encode_events_keeps_rows_and_round_trips():
    users, items = build_user_map(EVENTS), build_item_index(EVENTS)
    encoded = encode_events(EVENTS.lazy(), users, items).collect()
    assert encoded.columns == ["user_idx", "item_idx", "timestamp"]
    assert list(encoded.iter_rows()) == [(1, 3, 1), (0, 2, 2), (1, 2, 3), (2, 1, 4)]
    back = encoded.join(users, on="user_idx", maintain_order="left").join(
        items, on="item_idx", maintain_order="left"
    )
    assert back.select(EVENTS.columns).equals(EVENTS)


def test_train_count_counts_train_events_only():
    items = build_item_index(EVENTS)
    split_events = pl.DataFrame(
        {"item_idx": [2, 2, 3, 1, 2], "split": ["train", "train", "train", "test", "val"]},
        schema={"item_idx": pl.Int32, "split": pl.String},
    )
    item_map = add_train_count(items, split_events)
    assert list(item_map.iter_rows()) == [(3, 1, 0), (15, 2, 2), (900, 3, 1)]
    check_schema(item_map, ITEM_MAP, "item_map")

"""Contiguous internal indices for external ids, deterministic (sorted by external id).

Users get ``user_idx`` 0..n_users-1; items get ``item_idx`` 1..n_items because 0 (schema.PAD_IDX) is padding.
The maps follow schema.USER_MAP / schema.ITEM_MAP; ``train_count`` (TRAIN-split events of an item) is added
once the split is known, by :func:`add_train_count`.
"""

from __future__ import annotations

import polars as pl

from features.schema import ITEM_ID, ITEM_IDX, PAD_IDX, SPLIT, USER_ID, USER_IDX
from features.sequences import TRAIN


def build_user_map(events: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """``user_id`` Int64 -> ``user_idx`` Int32 in 0..n-1, ordered by user_id."""
    users = events.lazy().select(pl.col(USER_ID).unique().sort()).collect()
    return users.with_columns(pl.int_range(pl.len(), dtype=pl.Int32).alias(USER_IDX))


def build_item_index(events: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """``item_id`` Int64 -> ``item_idx`` Int32 in 1..n (0 stays free for padding), ordered by item_id."""
    items = events.lazy().select(pl.col(ITEM_ID).unique().sort()).collect()
    return items.with_columns((pl.int_range(pl.len(), dtype=pl.Int32) + PAD_IDX + 1).alias(ITEM_IDX))


def encode_events(events: pl.LazyFrame, user_map: pl.DataFrame, item_map: pl.DataFrame) -> pl.LazyFrame:
    """``user_idx``, ``item_idx`` (Int32) first, then the other columns but the ids; row order kept.

    Raises polars InvalidOperationError if an id is missing from a map (an internal error: the maps are
    built from the same events).
    """
    user_idx = pl.col(USER_ID).replace_strict(user_map[USER_ID], user_map[USER_IDX], return_dtype=pl.Int32)
    item_idx = pl.col(ITEM_ID).replace_strict(item_map[ITEM_ID], item_map[ITEM_IDX], return_dtype=pl.Int32)
    return events.select(user_idx.alias(USER_IDX), item_idx.alias(ITEM_IDX), pl.exclude(USER_ID, ITEM_ID))


def add_train_count(item_index: pl.DataFrame, split_events: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """schema.ITEM_MAP: ``item_index`` + ``train_count`` Int64, TRAIN-split events per item (0 if none)."""
    counts = (
        split_events.lazy()
        .filter(pl.col(SPLIT) == TRAIN)
        .group_by(ITEM_IDX)
        .agg(pl.len().cast(pl.Int64).alias("train_count"))
        .collect()
    )
    joined = item_index.join(counts, on=ITEM_IDX, how="left", maintain_order="left")
    return joined.with_columns(pl.col("train_count").fill_null(0))

"""Per-user sequences in time order and the train / val / test split (schema.SEQUENCES).

Time order is a STABLE sort by timestamp: events with equal timestamps keep their input order, so files that
are already in order per user (the benchmark files) are never reordered. Functions take and return either a
DataFrame or a LazyFrame and are built from expressions only (no Python loops over rows).
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

from features.schema import ITEM_IDX, TIMESTAMP, USER_IDX
from recsys.config import FeaturesConfig

SPLIT = "split"
TRAIN, VAL, TEST = "train", "val", "test"
SPLIT_LISTS = {TRAIN: "train_items", VAL: "val_items", TEST: "test_items"}

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def sort_events(events: Frame) -> Frame:
    """Rows ordered by ``user_idx``, each user's events by ``timestamp``; ties keep their input order."""
    return events.sort([USER_IDX, TIMESTAMP], maintain_order=True)


def split_leave_one_out(events: Frame) -> Frame:
    """Add ``split``: per user the last event is test, the second-to-last val, the rest train.

    Users with fewer than 3 events keep everything in train. Expects :func:`sort_events` order.
    """
    n = pl.len().over(USER_IDX)
    position = pl.int_range(pl.len()).over(USER_IDX)
    split = (
        pl.when(n < 3)
        .then(pl.lit(TRAIN))
        .when(position == n - 1)
        .then(pl.lit(TEST))
        .when(position == n - 2)
        .then(pl.lit(VAL))
        .otherwise(pl.lit(TRAIN))
    )
    return events.with_columns(split.alias(SPLIT))


def split_by_time(events: Frame, val_cutoff: int, test_cutoff: int) -> Frame:
    """Add ``split``: timestamp < val_cutoff train, [val_cutoff, test_cutoff) val, >= test_cutoff test."""
    ts = pl.col(TIMESTAMP)
    split = (
        pl.when(ts < val_cutoff)
        .then(pl.lit(TRAIN))
        .when(ts < test_cutoff)
        .then(pl.lit(VAL))
        .otherwise(pl.lit(TEST))
    )
    return events.with_columns(split.alias(SPLIT))


def assign_split(events: Frame, features: FeaturesConfig) -> Frame:
    """:func:`sort_events`, then the split named by ``features.split``; adds the String column ``split``."""
    ordered = sort_events(events)
    if features.split == "leave_one_out":
        return split_leave_one_out(ordered)
    assert features.val_cutoff is not None and features.test_cutoff is not None  # FeaturesConfig checks this
    return split_by_time(ordered, features.val_cutoff, features.test_cutoff)


def build_sequences(split_events: Frame) -> Frame:
    """schema.SEQUENCES: one row per ``user_idx`` (ascending) with its train/val/test ``item_idx`` lists.

    Lists are in time order (stable); a split a user has no events in gives an empty list.
    """
    lists = [
        pl.col(ITEM_IDX).filter(pl.col(SPLIT) == split).alias(column) for split, column in SPLIT_LISTS.items()
    ]
    return sort_events(split_events).group_by(USER_IDX, maintain_order=True).agg(lists)

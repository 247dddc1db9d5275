"""Per-user sequences in time order and the train / val / test split (schema.SEQUENCES).

Time order is a STABLE sort by timestamp: events with equal timestamps keep their input order, so files that
are already in order per user (the benchmark files) are never reordered. Functions take and return either a
DataFrame or a LazyFrame and are built from expressions only (no Python loops over rows).
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

from features.schema import ITEM_IDX, SPLIT, TIMESTAMP, TYPE_IDX, USER_IDX
from recsys.config import FeaturesConfig

TRAIN, VAL, TEST = "train", "val", "test"
SPLIT_LISTS = {TRAIN: "train_items", VAL: "val_items", TEST: "test_items"}
SPLIT_TYPES = {TRAIN: "train_types", VAL: "val_types", TEST: "test_types"}  # schema.SEQUENCE_TYPES

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def sort_events(events: Frame) -> Frame:
    """Rows ordered by ``user_idx``, each user's events by ``timestamp``; ties keep their input order."""
    return events.sort([USER_IDX, TIMESTAMP], maintain_order=True)


def split_leave_one_out(events: Frame) -> Frame:
    """Add ``split``: per user the last event is test, the second-to-last val, the rest train.

    Users with fewer than 3 events keep everything in train. Expects :func:`sort_events` order.
    """

    # each user's rows are contiguous, so comparing with the rows up to two places away says where a row
    # sits in its user's sequence: no per-user window (a hash group-by) is needed
    def same_user(offset: int) -> pl.Expr:
        return (pl.col(USER_IDX).shift(offset) == pl.col(USER_IDX)).fill_null(False)

    last, second_last = ~same_user(-1), same_user(-1) & ~same_user(-2)
    split = (
        pl.when(last & same_user(2))  # the last of >= 3 events
        .then(pl.lit(TEST))
        .when(second_last & same_user(1))  # the second-to-last of >= 3 events
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


def add_split(events: Frame, features: FeaturesConfig) -> Frame:
    """The split named by ``features.split`` (String column ``split``); expects :func:`sort_events` order."""
    if features.split == "leave_one_out":
        return split_leave_one_out(events)
    assert features.val_cutoff is not None and features.test_cutoff is not None  # FeaturesConfig checks this
    return split_by_time(events, features.val_cutoff, features.test_cutoff)


def assign_split(events: Frame, features: FeaturesConfig) -> Frame:
    """:func:`sort_events`, then :func:`add_split`."""
    return add_split(sort_events(events), features)


def build_sequences(split_events: Frame) -> Frame:
    """schema.SEQUENCES: one row per ``user_idx`` (ascending) with its train/val/test ``item_idx`` lists, and
    (schema.SEQUENCE_TYPES) the events' ``type_idx`` lists aligned with them when the events have that column.

    Lists are in time order (stable); a split a user has no events in gives an empty list.
    """
    lists = [
        pl.col(ITEM_IDX).filter(pl.col(SPLIT) == split).alias(column) for split, column in SPLIT_LISTS.items()
    ]
    if TYPE_IDX in split_events.collect_schema().names():
        lists += [pl.col(TYPE_IDX).filter(pl.col(SPLIT) == split).alias(column)
                  for split, column in SPLIT_TYPES.items()]
    return sort_events(split_events).group_by(USER_IDX, maintain_order=True).agg(lists)

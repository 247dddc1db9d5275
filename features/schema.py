"""Data contracts: the columns and dtypes of every table the pipeline writes, defined once.

``*_id`` columns hold EXTERNAL ids (as in the input); ``*_idx`` columns hold internal contiguous
indices (items: 1..n_items, 0 is reserved for padding; users: 0..n_users-1). Never mix them in one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

# Canonical event columns after reading (any input format is mapped onto these).
USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
EVENT_TYPE = "event_type"
WEIGHT = "weight"
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
SPLIT = "split"  # train / val / test: features.sequences.TRAIN, VAL, TEST

# External ids are whole numbers (Int64) or text (String), per column: data.user_id_type / data.item_id_type.
# A contract entry that is a tuple accepts any of its dtypes.
ID_DTYPES = {"int": pl.Int64, "string": pl.String}
ANY_ID = (pl.Int64, pl.String)

EVENTS = {USER_ID: ANY_ID, ITEM_ID: ANY_ID, TIMESTAMP: pl.Int64}
EVENTS_OPTIONAL = {EVENT_TYPE: pl.String, WEIGHT: pl.Float64}

USER_MAP = {USER_ID: ANY_ID, USER_IDX: pl.Int32}
ITEM_MAP = {ITEM_ID: ANY_ID, ITEM_IDX: pl.Int32, "train_count": pl.Int64}

# One row per user; lists are internal item indices in time order (stable sort).
# val history = train_items; test history = train_items + val_items; full history = all three.
SEQUENCES = {
    USER_IDX: pl.Int32,
    "train_items": pl.List(pl.Int32),
    "val_items": pl.List(pl.Int32),
    "test_items": pl.List(pl.Int32),
}

# events.parquet of a feature set: the kept events, encoded, with their split (and TYPE_IDX when typed).
ENCODED_EVENTS = {USER_IDX: pl.Int32, ITEM_IDX: pl.Int32, TIMESTAMP: pl.Int64, SPLIT: pl.String}

CANDIDATES = {USER_ID: ANY_ID, ITEM_ID: ANY_ID, "score": pl.Float32, "rank": pl.Int32}

PAD_IDX = 0

FEATURE_FILES = {
    "sequences": "sequences.parquet",
    "user_map": "user_map.parquet",
    "item_map": "item_map.parquet",
    "events": "events.parquet",
    "manifest": "manifest.json",
}


# Item attributes (data.item_features), written only when configured. One row per catalogue item (item_idx
# 1..n_items, in order): the attribute values it has, as feature_idx (1..n_values, 0 is padding; [] = none).
FEATURE_IDX = "feature_idx"
ITEM_FEATURES = {ITEM_IDX: pl.Int32, FEATURE_IDX: pl.List(pl.Int32)}
# The value behind each feature_idx: its column and text, and how many catalogue items have it.
ITEM_FEATURE_VALUES = {FEATURE_IDX: pl.Int32, "column": pl.String, "value": pl.String, "n_items": pl.Int64}
ITEM_FEATURE_FILES = {
    "item_features": "item_features.parquet",
    "item_feature_values": "item_feature_values.parquet",
}

# Event types (data.event_type_col), written when the events have a type column. Each kept type gets a
# ``type_idx`` 1..n_types in order of its name (0 = no type: padding, a null type, the [MASK] position).
TYPE_IDX = "type_idx"
EVENT_TYPE_MAP = {EVENT_TYPE: pl.String, TYPE_IDX: pl.Int16, "n_events": pl.Int64}
# Extra SEQUENCES columns then: each event's type_idx, aligned with the item lists of the same split.
SEQUENCE_TYPES = {
    "train_types": pl.List(pl.Int16),
    "val_types": pl.List(pl.Int16),
    "test_types": pl.List(pl.Int16),
}
EVENT_TYPE_FILES = {"event_types": "event_types.parquet"}
MAX_EVENT_TYPES = 32767  # Int16


def check_schema(df: pl.DataFrame, contract: Mapping[str, Any], name: str) -> None:
    """Raise ``ValueError`` naming the table and column if ``df`` does not match ``contract``."""
    for col, dtype in contract.items():
        accepted = dtype if isinstance(dtype, tuple) else (dtype,)
        expected = " or ".join(str(d) for d in accepted)
        if col not in df.columns:
            raise ValueError(f"{name}: missing column '{col}' (expected {expected})")
        if df.schema[col] not in accepted:
            raise ValueError(f"{name}: column '{col}' has dtype {df.schema[col]}, expected {expected}")


def empty_candidates(user_dtype: pl.DataType, item_dtype: pl.DataType) -> pl.DataFrame:
    """A CANDIDATES table with no rows, with these id dtypes."""
    return pl.DataFrame(schema={USER_ID: user_dtype, ITEM_ID: item_dtype, "score": pl.Float32, "rank": pl.Int32})


def with_id_dtype(frame: pl.DataFrame, column: str, dtype: pl.DataType) -> pl.DataFrame:
    """``frame`` with its id ``column`` cast to ``dtype``, to match ids across artifacts written with different
    id types (e.g. a model trained before data.item_id_type changed). Int64 → String writes the number in
    decimal (123 → "123"); String → Int64 parses it, and text that is not a whole number becomes null (an id
    the other side cannot hold, so it matches nothing)."""
    if frame.schema[column] == dtype:
        return frame
    return frame.with_columns(pl.col(column).cast(dtype, strict=False))


def merged_ids(before: pl.DataFrame, after: pl.DataFrame, column: str) -> list:
    """The ``before`` ids of the first id that :func:`with_id_dtype` made out of several (text ``7`` and ``07``
    both become 7), or ``[]`` when every non-null id of ``after`` is still distinct."""
    ids = after[column]
    repeated = ids.filter(ids.is_duplicated() & ids.is_not_null())
    return [] if repeated.is_empty() else before.filter(ids == repeated[0])[column].to_list()

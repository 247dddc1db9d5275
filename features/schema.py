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

EVENTS = {USER_ID: pl.Int64, ITEM_ID: pl.Int64, TIMESTAMP: pl.Int64}
EVENTS_OPTIONAL = {EVENT_TYPE: pl.String, WEIGHT: pl.Float64}

USER_MAP = {USER_ID: pl.Int64, USER_IDX: pl.Int32}
ITEM_MAP = {ITEM_ID: pl.Int64, ITEM_IDX: pl.Int32, "train_count": pl.Int64}

# One row per user; lists are internal item indices in time order (stable sort).
# val history = train_items; test history = train_items + val_items; full history = all three.
SEQUENCES = {
    USER_IDX: pl.Int32,
    "train_items": pl.List(pl.Int32),
    "val_items": pl.List(pl.Int32),
    "test_items": pl.List(pl.Int32),
}

CANDIDATES = {USER_ID: pl.Int64, ITEM_ID: pl.Int64, "score": pl.Float32, "rank": pl.Int32}

PAD_IDX = 0

FEATURE_FILES = {
    "sequences": "sequences.parquet",
    "user_map": "user_map.parquet",
    "item_map": "item_map.parquet",
    "events": "events.parquet",
    "manifest": "manifest.json",
}


def check_schema(df: pl.DataFrame, contract: Mapping[str, Any], name: str) -> None:
    """Raise ``ValueError`` naming the table and column if ``df`` does not match ``contract``."""
    for col, dtype in contract.items():
        if col not in df.columns:
            raise ValueError(f"{name}: missing column '{col}' (expected {dtype})")
        if df.schema[col] != dtype:
            raise ValueError(f"{name}: column '{col}' has dtype {df.schema[col]}, expected {dtype}")

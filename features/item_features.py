"""Item attributes (``data.item_features``): read, check and encode the table of item attributes that the model
embeds beside each item's id (``model.item_features``).

The file is a CSV with a header (or Parquet, by its ``.parquet`` suffix) with an item id column and the
attribute columns of ``data.item_features.columns``, each categorical. A cell holds one value, or several
split on ``list_separator`` (MovieLens genres: ``Action|Comedy``), or in Parquet a list; values are compared as
text, stripped of surrounding spaces, and a blank one (or a missing-value marker, ``NULL``, ``N/A``, ...) is no value. A value is the pair (column, text): ``"7"`` in
``brand`` and in ``category`` are two values. Rows are accounted for, never lost silently:

- ``not_in_catalogue``: rows of items that are not in the kept events (no model row to attach them to), dropped;
- ``duplicate_item_rows``: further rows of an item already listed, merged (the item has the values of all);
- ``empty_cells`` per column: cells with no value (the item simply has none there);
- ``values_over_cap`` per column: an item's values in a column beyond the first ``max_values`` (file order),
  dropped, so that a long tag list cannot blow up the model's item x values table.

With ``cold_items`` the items of the file with at least one value join the catalogue even without any event
(new arrivals): the model scores them by their attributes (:mod:`recsys.model`), the manifest counts them.

Every catalogue item gets a row of ``item_features.parquet`` (schema.ITEM_FEATURES), with an empty list when
the file does not list it or lists no value for it (the model then uses its id embedding alone).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from features.readers import InputDataError, read_table
from features.schema import FEATURE_IDX, ITEM_FEATURE_VALUES, ITEM_FEATURES, ITEM_ID, ITEM_IDX, check_schema
from features.validation import MISSING_TEXT, how_to_fix, id_expr
from recsys.config import ConfigError, ItemFeaturesConfig
from recsys.storage import fingerprint, shown

logger = logging.getLogger(__name__)

KEY = "data.item_features"


def read_item_rows(cfg: ItemFeaturesConfig, item_id_type: str) -> pl.DataFrame:
    """The attribute file's rows: ``item_id`` (of ``item_id_type``) and each attribute column as a list of its
    text values, in file order.

    Raises ConfigError if ``cfg.path`` is no file; InputDataError naming the file, the column and the data row
    for an unreadable file, a missing column, no rows, or an id that is not an item id of ``item_id_type``.
    """
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"{KEY}.path: {shown(path)} does not exist or is not a file; set it to a CSV (with a header) "
                          f"or Parquet file of item attributes, or set {KEY}=null")
    frame, data_rows = _read(path, cfg)
    raw_ids = frame[cfg.item_col]
    rows = frame.select(
        id_expr(raw_ids.dtype, cfg.item_col, item_id_type).alias(ITEM_ID),
        *[_values(frame.schema[col], col, cfg.list_separator) for col in cfg.columns],
    )
    if bad := rows.filter(pl.col(ITEM_ID).is_null()).height:
        row = int(rows[ITEM_ID].is_null().arg_true()[0])
        raise InputDataError(
            f"{path} ({KEY}), column '{cfg.item_col}' ({KEY}.item_col), data row {data_rows[row]}: {raw_ids[row]!r} is "
            f"not an item id ({bad} such row(s)); {how_to_fix(ITEM_ID, {ITEM_ID: item_id_type})}, as in the "
            "events")
    return rows


def cold_item_ids(rows: pl.DataFrame) -> pl.DataFrame:
    """The distinct ``item_id`` of ``read_item_rows`` that list at least one value (``cold_items``: they join
    the catalogue even with no event)."""
    has_value = pl.any_horizontal(pl.exclude(ITEM_ID).list.len() > 0)
    return rows.filter(has_value).select(pl.col(ITEM_ID).unique().sort())


def build_item_features(
    cfg: ItemFeaturesConfig, rows: pl.DataFrame, item_map: pl.DataFrame, event_items: int
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """``{"item_features", "item_feature_values"}`` tables for the catalogue of ``item_map`` (schema.ITEM_MAP)
    from the file's ``rows`` (:func:`read_item_rows`), and the manifest's ``item_features`` section (counts,
    the file's fingerprint); ``event_items``: how many catalogue items have a kept event (the rest came from
    the file, ``cold_items``).

    Raises InputDataError naming the file if it gives no attribute to any catalogue item.
    """
    path = Path(cfg.path)
    known = item_map.select(pl.col(ITEM_ID).cast(rows.schema[ITEM_ID]), ITEM_IDX)
    used = rows.join(known, on=ITEM_ID, how="inner", maintain_order="left")
    long = pl.concat([
        used.select(ITEM_IDX, pl.lit(col).alias("column"), pl.col(col).alias("value")).explode("value")
        for col in cfg.columns
    ]).drop_nulls("value").unique(maintain_order=True)
    # at most max_values per item and column (the first in file order): bounds the model's item x slots table
    nth = pl.int_range(pl.len()).over(ITEM_IDX, "column")
    over = long.filter(nth >= cfg.max_values).group_by("column").len()
    long = long.filter(nth < cfg.max_values)
    if long.height == 0:
        raise InputDataError(
            f"{path} ({KEY}): no attribute value for any item of the catalogue ({used.height} of {rows.height} "
            f"rows name a catalogue item; columns {list(cfg.columns)}); check {KEY}.item_col and the ids, or set "
            f"{KEY}=null")
    order = {col: i for i, col in enumerate(cfg.columns)}
    values = (
        long.group_by("column", "value").agg(pl.len().cast(pl.Int64).alias("n_items"))
        .sort(pl.col("column").replace_strict(order, return_dtype=pl.Int32), "value")
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias(FEATURE_IDX))
        .select(list(ITEM_FEATURE_VALUES))
    )
    lists = (
        long.join(values.select("column", "value", FEATURE_IDX), on=["column", "value"])
        .group_by(ITEM_IDX).agg(pl.col(FEATURE_IDX).sort())
    )
    table = (
        item_map.select(ITEM_IDX).sort(ITEM_IDX)
        .join(lists, on=ITEM_IDX, how="left", maintain_order="left")
        .with_columns(pl.col(FEATURE_IDX).fill_null(pl.lit([], dtype=pl.List(pl.Int32))))
    )
    check_schema(table, ITEM_FEATURES, "item_features")
    check_schema(values, ITEM_FEATURE_VALUES, "item_feature_values")
    counts = table.select(pl.col(FEATURE_IDX).list.len())[FEATURE_IDX]
    without = int((counts == 0).sum())
    section = {
        "columns": list(cfg.columns),
        "rows_in": rows.height,
        "rows_used": used.height,
        "dropped": {"not_in_catalogue": rows.height - used.height},
        "duplicate_item_rows": used.height - used[ITEM_IDX].n_unique(),
        "empty_cells": {col: int((used[col].list.len() == 0).sum()) for col in cfg.columns},
        "values_over_cap": {col: int(over.filter(pl.col("column") == col)["len"].sum()) for col in cfg.columns},
        "n_values": {col: int((values["column"] == col).sum()) for col in cfg.columns},
        "items_with_features": table.height - without,
        "items_without_features": without,
        "max_values_per_item": int(counts.max() or 0),
        "cold_items": table.height - event_items,
        "input": fingerprint(path),
    }
    if without:
        logger.warning("%s: %d of %d catalogue items have no attribute value (%s); they keep their id embedding "
                       "alone", path, without, table.height, KEY)
    return {"item_features": table, "item_feature_values": values}, section


def _read(path: Path, cfg: ItemFeaturesConfig) -> tuple[pl.DataFrame, pl.Series]:
    """The file with its item id column and the attribute columns (CSV: every column as text), and each row's
    data row number (:func:`features.readers.read_table`)."""
    frame, data_rows = read_table(path, KEY, f"fix the file or {KEY}.separator", cfg.separator)
    for col, key in [(cfg.item_col, f"{KEY}.item_col"), *[(c, f"{KEY}.columns") for c in cfg.columns]]:
        if col not in frame.columns:
            raise InputDataError(f"{path} ({KEY}): column '{col}' ({key}) not found; the file has columns "
                                 f"{frame.columns}. Set {key} to one of them or fix the file")
    if frame.height == 0:
        raise InputDataError(f"{path} ({KEY}) has no rows; list the items' attributes or set {KEY}=null")
    return frame.select(cfg.item_col, *cfg.columns), data_rows


def _values(dtype: pl.DataType, col: str, list_separator: str | None) -> pl.Expr:
    """Column ``col`` as a list of its non-blank text values (split on ``list_separator`` when set)."""
    if isinstance(dtype, pl.List):
        values = pl.col(col).list.eval(pl.element().cast(pl.String))
    elif list_separator is not None:
        values = pl.col(col).cast(pl.String).str.split(list_separator)
    else:
        values = pl.concat_list(pl.col(col).cast(pl.String))
    stripped = pl.element().str.strip_chars()
    kept = values.list.eval(stripped.filter(stripped.is_not_null() & (stripped.str.len_bytes() > 0)
                                            & ~stripped.is_in(MISSING_TEXT)))  # an export's NULL, N/A: no value
    return kept.fill_null(pl.lit([], dtype=pl.List(pl.String))).alias(col)

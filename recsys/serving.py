"""A trained model directory as an MLflow pyfunc model, for scoring outside the pipeline's jobs.

`recsys train` writes an ``MLmodel`` file (MLflow's own ``Model`` / ``pyfunc.add_to_model``) into the model
directory, so the directory, the run's ``model`` artifact and every registered version load with MLflow::

    model = mlflow.pyfunc.load_model("models:/sasrec@champion")    # or a local <work_dir>/model
    model.predict(pd.DataFrame({"history": [[10, 20, 30], [7]]}), params={"k": 5})

Input: a ``history`` column, each row a user's item ids (the ORIGINAL ids), oldest first; for a model that embeds
event types (``model.event_types``) also an ``event_types`` column, each row the type names of the history's
events (``["view", "view", "purchase"]``), a type the model never saw counting as none. Output: one row per
input row with ``item_ids`` (the top ``k`` items, best first, the history's items excluded) and ``scores``.
Items the model never saw are ignored; a history with no item the model knows gets the model's most popular
items (``score`` = share of training events), as `recsys candidates` does. The serving environment needs
this package installed (the ``loader_module`` is ``recsys.serving``); the model runs on the CPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features import schema
from features.validation import MISSING_TEXT, event_type_expr, id_expr
from recsys.candidates import TrainedModel, load_trained_model, popular_top_k, user_vectors
from recsys.data import RaggedItems
from recsys.topk import top_k_blocked

log = logging.getLogger(__name__)

HISTORY = "history"
TYPES = "event_types"
DEFAULT_K = 10


def write_mlmodel(directory: str | Path, item_dtype: pl.DataType = pl.Int64, event_types: bool = False) -> bool:
    """Make ``directory`` (a model directory) loadable by ``mlflow.pyfunc.load_model``; returns whether it
    did. ``item_dtype``: the model's item ids, Int64 or String (data.item_id_type), for the signature;
    ``event_types``: the model embeds event types (its input then has an ``event_types`` column). Without
    MLflow installed (a stripped environment: it is a dependency of this package) it logs a warning and writes
    nothing, so training does not depend on it when tracking is off."""
    try:
        import mlflow.pyfunc
    except ImportError:
        log.warning("mlflow is not installed: %s is not written as an MLflow pyfunc model", directory)
        return False
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType, Array

    ids = DataType.string if item_dtype == pl.String else DataType.long
    # types as AnyType: MLflow's check of an Array(string) turns a row holding a null into one-letter strings
    # (["view", "cart", None] -> ["v", "c", "n"], MLflow 3.17), every type then unknown; predict reads them
    signature = ModelSignature(
        inputs=Schema([ColSpec(Array(ids), HISTORY)]
                      + ([ColSpec(Array(AnyType()), TYPES)] if event_types else [])),
        outputs=Schema([ColSpec(Array(ids), "item_ids"), ColSpec(Array(DataType.float), "scores")]),
        params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_K)]),
    )
    model = Model(signature=signature)
    mlflow.pyfunc.add_to_model(model, loader_module="recsys.serving", data=".")
    model.save(str(Path(directory) / "MLmodel"))
    return True


def _type_text(value: Any) -> str | None:
    """An event type of a request as text (None and NaN: none; a whole-number code its decimal text, ``1.0`` ->
    ``"1"``); trimmed and checked for blanks and missing-value markers by :func:`event_type_expr`, as the features
    job reads types."""
    if _no_value(value) or (isinstance(value, float) and math.isinf(value)):
        return None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _no_value(cell: Any) -> bool:
    """Whether a request's cell is null (None, or the NaN pandas puts in an object column)."""
    return cell is None or (isinstance(cell, float) and math.isnan(cell))


def _load_pyfunc(path: str) -> Recommender:
    """MLflow's entry point for ``loader_module``: ``path`` is the model directory."""
    return Recommender(load_trained_model(path))


class Recommender:
    """Top-k items for item-id histories from a :class:`TrainedModel` (exact scores over the catalogue)."""

    def __init__(self, trained: TrainedModel, batch_size: int = 1024) -> None:
        self.trained = trained
        self.batch_size = batch_size

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """``model_input``: a pandas DataFrame with a ``history`` column; returns a pandas DataFrame."""
        import pandas as pd

        k = int((params or {}).get("k", DEFAULT_K))
        if k < 1:
            raise ValueError(f"params k must be at least 1, got {k}")
        if HISTORY not in model_input.columns:
            raise ValueError(f"the input needs a '{HISTORY}' column (a list of item ids per row, oldest first); "
                             f"it has {list(model_input.columns)}")
        types = None
        if self.trained.event_types is not None:
            if TYPES not in model_input.columns:
                raise ValueError(f"this model embeds event types: the input needs a '{TYPES}' column (a list of "
                                 f"type names per row, one per '{HISTORY}' item); it has {list(model_input.columns)}")
            # a null cell (no types known for that request): every event of its history without a type
            types = [[None] * len(history) if _no_value(row) else [_type_text(t) for t in row]
                     for row, history in zip(model_input[TYPES], model_input[HISTORY], strict=True)]
        rows = self.top_k([list(h) for h in model_input[HISTORY]], k, types) if len(model_input) else []
        # the input's own index: `df.assign(recs=model.predict(df)["item_ids"])` on a filtered frame aligns by it
        return pd.DataFrame({"item_ids": [r[0] for r in rows], "scores": [r[1] for r in rows]},
                            index=model_input.index)

    def top_k(self, histories: list[list[Any]], k: int, types: list[list[str]] | None = None
              ) -> list[tuple[list[Any], list[float]]]:
        """Per history: (item ids, scores) of the best ``min(k, catalogue)`` unseen items, best first.
        ``types``: each history's event type names (needed by a model with event types, ignored otherwise).

        Raises ValueError if a row's types are not one per history item."""
        model, item_map = self.trained.model, self.trained.item_map
        k = min(k, model.n_items)
        frame = pl.DataFrame({"row": np.arange(len(histories), dtype=np.int64), HISTORY: _id_lists(histories)})
        aggs = [pl.col(schema.ITEM_IDX).drop_nulls().alias("items"), pl.col(HISTORY).drop_nulls().alias("seen")]
        if self.trained.event_types is not None and types is not None:
            frame = frame.with_columns(pl.Series(TYPES, types, dtype=pl.List(pl.String)))
            if not frame.select((pl.col(HISTORY).list.len() == pl.col(TYPES).list.len()).all()).item():
                raise ValueError(f"the '{TYPES}' column must hold one type per '{HISTORY}' item in every row")
            names = self.trained.event_types.select(pl.col(schema.EVENT_TYPE).alias(TYPES), schema.TYPE_IDX)
            frame = (frame.explode(HISTORY, TYPES).with_columns(event_type_expr(pl.col(TYPES)).alias(TYPES))
                     .join(names, on=TYPES, how="left", maintain_order="left"))
            aggs.append(pl.col(schema.TYPE_IDX).fill_null(0).filter(pl.col(schema.ITEM_IDX).is_not_null())
                        .alias("types"))
        else:
            frame = frame.explode(HISTORY)
        frame = _as_item_ids(frame, item_map.schema[schema.ITEM_ID])
        mapped = (frame
                  .join(item_map.select(pl.col(schema.ITEM_ID).alias(HISTORY), schema.ITEM_IDX), on=HISTORY,
                        how="left", maintain_order="left")
                  .group_by("row", maintain_order=True)
                  .agg(aggs))
        # every input row, an empty history too (explode may drop its row): no known item, nothing seen
        rows = pl.DataFrame({"row": np.arange(len(histories), dtype=np.int64)})
        mapped = rows.join(mapped, on="row", how="left", maintain_order="left").with_columns(
            pl.col("items").fill_null([]), pl.col("seen").fill_null([]))
        known = mapped.filter(pl.col("items").list.len() > 0)
        out: dict[int, tuple[list[Any], list[float]]] = {}
        if known.height:
            with torch.no_grad():
                table = model.item_embeddings().detach().float().cpu()[1 : model.n_items + 1]  # (I, D): item_idx - 1
            to_id = item_map.sort(schema.ITEM_IDX)[schema.ITEM_ID]  # position = item_idx - 1
            vectors = user_vectors(model, known["items"], self.batch_size, known.get_column("types", default=None))
            known_items = RaggedItems.from_series(known["items"])
            seen = RaggedItems(known_items.values - 1, known_items.offsets)  # item_idx -> position
            # in item blocks with seen items masked, ties by item position: the candidates job's and the
            # evaluation's lists, in memory bounded by batch_size x the item block, not x the catalogue
            with torch.no_grad():
                found = top_k_blocked(torch.from_numpy(vectors), table, k, seen, user_block_size=self.batch_size)
            for i, row in enumerate(known["row"].to_list()):
                real = found.ids[i] >= 0  # fewer unseen items than k: the rest is -1 / -inf
                out[row] = (to_id.gather(found.ids[i][real].numpy()).to_list(), found.scores[i][real].tolist())
        unknown = mapped.filter(pl.col("items").list.len() == 0).select(pl.col("row").alias(schema.USER_ID), "seen")
        popular = popular_top_k(item_map, unknown, k, exclude_seen=True)
        for (row,), group in popular.group_by(schema.USER_ID, maintain_order=True):
            out[int(row)] = (group["item_id"].to_list(), group["score"].to_list())
        return [out.get(i, ([], [])) for i in range(len(histories))]


def _id_lists(histories: list[list[Any]]) -> pl.Series:
    """The histories as one list column, of the ids' own type (text for a mix of numbers and text)."""
    try:
        series = pl.Series(HISTORY, histories, strict=True)
    except (TypeError, ValueError, pl.exceptions.PolarsError):
        series = pl.Series(HISTORY, [[None if x is None else str(x) for x in h] for h in histories],
                           dtype=pl.List(pl.String))
    if not isinstance(series.dtype, pl.List):
        raise ValueError(f"the '{HISTORY}' column must hold lists of item ids, got {series.dtype}")
    return series


def _as_item_ids(frame: pl.DataFrame, id_dtype: pl.DataType) -> pl.DataFrame:
    """``frame``'s exploded ``history`` ids read as the features job reads ids (text stripped, numbers of a
    text-id model in decimal), so the model's item map finds them. Raises ValueError naming the first value
    that is no item id of this model's kind (text in a model with whole-number ids)."""
    kind = "string" if id_dtype == pl.String else "int"
    column = frame[HISTORY]
    ids = frame.select(id_expr(column.dtype, HISTORY, kind).cast(id_dtype))[HISTORY]
    bad = column.is_not_null() & ids.is_null()
    # a missing value in a request (a NaN, what pandas holds for one; 'None', 'nan', '' as text) is no item: left
    # out as an unknown id is, instead of failing the whole batch
    if column.dtype == pl.String:
        bad &= ~column.str.strip_chars().is_in([*MISSING_TEXT, ""])
    elif column.dtype.is_float():
        bad &= ~column.is_nan()
    if bad.any():
        what = "text" if kind == "string" else "whole numbers"
        raise ValueError(f"the '{HISTORY}' column must hold lists of item ids; this model's item ids are {what} "
                         f"({id_dtype}), and {column.filter(bad)[0]!r} is not one")
    return frame.with_columns(ids)

"""Champion against challenger on the SAME users and targets: tonight's validation split, scored by both.

The promotion gate's recorded numbers (each version's best val NDCG@10 at training time) come from the data
each model was trained on; after a night of new events they are not comparable. Here the older model (the
champion, with its own item map) is scored on the current features: its histories and targets are mapped
through ``item_id`` into its own indices, history items it never saw are dropped, and a target it never saw
counts as a miss (it cannot recommend it). Users with no history item the champion knows are left out of the
comparison (counted), so both models rank for exactly the same users, and the difference is paired. A champion
with event types gets the histories' types through its own type table (matched by name; a type it never saw
is 0), with the events of dropped items dropped alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
import torch

from features import schema
from recsys.candidates import TrainedModel, in_model_types, type_translation
from recsys.config import ConfigError
from recsys.evaluation import (
    RankingModel,
    ScoreFn,
    accumulate_scorer,
    build_eval_set,
    model_scorer,
    paired_deltas,
    ranking_set,
)

_ROW = "_row"


@dataclass(frozen=True)
class Comparison:
    """Validation NDCG@k of both models on the same users, and the paired difference."""

    challenger: float
    champion: float
    delta: float  # challenger - champion, mean over users
    delta_se: float | None
    users_compared: int
    users_without_known_history: int
    targets_unknown_to_champion: int

    def to_dict(self) -> dict[str, Any]:
        return {"challenger_ndcg": self.challenger, "champion_ndcg": self.champion, "delta": self.delta,
                "delta_se": self.delta_se, "users_compared": self.users_compared,
                "users_without_known_history": self.users_without_known_history,
                "targets_unknown_to_champion": self.targets_unknown_to_champion}


def _map_lists(sequences: pl.DataFrame, column: str, mapping: pl.DataFrame) -> pl.Series:
    """``column`` (List of the features' item_idx) through ``mapping`` (item_idx -> target); an item with no
    target is dropped. Order within each list is kept."""
    exploded = (sequences.select(pl.int_range(pl.len()).alias(_ROW), column).explode(column)
                .join(mapping, left_on=column, right_on=schema.ITEM_IDX, how="left", maintain_order="left"))
    mapped = pl.when(pl.col(column).is_null()).then(None).otherwise(pl.col("target"))  # an empty list stays empty
    lists = exploded.group_by(_ROW, maintain_order=True).agg(mapped.drop_nulls().cast(pl.Int32).alias(column))
    full = sequences.select(pl.int_range(pl.len()).alias(_ROW)).join(lists, on=_ROW, how="left",
                                                                      maintain_order="left")
    return full[column].fill_null([]).cast(pl.List(pl.Int32))


def compare_on_validation(
    challenger: RankingModel,
    champion: TrainedModel,
    sequences: pl.DataFrame,
    item_map: pl.DataFrame,
    max_len: int,
    k: int = 10,
    batch_size: int = 1024,
    exclude_seen: bool = True,
    event_types: pl.DataFrame | None = None,
) -> Comparison:
    """Score both models on the validation targets of ``sequences`` (the CURRENT features, whose item map is
    ``item_map`` and event type table ``event_types``; ``challenger`` uses those indices) for the users with a
    history item the champion knows."""
    champion_ids = schema.with_id_dtype(champion.item_map, schema.ITEM_ID, item_map.schema[schema.ITEM_ID])
    # Text ids that became one number (data.item_id_type changed: '30', '030') name no single champion item:
    # like a text id that is no number (null now), that item is one the champion cannot recommend tonight.
    ambiguous = pl.col(schema.ITEM_ID).is_duplicated() & pl.col(schema.ITEM_ID).is_not_null()
    model_idx = champion_ids.filter(~ambiguous).select(schema.ITEM_ID, pl.col(schema.ITEM_IDX).alias("target"))
    mapping = item_map.select(schema.ITEM_ID, schema.ITEM_IDX).join(model_idx, on=schema.ITEM_ID, how="left")
    mapping = mapping.select(schema.ITEM_IDX, "target")
    n_champion = champion.model.n_items
    # Each item the champion never saw becomes an item of its own after its catalogue, n + 1 .. n + M, scored
    # -inf, with k more -inf columns after them: the pessimistic rank counts those k as ahead of it, so it is
    # a miss at k even on a tiny catalogue; and a user's several unknown targets stay several targets (one
    # shared index would merge them, shrinking the champion's ideal DCG).
    history = _map_lists(sequences, "train_items", mapping)
    known = history.list.len() > 0
    with_val = sequences["val_items"].list.len() > 0
    kept = sequences.filter(known)
    targets = kept["val_items"].explode().drop_nulls().unique().implode()  # only those need a column
    unseen = mapping.filter(pl.col("target").is_null() & pl.col(schema.ITEM_IDX).is_in(targets))
    unseen = unseen.with_row_index("extra")
    as_targets = mapping.join(unseen.select(schema.ITEM_IDX, "extra"), on=schema.ITEM_IDX, how="left").select(
        schema.ITEM_IDX, pl.coalesce("target", pl.col("extra").cast(pl.Int64) + n_champion + 1).alias("target"))
    n_eval = n_champion + unseen.height + k
    remapped = kept.with_columns(
        history.filter(known).alias("train_items"),
        _map_lists(kept, "val_items", as_targets).alias("val_items"),
        pl.lit([], dtype=pl.List(pl.Int32)).alias("test_items"),
    )
    translation = type_translation(champion, event_types)  # ConfigError: a typed champion, features without
    if "train_types" in sequences.columns:  # the types of the champion's kept history events
        translated = in_model_types(kept, translation)
        champion_items = mapping.drop_nulls("target")[schema.ITEM_IDX].implode()
        known_at = pl.col("train_items").list.eval(pl.arg_where(pl.element().is_in(champion_items)))
        no_types = pl.lit([], dtype=pl.List(pl.Int16))
        remapped = remapped.with_columns(
            translated.select(pl.col("train_types").list.gather(known_at)).to_series(),  # as _map_lists drops
            translated["val_types"], no_types.alias("test_types"))  # val items are all kept (unknown: a miss)
    if not kept.filter(pl.col("val_items").list.len() > 0).height:
        shared = mapping["target"].drop_nulls().len()
        raise ConfigError(
            f"the champion knows no history item of tonight's {int(with_val.sum())} validation users (its item map "
            f"shares {shared} of the features' {item_map.height} items), so the two models cannot be scored on the "
            "same users. If the item ids were re-keyed on purpose, gate this night on the recorded numbers "
            "(tracking.promotion_basis=recorded) or move the champion alias by hand")
    ours_set = build_eval_set(kept, "val", max_len)
    bias = not exclude_seen  # a repeat bias only where seen items compete (model_scorer)
    ours = accumulate_scorer(model_scorer(challenger, ours_set, bias), ranking_set(ours_set, exclude_seen),
                             int(item_map.height), (k,), batch_size)
    theirs_set = build_eval_set(remapped, "val", champion.model.max_len)
    theirs = accumulate_scorer(_with_columns(model_scorer(champion.model, theirs_set, bias), unseen.height + k),
                               ranking_set(theirs_set, exclude_seen), n_eval, (k,), batch_size)
    deltas = paired_deltas(ours, theirs)
    key = f"ndcg_at_{k}"
    unknown_targets = int((remapped["val_items"].explode() > n_champion).sum())
    return Comparison(
        challenger=ours.result()[key], champion=theirs.result()[key], delta=deltas[f"delta_{key}"],
        delta_se=deltas.get(f"delta_{key}_se"), users_compared=ours.n_users,
        users_without_known_history=int((~known & with_val).sum()), targets_unknown_to_champion=unknown_targets,
    )


def _with_columns(score_fn: ScoreFn, extra: int) -> ScoreFn:
    """Scores with ``extra`` more item indices after the catalogue, all scored -inf."""

    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        scores = score_fn(inputs, user_idx)
        return torch.cat([scores, scores.new_full((scores.shape[0], extra), float("-inf"))], dim=1)

    return score

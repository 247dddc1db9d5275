"""Nightly candidate generation: user vectors (hidden state at the last position) and item vectors from
a trained model, a FAISS index, top-K per user with already-seen items excluded, in ORIGINAL ids.

Ids go through the MODEL's own id maps (the model may be older than the features): a history is mapped
``item_id`` → the model's ``item_idx``; items the model never saw are dropped from histories and are never
recommended (counted as ``unknown_items`` / ``unknown_item_events``). SASRec has no user embedding, so a user
the model never saw is scored from their history like any other (counted as ``users_unknown_to_model``).
A user left with NO history the model knows gets the fallback: the model's K most popular items
(``train_count`` of its item map, ties by ``item_id``), seen items excluded, with ``score`` = the item's
share of training events (counted as ``fallback_users``).

With an allow list (``candidates.allowed_items``) only its items can be candidates, for the model's lists
and the fallback alike: the index holds the allowed rows of the item table only, so every user still gets K
allowed items whenever there are K (``items_allowed`` in the manifest; listed ids the model does not know
cannot be scored and are counted as ``allowed_items_unknown``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features import schema
from features.artifacts import FeatureSet
from features.readers import InputDataError
from recsys.config import CandidatesConfig, ConfigError
from recsys.data import RaggedItems
from recsys.device import inference
from recsys.model import MODEL_FIX, SASRec, load_model
from recsys.storage import read_parquet_file

log = logging.getLogger(__name__)

MODEL_IDX = "model_item_idx"  # an item's index in the MODEL's item map (vs the features' item_idx)
MODEL_TYPE = "model_type_idx"  # an event type's index in the MODEL's event type table (0: one it never saw)


@dataclass(frozen=True)
class TrainedModel:
    """A model with the id maps it was trained with (schema.USER_MAP, schema.ITEM_MAP) and, for a model with
    item attributes, what its attribute values are (schema.ITEM_FEATURE_VALUES; None if not saved), and for a
    model with event types, which type each ``type_idx`` is (schema.EVENT_TYPE_MAP; None without types)."""

    model: SASRec
    user_map: pl.DataFrame
    item_map: pl.DataFrame
    feature_values: pl.DataFrame | None = None
    event_types: pl.DataFrame | None = None


def load_trained_model(directory: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Weights (``weights_only=True``, onto ``device``), ``model.json`` and the id maps of a model directory.

    Raises FileNotFoundError naming a missing file, ValueError if the item map does not cover the model's
    item indices 1..n_items exactly.
    """
    directory = Path(directory)
    model = load_model(directory, device)
    maps = {}
    for name, contract in (("user_map", schema.USER_MAP), ("item_map", schema.ITEM_MAP)):
        path = directory / schema.FEATURE_FILES[name]
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; a model directory holds the id maps it was "
                                    "trained with (`recsys train` writes them)")
        maps[name] = read_parquet_file(path, MODEL_FIX)
        schema.check_schema(maps[name], contract, str(path))
    idx = maps["item_map"][schema.ITEM_IDX]
    if idx.n_unique() != model.n_items or idx.len() != model.n_items or idx.min() != 1:
        raise ValueError(f"{directory / 'item_map.parquet'}: column 'item_idx' must hold 1..{model.n_items} "
                         "once each (the model's catalogue); the model and its id maps do not match")
    values_path = directory / schema.ITEM_FEATURE_FILES["item_feature_values"]
    values = None
    if model.n_feature_values and values_path.is_file():
        values = read_parquet_file(values_path, MODEL_FIX)
        schema.check_schema(values, schema.ITEM_FEATURE_VALUES, str(values_path))
    types = None
    if model.n_event_types:
        path = directory / schema.EVENT_TYPE_FILES["event_types"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; a model that embeds event types keeps their names "
                                    "beside its weights (`recsys train` writes them)")
        types = read_parquet_file(path, MODEL_FIX)
        schema.check_schema(types, schema.EVENT_TYPE_MAP, str(path))
        if sorted(types[schema.TYPE_IDX].to_list()) != list(range(1, model.n_event_types + 1)):
            raise ValueError(f"{path}: column 'type_idx' must hold 1..{model.n_event_types} once each (the "
                             "model's event types); the model and its type table do not match")
    return TrainedModel(model, maps["user_map"], maps["item_map"], values, types)


def type_translation(trained: TrainedModel, feature_types: pl.DataFrame | None) -> pl.DataFrame | None:
    """(``type_idx`` of the features, :data:`MODEL_TYPE`) for a model with event types, matched by type name:
    a type the model never saw gets 0 (no type); None for a model without event types. Raises ConfigError
    naming data.event_type_col if the model embeds types and the features have none."""
    if trained.event_types is None:
        return None
    if feature_types is None:
        raise ConfigError("the model embeds event types (model.event_types) but these features have none: "
                          "set data.event_type_col as when the model was trained, or train a model with "
                          "model.event_types=false")
    model_types = trained.event_types.select(schema.EVENT_TYPE, pl.col(schema.TYPE_IDX).alias(MODEL_TYPE))
    return (feature_types.select(schema.EVENT_TYPE, schema.TYPE_IDX)
            .join(model_types, on=schema.EVENT_TYPE, how="left", maintain_order="left")
            .select(schema.TYPE_IDX, pl.col(MODEL_TYPE).fill_null(0)))


def with_feature_ids(trained: TrainedModel, feats: FeatureSet) -> TrainedModel:
    """``trained`` with its id maps in the id dtypes of ``feats`` (data.user_id_type / data.item_id_type may
    have changed since the model was trained): whole-number ids become their decimal text, and text ids become
    numbers where every item id of the model is one.

    Raises ConfigError naming data.item_id_type when the model holds text item ids that are not whole numbers
    and the features hold numbers (such items could not be written as candidates), or two that are one number
    (``7`` and ``07``: a list would hold that item twice).
    """
    user_map = schema.with_id_dtype(trained.user_map, schema.USER_ID, feats.user_map.schema[schema.USER_ID])
    item_dtype = feats.item_map.schema[schema.ITEM_ID]
    item_map = schema.with_id_dtype(trained.item_map, schema.ITEM_ID, item_dtype)
    lost = item_map[schema.ITEM_ID].null_count() - trained.item_map[schema.ITEM_ID].null_count()
    if lost:
        example = trained.item_map.filter(item_map[schema.ITEM_ID].is_null())[schema.ITEM_ID][0]
        raise ConfigError(f"the model was trained with text item ids, {lost} of which are not whole numbers (e.g. "
                          f"{example!r}), but the features hold {item_dtype} item ids (data.item_id_type: int): "
                          "set data.item_id_type: string as when the model was trained, or train a new model")
    if same := schema.merged_ids(trained.item_map, item_map, schema.ITEM_ID):  # '7', '07': one number now
        raise ConfigError(f"the model was trained with text item ids {same}, which are one {item_dtype} id "
                          f"in these features (data.item_id_type: int): its lists would repeat that item. Set "
                          "data.item_id_type: string as when the model was trained, or train a new model")
    return replace(trained, user_map=user_map, item_map=item_map)


def read_candidates(path: str | Path) -> pl.DataFrame:
    """A candidates table (schema.CANDIDATES) from a Parquet file or a partition directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "candidates.parquet"
    table = read_parquet_file(path, f"move {path.parent} aside (out of {path.parent.parent}) and rerun, or restore it")
    schema.check_schema(table, schema.CANDIDATES, str(path))
    return table


def select_active(
    feats: FeatureSet, last_times: pl.DataFrame, window: int
) -> tuple[FeatureSet, dict[str, Any]]:
    """``feats`` with only the sequences of users whose newest event (``last_times``: user_idx,
    last_timestamp) is at or after ``newest - window``, newest = the latest event of all users; plus the
    counts for the manifest (``active_window``, ``active_since``, ``users_inactive``)."""
    newest = last_times["last_timestamp"].max()
    if newest is None:  # no events at all: nobody is active
        since, active = None, last_times[schema.USER_IDX].clear()
    else:
        since = int(newest) - window
        active = last_times.filter(pl.col("last_timestamp") >= since)[schema.USER_IDX]
    sequences = feats.sequences.filter(pl.col(schema.USER_IDX).is_in(active.implode()))
    stats = {"active_window": window, "active_since": since,
             "users_inactive": feats.sequences.height - sequences.height}
    log.info("candidates: %d active users (an event at or after %s), %d inactive ones skipped",
             sequences.height, since, stats["users_inactive"])
    return replace(feats, sequences=sequences), stats


def in_model_types(sequences: pl.DataFrame, translation: pl.DataFrame | None) -> pl.DataFrame:
    """``sequences`` with their type lists (schema.SEQUENCE_TYPES) in the model's type indices through
    ``translation`` (:func:`type_translation`; a type it lacks becomes 0); unchanged when None."""
    if translation is None:
        return sequences
    old, new = translation[schema.TYPE_IDX], translation[MODEL_TYPE]
    return sequences.with_columns(
        pl.col(c).list.eval(pl.element().replace_strict(old, new, default=0, return_dtype=pl.Int16))
        for c in schema.SEQUENCE_TYPES)


def full_histories(sequences: pl.DataFrame) -> pl.DataFrame:
    """(user_idx, items) with every known event in time order: train + val + test; and ``types``, the events'
    type lists, where the sequences have them (schema.SEQUENCE_TYPES)."""
    columns = [pl.concat_list("train_items", "val_items", "test_items").alias("items")]
    if "train_types" in sequences.columns:
        columns.append(pl.concat_list("train_types", "val_types", "test_types").alias("types"))
    return sequences.select(schema.USER_IDX, *columns).filter(pl.col("items").list.len() > 0)


def model_histories(feats: FeatureSet, item_map: pl.DataFrame, types: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per user with events, sorted by ``user_id``: ``items`` List(Int32) of the MODEL's item
    indices in time order (items unknown to the model dropped), ``seen`` List(Int64) of every item_id in the
    history, ``unknown_events`` (history events of items unknown to the model); with ``types``
    (:func:`type_translation`) also ``types``, the MODEL's type index of each event of ``items``."""
    model_ids = item_map.select(schema.ITEM_ID, pl.col(schema.ITEM_IDX).alias(MODEL_IDX))
    full = full_histories(feats.sequences)
    aggs = [
        pl.col(MODEL_IDX).drop_nulls().alias("items"),
        pl.col(schema.ITEM_ID).alias("seen"),
        pl.col(MODEL_IDX).is_null().sum().alias("unknown_events"),
    ]
    if types is not None:
        full = full.explode("items", "types").join(types, left_on="types", right_on=schema.TYPE_IDX, how="left",
                                                   maintain_order="left")
        aggs.append(pl.col(MODEL_TYPE).fill_null(0).filter(pl.col(MODEL_IDX).is_not_null()).alias("types"))
    else:
        full = full.explode("items")
    return (
        full
        .join(feats.item_map.select(schema.ITEM_ID, schema.ITEM_IDX), left_on="items",
              right_on=schema.ITEM_IDX, how="left", maintain_order="left")
        .join(model_ids, on=schema.ITEM_ID, how="left", maintain_order="left")
        .join(feats.user_map, on=schema.USER_IDX, how="left", maintain_order="left")
        .sort(schema.USER_ID, maintain_order=True)  # stable: each history stays in time order
        .group_by(schema.USER_ID, maintain_order=True)
        .agg(*aggs)
    )


def user_vectors(model: SASRec, histories: pl.Series, batch_size: int, types: pl.Series | None = None) -> np.ndarray:
    """(U, D) float32 hidden state at each user's last position (the last ``model.max_len`` items).

    ``histories`` is a List(Int) column of item indices, ``types`` (for a model with event types) the
    matching List(Int) column of their event types; padding is vectorised (no per-user Python). The model
    runs on its own device in exact float32; the vectors come back to the CPU (for FAISS).
    """
    ragged = RaggedItems.from_series(histories)
    kinds = None if types is None else RaggedItems.from_series(types)
    out = []
    with inference(model) as device:
        for start in range(0, len(histories), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(histories)))
            batch = ragged.pad(rows, model.max_len).long().to(device)  # (B, T)
            batch_types = None if kinds is None else kinds.pad(rows, model.max_len).long().to(device)  # (B, T)
            out.append(model.user_vectors(batch, batch_types).float().cpu())  # (B, D)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def generate_candidates(
    trained: TrainedModel, feats: FeatureSet, cfg: CandidatesConfig, allowed: pl.Series | None = None,
    night: FeatureSet | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Top-``cfg.k`` items per user of ``feats`` as a schema.CANDIDATES table plus counts for the manifest;
    with ``allowed`` (item ids, from ``cfg.allowed_items``) only those items are candidates. ``night``: the whole
    night's features when ``feats`` holds one shard of them: with ``cfg.target_recall`` the index is tuned on the
    same users of the night whatever the shard (:func:`tuning_users`), so every shard searches with the value
    the unsharded night would use and the shards' union stays the unsharded night.

    Raises InputDataError naming ``candidates.allowed_items`` if the model knows none of the allowed items.
    """
    trained = with_feature_ids(trained, feats)
    check_shared_catalogue(trained.item_map[schema.ITEM_ID], feats.item_map[schema.ITEM_ID])
    hist = model_histories(feats, trained.item_map, type_translation(trained, feats.event_types))
    pool = trained.item_map  # the items that may be candidates
    listed = 0 if allowed is None else allowed.len()
    if allowed is not None:
        typed = allowed.cast(feats.item_map.schema[schema.ITEM_ID], strict=False)
        if typed.null_count() > allowed.null_count():  # e.g. 'sku-9' against whole-number item ids
            example = allowed.filter(typed.is_null() & allowed.is_not_null())[0]
            log.warning("candidates: %d ids of %s (candidates.allowed_items) are not %s item ids like the "
                        "features' (e.g. %r); counted as unknown", typed.null_count() - allowed.null_count(),
                        cfg.allowed_items, feats.item_map.schema[schema.ITEM_ID], example)
        allowed = typed.drop_nulls()
        pool = pool.filter(pl.col(schema.ITEM_ID).is_in(allowed.implode()))
        if pool.height == 0:
            raise InputDataError(f"{cfg.allowed_items} (candidates.allowed_items): none of its {listed} "
                                 "item ids is in the model's catalogue, so nothing could be recommended; "
                                 "check that it lists the same item ids as the events")
    k = min(cfg.k, pool.height)  # a catalogue smaller than K gives every item
    known = pl.col("items").list.len() > 0
    scored, fallback = hist.filter(known), hist.filter(~known)
    rows = None if allowed is None else pool[schema.ITEM_IDX].to_numpy().astype(np.int64) - 1
    tune_on = None
    if cfg.target_recall is not None:  # the whole night's users (those of every shard) when scoring one shard
        tune_on = (tuning_users(scored, cfg.recall_sample) if night is None
                   else night_tuning_users(night, trained, cfg.recall_sample))
    model_rows, search = _model_top_k(trained, scored, k, cfg, rows, tune_on)
    table = pl.concat([model_rows, popular_top_k(pool, fallback, k, cfg.exclude_seen,
                                                 total_events=int(trained.item_map["train_count"].sum()))])
    table = table.sort([schema.USER_ID, "rank"])
    schema.check_schema(table, schema.CANDIDATES, "candidates")
    model_items, feature_items = trained.item_map[schema.ITEM_ID], feats.item_map[schema.ITEM_ID]
    counts = {
        "k_effective": k,
        "users": hist.height,
        "users_scored": scored.height,
        "fallback_users": fallback.height,
        "users_unknown_to_model": _count_missing(hist[schema.USER_ID], trained.user_map[schema.USER_ID]),
        "unknown_items": _count_missing(feature_items, model_items),
        "unknown_item_events": int(hist["unknown_events"].sum()),
        "model_items_not_in_features": _count_missing(model_items, feature_items),
        "items_allowed": pool.height,
        "allowed_items_unknown": listed - pool.height if allowed is not None else 0,  # uncastable ids included
    }
    log.info("candidates: %d users scored by the model, %d popularity fallbacks, %d items unknown to the "
             "model", counts["users_scored"], counts["fallback_users"], counts["unknown_items"])
    return table, {**counts, "search": search}


def _by_user_hash(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` (with a user_id column) sorted by :func:`recsys.sharding.user_hash`, then user_id."""
    from recsys.sharding import user_hash

    key = user_hash(pl.col(schema.USER_ID), frame.schema[schema.USER_ID])
    return frame.with_columns(key.alias("_hash")).sort("_hash", schema.USER_ID).drop("_hash")


def tuning_users(histories: pl.DataFrame, n: int) -> pl.DataFrame:
    """The ``n`` rows of ``histories`` whose users have the smallest :func:`recsys.sharding.user_hash`: a sample
    that depends neither on the order of the users nor on which shard of the night draws it."""
    return _by_user_hash(histories).head(n)


def night_tuning_users(night: FeatureSet, trained: TrainedModel, n: int) -> pl.DataFrame:
    """:func:`tuning_users` of the whole ``night``'s histories that the model knows, without building them all:
    histories are built for the users of smallest hash only, ``n`` first, twice as many while fewer than ``n`` of
    them have an item the model knows (and users remain), so one shard of a large night pays for about ``n``
    histories, not the night's."""
    users = night.user_map.filter(pl.col(schema.USER_IDX).is_in(night.sequences[schema.USER_IDX].implode()))
    ordered = _by_user_hash(users)[schema.USER_IDX]
    types = type_translation(trained, night.event_types)
    take = max(n, 1)
    while True:
        part = replace(night, sequences=night.sequences.filter(pl.col(schema.USER_IDX).is_in(ordered[:take].implode())))
        known = model_histories(part, trained.item_map, types).filter(pl.col("items").list.len() > 0)
        if known.height >= n or take >= len(ordered):
            return tuning_users(known, n)
        take *= 2


def _model_top_k(
    trained: TrainedModel, scored: pl.DataFrame, k: int, cfg: CandidatesConfig, rows: np.ndarray | None,
    tune_on: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """FAISS top-k over the model's catalogue (only its item table ``rows``, sorted, when not None) for users
    with a history the model knows; with ``cfg.target_recall`` the index is tuned on the histories ``tune_on``
    (:func:`tuning_users`)."""
    # FAISS is imported here, not with the module: training imports this module (TrainedModel, warm start)
    # and must not need FAISS (GPU images without it); tests/test_imports.py checks that.
    from recsys.retrieval import (
        IndexBuildError,
        IndexSpecError,
        ann_recall,
        build_index,
        exact_search,
        recall_at_k,
        search_top_k,
        tune_index,
    )

    if scored.height == 0:
        return schema.empty_candidates(scored.schema[schema.USER_ID], trained.item_map.schema[schema.ITEM_ID]), \
            {"users": 0}
    lists = scored["items"].to_list()
    users = user_vectors(trained.model, scored["items"], cfg.batch_size, scored.get_column("types", default=None))
    with torch.no_grad():
        items = trained.model.item_embeddings()[1:].float().cpu().numpy()  # (I, D); row r = item_idx r + 1
    table = items  # every item's vector (the index may hold only the allowed rows)
    repeats = trained.model.repeat_bias and not cfg.exclude_seen  # seen items compete, with their bonus
    position = None  # item table row -> index row (-1: not in the index)
    if rows is not None:
        items = np.ascontiguousarray(items[rows])
        position = np.full(trained.model.n_items, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
    def seen_of(histories: list[list[int]]) -> list[np.ndarray]:  # index rows to leave out, per user
        return [_index_rows(np.asarray(x, dtype=np.int64) - 1, position) if cfg.exclude_seen
                else np.empty(0, dtype=np.int64) for x in histories]

    seen = seen_of(lists)
    factory = cfg.index
    try:
        index = build_index(items, factory, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    except IndexSpecError as exc:  # checked with the config for its model; this model serves another dimension
        raise ConfigError(f"candidates.index / nprobe / ef_search for this model's {items.shape[1]}-wide vectors: "
                          f"{exc}") from exc
    except IndexBuildError as exc:
        # a catalogue (or allow list) too small to train the configured index (e.g. fewer items than IVF lists):
        # exact search over so few items is cheap, and the night goes on
        log.warning("candidates: index %r cannot be built over the %d %s items (%s); searching them exactly",
                    factory, len(items), "model" if rows is None else "allowed", exc)
        factory = "Flat"
        index = build_index(items, factory)
    # With the repeat bias a window item may climb past the plain top k: take k + max_len by plain score, add
    # the bonus, keep the best k (a window item outside those is added below with its exact score).
    wide = min(k + trained.model.max_len, len(items)) if repeats else k
    allowed_rows = None if position is None else position >= 0

    def with_bonus(found: np.ndarray, found_scores: np.ndarray, histories: pl.DataFrame, vectors: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:  # index rows -> item table rows, plus the repeat bonus
        if rows is not None:
            found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        if not repeats:
            return found, found_scores
        return with_repeat_bias(trained.model, histories["items"], vectors, table, found, found_scores, k,
                                allowed_rows, cfg.batch_size, histories.get_column("types", default=None))

    def exact_with_bonus(histories: pl.DataFrame, vectors: np.ndarray) -> np.ndarray:
        """Seen items competing: the exact reference of the published lists (exact search, same widening, bonus)."""
        return with_bonus(*exact_search(items, vectors, wide), histories, vectors)[0]

    rng = np.random.default_rng(0)
    sample = rng.choice(len(lists), size=min(cfg.recall_sample, len(lists)), replace=False)
    tuned: dict[str, Any] = {}
    if tune_on is not None:  # cfg.target_recall: before the search, as it sets nprobe / efSearch
        tune_users = user_vectors(trained.model, tune_on["items"], cfg.batch_size,
                                  tune_on.get_column("types", default=None))
        def publish() -> np.ndarray:  # the lists published for the tuning users, as the index is set now
            found = search_top_k(index, tune_users, wide, None, batch_size=cfg.batch_size, item_vectors=items)
            return with_bonus(found.ids, found.scores, tune_on, tune_users)[0]

        tuning = tune_index(index, items, tune_users, k, cfg.target_recall, seen_of(tune_on["items"].to_list()),
                            exact_ids=exact_with_bonus(tune_on, tune_users) if repeats else None,
                            publish=publish if repeats else None)
        # The recall recorded (and gated by min_recall) is measured on OTHER users: on the tuning sample it
        # reaches the target by construction and overstates the recall of everyone else.
        rest = np.flatnonzero(~scored[schema.USER_ID].is_in(tune_on[schema.USER_ID].implode()).to_numpy())
        tuned = {"tuned_parameter": tuning.parameter, "tuned_value": tuning.value,
                 "target_recall": cfg.target_recall, "target_reached": tuning.reached,
                 "tuning_recall": tuning.recall, "tuning_sample": tune_on.height,
                 "tuning_tried": [list(t) for t in tuning.tried], "recall_held_out": bool(len(rest))}
        if len(rest):  # else (every user in the tuning sample) the recall is that sample's, and says so
            sample = rng.choice(rest, size=min(cfg.recall_sample, len(rest)), replace=False)
    found, found_scores, stats = search_top_k(index, users, wide, seen, batch_size=cfg.batch_size,
                                              item_vectors=items)
    ids, scores = with_bonus(found, found_scores, scored, users)
    if repeats:  # the published lists carry the bonus: so does the exact reference (the same widening, exact)
        recall = recall_at_k(exact_with_bonus(scored[sample], users[sample]), ids[sample])
    else:
        recall = ann_recall(index, items, users[sample], k, [seen[i] for i in sample])
    if recall is None:
        log.warning("ANN recall@%d not measured: none of the %d sampled users has an unseen item", k, len(sample))
    else:
        log.info("ANN recall@%d vs exact search on %d users: %.4f", k, len(sample), recall)
    rows = _to_rows(scored[schema.USER_ID], ids, scores, trained.item_map)
    search = {"index_used": factory,
              "users": stats["users"], "batches": stats["batches"], "short_users": stats["short_users"],
              "exact_fallback_users": stats["fallback_users"],  # ANN left short: answered by exact search
              "ann_recall_at_k": recall, "recall_sample": int(len(sample)), **tuned}
    return rows, search


def with_repeat_bias(
    model: SASRec, histories: pl.Series, users: np.ndarray, table: np.ndarray, ids: np.ndarray, scores: np.ndarray,
    k: int, allowed: np.ndarray | None, batch_size: int, types: pl.Series | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of (the found ``ids`` (U, K') with ``scores``) ∪ (each user's window items), scored
    ``user · item`` + the model's repeat bias (:meth:`SASRec.history_bias`, repeats summed); ``ids`` are item
    table rows (item_idx - 1, -1 = none); ``allowed`` (I,) bool limits the window items added (None = all);
    ``types`` the histories' event types (a model whose repeat bias depends on them needs them).
    Returns ids (U, k) and float32 scores (U, k), best first, -1 / -inf where fewer than k exist."""
    ragged = RaggedItems.from_series(histories)
    kinds = None if types is None else RaggedItems.from_series(types)
    out_ids = np.full((len(users), k), -1, dtype=np.int64)
    out_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    step = min(batch_size, 256)  # the (B, K' + L, L) comparisons below: ~25M booleans at K' + L = 500, L = 200
    for start in range(0, len(users), step):
        rows = np.arange(start, min(start + step, len(users)))
        window = ragged.pad(torch.from_numpy(rows), model.max_len).long()  # (B, L) item_idx, 0 = padding
        device = next(model.parameters()).device
        window_types = None if kinds is None else kinds.pad(torch.from_numpy(rows), model.max_len).long().to(device)
        with torch.no_grad():
            bonus = model.history_bias(window.to(device), types=window_types).float().cpu().numpy()  # (B, L)
        own = window.numpy() - 1  # (B, L) table rows, -1 = padding
        if allowed is not None:
            own = np.where((own >= 0) & allowed[np.maximum(own, 0)], own, -1)
        found = ids[rows]  # (B, K')
        own_plain = np.einsum("bd,bld->bl", users[rows], table[np.maximum(own, 0)])  # (B, L)
        earlier = np.tril(np.ones((own.shape[1],) * 2, dtype=bool), -1)  # [i, j]: j before i
        repeated = ((own[:, :, None] == own[:, None, :]) & earlier).any(-1)  # (B, L) not its first occurrence
        in_found = (own[:, :, None] == found[:, None, :]).any(-1)  # (B, L)
        own_valid = (own >= 0) & ~repeated & ~in_found
        cand = np.concatenate([found, np.where(own_valid, own, -1)], 1)  # (B, K' + L)
        plain = np.concatenate([scores[rows], own_plain], 1).astype(np.float64)
        extra = ((cand[:, :, None] == own[:, None, :]) & (own[:, None, :] >= 0)) @ bonus[:, :, None]  # (B, C, 1)
        total = np.where(cand >= 0, plain + extra[:, :, 0], -np.inf)
        order = np.argsort(-total, axis=1, kind="stable")[:, :k]  # (B, k)
        out_ids[rows] = np.where(np.isfinite(np.take_along_axis(total, order, 1)),
                                 np.take_along_axis(cand, order, 1), -1)
        out_scores[rows] = np.take_along_axis(total, order, 1).astype(np.float32)
    return out_ids, out_scores


def _index_rows(table_rows: np.ndarray, position: np.ndarray | None) -> np.ndarray:
    """Item table rows → rows of an index holding a subset of them (``position``; None = all), dropping
    the rows it does not hold."""
    if position is None:
        return table_rows
    mapped = position[table_rows]
    return mapped[mapped >= 0]


def _to_rows(
    user_id: pl.Series, ids: np.ndarray, scores: np.ndarray, item_map: pl.DataFrame
) -> pl.DataFrame:
    """ids (U, k) row positions of the model's item table (-1 = none) → schema.CANDIDATES rows."""
    k = ids.shape[1]
    valid = ids.reshape(-1) >= 0
    frame = pl.DataFrame({
        schema.USER_ID: user_id.gather(np.repeat(np.arange(len(user_id)), k)[valid]),
        schema.ITEM_IDX: (ids.reshape(-1)[valid] + 1).astype(np.int32),
        "score": scores.reshape(-1)[valid].astype(np.float32),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(user_id))[valid],
    })
    return (frame.join(item_map.select(schema.ITEM_ID, schema.ITEM_IDX), on=schema.ITEM_IDX, how="left",
                       maintain_order="left")
            .select(list(schema.CANDIDATES)))


def recall_violations(search: dict[str, Any], cfg: CandidatesConfig, k: int | None = None) -> list[str]:
    """Why the night fails ``candidates.min_recall`` (empty = it does not, or no gate, or nothing to recall);
    ``k`` the night's effective k (``cfg.k``, or the catalogue size when smaller)."""
    recall = search.get("ann_recall_at_k")
    if cfg.min_recall is None or recall is None or recall >= cfg.min_recall:
        return []
    if search.get("target_recall") is not None and search.get("tuned_parameter") is None:
        advice = "the index has no search parameter to tune (nprobe / efSearch): set a more exact candidates.index"
    elif search.get("target_recall") is not None:  # the tuner sets nprobe / efSearch: those keys do nothing
        others = " other" if search.get("recall_held_out") else ""
        advice = (f"the index was tuned to candidates.target_recall {search['target_recall']} on "
                  f"{search.get('tuning_sample')}{others} users: raise target_recall (at least to min_recall) or "
                  "candidates.recall_sample")
    else:
        advice = "raise candidates.nprobe / ef_search or set candidates.target_recall"
    return [f"ANN recall@{k or cfg.k} {recall:.4f} (of the published lists, exact fallback included) on "
            f"{search['recall_sample']} sampled users < candidates.min_recall {cfg.min_recall} with index "
            f"{search['index_used']!r}: {advice}"]


def popular_top_k(item_map: pl.DataFrame, users: pl.DataFrame, k: int, exclude_seen: bool,
                  total_events: int | None = None) -> pl.DataFrame:
    """The fallback: per user of ``users`` (user_id, seen List(Int64)), the k items of ``item_map`` with the
    most training events (ties by item_id), seen ones excluded; score = share of training events, of
    ``total_events`` (the model's, when ``item_map`` is only the allowed part of its catalogue; default: those
    of ``item_map``)."""
    if users.height == 0:
        return schema.empty_candidates(users.schema[schema.USER_ID], item_map.schema[schema.ITEM_ID])
    total = max(int(item_map["train_count"].sum()) if total_events is None else total_events, 1)
    popular = (item_map.sort(["train_count", schema.ITEM_ID], descending=[True, False])
               .select(schema.ITEM_ID, (pl.col("train_count") / total).cast(pl.Float32).alias("score"))
               .with_row_index("order"))
    # Only seen items of item_map can displace a popular item, each once: a fallback user's history is of items
    # the model does not know, so this is usually 0, whatever the length of the history (the cross join below
    # is users x (k + the most such items of any user)).
    seen = (users.select(schema.USER_ID, pl.col("seen").alias(schema.ITEM_ID)).explode(schema.ITEM_ID)
            .join(popular.select(schema.ITEM_ID), on=schema.ITEM_ID, how="semi")
            .unique() if exclude_seen else None)
    n_seen = int(seen[schema.USER_ID].value_counts()["count"].max() or 0) if seen is not None and seen.height else 0
    rows = users.select(schema.USER_ID).join(popular.head(k + n_seen), how="cross")
    if seen is not None and seen.height:
        rows = rows.join(seen, on=[schema.USER_ID, schema.ITEM_ID], how="anti", maintain_order="left")
    return (rows.sort([schema.USER_ID, "order"])
            .group_by(schema.USER_ID, maintain_order=True).head(k)
            .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(schema.USER_ID).alias("rank"))
            .select(list(schema.CANDIDATES)))


def check_shared_catalogue(model_items: pl.Series, feature_items: pl.Series) -> None:
    """Raise ConfigError when the model knows none of the features' item ids: every user would fall back to
    popularity and seen items could not be excluded (their ids match nothing), a night published with exit 0.
    The ids are then written differently on the two sides, or the model is of another catalogue."""
    if model_items.len() == 0 or feature_items.len() == 0 or bool(feature_items.is_in(model_items.implode()).any()):
        return
    raise ConfigError(
        f"candidates: the model knows none of the features' {feature_items.len()} item ids (features e.g. "
        f"{feature_items[0]!r}, the model's e.g. {model_items[0]!r}), so no user could be scored by it: the ids are "
        "written differently (under data.item_id_type=string a CSV's text is kept as written: '42.0' is not the "
        "'42' a model trained with int ids knows), or the model is of another catalogue. Check data.item_id_type "
        "and the id columns against the model's training data, or train a model on these features")


def _count_missing(values: pl.Series, known: pl.Series) -> int:
    """How many of ``values`` are not in ``known``."""
    return int((~values.is_in(known.implode())).sum())

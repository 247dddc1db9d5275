"""Nightly candidate generation: user vectors (hidden state at the last position) and item vectors from
the trained model, a FAISS index, top-K per user with already-seen items excluded, in ORIGINAL ids."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import polars as pl
import torch

from features import schema
from features.artifacts import FeatureSet
from recsys.config import CandidatesConfig
from recsys.data import pad_lists
from recsys.model import SASRec
from recsys.retrieval import ann_recall, build_index, search_top_k

log = logging.getLogger(__name__)


def full_histories(sequences: pl.DataFrame) -> pl.DataFrame:
    """(user_idx, items) with every known event in time order: train + val + test."""
    return sequences.select(
        schema.USER_IDX,
        pl.concat_list("train_items", "val_items", "test_items").alias("items"),
    ).filter(pl.col("items").list.len() > 0)


@torch.no_grad()
def user_vectors(model: SASRec, histories: list[list[int]], batch_size: int) -> np.ndarray:
    """(U, D) float32 hidden state at each user's last position (the last ``model.max_len`` items)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(histories), batch_size):
        batch = pad_lists(histories[start:start + batch_size], model.max_len).to(device)  # (B, T)
        out.append(model.user_vectors(batch).float().cpu())  # (B, D)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def generate_candidates(
    model: SASRec, feats: FeatureSet, cfg: CandidatesConfig
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Top-``cfg.k`` items per user as a schema.CANDIDATES table plus statistics for the manifest."""
    hist = full_histories(feats.sequences)
    lists = hist["items"].to_list()
    users = user_vectors(model, lists, cfg.batch_size)  # (U, D)
    with torch.no_grad():
        items = model.item_embeddings()[1:].float().cpu().numpy()  # (I, D); row r = item_idx r + 1
    index = build_index(items, cfg.index, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    seen = [np.asarray(x, dtype=np.int64) - 1 for x in lists] if cfg.exclude_seen else [
        np.empty(0, dtype=np.int64) for _ in lists]
    k = min(cfg.k, items.shape[0])  # a catalogue smaller than K gives every item
    ids, scores, stats = search_top_k(index, users, k, seen, batch_size=cfg.batch_size, item_vectors=items)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(lists), size=min(cfg.recall_sample, len(lists)), replace=False)
    recall = ann_recall(index, items, users[sample], k, [seen[i] for i in sample])
    log.info("ANN recall@%d vs exact search on %d users: %.4f", k, len(sample), recall)
    table = _to_table(hist[schema.USER_IDX].to_numpy(), ids, scores, feats)
    return table, {**stats, "k_effective": k, "ann_recall_at_k": recall, "recall_sample": int(len(sample)),
                   "users_scored": len(lists)}


def _to_table(user_idx: np.ndarray, ids: np.ndarray, scores: np.ndarray, feats: FeatureSet) -> pl.DataFrame:
    k = ids.shape[1]
    valid = ids.reshape(-1) >= 0
    frame = pl.DataFrame(
        {
            schema.USER_IDX: np.repeat(user_idx, k).astype(np.int32)[valid],
            schema.ITEM_IDX: (ids.reshape(-1)[valid] + 1).astype(np.int32),
            "score": scores.reshape(-1)[valid].astype(np.float32),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(user_idx))[valid],
        }
    )
    table = (
        frame.join(feats.user_map, on=schema.USER_IDX, how="left")
        .join(feats.item_map.select(schema.ITEM_ID, schema.ITEM_IDX), on=schema.ITEM_IDX, how="left")
        .select(list(schema.CANDIDATES))
        .sort([schema.USER_ID, "rank"])
    )
    schema.check_schema(table, schema.CANDIDATES, "candidates")
    return table

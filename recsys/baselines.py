"""Non-learned baselines scored over the same full catalogue as the model.

A scorer is any ``score_fn(inputs (B, T) long, user_idx (B,) long) -> scores (B, n_items + 1)``;
column 0 is padding (the evaluation excludes it).

- popularity: events per item before the evaluated split (train for validation, train + validation for test),
  the same list for everyone.
- item_knn: cosine similarity between the items' user columns of the binary user-item matrix, each item
  keeping its ``n_neighbors`` most similar items; a user's score for item j is the sum of the similarities
  of j to the user's history items (the whole history, or its last ``last_n`` items).
- ease: Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019: the closed form
  ``B = I - P / diag(P)``, ``P = (X^T X + lambda I)^-1`` (zero diagonal); scores ``x_u B``.

- repeat: the user's own history items, the most recently consumed first, then every other item by
  popularity: the rule to beat in repeat domains (groceries, music, re-views), for evaluate.exclude_seen=
  false (the config refuses it otherwise). With the history excluded it would rank unseen targets as
  popularity does, and a re-consumed target (the target is never excluded) above every unseen item: a leak.

item_knn, ease and repeat are fitted on ``histories``, a (``user_idx``, ``history``) frame: per user, the item
indices the evaluation treats as known (for the test split, train + validation items). Repeated items count
once (binary matrix).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from features.schema import PAD_IDX, USER_IDX

logger = logging.getLogger(__name__)

# Rows of the item-item similarity computed at a time: (block, n_items + 1) float32 dense.
KNN_BLOCK_ROWS = 1024

if TYPE_CHECKING:
    from recsys.evaluation import ScoreFn


def popularity_scores(sequences: pl.DataFrame, n_items: int, split: str = "val") -> torch.Tensor:
    """(n_items + 1,) float32 count of each item in what is known when ``split`` is predicted: ``train_items``
    for val, ``train_items`` and ``val_items`` for test (as the other baselines are fitted); the padding
    column is -inf.

    Raises ``ValueError`` if a column is missing or holds an index outside 0..n_items.
    """
    columns = ["train_items"] if split == "val" else ["train_items", "val_items"]
    for column in columns:
        if column not in sequences.columns:
            raise ValueError(f"sequences: missing column '{column}' (a List(Int32) of item indices)")
    items = pl.concat([sequences[c].explode().drop_nulls() for c in columns])
    items = torch.from_numpy(items.to_numpy().astype(np.int64))  # (total,)
    if items.numel() and (int(items.min()) < 0 or int(items.max()) > n_items):
        raise ValueError(
            f"sequences: columns {columns} hold indices in [{int(items.min())}, {int(items.max())}], "
            f"expected 1..{n_items} (0 = padding); is n_items right?"
        )
    counts = torch.bincount(items, minlength=n_items + 1).float()  # (n_items + 1,)
    counts[PAD_IDX] = float("-inf")
    return counts


def popularity_scorer(pop: torch.Tensor) -> ScoreFn:
    """Score every user with the same ``pop`` (n_items + 1,) vector."""

    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        return pop.to(inputs.device).unsqueeze(0).expand(inputs.shape[0], -1)  # (B, n_items + 1)

    return score


def history_matrix(histories: pl.DataFrame, n_items: int, last_n: int | None = None) -> sp.csr_matrix:
    """(max user_idx + 1, n_items + 1) binary float32 CSR: row u holds user u's ``history`` items.

    histories: ``user_idx`` and ``history`` List(Int) of item indices; ``last_n`` keeps each history's last
    ``last_n`` items (None = all). Column 0 (padding) is always empty. Raises ``ValueError`` on a missing
    column or an item index outside 1..n_items.
    """
    for column in (USER_IDX, "history"):
        if column not in histories.columns:
            raise ValueError(f"histories: missing column '{column}'")
    items = pl.col("history") if last_n is None else pl.col("history").list.tail(last_n)
    long = histories.select(USER_IDX, items.alias("history")).explode("history").drop_nulls("history")
    rows, cols = long[USER_IDX].to_numpy().astype(np.int64), long["history"].to_numpy().astype(np.int64)
    if cols.size and (cols.min() < 1 or cols.max() > n_items):
        raise ValueError(f"histories: column 'history' holds indices in [{cols.min()}, {cols.max()}], "
                         f"expected 1..{n_items}")
    n_rows = int(histories[USER_IDX].max() or 0) + 1 if histories.height else 0
    matrix = sp.csr_matrix((np.ones(cols.size, np.float32), (rows, cols)), shape=(n_rows, n_items + 1))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # binary: a repeated item counts once
    return matrix


def item_knn_similarity(matrix: sp.csr_matrix, n_neighbors: int) -> sp.csr_matrix:
    """(I + 1, I + 1) float32 CSR: row i holds the cosine similarities of item i to its ``n_neighbors``
    most similar other items (zero similarities dropped, the diagonal is zero; among items tied with the
    ``n_neighbors``-th similarity, which are kept is deterministic but unspecified).

    matrix: binary (U, I + 1) user-item matrix. Computed ``KNN_BLOCK_ROWS`` items at a time.
    """
    n = matrix.shape[1]
    counts = np.asarray(matrix.sum(0), dtype=np.float64).ravel()  # (I + 1,) users per item
    inv_norm = np.divide(1.0, np.sqrt(counts), out=np.zeros(n), where=counts > 0).astype(np.float32)  # (I + 1,)
    by_item = matrix.T.tocsr()  # (I + 1, U)
    k = min(n_neighbors, n - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n, KNN_BLOCK_ROWS):
        block = (by_item[start:start + KNN_BLOCK_ROWS] @ matrix).toarray()  # (b, I + 1) co-occurrences
        sim = block * inv_norm[start:start + len(block), None] * inv_norm[None, :]  # (b, I + 1) cosine
        local = np.arange(len(block))
        sim[local, start + local] = 0.0
        # The k largest per row (unordered; ties at the k-th value broken by the selection algorithm).
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n - 1 else np.tile(np.arange(n), (len(sim), 1))
        top_sim = np.take_along_axis(sim, top, 1)  # (b, k)
        keep = top_sim > 0
        rows.append(np.broadcast_to(start + local[:, None], top.shape)[keep])
        cols.append(top[keep])
        vals.append(top_sim[keep])
    data = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))) if rows else ([], ([], []))
    return sp.csr_matrix(data, shape=(n, n), dtype=np.float32)


def item_knn_scorer(
    histories: pl.DataFrame, n_items: int, n_neighbors: int = 100, last_n: int | None = None
) -> ScoreFn:
    """Item-kNN fitted on ``histories``; a user's scores sum the similarity rows of their history items
    (the last ``last_n`` of them, None = all), looked up by ``user_idx``; column 0 is -inf."""
    start = time.perf_counter()
    similarity = item_knn_similarity(history_matrix(histories, n_items), n_neighbors)  # (I + 1, I + 1)
    scoring = history_matrix(histories, n_items, last_n)  # (U, I + 1)
    logger.info("item_knn: %d neighbours per item, %s history, fitted in %.1f s", n_neighbors,
                "full" if last_n is None else f"last {last_n} items of the", time.perf_counter() - start)

    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        dense = (scoring[user_idx.cpu().numpy()] @ similarity).toarray()  # (B, I + 1)
        return _with_padding_column(torch.from_numpy(dense).to(inputs.device))

    return score


def ease_weights(matrix: sp.csr_matrix, lam: float) -> torch.Tensor:
    """(I + 1, I + 1) float32 EASE item-item weights ``B = I - P / diag(P)``, ``P = (G + lam I)^-1``,
    ``G = X^T X`` over items 1..n_items (row and column 0, padding, are zero; the diagonal is zero).

    Solved in float64 through a Cholesky factorisation (``G + lam I`` is symmetric positive definite).
    Raises ``ValueError`` unless ``lam`` > 0.
    """
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    items = matrix[:, 1:]  # (U, I)
    gram = torch.from_numpy((items.T @ items).toarray().astype(np.float64))  # (I, I)
    gram.diagonal().add_(lam)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))  # (I, I) P
    weights = -inverse / inverse.diagonal().unsqueeze(0)  # (I, I) B_ij = -P_ij / P_jj
    weights.diagonal().zero_()
    out = torch.zeros(matrix.shape[1], matrix.shape[1], dtype=torch.float32)
    out[1:, 1:] = weights
    return out


def ease_scorer(histories: pl.DataFrame, n_items: int, lam: float = 500.0) -> ScoreFn:
    """EASE fitted on ``histories``; a user's scores are their binary history row times B (looked up by
    ``user_idx``); column 0 is -inf."""
    start = time.perf_counter()
    matrix = history_matrix(histories, n_items)  # (U, I + 1)
    weights = ease_weights(matrix, lam)  # (I + 1, I + 1)
    logger.info("ease: lambda %g on %d items fitted in %.1f s", lam, n_items, time.perf_counter() - start)

    dense = weights.numpy()  # shares memory

    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        # Sparse rows times the dense B: cost nnz(rows) * (I + 1), not B * (I + 1)^2.
        scores = np.asarray(matrix[user_idx.cpu().numpy()] @ dense, dtype=np.float32)  # (B, I + 1)
        return _with_padding_column(torch.from_numpy(scores).to(inputs.device))

    return score


def repeat_scorer(histories: pl.DataFrame, n_items: int, pop: torch.Tensor) -> ScoreFn:
    """The user's history items by recency, then the rest by ``pop`` (n_items + 1,): an item's score is
    ``2 + p`` if the user consumed it, p the 0-based position of its LAST occurrence in the history (later =
    higher), else its popularity scaled into [0, 1) (ties stay ties); column 0 is -inf."""
    for column in (USER_IDX, "history"):
        if column not in histories.columns:
            raise ValueError(f"histories: missing column '{column}'")
    last = (histories.select(USER_IDX, pl.col("history"), pl.int_ranges(pl.col("history").list.len())
                             .alias("position"))
            .explode("history", "position").drop_nulls("history")
            .group_by(USER_IDX, "history").agg(pl.col("position").max()))
    rows = last[USER_IDX].to_numpy().astype(np.int64)
    cols = last["history"].to_numpy().astype(np.int64)
    if cols.size and (cols.min() < 1 or cols.max() > n_items):
        raise ValueError(f"histories: column 'history' holds indices in [{cols.min()}, {cols.max()}], "
                         f"expected 1..{n_items}")
    n_rows = int(histories[USER_IDX].max() or 0) + 1 if histories.height else 0
    recency = sp.csr_matrix(((2.0 + last["position"].to_numpy()).astype(np.float64), (rows, cols)),
                            shape=(n_rows, n_items + 1))
    base = pop.double().clone()
    finite = torch.isfinite(base)
    top = float(base[finite].max()) if bool(finite.any()) else 0.0
    base = torch.where(finite, base / (abs(top) + 1.0), torch.zeros_like(base))  # [0, 1) for counts ≥ 0

    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        seen = torch.from_numpy(recency[user_idx.cpu().numpy()].toarray())  # (B, I + 1), 0 where unseen
        scores = torch.where(seen > 0, seen, base.unsqueeze(0)).float()  # float32 keeps positions < 2^24 exact
        return _with_padding_column(scores.to(inputs.device))

    return score


def _with_padding_column(scores: torch.Tensor) -> torch.Tensor:
    scores[:, PAD_IDX] = float("-inf")
    return scores

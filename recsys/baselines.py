"""Non-learned baselines scored over the same full catalogue as the model.

A scorer is any ``score_fn(inputs (B, T) long, user_idx (B,) long) -> scores (B, n_items + 1)``;
column 0 is padding (the evaluation excludes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from features.schema import PAD_IDX

if TYPE_CHECKING:
    from recsys.evaluation import ScoreFn


def popularity_scores(sequences: pl.DataFrame, n_items: int) -> torch.Tensor:
    """(n_items + 1,) float32 count of each item in ``train_items``; the padding column is -inf.

    Raises ``ValueError`` if ``train_items`` is missing or holds an index outside 0..n_items.
    """
    if "train_items" not in sequences.columns:
        raise ValueError("sequences: missing column 'train_items' (a List(Int32) of item indices)")
    items = sequences.select(pl.col("train_items").explode().drop_nulls()).to_series()
    items = torch.from_numpy(items.to_numpy().astype(np.int64))  # (total,)
    if items.numel() and (int(items.min()) < 0 or int(items.max()) > n_items):
        raise ValueError(
            f"sequences: column 'train_items' holds indices in [{int(items.min())}, {int(items.max())}], "
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

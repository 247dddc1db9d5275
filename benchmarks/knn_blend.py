"""Would a trained model gain from item-kNN? Validation NDCG@10 of ``z(model) + alpha * z(item-kNN)``.

    python -m benchmarks.knn_blend WORK_DIR [--alphas 0,0.01,0.03,0.1] [--neighbors 100] [--json-out F]

WORK_DIR is a finished benchmark run's work directory (``work/bench/<tag>-seed<N>``: its ``features/`` and
``model/``). Each user's scores, model and item-kNN (fitted on the validation histories, as the evaluate job's
baseline), are standardised over the catalogue (z-scores) and summed with weight ``alpha``; the blend is ranked
under the protocol (seen items excluded, pessimistic ties) on the **validation** split only, so the choice of
``alpha`` never sees the test split. ``alpha`` 0 is the model alone. One JSON record per alpha.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
import torch

from benchmarks.machine import emit
from features.schema import FEATURE_FILES
from recsys.baselines import item_knn_scorer
from recsys.evaluation import ScoreFn, build_eval_set, evaluate_scorer, model_scorer, split_histories
from recsys.model import load_model


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """(B, I + 1) scores -> (B, I) per-row z-scores of the item columns (column 0, padding, dropped)."""
    items = scores[:, 1:].float()
    return (items - items.mean(1, keepdim=True)) / (items.std(1, keepdim=True) + 1e-9)


def blended(model: ScoreFn, knn: ScoreFn, alpha: float) -> ScoreFn:
    """``z(model) + alpha * z(knn)`` with a -inf padding column (``alpha`` 0: the model's z-scores)."""
    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        out = standardised(model(inputs, user_idx).cpu())
        if alpha:
            out = out + alpha * standardised(knn(inputs, user_idx).cpu())
        return torch.cat([torch.full((out.shape[0], 1), float("-inf")), out], 1)
    return score


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dir", type=Path)
    p.add_argument("--alphas", default="0,0.01,0.03,0.1")
    p.add_argument("--neighbors", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    sequences = pl.read_parquet(a.work_dir / "features" / FEATURE_FILES["sequences"])
    model = load_model(a.work_dir / "model")
    eval_set = build_eval_set(sequences, "val", model.max_len)
    knn = item_knn_scorer(split_histories(sequences, "val"), model.n_items, a.neighbors)
    records: list[dict] = []
    for alpha in (float(x) for x in a.alphas.split(",")):
        metrics = evaluate_scorer(blended(model_scorer(model, eval_set), knn, alpha), eval_set, model.n_items,
                                  (10,), a.batch_size)
        emit({"bench": "knn_blend", "work_dir": str(a.work_dir), "split": "val", "alpha": alpha,
              "neighbors": a.neighbors, **{k: metrics[k] for k in ("ndcg_at_10", "hr_at_10", "n_users")}},
             a.json_out, records)
    return records


if __name__ == "__main__":
    main()

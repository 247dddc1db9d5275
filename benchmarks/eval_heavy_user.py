"""Evaluation with one heavy user among ordinary ones: memory of the histories and time of the ranking.

    python -m benchmarks.eval_heavy_user [--users 20000] [--items 2000] [--heavy-history 5]
        [--heavy-targets 1000] [--batch-size 1024] [--seed 0]

Synthetic sequences (features.schema.SEQUENCES): ``--users`` users with 5 history items, one validation and
one test item each, plus one user with ``--heavy-history`` history items and ``--heavy-targets`` distinct
test items (a bot, or a time split's power user). The popularity baseline is scored on the test split through
``recsys.evaluation.evaluate_scorer`` (the evaluate job's dense path, whole catalogue, seen items excluded);
prints one JSON line: the history's bytes as the eval set stores it, the scoring time and NDCG@10 (to check
that a change keeps the metrics). Run it on two commits to compare them; the numbers go to BENCHMARKS.md by
hand ("Evaluation with one heavy user").
"""

from __future__ import annotations

import argparse
import json
import random
import time

import polars as pl
import torch

from benchmarks.machine import commit, machine
from features.schema import SEQUENCES
from recsys.baselines import popularity_scorer, popularity_scores
from recsys.evaluation import build_eval_set, evaluate_scorer


def sequences(users: int, items: int, heavy_history: int, heavy_targets: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = [(u, [rng.randint(1, items) for _ in range(5)], [rng.randint(1, items)], [rng.randint(1, items)])
            for u in range(users)]
    rows.append((users, [rng.randint(1, items) for _ in range(heavy_history)], [1],
                 rng.sample(range(1, items + 1), heavy_targets)))
    columns = ["user_idx", "train_items", "val_items", "test_items"]
    return pl.DataFrame(dict(zip(columns, zip(*rows, strict=True), strict=True)), schema=SEQUENCES)


def history_bytes(history: object) -> int:
    """Bytes of the eval set's history: a padded tensor, or flat values and offsets (RaggedItems)."""
    if isinstance(history, torch.Tensor):
        return history.numel() * history.element_size()
    values, offsets = history.values, history.offsets  # type: ignore[attr-defined]
    return values.numel() * values.element_size() + offsets.numel() * offsets.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--heavy-history", type=int, default=5)
    parser.add_argument("--heavy-targets", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    seqs = sequences(a.users, a.items, a.heavy_history, a.heavy_targets, a.seed)
    eval_set = build_eval_set(seqs, "test", 50)
    scorer = popularity_scorer(popularity_scores(seqs, a.items, "test"))
    start = time.perf_counter()
    result = evaluate_scorer(scorer, eval_set, a.items, (10,), a.batch_size)
    print(json.dumps({**vars(a), "history_mib": round(history_bytes(eval_set.history) / 2**20, 1),
                      "eval_s": round(time.perf_counter() - start, 2), "ndcg_at_10": result["ndcg_at_10"],
                      "threads": torch.get_num_threads(), "machine": machine(), "commit": commit()}))


if __name__ == "__main__":
    main()

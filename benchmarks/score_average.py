"""Would an ensemble help? Validation NDCG@10 of the mean of several trained models' scores (raw logits).

    python -m benchmarks.score_average WORK_DIR WORK_DIR [...] [--batch-size 1024] [--json-out F]

Each WORK_DIR is a finished benchmark run's work directory (``work/bench/<tag>-seed<N>``: its ``features/`` and
``model/``), all built from the same data (their item maps must be equal). Every subset of the models (one model
alone included) is scored by the mean of its members' scores, under the protocol (seen items excluded,
pessimistic ties), on the **validation** split only: one pass over the users, each model scoring each batch once.
The mean of raw scores is what one wider model gives (the members' user vectors concatenated and divided by
their number, against their item tables concatenated), so a winning subset can be served by FAISS as it is.
One JSON record per subset.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import polars as pl

from benchmarks.machine import emit
from features.schema import FEATURE_FILES
from recsys.evaluation import MetricAccumulator, build_eval_set, model_scorer, ranks_and_top
from recsys.metrics import exclusion_mask
from recsys.model import load_model


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dirs", type=Path, nargs="+")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    maps = [pl.read_parquet(d / "model" / FEATURE_FILES["item_map"]) for d in a.work_dirs]
    for d, m in zip(a.work_dirs[1:], maps[1:], strict=True):
        if not m.equals(maps[0]):
            raise SystemExit(f"{d}: its item map is not that of {a.work_dirs[0]}; average models of one data set")
    models = [load_model(d / "model") for d in a.work_dirs]
    if len({m.max_len for m in models}) > 1:  # one input width for all: a longer model would be scored cut short
        raise SystemExit("the models have different model.max_len "
                         f"({', '.join(f'{d}: {m.max_len}' for d, m in zip(a.work_dirs, models, strict=True))}); "
                         "average models of one max_len")
    eval_set = build_eval_set(pl.read_parquet(a.work_dirs[0] / "features" / FEATURE_FILES["sequences"]), "val",
                              models[0].max_len)
    scorers = [model_scorer(m, eval_set) for m in models]
    n_items = models[0].n_items
    subsets = [s for r in range(1, len(models) + 1) for s in itertools.combinations(range(len(models)), r)]
    totals = {s: MetricAccumulator(n_items, (10,)) for s in subsets}
    for start in range(0, len(eval_set), a.batch_size):
        rows = slice(start, start + a.batch_size)
        scores = [f(eval_set.inputs[rows], eval_set.user_idx[rows]).float().cpu() for f in scorers]
        targets = eval_set.targets[rows]
        exclude = exclusion_mask(eval_set.history[rows], n_items, keep=targets)
        for s in subsets:
            totals[s].add(*ranks_and_top(sum(scores[i] for i in s) / len(s), targets, exclude, 10))
    records: list[dict] = []
    for s in subsets:
        metrics = totals[s].result()
        emit({"bench": "score_average", "split": "val", "members": [str(a.work_dirs[i]) for i in s],
              **{k: metrics[k] for k in ("ndcg_at_10", "hr_at_10", "n_users")}}, a.json_out, records)
    return records


if __name__ == "__main__":
    main()

"""Dense full-catalogue evaluation speed: the baselines of the evaluate job on a features directory.

    python -m benchmarks.baseline_eval --features <work_dir>/features [--baselines popularity,item_knn]
        [--split test] [--threads 1] [--batch-size 1024] [--json-out F]

Builds the eval set of ``--split`` from the features job's sequences, fits each baseline as the evaluate job
does (``recsys.evaluation.baseline_scorers``) and times ``recsys.evaluation.evaluate_scorer`` over every user:
score, exclude the history, rank the targets, top items for coverage. Prints one JSON record per baseline with
the seconds, users and catalogue size, and its NDCG@10 (so that a faster path is seen to give the same
numbers). The script depends only on those functions, so it can be copied into an older checkout for a
before/after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import torch

from benchmarks.machine import append_record, commit, machine
from recsys.config import EvaluateConfig
from recsys.evaluation import baseline_scorers, build_eval_set, evaluate_scorer


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, required=True, help="a features job's output directory")
    p.add_argument("--baselines", default="popularity")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=50, help="history kept per user for the model input")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sequences = pl.read_parquet(a.features / "sequences.parquet")
    n_items = pl.read_parquet(a.features / "item_map.parquet").height
    eval_set = build_eval_set(sequences, a.split, a.max_len)
    cfg = EvaluateConfig(split=a.split, baselines=a.baselines.split(","))
    records = []
    for name, scorer in baseline_scorers(sequences, n_items, cfg).items():
        start = time.perf_counter()
        result = evaluate_scorer(scorer, eval_set, n_items, (10, 20, 50), a.batch_size)
        record = {"baseline": name, "seconds": time.perf_counter() - start, "users": len(eval_set),
                  "n_items": n_items, "threads": a.threads, "batch_size": a.batch_size,
                  "ndcg_at_10": result["ndcg_at_10"], "features": str(a.features), "machine": machine(),
                  "commit": commit()}
        print(json.dumps(record), flush=True)
        records.append(record)
        append_record(a.json_out, record)
    return records


if __name__ == "__main__":
    main()

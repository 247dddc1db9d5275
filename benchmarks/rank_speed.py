"""Time the validation ranking (recsys.metrics.target_ranks) of the checkout it runs from.

    python -m benchmarks.rank_speed [--users 1024] [--items 54542] [--batches 5] [--threads 1] [--json-out F]

Random float32 scores of ``--users`` users over ``--items`` items (plus the padding column), one target and a
20-item history per user, ranked ``--batches`` times after one warm-up; prints and appends one JSON record
(milliseconds per batch: mean and median; the machine, load, commit, date). Run it from two checkouts (git
worktrees) in alternation to compare code versions under the same load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import emit
from recsys.metrics import exclusion_mask, target_ranks


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1024)
    p.add_argument("--items", type=int, default=54542)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(a.users, a.items + 1, generator=g)  # (B, I + 1)
    targets = torch.randint(1, a.items + 1, (a.users, 1), generator=g)  # (B, 1)
    exclude = exclusion_mask(torch.randint(1, a.items + 1, (a.users, 20), generator=g), a.items, keep=targets)
    target_ranks(scores, targets, exclude)  # warm-up
    times = []
    for _ in range(a.batches):
        start = time.perf_counter()
        target_ranks(scores, targets, exclude)
        times.append(time.perf_counter() - start)
    record = {"benchmark": "rank_speed", "users": a.users, "items": a.items, "threads": a.threads,
              "ms_mean": 1000 * statistics.fmean(times), "ms_median": 1000 * statistics.median(times)}
    return emit(record, a.json_out, [])


if __name__ == "__main__":
    main()

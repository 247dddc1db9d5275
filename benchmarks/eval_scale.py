"""Full-catalogue evaluation with bounded memory at scale (issue #4, target 2); appends a row to BENCHMARKS.md.

    python -m benchmarks.eval_scale [--users 1000000] [--items 1000000] [--dim 64] [--clusters 1000]
        [--user-block 1024] [--item-block 16384] [--gen-block 16384] [--ks 10,20,50,100]
        [--device cpu|cuda] [--threads N] [--time-limit SECONDS] [--output BENCHMARKS.md | --no-append]

Synthetic clustered catalogue (benchmarks/catalogue.py): the item vectors are built once, the users
``--gen-block`` at a time, each with 10-50 seen items and one held-out target from its cluster. Each block is
ranked against the whole catalogue by ``recsys.topk.top_k_blocked`` (exact fp32 inner products in user blocks x
item blocks, seen items excluded, pessimistic target rank, top-K for coverage) and reduced to metrics by
``recsys.evaluation.MetricAccumulator``: the code path of ``evaluate.item_block_size``. Reports scoring time
(user generation excluded), users/s, peak RSS (``ru_maxrss``) and on CUDA peak GPU memory. With
``--time-limit`` it stops after the block that passes the limit and extrapolates the full run linearly; the
row says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.catalogue import ClusteredCatalogue, add_catalogue_args
from benchmarks.machine import (
    ROOT,
    append_row,
    check_json_out,
    commit,
    emit,
    jsonable,
    load_1min,
    machine,
    peak_rss_gb,
)
from recsys.evaluation import MetricAccumulator
from recsys.topk import top_k_blocked

TITLE = "Full-catalogue evaluation at scale (synthetic, exact blocked top-K)"
INTRO = """
`benchmarks/eval_scale.py`: a synthetic clustered catalogue (`benchmarks/catalogue.py`; d-dimensional
Gaussian cluster centres, items and users = centre + noise; 10-50 seen items and one held-out target per
user, drawn from the user's cluster). Every user is ranked against the whole catalogue with
`recsys.topk.top_k_blocked` (exact fp32 inner products in user blocks x item blocks with a running top-K merge,
seen items excluded, pessimistic target rank) and reduced to NDCG/HR/coverage by
`recsys.evaluation.MetricAccumulator`, the path of `evaluate.item_block_size`. Scoring time excludes user
generation; peak RSS is `ru_maxrss` of the whole process (catalogue included). A row with fewer users done
than users extrapolates the full run linearly from the measured rate (marked "extrapolated"). The load column
is the 1-minute load average before and after: above the thread count, other jobs shared the CPU.
"""
HEADER = """| date | users x items x d | device, threads | blocks (user / item / generated) | users done | scoring s | users/s | full run s | peak RSS GB | peak GPU GB | NDCG@10 / HR@10 / HR@100 / coverage@100 | load 1 min | machine | command | commit |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_catalogue_args(p)
    p.add_argument("--user-block", type=int, default=1024, help="users per score block")
    p.add_argument("--item-block", type=int, default=16384, help="items per score block")
    p.add_argument("--gen-block", type=int, default=16384, help="users generated and ranked per call")
    p.add_argument("--ks", type=lambda s: tuple(int(x) for x in s.split(",")), default=(10, 20, 50, 100))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop early and extrapolate")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-append", action="store_true", help="print the summary only")
    p.add_argument("--json-out", type=Path, default=None,
                   help="also append the run's record (arguments, measurements, machine, commit) as a JSON line")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(a: argparse.Namespace) -> dict:
    """Generate, rank and reduce block by block; returns the measurements."""
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 scores on GPU too
    load_before, start = load_1min(), time.perf_counter()
    catalogue = ClusteredCatalogue(a.items, a.dim, a.clusters, a.seed)
    items = catalogue.items.to(device)  # (I, D) moved once, not per call
    print(f"catalogue: {a.items} items x {a.dim} in {time.perf_counter() - start:.1f} s, "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    totals, scoring, done = MetricAccumulator(a.items, a.ks), 0.0, 0
    for block, first in enumerate(range(0, a.users, a.gen_block)):
        users = catalogue.users(block, min(a.gen_block, a.users - first))
        _sync(device)
        tick = time.perf_counter()
        found = top_k_blocked(users.vectors, items, max(a.ks), users.seen, users.targets, a.user_block,
                              a.item_block, device)
        _sync(device)
        scoring += time.perf_counter() - tick
        assert found.ranks is not None
        totals.add(found.ranks, found.ids + 1)  # positions -> 1-based item indices, -1 -> 0 = none
        done += len(users.vectors)
        print(f"users {done}/{a.users}: {scoring:.1f} s scoring, {done / scoring:.0f} users/s, "
              f"eta {(a.users - done) * scoring / done:.0f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
        if a.time_limit is not None and time.perf_counter() - start > a.time_limit:
            break
    return {"metrics": totals.result(), "done": done, "scoring_s": scoring, "rss_gb": peak_rss_gb(),
            "gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "load": (load_before, load_1min()), "device": device}


def table_row(a: argparse.Namespace, r: dict, command: str) -> str:
    m, full = r["metrics"], r["scoring_s"] * a.users / r["done"]
    quality = " / ".join(f"{m[key]:.4f}" for key in ("ndcg_at_10", "hr_at_10", "hr_at_100", "coverage_at_100")
                         if key in m)
    cells = [
        dt.date.today().isoformat(), f"{a.users:,} x {a.items:,} x {a.dim}", f"{a.device}, {a.threads}",
        f"{a.user_block} / {a.item_block} / {a.gen_block}", f"{r['done']:,}", f"{r['scoring_s']:.1f}",
        f"{r['done'] / r['scoring_s']:.0f}", f"{full:.0f}" + ("" if r["done"] == a.users else " extrapolated"),
        f"{r['rss_gb']:.2f}", f"{r['gpu_gb']:.2f}" if r["gpu_gb"] is not None else "—", quality,
        f"{r['load'][0]:.1f} → {r['load'][1]:.1f}", machine(r["device"]), f"`{command}`", commit(),
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    check_json_out(a.json_out)  # before hours of measuring, not after
    command = "python -m benchmarks.eval_scale " + shlex.join(sys.argv[1:] if argv is None else argv)
    r = run(a)
    emit(jsonable({"bench": "eval_scale", "command": command, "args": vars(a), **r}), a.json_out, [])
    if not a.no_append:
        append_row(a.output, TITLE, INTRO, HEADER, table_row(a, r, command))
    print(summary(a, r))


def summary(a: argparse.Namespace, r: dict) -> str:
    """The one-line result."""
    m, rate = r["metrics"], r["done"] / r["scoring_s"]
    full = f"{r['scoring_s'] * a.users / r['done']:.0f} s" + ("" if r["done"] == a.users else " (extrapolated)")
    gpu = f", peak GPU {r['gpu_gb']:.2f} GB" if r["gpu_gb"] is not None else ""
    quality = ", ".join(f"{key} {m[key]:.4f}" for key in ("ndcg_at_10", "hr_at_10") if key in m)
    return (f"eval_scale: {r['done']}/{a.users} users x {a.items} items d={a.dim} on {a.device} ({a.threads} "
            f"threads): {r['scoring_s']:.1f} s scoring, {rate:.0f} users/s, full run {full}, peak RSS "
            f"{r['rss_gb']:.2f} GB{gpu}, {quality}")

if __name__ == "__main__":
    main()

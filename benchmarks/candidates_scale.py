"""Candidate generation at scale with FAISS on CPU (issue #4, target 3); appends a row to BENCHMARKS.md.

    python -m benchmarks.candidates_scale [--users 1000000] [--items 1000000] [--dim 64] [--clusters 1000]
        [--index IVF4096,Flat] [--k 100] [--target-recall 0.95] [--tune-sample 1000] [--gen-block 65536]
        [--threads N] [--time-limit SECONDS] [--output BENCHMARKS.md | --no-append]

The synthetic clustered catalogue of benchmarks/catalogue.py (10-50 seen items per user). Builds the index
over the item vectors (``recsys.retrieval.build_index``), then auto-tunes nprobe / efSearch
(``recsys.retrieval.tune_index``) until recall@k against EXACT search reaches the target on a user sample, the
exact top-k of the sample coming from ``recsys.topk.top_k_blocked``. Then searches every user, generated
``--gen-block`` at a time, for the top ``k`` unseen items (``recsys.retrieval.search_top_k``, exact fallback
for users the index leaves short). Reports build time, the tuning, users/s of the search and peak RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np
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
from recsys.data import RaggedItems
from recsys.retrieval import Tuning, build_index, recall_at_k, search_top_k, tune_index
from recsys.topk import top_k_blocked

TITLE = "Candidate generation at scale (synthetic, FAISS on CPU, auto-tuned)"
INTRO = """
`benchmarks/candidates_scale.py`: the synthetic clustered catalogue of `benchmarks/catalogue.py` (10-50 seen
items per user). The index is built over the item vectors (`recsys.retrieval.build_index`), then
`recsys.retrieval.tune_index` doubles nprobe (IVF) / efSearch (HNSW) from the smallest until recall@k against
EXACT search (top-k of `recsys.topk.top_k_blocked`, seen items excluded) on a user sample reaches the target,
then bisects down to the smallest value that reaches it (to 1/8 of the last miss), and measures the tuned index's
recall on as many OTHER users (since 2026-12-05; on the tuning sample the target is reached by construction); then every user is searched for its top-k unseen items (`recsys.retrieval.search_top_k`, exact fallback for a
user the index leaves short). Search time excludes user generation; peak RSS is `ru_maxrss` of the whole
process (catalogue and index included). A row with fewer users done than users extrapolates the full search
linearly (marked "extrapolated"). Load: 1-minute load average before and after.
"""
HEADER = """| date | users x items x d, k | index, threads | build s | tuned (recall@k on sample) | users done | search s | users/s | full search s | exact fallbacks | peak RSS GB | load 1 min | machine | command | commit |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_catalogue_args(p)
    p.add_argument("--index", default="IVF4096,Flat", help="FAISS factory string (IVF or HNSW)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--tune-sample", type=int, default=1000, help="users whose exact top-k the tuning uses")
    p.add_argument("--gen-block", type=int, default=65536, help="users generated and searched per call")
    p.add_argument("--batch-size", type=int, default=4096, help="users per FAISS search call")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--time-limit", type=float, default=None, help="seconds of search; stop early, extrapolate")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-append", action="store_true", help="print the summary only")
    p.add_argument("--json-out", type=Path, default=None,
                   help="also append the run's record (arguments, measurements, machine, commit) as a JSON line")
    return p.parse_args(argv)


def padded_seen(seen: RaggedItems) -> np.ndarray:
    """(U, S) int64 item positions right-padded with -1: the form ``search_top_k`` takes without a list of
    per-user arrays."""
    width = max(int(seen.lengths.max()) if len(seen.lengths) else 0, 1)
    rows = torch.repeat_interleave(torch.arange(len(seen.lengths)), seen.lengths)  # (S,)
    cols = torch.arange(seen.values.numel()) - seen.offsets[rows]  # (S,) slot within the row
    out = torch.full((len(seen.lengths), width), -1, dtype=torch.long)  # (U, S)
    out[rows, cols] = seen.values.long()
    return out.numpy()


def tune(a: argparse.Namespace, catalogue: ClusteredCatalogue, index: faiss.Index) -> tuple[Tuning, float]:
    """Tune on the first ``--tune-sample`` users of a block no search block uses; returns the tuning and
    the seconds the exact top-k of the sample took."""
    sample = catalogue.users(-1, a.tune_sample)  # block -1: its own seed
    tick = time.perf_counter()
    exact = top_k_blocked(sample.vectors, catalogue.items, a.k, sample.seen).ids.numpy()  # (S, k)
    exact_s = time.perf_counter() - tick
    items = catalogue.items.numpy()
    tuning = tune_index(index, items, sample.vectors.numpy(), a.k, a.target_recall, padded_seen(sample.seen),
                        exact_ids=exact)
    return tuning, exact_s


def held_out_recall(a: argparse.Namespace, catalogue: ClusteredCatalogue, index: faiss.Index) -> float | None:
    """Recall@k of the lists the tuned index gives (with the exact fallback of the candidates job, as the tuner
    measures since 2026-12-05) on ``--tune-sample`` OTHER users (block -2, its own seed): on the tuning sample
    the target is reached by construction."""
    other = catalogue.users(-2, a.tune_sample)
    exact = top_k_blocked(other.vectors, catalogue.items, a.k, other.seen).ids.numpy()  # (S, k)
    approx = search_top_k(index, other.vectors.numpy(), a.k, padded_seen(other.seen),
                          item_vectors=catalogue.items.numpy()).ids
    return recall_at_k(exact, approx)


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    load_before = load_1min()
    catalogue = ClusteredCatalogue(a.items, a.dim, a.clusters, a.seed)
    tick = time.perf_counter()
    index = build_index(catalogue.items.numpy(), a.index)
    build_s = time.perf_counter() - tick
    print(f"built {a.index} over {a.items} items in {build_s:.1f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
    tuning, exact_s = tune(a, catalogue, index)
    held_out = held_out_recall(a, catalogue, index)
    print(f"tuned {tuning.parameter}={tuning.value}: recall@{a.k} {tuning.recall:.4f} (tried {tuning.tried}; "
          f"exact top-k of the sample {exact_s:.1f} s); on {a.tune_sample} other users {held_out:.4f}", flush=True)
    search_s, done, fallbacks = 0.0, 0, 0
    for block, first in enumerate(range(0, a.users, a.gen_block)):
        users = catalogue.users(block, min(a.gen_block, a.users - first))
        vectors, seen = users.vectors.numpy(), padded_seen(users.seen)
        tick = time.perf_counter()
        found = search_top_k(index, vectors, a.k, seen, batch_size=a.batch_size,
                             item_vectors=catalogue.items.numpy())
        search_s += time.perf_counter() - tick
        done, fallbacks = done + len(vectors), fallbacks + found.stats["fallback_users"]
        print(f"users {done}/{a.users}: {search_s:.1f} s search, {done / search_s:.0f} users/s, "
              f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
        if a.time_limit is not None and search_s > a.time_limit:
            break
    return {"build_s": build_s, "tuning": tuning, "held_out": held_out, "exact_s": exact_s, "search_s": search_s,
            "done": done,
            "fallbacks": fallbacks, "rss_gb": peak_rss_gb(), "load": (load_before, load_1min())}


def table_row(a: argparse.Namespace, r: dict, command: str) -> str:
    t: Tuning = r["tuning"]
    full = f"{r['search_s'] * a.users / r['done']:.0f}" + ("" if r["done"] == a.users else " extrapolated")
    tried = ", ".join(f"{v}: {rec:.3f}" for v, rec in t.tried)
    cells = [
        dt.date.today().isoformat(), f"{a.users:,} x {a.items:,} x {a.dim}, k={a.k}", f"{a.index}, {a.threads}",
        f"{r['build_s']:.0f}", f"{t.parameter}={t.value}: {t.recall:.4f} on {a.tune_sample} users, target "
        f"{a.target_recall} {'reached' if t.reached else 'NOT reached'} (tried {tried}); "
        f"{r['held_out']:.4f} on {a.tune_sample} other users", f"{r['done']:,}",
        f"{r['search_s']:.1f}", f"{r['done'] / r['search_s']:.0f}", full, str(r["fallbacks"]),
        f"{r['rss_gb']:.2f}", f"{r['load'][0]:.1f} → {r['load'][1]:.1f}", machine(), f"`{command}`", commit(),
    ]
    return "| " + " | ".join(cells) + " |"


def summary(a: argparse.Namespace, r: dict) -> str:
    t: Tuning = r["tuning"]
    full = f"{r['search_s'] * a.users / r['done']:.0f} s" + ("" if r["done"] == a.users else " (extrapolated)")
    return (f"candidates_scale: {r['done']}/{a.users} users x {a.items} items d={a.dim} k={a.k}, {a.index} on "
            f"{a.threads} threads: build {r['build_s']:.1f} s, {t.parameter}={t.value} recall@{a.k} "
            f"{t.recall:.4f} ({'reached' if t.reached else 'NOT reached'} {a.target_recall}; {r['held_out']:.4f} on "
            f"other users), search "
            f"{r['search_s']:.1f} s = {r['done'] / r['search_s']:.0f} users/s, full search {full}, "
            f"{r['fallbacks']} exact fallbacks, peak RSS {r['rss_gb']:.2f} GB")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    check_json_out(a.json_out)  # before hours of measuring, not after
    command = "python -m benchmarks.candidates_scale " + shlex.join(sys.argv[1:] if argv is None else argv)
    r = run(a)
    emit(jsonable({"bench": "candidates_scale", "command": command, "args": vars(a), **r}), a.json_out, [])
    if not a.no_append:
        append_row(a.output, TITLE, INTRO, HEADER, table_row(a, r, command))
    print(summary(a, r))


if __name__ == "__main__":
    main()

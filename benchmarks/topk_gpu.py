"""Exact blocked top-K at candidate-generation scale on one GPU (issue #4, target 3, GPU part).

    python -m benchmarks.topk_gpu [--users 1000000] [--items 1000000] [--dim 64] [--k 100] [--seen 20]
                                  [--user-block 8192] [--item-block 131072] [--device cuda] [--json-out F]

Random float32 user and item vectors (seeded), ``--seen`` random items per user excluded, top-``k`` by inner
product with :func:`recsys.topk.top_k_blocked` (fp32 scores, running top-K merge over item blocks). Times
the whole search (results back on the host) after a small warm-up, and checks a user sample against a
brute-force reference (full score rows, seen items masked, stable sort).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from recsys.data import RaggedItems
from recsys.topk import top_k_blocked


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference(users: torch.Tensor, items: torch.Tensor, seen: RaggedItems, rows: torch.Tensor, k: int):
    """(len(rows), k) ids and scores by full scoring of the sampled users."""
    scores = users[rows] @ items.T  # (S, I)
    for r, row in enumerate(rows.tolist()):
        scores[r, seen.values[seen.offsets[row]:seen.offsets[row + 1]].long().to(scores.device)] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.indices[:, :k].cpu(), order.values[:, :k].cpu()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seen", type=int, default=20)
    p.add_argument("--user-block", type=int, default=8192)
    p.add_argument("--item-block", type=int, default=131072)
    p.add_argument("--device", default="cuda")
    p.add_argument("--check", type=int, default=256, help="users checked against the brute-force reference")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 scores
    g = torch.Generator(device=device).manual_seed(0)
    users = torch.randn(a.users, a.dim, device=device, generator=g)  # (U, D)
    items = torch.randn(a.items, a.dim, device=device, generator=g)  # (I, D)
    values = torch.randint(0, a.items, (a.users * a.seen,), generator=torch.Generator().manual_seed(1))
    seen = RaggedItems(values.int(), torch.arange(a.users + 1, dtype=torch.long) * a.seen)
    warm = min(a.users, a.user_block)
    top_k_blocked(users[:warm], items, a.k, RaggedItems(seen.values[: warm * a.seen], seen.offsets[: warm + 1]),
                  user_block_size=a.user_block, item_block_size=a.item_block, device=device)
    _sync(device)
    start = time.perf_counter()
    out = top_k_blocked(users, items, a.k, seen, user_block_size=a.user_block, item_block_size=a.item_block,
                        device=device)
    _sync(device)
    wall = time.perf_counter() - start
    rows = torch.randperm(a.users, generator=torch.Generator().manual_seed(2))[: a.check]
    ref_ids, ref_scores = reference(users, items, seen, rows.to(device), a.k)
    same_ids = float((out.ids[rows] == ref_ids).float().mean())
    max_diff = float((out.scores[rows] - ref_scores).abs().max())
    result = {"users": a.users, "items": a.items, "dim": a.dim, "k": a.k, "seen_per_user": a.seen,
              "user_block": a.user_block, "item_block": a.item_block, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "wall_s": wall, "users_per_s": a.users / wall,
              "checked_users": len(rows), "ids_equal_reference": same_ids, "max_score_diff": max_diff,
              "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    print(json.dumps(result))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

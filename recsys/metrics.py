"""Full-catalogue ranking metrics with pessimistic tie handling.

A target's rank is the number of non-excluded, non-target items scoring **greater than or equal to** it
(ties never favour the target), plus the other targets ranked strictly above it (ties among targets are
broken by item index, a fixed rule independent of which item is the target). Ranks are 0-based.
A target listed twice for one user counts once.
"""

from __future__ import annotations

import torch

from recsys.topk import count_at_least, count_column, repeated_targets, targets_above

PAD = 0
# target_ranks on the CPU: scores per row chunk (2 MiB of float32, a core's L2; 9 rows of 54,542 items)
RANK_CHUNK_ELEMENTS = 1 << 19


def exclusion_mask(history: torch.Tensor, n_items: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, n_items + 1) mask of items to drop from the ranking: padding column 0 and the history.

    history: (B, L) item indices, 0 = padding. keep: (B, M) items never excluded (the targets).
    """
    mask = torch.zeros(history.shape[0], n_items + 1, dtype=torch.bool, device=history.device)
    mask.scatter_(1, history.long(), True)
    if keep is not None:
        mask.scatter_(1, keep.long(), False)
    mask[:, PAD] = True
    return mask


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Pessimistic 0-based rank of each target; -1 where ``targets`` is padding or repeats an earlier target.

    scores: (B, I) with column 0 = padding; targets: (B, M) item indices (0 = none); exclude: (B, I) bool.
    A NaN score counts against the target: a NaN target ranks below every competitor, a NaN competitor
    ranks above the target. On the CPU rows are counted in chunks of about ``RANK_CHUNK_ELEMENTS`` scores
    (a few rows of a large catalogue), whose three passes stay in cache: 5.5x faster than whole-batch
    passes on 54,542 items (BENCHMARKS.md "Validation ranking on the CPU"); on GPU the batch is one chunk.
    Temporary memory is one chunk, whatever M (targets are ranked one column at a time).
    """
    scores = scores.float()
    targets = targets.long()
    t_scores = scores.gather(1, targets)  # (B, M)
    t_scores = t_scores.masked_fill(t_scores.isnan() | exclude.gather(1, targets), float("-inf"))
    ahead = torch.zeros_like(targets)  # (B, M) competitors scoring >= the target
    rows = scores.shape[0] if scores.is_cuda else max(1, RANK_CHUNK_ELEMENTS // max(scores.shape[1], 1))
    for start in range(0, scores.shape[0], rows):
        part = slice(start, start + rows)
        # competitors keep their score (NaN -> +inf: above any target); excluded items and the row's targets
        # become NaN, which is never >= anything, so they are not counted
        others = scores[part].nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))  # (R, I)
        others.masked_fill_(exclude[part], float("nan")).scatter_(1, targets[part], float("nan"))
        for j in range(targets.shape[1]):
            column = t_scores[part, j : j + 1]
            ahead[part, j] = (count_at_least(others, column) if targets.shape[1] == 1
                              else count_column(others, column, targets[part, j] != PAD))
    return ranks_among_targets(ahead, t_scores, targets)


def distinct_targets(targets: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: the target is an item (not padding) and not a repeat of an earlier target of the row."""
    return (targets != PAD) & ~repeated_targets(targets)


def ranks_among_targets(ahead: torch.Tensor, t_scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ranks (B, M) from ``ahead`` (competitors scoring >= each target) plus the other targets strictly above
    it or tied with a smaller item index (:func:`targets_above`); -1 where the target is padding or a repeat."""
    valid = distinct_targets(targets)  # (B, M)
    ranks = ahead + targets_above(t_scores, targets, valid)
    return torch.where(valid, ranks, torch.full_like(ranks, -1))


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-user metrics (each a (B,) float tensor) from (B, M) target ranks (-1 = no target).

    Keys: ``ndcg_at_K``, ``hr_at_K`` (any target in top K), ``recall_at_K``, ``mrr_at_K``.
    Users without any target must be filtered out before calling.
    """
    valid = ranks >= 0
    n_targets = valid.sum(-1).clamp(min=1).float()
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = valid & (ranks < k)  # (B, M)
        gains = torch.where(hit, 1.0 / torch.log2(ranks.float() + 2.0), torch.zeros_like(ranks, dtype=torch.float))
        ideal_n = n_targets.clamp(max=k)
        ideal = (1.0 / torch.log2(torch.arange(k, device=ranks.device).float() + 2.0)).cumsum(0)
        idcg = ideal[(ideal_n - 1).long()]
        first = torch.where(hit, ranks, torch.full_like(ranks, k)).min(-1).values
        out[f"ndcg_at_{k}"] = gains.sum(-1) / idcg
        out[f"hr_at_{k}"] = hit.any(-1).float()
        out[f"recall_at_{k}"] = hit.sum(-1).float() / n_targets
        out[f"mrr_at_{k}"] = torch.where(first < k, 1.0 / (first.float() + 1.0), torch.zeros_like(n_targets))
    return out

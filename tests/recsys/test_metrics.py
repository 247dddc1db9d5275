"""Ranking metrics against scikit-learn and hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from recsys.metrics import exclusion_mask, metrics_from_ranks, target_ranks


def _metrics(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None, ks=(1, 3)):
    n_items = scores.shape[1] - 1
    history = history if history is not None else torch.zeros(scores.shape[0], 1, dtype=torch.long)
    exclude = exclusion_mask(history, n_items, keep=targets)
    return metrics_from_ranks(target_ranks(scores, targets, exclude), ks)


@pytest.mark.parametrize("n_targets", [1, 3])
def test_ndcg_equals_sklearn_on_tie_free_scores(n_targets: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, ks = 40, 30, (1, 5, 10, 30)
    scores = torch.stack([torch.randperm(n_items + 1, generator=gen) for _ in range(n_users)]).float()
    targets = torch.stack([torch.randperm(n_items, generator=gen)[:n_targets] + 1 for _ in range(n_users)])
    history = torch.stack([torch.randperm(n_items, generator=gen)[:5] + 1 for _ in range(n_users)])
    got = _metrics(scores, targets, history, ks)
    exclude = exclusion_mask(history, n_items, keep=targets)
    for u in range(n_users):
        keep = ~exclude[u]  # sklearn has no exclusion: drop the excluded columns
        y_true = torch.zeros(n_items + 1)
        y_true[targets[u]] = 1.0
        for k in ks:
            want = ndcg_score(y_true[keep][None].numpy(), scores[u][keep][None].numpy(), k=k)
            assert got[f"ndcg_at_{k}"][u].item() == pytest.approx(want, abs=1e-6)


def test_hr_recall_mrr_on_a_hand_case() -> None:
    # Items 1..6 ranked 6 > 5 > 4 > 3 > 2 > 1; user 0 wants {5, 2} (ranks 1 and 4), user 1 wants {6}.
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6]]).repeat(2, 1)
    targets = torch.tensor([[5, 2], [6, 0]])
    m = _metrics(scores, targets, ks=(1, 3, 5))
    assert m["hr_at_1"].tolist() == [0.0, 1.0]
    assert m["hr_at_3"].tolist() == [1.0, 1.0]
    assert m["recall_at_3"].tolist() == [0.5, 1.0]
    assert m["recall_at_5"].tolist() == [1.0, 1.0]
    assert m["mrr_at_1"].tolist() == [0.0, 1.0]
    assert m["mrr_at_3"].tolist() == [0.5, 1.0]
    want = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert m["ndcg_at_5"][0].item() == pytest.approx(want)


def test_ties_never_favour_the_target() -> None:
    scores = torch.zeros(1, 11)  # constant scores: 10 real items, all tied
    history = torch.tensor([[1, 2]])
    exclude = exclusion_mask(history, 10, keep=torch.tensor([[7]]))
    # 7 competitors remain (10 items - 2 seen - the target): the target is last among them.
    assert target_ranks(scores, torch.tensor([[7]]), exclude).tolist() == [[7]]
    two = torch.tensor([[7, 4]])
    exclude = exclusion_mask(history, 10, keep=two)
    # Both below the 6 competitors; between the two targets the smaller item index wins.
    assert target_ranks(scores, two, exclude).tolist() == [[7, 6]]


def test_history_excluded_but_a_target_in_it_is_not() -> None:
    mask = exclusion_mask(torch.tensor([[2, 3, 0]]), 5, keep=torch.tensor([[3]]))
    assert mask.tolist() == [[True, False, True, False, False, False]]
    scores = torch.tensor([[0.0, 1, 9, 8, 2, 3]])  # 2 is seen and would beat the target 3
    assert target_ranks(scores, torch.tensor([[3]]), mask).tolist() == [[0]]


def test_a_repeated_target_counts_once() -> None:
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5]])
    m = _metrics(scores, torch.tensor([[5, 5]]), ks=(1, 5))
    assert m["ndcg_at_5"].item() == pytest.approx(1.0)
    assert m["recall_at_1"].item() == 1.0


def test_nan_and_minus_inf_targets_rank_last_among_competitors_only() -> None:
    scores = torch.tensor([[0.0, float("nan"), 1, 2, float("-inf"), 3, 4]])
    history = torch.tensor([[5, 6]])  # 2 excluded; competitors of target 1 are items 2, 3, 4
    for target in (1, 4):
        exclude = exclusion_mask(history, 6, keep=torch.tensor([[target]]))
        assert target_ranks(scores, torch.tensor([[target]]), exclude).item() == 3
    # A NaN competitor ranks above the target.
    exclude = exclusion_mask(history, 6, keep=torch.tensor([[3]]))
    assert target_ranks(scores, torch.tensor([[3]]), exclude).item() == 1


def test_padding_targets_get_rank_minus_one() -> None:
    ranks = target_ranks(
        torch.randn(2, 5), torch.tensor([[1, 0], [2, 3]]), torch.zeros(2, 5, dtype=torch.bool)
    )
    assert (ranks[0, 1] == -1).item() and bool((ranks[1] >= 0).all())
    assert np.isfinite(metrics_from_ranks(ranks, (2,))["ndcg_at_2"].numpy()).all()


def _direct_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor) -> list[list[int]]:
    """The module docstring's definition, one user and one target at a time in plain Python."""
    out = []
    for b in range(scores.shape[0]):
        row, tgt = scores[b].tolist(), targets[b].tolist()
        ranks = []
        for j, t in enumerate(tgt):
            if t == 0 or t in tgt[:j]:
                ranks.append(-1)
                continue
            ts = float("-inf") if math.isnan(row[t]) or bool(exclude[b, t]) else row[t]
            ahead = sum(1 for i, s in enumerate(row)
                        if not exclude[b, i] and i not in tgt and (math.isnan(s) or s >= ts))
            above = sum(1 for u in set(tgt) - {0, t}
                        if (lambda us: us > ts or (us == ts and u < t))(
                            float("-inf") if math.isnan(row[u]) or bool(exclude[b, u]) else row[u]))
            ranks.append(ahead + above)
        out.append(ranks)
    return out


@pytest.mark.parametrize("chunk_elements", [1 << 19, 3 * 41, 41, 1])  # one chunk; 3 rows; 1 row; 1 row (floor)
def test_target_ranks_in_row_chunks_equal_the_direct_definition(monkeypatch, chunk_elements: int) -> None:
    """Chunked counting (the CPU path) gives the definition's ranks on scores with ties, NaN, +-inf, excluded
    items, several targets per user, a repeated target and padding targets."""
    import recsys.metrics as metrics

    monkeypatch.setattr(metrics, "RANK_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    n_users, n_items = 17, 40
    scores = torch.randint(0, 6, (n_users, n_items + 1), generator=gen).float()  # many ties
    scores[0, 3], scores[1, 5], scores[2, 7], scores[3, 9] = float("nan"), float("inf"), float("-inf"), float("inf")
    targets = torch.randint(1, n_items + 1, (n_users, 3), generator=gen)
    targets[4, 2] = 0  # padding target
    targets[5, 1] = targets[5, 0]  # repeated target
    targets[1, 0], targets[2, 0], targets[3, 0] = 5, 7, 2  # an inf, a -inf target; inf competitor for row 3
    history = torch.randint(0, n_items + 1, (n_users, 6), generator=gen)
    exclude = exclusion_mask(history, n_items, keep=targets)
    assert target_ranks(scores, targets, exclude).tolist() == _direct_ranks(scores, targets, exclude)


def _pairwise_reference(t_scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct, others above) by (B, M, M) comparisons, as computed before the sort-based versions."""
    m = targets.shape[1]
    first = torch.ones(m, m, dtype=torch.bool).tril(-1)
    repeat = ((targets.unsqueeze(2) == targets.unsqueeze(1)) & first).any(-1)
    valid = (targets != 0) & ~repeat
    ts_i, ts_j = t_scores.unsqueeze(2), t_scores.unsqueeze(1)
    idx_i, idx_j = targets.unsqueeze(2), targets.unsqueeze(1)
    above = (ts_j > ts_i) | ((ts_j == ts_i) & (idx_j < idx_i))
    above &= valid.unsqueeze(1) & (idx_j != idx_i)
    return valid, above.sum(-1)


@pytest.mark.parametrize("seed", range(6))
def test_sorted_ranks_among_targets_equal_the_pairwise_comparison(seed: int) -> None:
    """distinct_targets and the targets ranked above each target by sorting (O(B·M log M) memory O(B·M)) equal
    the (B, M, M) comparisons they replace (a time split's user with 3,000 targets made 9e9 booleans): ties of
    scores, repeated and padding targets, -inf scores."""
    from recsys.metrics import distinct_targets
    from recsys.topk import targets_above

    gen = torch.Generator().manual_seed(seed)
    for m in (1, 2, 7, 40):
        targets = torch.randint(0, 12, (50, m), generator=gen)  # 0 = padding; repeats are frequent
        t_scores = torch.randint(-3, 4, (50, m), generator=gen).float()  # many ties
        t_scores[torch.rand(50, m, generator=gen) < 0.1] = float("-inf")
        valid, above = _pairwise_reference(t_scores, targets)
        assert torch.equal(distinct_targets(targets), valid)
        got = targets_above(t_scores, targets, valid)
        assert torch.equal(got[valid], above[valid])

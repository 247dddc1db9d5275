"""Blocked exact top-K against a brute-force oracle (full score matrix + stable sort) and recsys.metrics' ranks;
blocked model evaluation against the dense path."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from torch import nn

from features.schema import SEQUENCES
from recsys.config import EvaluateConfig
from recsys.data import RaggedItems
from recsys.evaluation import (
    EvalSet,
    evaluate_all,
    evaluate_model_blocked,
    evaluate_scorer,
    model_scorer,
)
from recsys.metrics import target_ranks
from recsys.topk import select_top_k, top_k_blocked

BLOCKS = [(1, 997), (3, 13), (7, 64), (16, 100), (37, 129), (5, 333), (1000, 500), (11, 4096)]


def _ragged(rows: list[list[int]]) -> RaggedItems:
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([len(r) for r in rows]).cumsum(0)
    return RaggedItems(torch.tensor([i for r in rows for i in r], dtype=torch.int32), offsets)


def _problem(n_users: int, n_items: int, dim: int, integer: bool, seed: int = 0):
    """Random seen items (duplicates included) and 3 targets per user: one padding (-1), one repeated, some
    also seen. Integer vectors plant ties (small values, and ten copies of item 5) and make every score exact
    in fp32, so any GEMM kernel gives the same scores; float vectors have no ties but the last bit of a score
    may depend on the BLAS kernel."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        users = torch.randint(-3, 4, (n_users, dim), generator=g).float()
        items = torch.randint(-3, 4, (n_items, dim), generator=g).float()
        items[100:110] = items[5]
    else:
        users, items = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
    seen = [torch.randint(0, n_items, (int(n),), generator=g).tolist()
            for n in torch.randint(0, 30, (n_users,), generator=g)]
    targets = torch.randint(-1, n_items, (n_users, 3), generator=g)
    targets[:, 2] = targets[:, 0]
    for u in range(0, n_users, 4):  # a target also in the history stays ranked and recommendable
        seen[u].append(max(int(targets[u, 1]), 0))
    return users, items, seen, targets


def _oracle(users, items, seen, targets, k):
    """Full fp32 score matrix, exclusion like recsys.metrics.exclusion_mask(keep=targets), stable sort."""
    scores = users @ items.T  # (U, I)
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    for u, s in enumerate(seen):
        exclude[u, s] = True
        exclude[u, targets[u][targets[u] >= 0]] = False
    masked = scores.masked_fill(exclude, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True)  # ties: item index ascending
    top_s, top_i = order.values[:, :k], order.indices[:, :k]
    # recsys.metrics expects column 0 = padding and 1-based items.
    padded = torch.cat([torch.zeros(len(users), 1), scores], 1)
    excl = torch.cat([torch.ones(len(users), 1, dtype=torch.bool), exclude], 1)
    ranks = target_ranks(padded, (targets + 1).clamp(min=0), excl)
    return top_i.masked_fill(top_s == float("-inf"), -1), top_s, ranks


@pytest.mark.parametrize(("integer", "k"), [(True, 50), (True, 3), (False, 50), (False, 3)])
def test_equals_brute_force_for_any_block_sizes(integer: bool, k: int) -> None:
    users, items, seen, targets = _problem(37, 3000, 8, integer)
    users[3:5] = 0  # every item scores exactly 0 for these two users
    want_ids, want_scores, want_ranks = _oracle(users, items, seen, targets, k)
    assert (want_ids >= 0).all() and (want_ranks >= 0).any()
    for user_block, item_block in BLOCKS:
        got = top_k_blocked(users, items, k, _ragged(seen), targets, user_block, item_block)
        assert torch.equal(got.ids, want_ids), (user_block, item_block)
        assert got.ranks is not None and torch.equal(got.ranks, want_ranks), (user_block, item_block)
        if integer:
            assert torch.equal(got.scores, want_scores), (user_block, item_block)
        else:  # identical with MKL (GEMMs padded to 16 rows); another BLAS may differ in the last bit
            torch.testing.assert_close(got.scores, want_scores, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("integer", [True, False])
def test_target_scores_are_formed_in_chunks_of_users_with_the_same_ranks(integer: bool, monkeypatch) -> None:
    """A block of 200 users: their targets' scores come from GEMMs of at most TARGET_CHUNK users x their own
    targets (one (B, B * M) product was O(B^2) memory: 16 GiB at a GPU block of 65,536 users), chunk sizes that
    do not divide B included, and the ranks stay the oracle's."""
    import recsys.topk as topk

    users, items, seen, targets = _problem(200, 700, 8, integer, seed=3)
    want_ids, _, want_ranks = _oracle(users, items, seen, targets, 20)
    shapes: list[tuple[int, int]] = []
    real = topk._scores

    def recording(u: torch.Tensor, i: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
        shapes.append((u.shape[0], i.shape[0]))
        return real(u, i, buffer)

    monkeypatch.setattr(topk, "_scores", recording)
    got = top_k_blocked(users, items, 20, _ragged(seen), targets, 200, 128)
    assert torch.equal(got.ids, want_ids) and got.ranks is not None and torch.equal(got.ranks, want_ranks)
    m = targets.shape[1]
    target_gemms = [s for s in shapes if s[1] % m == 0 and s[1] == s[0] * m]
    assert [rows for rows, _ in target_gemms] == [64, 64, 64, 8]
    assert max(rows * cols for rows, cols in shapes) <= 200 * 128  # never more than one item block's scores


def test_ties_at_the_k_boundary_go_to_the_smaller_item_index() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    top_s, top_i = select_top_k(scores, torch.arange(5), k=2)
    assert top_i.tolist() == [[1, 2], [0, 1]] and top_s.tolist() == [[2.0, 2.0], [3.0, 3.0]]
    users = torch.ones(1, 2)
    items = torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 200)  # 200 tied best items from position 3
    for item_block in (1, 5, 64, 150, 1000):
        got = top_k_blocked(users, items, 7, item_block_size=item_block)
        assert got.ids.tolist() == [[3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize("ids_kind", ["arange", "spaced", "per_row"])
@pytest.mark.parametrize("budget", [1 << 22, 0])
def test_select_top_k_equals_a_stable_sort_on_wide_tied_rows(ids_kind: str, budget: int, monkeypatch) -> None:
    """Rows of 20,000 entries whose k-th score is tied: with thousands of zeros from the first columns (an
    item-kNN row of few neighbours), with zeros only after column 3,000, with entries in the last columns only
    and with entries spread over the row; untied rows, -inf entries, a row with fewer than k candidates. The
    oracle is a stable sort by score of rows whose ids ascend. 1-D ascending ids take the nonzero path while
    the tied entries fit TIED_BUDGET and the full-row path otherwise (both counted); per-row ids (B, N),
    ascending too, always take the full-row path."""
    import recsys.topk as topk

    g = torch.Generator().manual_seed(3)
    n, k = 20000, 50
    scores = torch.zeros(8, n)
    scores[:, ::97] = torch.rand(8, len(range(0, n, 97)), generator=g) + 1  # ~206 positives per row
    scores[0:2, 30:] = 0.0  # rows 0-1: 30 positives, then only zeros (boundary at 0: the first zeros)
    scores[2] = -1.0
    scores[2, 100:140] = 5.0  # 40 above the boundary, 30 tied in the last columns
    scores[2, n - 30 :] = 2.0
    scores[3] = torch.randint(0, 400, (n,), generator=g).float()  # ~50 per value: ties spread out
    scores[4] = torch.where(torch.arange(n) < 3000, -1.0, 0.0)  # zeros only after column 3,000
    scores[4, 5000:5020] = 5.0  # 20 above the boundary at 0
    scores[5] = torch.randperm(n, generator=g).float()  # no ties
    scores[6, torch.randperm(n, generator=g)[:2000]] = float("-inf")
    scores[7, : n - 10] = float("-inf")  # fewer than k candidates
    ids_1d = torch.arange(n) if ids_kind == "arange" else 3 * torch.arange(n) + 5
    ids = ids_1d.expand(8, n).clone() if ids_kind == "per_row" else ids_1d

    calls = {"nonzero": 0, "full": 0}
    first_tied, select_tied = topk._first_tied, topk._select_tied

    def counted_first(*args):
        calls["nonzero"] += 1
        return first_tied(*args)

    def counted_full(*args):
        calls["full"] += 1
        return select_tied(*args)

    monkeypatch.setattr(topk, "_first_tied", counted_first)
    monkeypatch.setattr(topk, "_select_tied", counted_full)
    monkeypatch.setattr(topk, "TIED_BUDGET", budget)
    for rows in ([0, 1, 4, 5, 6, 7], [2, 3], list(range(8))):
        got_s, got_i = select_top_k(scores[rows], ids if ids.ndim == 1 else ids[rows], k)
        order = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :k]  # ids ascend
        want_s = scores[rows].gather(1, order)
        want_i = ids_1d[order].masked_fill(want_s == float("-inf"), -1)
        assert torch.equal(got_s, want_s) and torch.equal(got_i, want_i), rows
    nonzero_path = ids_kind != "per_row" and budget > 0
    assert calls == {"nonzero": 3 * nonzero_path, "full": 3 * (not nonzero_path)}


def test_a_user_with_fewer_than_k_unseen_items_gets_minus_one() -> None:
    users, items = torch.randn(2, 4), torch.randn(6, 4)
    got = top_k_blocked(users, items, 4, _ragged([[0, 1, 2, 3], []]), item_block_size=4)
    assert sorted(got.ids[0, :2].tolist()) == [4, 5] and got.ids[0, 2:].tolist() == [-1, -1]
    assert torch.isneginf(got.scores[0, 2:]).all() and (got.ids[1] >= 0).all()
    assert got.ranks is None


def test_bad_inputs_raise_precise_errors() -> None:
    users, items = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=11"):
        top_k_blocked(users, items, 11)
    with pytest.raises(ValueError, match="share D"):
        top_k_blocked(users, torch.randn(10, 5), 2)
    with pytest.raises(ValueError, match="item_vectors holds NaN"):
        top_k_blocked(users, items.masked_fill(items > 1, float("nan")), 2)
    with pytest.raises(ValueError, match="seen has 2 rows"):
        top_k_blocked(users, items, 2, _ragged([[1], [2]]))
    with pytest.raises(ValueError, match="outside 0..9"):
        top_k_blocked(users, items, 2, _ragged([[1], [10], []]))
    with pytest.raises(ValueError, match="targets hold position 10"):
        top_k_blocked(users, items, 2, targets=torch.tensor([[1], [10], [2]]))
    with pytest.raises(ValueError, match="block sizes"):
        top_k_blocked(users, items, 2, item_block_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu_on_exact_scores() -> None:
    users, items, seen, targets = _problem(300, 5000, 16, integer=True)
    want = top_k_blocked(users, items, 100, _ragged(seen), targets, 64, 1000)
    got = top_k_blocked(users, items, 100, _ragged(seen), targets, 128, 2048, device="cuda")
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert got.ranks is not None and want.ranks is not None and torch.equal(got.ranks, want.ranks)


class _DotModel(nn.Module):
    """SASRec's scoring contract: user vector = mean input embedding, scores = vector @ item table."""

    def __init__(self, n_items: int, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.emb(items).mean(1)  # (B, D)

    def item_embeddings(self) -> torch.Tensor:
        return self.emb.weight  # (n_items + 1, D)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.item_embeddings().T  # (B, n_items + 1)


def _eval_set(n_users: int, n_items: int, seed: int = 0) -> EvalSet:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, n_items + 1, (n_users, 12), generator=g)  # 0 = padding
    history[:, -1] = torch.randint(1, n_items + 1, (n_users,), generator=g)
    targets = torch.randint(0, n_items + 1, (n_users, 2), generator=g)
    targets[:, 0] = torch.where(targets[:, 0] == 0, 1, targets[:, 0])
    targets[::3, 1] = history[::3, -1]  # a target in the history
    return EvalSet(torch.arange(n_users), history[:, -4:], history, targets)


def test_blocked_evaluation_equals_the_dense_path() -> None:
    torch.manual_seed(0)
    n_items = 700
    model, es = _DotModel(n_items).train(), _eval_set(90, n_items)
    ks = (1, 10, 50)
    want = evaluate_scorer(model_scorer(model), es, n_items, ks, batch_size=32)
    assert 0.0 < want["hr_at_50"] < 1.0 and want["coverage_at_50"] > 0.0
    for batch_size, item_block in ((32, 64), (7, 100), (90, 333), (1000, 5000)):
        assert evaluate_model_blocked(model, es, n_items, ks, batch_size, item_block) == want
    assert model.training  # the mode is restored


def test_evaluate_all_with_item_blocks_gives_the_same_metrics() -> None:
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    rows = [(u, torch.randint(1, 41, (6,), generator=g).tolist(), [int(torch.randint(1, 41, (1,), generator=g))],
             [int(torch.randint(1, 41, (1,), generator=g))]) for u in range(25)]
    users, train, val, test = zip(*rows, strict=True)
    sequences = pl.DataFrame({"user_idx": users, "train_items": train, "val_items": val, "test_items": test},
                             schema=SEQUENCES)
    model = _DotModel(40)
    for exclude_seen in (True, False):
        dense = evaluate_all(model, sequences, 40, None,
                             EvaluateConfig(ks=(5, 10), batch_size=8, exclude_seen=exclude_seen), max_len=4)
        blocked = evaluate_all(model, sequences, 40, None, EvaluateConfig(
            ks=(5, 10), batch_size=8, item_block_size=16, exclude_seen=exclude_seen), max_len=4)
        assert blocked == dense, exclude_seen


def test_count_column_counts_only_the_rows_asked_for() -> None:
    """A target column that is padding for most rows gathers its real rows (one user with many targets costs its
    own width, not a pass over the batch); the rows asked for get count_at_least's counts, the others 0."""
    from recsys.topk import count_at_least, count_column

    torch.manual_seed(0)
    scores = torch.randn(6, 3000).round(decimals=1)  # ties
    thresholds = torch.randn(6, 1).round(decimals=1)
    full = count_at_least(scores, thresholds)
    for rows in ([1], [0, 4], [0, 1, 2, 3], [], [0, 1, 2, 3, 4, 5]):
        mask = torch.zeros(6, dtype=torch.bool)
        mask[rows] = True
        got = count_column(scores, thresholds, mask)
        assert torch.equal(got[mask], full[mask])
        assert len(rows) > 3 or not got[~mask].any()  # gathered: 0 elsewhere

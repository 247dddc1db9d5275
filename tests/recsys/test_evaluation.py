"""Eval-set building, full-catalogue evaluation and the baselines (popularity, item-kNN, EASE)."""

from __future__ import annotations

import logging
import random

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from features.schema import SEQUENCES
from recsys.baselines import (
    ease_scorer,
    ease_weights,
    history_matrix,
    item_knn_scorer,
    item_knn_similarity,
    popularity_scorer,
    popularity_scores,
    repeat_scorer,
)
from recsys.config import EvaluateConfig
from recsys.data import RaggedItems
from recsys.evaluation import (
    EvalSet,
    accumulate_scorer,
    build_eval_set,
    evaluate_all,
    evaluate_scorer,
    history_segments,
    paired_deltas,
    ranking_set,
    segment_results,
    split_histories,
)

N_ITEMS = 8


def _sequences(rows: list[tuple[int, list[int], list[int], list[int]]]) -> pl.DataFrame:
    users, train, val, test = zip(*rows, strict=True)
    return pl.DataFrame(
        {"user_idx": users, "train_items": train, "val_items": val, "test_items": test}, schema=SEQUENCES
    )


@pytest.fixture
def sequences() -> pl.DataFrame:
    return _sequences(
        [
            (0, [1, 2, 3, 4], [5], [6]),
            (1, [2, 3], [4], [4]),  # test target 4 is also in the test history
            (2, [7], [], [8]),  # no val target
            (3, [], [1], [2]),  # no val history
            (4, [8, 1, 2], [3], [3, 5, 3]),  # repeated test target
        ]
    )


def _random_eval_set(n_users: int = 37, seed: int = 0) -> EvalSet:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for u in range(n_users):
        items = (torch.randperm(N_ITEMS, generator=gen) + 1).tolist()
        n = int(torch.randint(2, N_ITEMS, (1,), generator=gen))
        rows.append((u, items[: n - 1], [items[n - 1]], [items[0]]))
    return build_eval_set(_sequences(rows), "val", max_len=3)


def test_build_eval_set_val(sequences: pl.DataFrame) -> None:
    es = build_eval_set(sequences, "val", max_len=3)
    assert es.user_idx.tolist() == [0, 1, 4]
    assert es.inputs.tolist() == [[2, 3, 4], [0, 2, 3], [8, 1, 2]]
    assert es.history[:].tolist() == [[1, 2, 3, 4], [0, 0, 2, 3], [0, 8, 1, 2]]
    assert es.targets[:].tolist() == [[5], [4], [3]]


def test_build_eval_set_test(sequences: pl.DataFrame) -> None:
    es = build_eval_set(sequences, "test", max_len=2)
    assert es.user_idx.tolist() == [0, 1, 2, 3, 4]
    assert es.inputs.tolist() == [[4, 5], [3, 4], [0, 7], [0, 1], [2, 3]]
    assert es.history[:][0].tolist() == [1, 2, 3, 4, 5] and es.history[:][3].tolist() == [0, 0, 0, 0, 1]
    assert es.targets[:].tolist() == [[0, 6], [0, 4], [0, 8], [0, 2], [3, 5]]
    assert all(t.dtype == torch.long for t in (es.user_idx, es.inputs, es.history[:], es.targets[:]))


def test_build_eval_set_rejects_a_bad_schema(sequences: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="val_items"):
        build_eval_set(sequences.drop("val_items"), "val", max_len=3)


def _table_scorer(table: torch.Tensor):
    """Scores looked up by user_idx: row u of ``table`` for user u."""
    return lambda inputs, user_idx: table[user_idx]


def test_results_do_not_depend_on_batch_size() -> None:
    es = _random_eval_set()
    table = torch.randn(len(es), N_ITEMS + 1, generator=torch.Generator().manual_seed(1))
    table[:, 3] = table[:, 4]  # some ties
    results = [evaluate_scorer(_table_scorer(table), es, N_ITEMS, (1, 3, 5), bs) for bs in (1, 4, 10, 1024)]
    assert all(r == results[0] for r in results)
    pop = popularity_scorer(torch.arange(N_ITEMS + 1.0) % 3)  # heavy ties
    results = [evaluate_scorer(pop, es, N_ITEMS, (1, 3), bs) for bs in (1, 5, 1024)]
    assert all(r == results[0] for r in results)


def test_oracle_gets_one_and_anti_oracle_gets_zero(sequences: pl.DataFrame) -> None:
    es = build_eval_set(sequences, "test", max_len=3)
    oracle = torch.zeros(len(es), N_ITEMS + 1).scatter_(1, es.targets[:], 1.0)
    got = evaluate_scorer(_table_scorer(oracle), es, N_ITEMS, ks=(2,))
    assert got["ndcg_at_2"] == 1.0 and got["hr_at_2"] == 1.0 and got["mrr_at_2"] == 1.0
    assert got["recall_at_2"] == 1.0 and got["n_users"] == 5.0
    last = torch.zeros(len(es), N_ITEMS + 1).scatter_(1, es.targets[:], -1.0)
    got = evaluate_scorer(_table_scorer(last), es, N_ITEMS, ks=(1,))
    assert got["ndcg_at_1"] == 0.0 and got["hr_at_1"] == 0.0 and got["mrr_at_1"] == 0.0


def test_constant_scores_rank_the_target_below_all_ties(sequences: pl.DataFrame) -> None:
    es = build_eval_set(sequences, "val", max_len=3)
    got = evaluate_scorer(_table_scorer(torch.zeros(5, N_ITEMS + 1)), es, N_ITEMS, ks=(3,))
    assert got["hr_at_3"] == 0.0  # every user has >= 3 unseen competitors tied with the target


def test_coverage_on_a_hand_case() -> None:
    seqs = _sequences([(0, [8], [1], []), (1, [7], [1], [])])
    es = build_eval_set(seqs, "val", max_len=2)
    scores = torch.arange(N_ITEMS + 1.0).repeat(2, 1)  # item 8 best, then 7, ...
    got = evaluate_scorer(_table_scorer(scores), es, N_ITEMS, ks=(1, 2))
    assert got["coverage_at_1"] == pytest.approx(2 / N_ITEMS)  # user 0 gets 7, user 1 gets 8
    assert got["coverage_at_2"] == pytest.approx(3 / N_ITEMS)  # {7, 6} and {8, 6}


def test_coverage_counts_only_real_candidates() -> None:
    seqs = _sequences([(0, [1, 2, 3, 4, 5, 6, 7], [8], [])])
    es = build_eval_set(seqs, "val", max_len=2)
    got = evaluate_scorer(_table_scorer(torch.zeros(1, N_ITEMS + 1)), es, N_ITEMS, ks=(5,))
    assert got["coverage_at_5"] == pytest.approx(1 / N_ITEMS)  # only item 8 is not seen


def test_wrong_score_shape_and_out_of_range_items_raise(sequences: pl.DataFrame) -> None:
    es = build_eval_set(sequences, "val", max_len=3)
    with pytest.raises(ValueError, match="shape"):
        evaluate_scorer(_table_scorer(torch.zeros(5, N_ITEMS)), es, N_ITEMS)
    with pytest.raises(ValueError, match="n_items"):
        evaluate_scorer(_table_scorer(torch.zeros(5, 5)), es, 4)


def test_popularity_scores_on_a_hand_case(sequences: pl.DataFrame) -> None:
    pop = popularity_scores(sequences, N_ITEMS)
    assert pop[0] == float("-inf")
    assert pop[1:].tolist() == [2, 3, 2, 1, 0, 0, 1, 1]
    scores = popularity_scorer(pop)(torch.zeros(3, 2, dtype=torch.long), torch.arange(3))
    assert scores.shape == (3, N_ITEMS + 1) and bool((scores == pop).all())
    with pytest.raises(ValueError, match="train_items"):
        popularity_scores(sequences, 5)
    # predicting test, the validation events are known too (as item-kNN and EASE are fitted): 5, 4, 1, 3
    assert popularity_scores(sequences, N_ITEMS, "test")[1:].tolist() == [3, 3, 3, 2, 1, 0, 1, 1]
    assert popularity_scores(sequences, N_ITEMS, "val")[1:].tolist() == [2, 3, 2, 1, 0, 0, 1, 1]


class _MeanModel(nn.Module):
    """Tiny stand-in for SASRec: the user vector is the mean input embedding."""

    def __init__(self, n_items: int, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.emb(items).mean(1)  # (B, D)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.emb.weight.T  # (B, n_items + 1)


def test_evaluate_all_runs_model_and_popularity(sequences: pl.DataFrame) -> None:
    torch.manual_seed(0)
    model = _MeanModel(N_ITEMS).train()
    cfg = EvaluateConfig(split="test", ks=(1, 5), batch_size=2)
    got = evaluate_all(model, sequences, N_ITEMS, None, cfg, max_len=3)
    assert list(got) == ["model", "popularity", "item_knn", "ease"]
    assert model.training  # the mode is restored
    popularity = evaluate_scorer(
        popularity_scorer(popularity_scores(sequences, N_ITEMS, "test")),  # train + val known
        build_eval_set(sequences, "test", 3),
        N_ITEMS,
        (1, 5),
    )
    assert {k: v for k, v in got["popularity"].items() if not k.startswith("delta_")} == popularity
    for name, metrics in got.items():
        assert metrics["n_users"] == 5.0
        assert {"ndcg_at_5", "hr_at_5", "recall_at_5", "mrr_at_5", "coverage_at_5", "ndcg_at_5_se"} <= set(metrics)
        assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k not in ("n_users", "seen_targets") and not k.startswith("delta_"))
        assert (name == "model") == ("delta_ndcg_at_5" not in metrics)
        if name != "model":  # the model's paired difference from this baseline
            assert metrics["delta_ndcg_at_5"] == pytest.approx(got["model"]["ndcg_at_5"] - metrics["ndcg_at_5"])


def test_evaluate_all_runs_the_configured_baselines(sequences: pl.DataFrame, caplog) -> None:
    model = _MeanModel(N_ITEMS)
    cfg = EvaluateConfig(split="val", ks=(5,), baselines=("ease", "popularity"))
    assert list(evaluate_all(model, sequences, N_ITEMS, None, cfg, max_len=3)) == ["model", "ease", "popularity"]
    cfg = EvaluateConfig(ks=(5,), baselines=("ease",), ease_max_items=N_ITEMS - 1)
    with caplog.at_level(logging.WARNING, logger="recsys.evaluation"):
        assert list(evaluate_all(model, sequences, N_ITEMS, None, cfg, max_len=3)) == ["model"]
    assert "ease skipped" in caplog.text and "ease_max_items" in caplog.text


def test_split_histories_and_history_matrix(sequences: pl.DataFrame) -> None:
    assert split_histories(sequences, "val")["history"].to_list()[4] == [8, 1, 2]
    test = split_histories(sequences, "test")
    assert test["history"].to_list()[4] == [8, 1, 2, 3]
    rows = _sequences([(0, [1, 2, 1], [], []), (2, [3], [], [])])
    matrix = history_matrix(split_histories(rows, "val"), 4).toarray()
    assert matrix.tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]  # binary, row = user_idx
    assert history_matrix(split_histories(rows, "val"), 4, last_n=1).toarray()[0].tolist() == [0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="1..2"):
        history_matrix(split_histories(rows, "val"), 2)


# Users 0, 1, 2 with histories [1, 2], [1, 2, 3], [3, 4]: item 1 and 2 share users {0, 1}, 3 is {1, 2}, 4 {2}.
KNN_ROWS = [(0, [1, 2], [], []), (1, [1, 2, 3], [], []), (2, [3, 4], [], [])]
R = 1 / np.sqrt(2)
KNN_COSINE = np.array([  # cosine between the item columns, diagonal 0; row/column 0 is padding
    [0, 0, 0, 0, 0],
    [0, 0, 1.0, 0.5, 0],
    [0, 1.0, 0, 0.5, 0],
    [0, 0.5, 0.5, 0, R],
    [0, 0, 0, R, 0],
])


def test_item_knn_similarity_on_a_hand_case() -> None:
    matrix = history_matrix(split_histories(_sequences(KNN_ROWS), "val"), 4)
    np.testing.assert_allclose(item_knn_similarity(matrix, 10).toarray(), KNN_COSINE, rtol=1e-6)
    top1 = np.zeros_like(KNN_COSINE)  # each item keeps its single most similar item
    top1[1, 2] = top1[2, 1] = 1.0
    top1[3, 4] = top1[4, 3] = R
    np.testing.assert_allclose(item_knn_similarity(matrix, 1).toarray(), top1, rtol=1e-6)


def test_item_knn_scores_sum_similarities_to_the_history() -> None:
    histories = split_histories(_sequences(KNN_ROWS), "val")
    users = torch.tensor([2, 0])
    full = item_knn_scorer(histories, 4, n_neighbors=10)(torch.zeros(2, 1, dtype=torch.long), users)
    assert full[:, 0].tolist() == [float("-inf")] * 2
    np.testing.assert_allclose(full[:, 1:].numpy(), [[0.5, 0.5, R, R], [1.0, 1.0, 1.0, 0.0]], rtol=1e-6)
    last = item_knn_scorer(histories, 4, n_neighbors=10, last_n=1)(torch.zeros(2, 1, dtype=torch.long), users)
    np.testing.assert_allclose(last[:, 1:].numpy(), [[0, 0, R, 0], [1.0, 0, 0.5, 0]], rtol=1e-6)


def test_ease_equals_a_direct_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, lam = 30, 7, 3.0
    x = (rng.random((n_users, n_items)) < 0.4).astype(np.float64)  # (U, I) items 1..I as columns 0..I-1
    p = np.linalg.inv(x.T @ x + lam * np.eye(n_items))
    b = np.eye(n_items) - p / np.diag(p)  # column j divided by P_jj
    histories = pl.DataFrame(
        {"user_idx": list(range(n_users)), "history": [list(np.flatnonzero(row) + 1) for row in x]},
        schema={"user_idx": pl.Int32, "history": pl.List(pl.Int32)},
    )
    weights = ease_weights(history_matrix(histories, n_items), lam)
    assert weights.shape == (n_items + 1, n_items + 1) and not weights[0].any() and not weights[:, 0].any()
    np.testing.assert_allclose(weights[1:, 1:].numpy(), b, atol=1e-6)
    assert np.allclose(np.diag(b), 0)
    users = torch.tensor([4, 0, 17])
    scores = ease_scorer(histories, n_items, lam)(torch.zeros(3, 1, dtype=torch.long), users)
    np.testing.assert_allclose(scores[:, 1:].numpy(), x[users.numpy()] @ b, atol=1e-5)
    assert bool((scores[:, 0] == float("-inf")).all())


def planted_group_sequences(n_users: int = 300, n_groups: int = 6, group_size: int = 20, seed: int = 0):
    """Items come in groups; each user draws 8 items from one group plus 2 globally popular ones (Zipf);
    the val and test targets are further items of the user's group."""
    rng = random.Random(seed)
    n_items = n_groups * group_size
    popular = [1.0 / (i + 1) for i in range(n_items)]
    rows = []
    for u in range(n_users):
        g = rng.randrange(n_groups)
        own = rng.sample(range(g * group_size + 1, (g + 1) * group_size + 1), 10)
        noise = rng.choices(range(1, n_items + 1), weights=popular, k=2)
        rows.append((u, own[:4] + noise + own[4:8], [own[8]], [own[9]]))
    return _sequences(rows), n_items


def test_item_knn_and_ease_beat_popularity_on_planted_groups() -> None:
    seqs, n_items = planted_group_sequences()
    cfg = EvaluateConfig(ks=(10,), knn_neighbors=20, ease_lambda=10.0)
    got = evaluate_all(_MeanModel(n_items), seqs, n_items, None, cfg, max_len=10)
    pop = got["popularity"]["ndcg_at_10"]
    assert got["item_knn"]["ndcg_at_10"] > pop + 0.2, got
    assert got["ease"]["ndcg_at_10"] > pop + 0.2, got


@pytest.mark.parametrize("case", ["ties", "inf", "nan", "neg_inf_target"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shared_ranking_pass_equals_the_reference(case: str, seed: int) -> None:
    """evaluate_scorer's one-copy path (ranks and top items from one masked copy of the scores) against
    target_ranks and _top_items computed separately: heavily tied integer scores, repeated and padding targets,
    targets also in the history; +inf scores; and the NaN / -inf-target cases that take the reference path."""
    from recsys.evaluation import _top_items, ranks_and_top
    from recsys.metrics import exclusion_mask, target_ranks

    g = torch.Generator().manual_seed(seed)
    b, n_items, m = 41, 70, 4
    scores = torch.randint(0, 6, (b, n_items + 1), generator=g).float()  # ~12 items per score value
    targets = torch.randint(0, n_items + 1, (b, m), generator=g)  # 0 = padding; repeats happen
    targets[:, 1] = targets[:, 0].roll(1)  # some rows repeat a target
    history = torch.randint(0, n_items + 1, (b, 9), generator=g)
    history[:, 0] = targets[:, 0]  # a target in the history stays a candidate (keep)
    if case == "inf":
        scores[torch.rand(scores.shape, generator=g) < 0.05] = float("inf")
    if case == "nan":
        scores[torch.rand(scores.shape, generator=g) < 0.05] = float("nan")
    if case == "neg_inf_target":
        scores[0, targets[0, 0]] = float("-inf")
    exclude = exclusion_mask(history, n_items, keep=targets)
    ranks, top = ranks_and_top(scores, targets, exclude, 10)
    assert torch.equal(ranks, target_ranks(scores, targets, exclude))
    assert torch.equal(top, _top_items(scores, exclude, 10))
    assert (ranks >= 0).any() and (ranks == -1).any()  # both valid and padding / repeated targets occur


def test_standard_errors_and_paired_deltas_against_planted_ranks() -> None:
    # Users 0-5 saw item 8; their val targets 1, 2, 3, 5, 6, 7. Scorer A ranks item i at i - 1 among the
    # unseen items (score -i), scorer B at 7 - i (score +i): planted 0-based ranks, so per-user NDCG@5 is known.
    targets = [1, 2, 3, 5, 6, 7]
    es = build_eval_set(_sequences([(u, [8], [t], []) for u, t in enumerate(targets)]), "val", max_len=2)
    items = torch.arange(N_ITEMS + 1.0)
    a = accumulate_scorer(_table_scorer((-items).repeat(6, 1)), es, N_ITEMS, (5,), batch_size=4)
    b = accumulate_scorer(_table_scorer(items.repeat(6, 1)), es, N_ITEMS, (5,), batch_size=2)

    def ndcg(ranks: list[int]) -> np.ndarray:
        return np.array([1 / np.log2(r + 2) if r < 5 else 0.0 for r in ranks])

    na, nb = ndcg([t - 1 for t in targets]), ndcg([7 - t for t in targets])
    got = a.result()
    assert got["ndcg_at_5"] == pytest.approx(na.mean(), rel=1e-6)
    assert got["ndcg_at_5_se"] == pytest.approx(na.std(ddof=1) / np.sqrt(6), rel=1e-6)
    assert got["hr_at_5_se"] == pytest.approx(np.array([1, 1, 1, 1, 0, 0]).std(ddof=1) / np.sqrt(6), rel=1e-6)
    deltas = paired_deltas(a, b)
    assert deltas["delta_ndcg_at_5"] == pytest.approx((na - nb).mean(), rel=1e-6)
    assert deltas["delta_ndcg_at_5_se"] == pytest.approx((na - nb).std(ddof=1) / np.sqrt(6), rel=1e-6)
    # Pairing matters: the unpaired error of the difference would be sqrt(se_a^2 + se_b^2).
    unpaired = np.sqrt(na.var(ddof=1) / 6 + nb.var(ddof=1) / 6)
    assert abs(deltas["delta_ndcg_at_5_se"] - unpaired) > 1e-3


def test_one_user_has_no_standard_error_and_other_users_cannot_be_paired(sequences: pl.DataFrame) -> None:
    es = build_eval_set(_sequences([(0, [8], [1], [])]), "val", max_len=2)
    one = accumulate_scorer(_table_scorer(torch.zeros(1, N_ITEMS + 1)), es, N_ITEMS, (5,), batch_size=1)
    assert "ndcg_at_5" in one.result() and "ndcg_at_5_se" not in one.result()
    five = build_eval_set(sequences, "test", max_len=3)
    other = accumulate_scorer(_table_scorer(torch.zeros(5, N_ITEMS + 1)), five, N_ITEMS, (5,), batch_size=2)
    with pytest.raises(ValueError, match="same users: 1 vs 5"):
        paired_deltas(one, other)


def test_history_segments_against_planted_ranks() -> None:
    # (history, val target): history lengths 1, 1, 2, 3, 4, 5, 5. Scorer A scores item i by -i, B by +i, so a
    # target's 0-based rank is the number of unseen items scored above it: a direct count is the oracle.
    rows = [([8], 1), ([8], 3), ([8, 2], 5), ([8, 1, 2], 6), ([8, 1, 2, 3], 7), ([8, 1, 2, 3, 4], 6),
            ([8, 7, 6, 5, 4], 2)]
    es = build_eval_set(_sequences([(u, h, [t], []) for u, (h, t) in enumerate(rows)]), "val", max_len=6)
    items = torch.arange(N_ITEMS + 1.0)
    a = accumulate_scorer(_table_scorer((-items).repeat(7, 1)), es, N_ITEMS, (5,), batch_size=3)
    b = accumulate_scorer(_table_scorer(items.repeat(7, 1)), es, N_ITEMS, (5,), batch_size=7)

    def ndcg(above) -> np.ndarray:  # above(i, t): item i scores above target t
        ranks = [sum(1 for i in range(1, N_ITEMS + 1) if i not in h and i != t and above(i, t)) for h, t in rows]
        return np.array([1 / np.log2(r + 2) if r < 5 else 0.0 for r in ranks])

    na, nb = ndcg(lambda i, t: i < t), ndcg(lambda i, t: i > t)
    segments = history_segments(es, (2, 4))
    assert list(segments) == ["1", "2-3", "4+"]
    groups = {"1": [0, 1], "2-3": [2, 3], "4+": [4, 5, 6]}
    for label, users in groups.items():
        assert segments[label].nonzero().flatten().tolist() == users
    got = segment_results(a, None, segments)
    versus_a = segment_results(b, a, segments)  # B as a baseline of model A
    for label, users in groups.items():
        assert got[label]["n_users"] == len(users)
        assert got[label]["ndcg_at_5"] == pytest.approx(na[users].mean(), rel=1e-6), label
        assert got[label]["ndcg_at_5_se"] == pytest.approx(na[users].std(ddof=1) / np.sqrt(len(users)), rel=1e-6)
        assert "delta_ndcg_at_5" not in got[label]
        diff = na[users] - nb[users]
        assert versus_a[label]["ndcg_at_5"] == pytest.approx(nb[users].mean(), rel=1e-6)
        assert versus_a[label]["delta_ndcg_at_5"] == pytest.approx(diff.mean(), rel=1e-6, abs=1e-12)
        assert versus_a[label]["delta_ndcg_at_5_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(users)),
                                                                      rel=1e-6, abs=1e-12)
    assert history_segments(es, ()) == {}


def test_evaluate_all_segments_add_up_to_the_whole(sequences: pl.DataFrame) -> None:
    cfg = EvaluateConfig(ks=(5,), baselines=("popularity",), history_segments=(2, 4))
    got = evaluate_all(_MeanModel(N_ITEMS), sequences, N_ITEMS, None, cfg, max_len=3)
    for name in ("model", "popularity"):
        parts = got[name]["segments"]
        assert sum(p["n_users"] for p in parts.values()) == got[name]["n_users"]
        for key in ("ndcg_at_5", "hr_at_5", "mrr_at_5"):
            total = sum(p[key] * p["n_users"] for p in parts.values() if p["n_users"])
            assert total / got[name]["n_users"] == pytest.approx(got[name][key], rel=1e-9), (name, key)
    assert "delta_ndcg_at_5" in got["popularity"]["segments"]["4+"]
    assert "segments" not in evaluate_all(_MeanModel(N_ITEMS), sequences, N_ITEMS, None,
                                          EvaluateConfig(ks=(5,), baselines=()), max_len=3)["model"]


def test_history_segments_must_ascend() -> None:
    for bad in ((5, 5), (20, 5), (1, 5)):
        with pytest.raises(ValueError, match="evaluate.history_segments must be strictly ascending"):
            EvaluateConfig(history_segments=bad)


def test_seen_items_compete_when_not_excluded() -> None:
    # Scores -i: item 1 is best. Oracle: a target's 0-based rank is the number of items scored above it, every
    # other item counting (exclude_seen=False), or only the unseen ones (the standard protocol).
    rows = [([1, 2], 3), ([1], 1), ([4, 5], 6), ([2, 3, 4], 1), ([6], 2)]  # user 1 re-consumes item 1
    es = build_eval_set(_sequences([(u, h, [t], []) for u, (h, t) in enumerate(rows)]), "val", max_len=3)
    scorer = _table_scorer((-torch.arange(N_ITEMS + 1.0)).repeat(len(rows), 1))

    def ndcg(exclude_seen: bool) -> float:
        ranks = [sum(1 for i in range(1, t) if not (exclude_seen and i in h)) for h, t in rows]
        return float(np.mean([1 / np.log2(r + 2) if r < 2 else 0.0 for r in ranks]))

    for exclude_seen in (True, False):
        got = evaluate_scorer(scorer, ranking_set(es, exclude_seen), N_ITEMS, (2,))
        assert got["ndcg_at_2"] == pytest.approx(ndcg(exclude_seen), rel=1e-6), exclude_seen
    assert ndcg(True) != ndcg(False)
    assert ranking_set(es, True) is es and torch.equal(ranking_set(es, False).inputs, es.inputs)


def test_evaluate_all_without_excluding_seen_items(sequences: pl.DataFrame) -> None:
    model = _MeanModel(N_ITEMS)
    cfg = EvaluateConfig(split="test", ks=(1, 5), batch_size=2, exclude_seen=False, history_segments=(3,))
    got = evaluate_all(model, sequences, N_ITEMS, None, cfg, max_len=3)
    pop = popularity_scorer(popularity_scores(sequences, N_ITEMS, "test"))
    es = build_eval_set(sequences, "test", 3)
    want = evaluate_scorer(pop, ranking_set(es, False), N_ITEMS, (1, 5))
    assert {k: v for k, v in got["popularity"].items() if not k.startswith("delta_") and k != "segments"} == want
    assert want != evaluate_scorer(pop, es, N_ITEMS, (1, 5))  # the flag changes the numbers here
    # segments still split users by their history length
    assert {k: v["n_users"] for k, v in got["model"]["segments"].items()} == {"1-2": 2.0, "3+": 3.0}


def test_repeat_scores_the_own_history_by_recency_then_popularity() -> None:
    histories = pl.DataFrame({"user_idx": [0, 1], "history": [[3, 1, 3, 5], []]},
                             schema={"user_idx": pl.Int32, "history": pl.List(pl.Int32)})
    pop = torch.tensor([float("-inf"), 4, 0, 9, 1, 2, 7, 0, 3])  # (N_ITEMS + 1,)
    scores = repeat_scorer(histories, N_ITEMS, pop)(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    # user 0: 5 (last at position 3), 3 (last at 2), 1 (at 1), then 6, 8, 4 by popularity; user 1: popularity
    order = [int(i) for i in scores[0, 1:].argsort(descending=True, stable=True) + 1]
    assert order[:6] == [5, 3, 1, 6, 8, 4]
    assert scores[0, 5] == 5.0 and scores[0, 3] == 4.0 and scores[0, 1] == 3.0 and scores[0, 0] == float("-inf")
    assert torch.equal(scores[1, 1:].argsort(descending=True, stable=True), pop[1:].argsort(descending=True,
                                                                                            stable=True))
    assert float(scores[1, 1:].max()) < 1.0 <= float(scores[0, 1])


def test_repeat_baseline_against_popularity(sequences: pl.DataFrame) -> None:
    model = _MeanModel(N_ITEMS)
    # The config refuses repeat with the history excluded (a leak on re-consumed targets, tested in
    # test_exclude_seen); the library still scores it, which this hand count pins down.
    cfg = EvaluateConfig(split="test", ks=(1, 5), baselines=("popularity", "repeat"), exclude_seen=False)
    fresh = sequences.filter(pl.col("user_idx").is_in([0, 2, 3]))  # no test target seen before
    got = evaluate_all(model, fresh, N_ITEMS, None, cfg.model_copy(update={"exclude_seen": True}), max_len=3)
    assert {k: v for k, v in got["repeat"].items() if not k.startswith("delta")} == {
        k: v for k, v in got["popularity"].items() if not k.startswith("delta")}
    # Hand count of HR@1. Popularity when test is predicted counts train and val events: items 1, 2, 3 three
    # times, 4 twice, 5, 7, 8 once. Re-consumed targets, the last item of their history (user 1's 4, user 4's
    # 3), are first for repeat under either protocol (the target itself is never excluded). With the history
    # excluded, user 4's 3 is also the most popular of its unseen items, but user 3's 2 (history [1]) ties
    # with 3, and ties count against the target; with the history competing, popularity ties 1, 2, 3 for
    # every target among them, so it hits nobody.
    want = {True: {"repeat": 2 / 5, "popularity": 1 / 5}, False: {"repeat": 2 / 5, "popularity": 0.0}}
    for exclude_seen, hr in want.items():
        got = evaluate_all(model, sequences, N_ITEMS, None, cfg.model_copy(update={"exclude_seen": exclude_seen}),
                           max_len=3)
        assert {name: got[name]["hr_at_1"] for name in hr} == pytest.approx(hr), exclude_seen


def test_type_segments_group_users_by_their_targets_type() -> None:
    """Users by the type of their (first) val target: the segment means are those users' direct NDCG."""
    from features.schema import SEQUENCE_TYPES
    from recsys.evaluation import type_segments

    rows = [([8], 1, 2), ([8], 3, 1), ([8, 2], 5, 2), ([8, 1, 2], 6, 0), ([8, 1, 2, 3], 7, 1), ([8, 7], 2, 2)]
    seqs = _sequences([(u, h, [t], []) for u, (h, t, _) in enumerate(rows)]).with_columns(
        pl.Series("train_types", [[1] * len(h) for h, _, _ in rows], dtype=pl.List(pl.Int16)),
        pl.Series("val_types", [[k] for _, _, k in rows], dtype=pl.List(pl.Int16)),
        pl.Series("test_types", [[]] * len(rows), dtype=pl.List(pl.Int16)))
    assert set(SEQUENCE_TYPES) <= set(seqs.columns)
    types = pl.DataFrame({"event_type": ["buy", "cart", "view"], "type_idx": [1, 2, 3], "n_events": [1, 1, 1]},
                         schema={"event_type": pl.String, "type_idx": pl.Int16, "n_events": pl.Int64})
    es = build_eval_set(seqs, "val", max_len=6)
    segments = type_segments(es, types)
    assert list(segments) == ["buy", "cart", "(none)"]  # no target is a view: no segment
    assert {k: v.nonzero().flatten().tolist() for k, v in segments.items()} == {
        "buy": [1, 4], "cart": [0, 2, 5], "(none)": [3]}
    totals = accumulate_scorer(_table_scorer((-torch.arange(N_ITEMS + 1.0)).repeat(6, 1)), es, N_ITEMS, (5,), 2)
    ranks = [sum(1 for i in range(1, N_ITEMS + 1) if i not in h and i != t and i < t) for h, t, _ in rows]
    direct = np.array([1 / np.log2(r + 2) if r < 5 else 0.0 for r in ranks])
    got = segment_results(totals, None, segments)
    for label, users in (("buy", [1, 4]), ("cart", [0, 2, 5]), ("(none)", [3])):
        assert got[label]["n_users"] == len(users)
        assert got[label]["ndcg_at_5"] == pytest.approx(direct[users].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="data.event_type_col"):
        type_segments(build_eval_set(_sequences([(0, [8], [1], [])]), "val", 6), types)
    cfg = EvaluateConfig(split="val", ks=(5,), baselines=("popularity",), type_segments=True)
    report = evaluate_all(_MeanModel(N_ITEMS), seqs, N_ITEMS, None, cfg, max_len=6, event_types=types)
    for name in ("model", "popularity"):
        assert list(report[name]["type_segments"]) == ["buy", "cart", "(none)"]
        total = sum(p["ndcg_at_5"] * p["n_users"] for p in report[name]["type_segments"].values())
        assert total / report[name]["n_users"] == pytest.approx(report[name]["ndcg_at_5"], rel=1e-9)


def test_users_with_a_target_but_no_history_are_counted_not_silently_left_out(
    sequences: pl.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a time split, users whose events all fall after the cutoff have a target and no history: no scorer
    ranks them, and the report only showed a smaller n_users."""
    cold = pl.concat([sequences, _sequences([(5, [], [], [3]), (6, [], [], [1, 2]), (7, [], [], [])])])
    cfg = EvaluateConfig(ks=(5,), baselines=("popularity",))
    with caplog.at_level(logging.WARNING, logger="recsys.evaluation"):
        got = evaluate_all(_MeanModel(N_ITEMS), cold, N_ITEMS, None, cfg, max_len=3)
    assert got["model"]["users_without_history"] == 2 and got["model"]["n_users"] == 5  # user 7 has no target
    assert "2 users with a test target have no history before it" in caplog.text
    val = evaluate_all(_MeanModel(N_ITEMS), cold, N_ITEMS, None, EvaluateConfig(ks=(5,), baselines=(), split="val"),
                       max_len=3)["model"]
    assert val["users_without_history"] == 1 and val["n_users"] == 3  # user 3: a val target, no train items


def test_one_heavy_user_widens_only_its_own_batch_and_changes_no_metric() -> None:
    """History and targets were padded to the longest list of ALL users: one user with 2,000 events and 300
    targets made a (U, 2001) history and (U, 300) targets, 300 ranking passes for every batch."""
    rows = [(u, [1 + (u + j) % 40 for j in range(3)], [], [41 + u % 9]) for u in range(12)]
    rows[5] = (5, [1 + j % 40 for j in range(2000)], [], list(range(41, 341)))
    seqs = _sequences(rows)
    es = build_eval_set(seqs, "test", 4)
    assert isinstance(es.history, RaggedItems) and es.history.values.numel() == 11 * 3 + 2000
    assert es.history[0:4].shape == (4, 3) and es.targets[0:4].shape == (4, 1)  # users 0-3: not padded to 2000
    assert es.history[4:8].shape == (4, 2000) and es.targets[4:8].shape == (4, 300)
    assert es.targets[5:6].tolist() == [list(range(41, 341))] and es.history[5:6][0, -3:].tolist() == [38, 39, 40]
    torch.manual_seed(0)
    model = _MeanModel(400)
    results = [evaluate_all(model, seqs, 400, None, EvaluateConfig(ks=(5, 20), baselines=("popularity",),
                                                                   batch_size=b), max_len=4) for b in (1, 4, 1024)]
    assert results[0] == results[1] == results[2] and results[0]["model"]["n_users"] == 12


def test_re_consumed_targets_are_counted_and_warned_about_when_seen_items_are_excluded(
    sequences: pl.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    """With the history excluded a re-consumed target is still ranked: a repeat-heavy split (Taobao: 60 % of test
    targets) rewards any scorer that favours the user's own items, so the report counts them and warns."""
    from recsys.evaluation import seen_targets

    # test targets by user: 0 {6}, 1 {4} seen, 2 {8}, 3 {2}, 4 {3 seen, 5}; val: none seen, user 3 has no history
    assert seen_targets(sequences, "test") == (2, 6)
    assert seen_targets(sequences, "val") == (0, 3)
    cfg = EvaluateConfig(ks=(5,), baselines=())
    with caplog.at_level(logging.WARNING, logger="recsys.evaluation"):
        got = evaluate_all(_MeanModel(N_ITEMS), sequences, N_ITEMS, None, cfg, max_len=3)["model"]
    assert got["seen_targets"] == 2
    assert "2 of the 6 test targets (33.3 %) are items the user already had" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recsys.evaluation"):
        competing = evaluate_all(_MeanModel(N_ITEMS), sequences, N_ITEMS, None,
                                 cfg.model_copy(update={"exclude_seen": False}), max_len=3)["model"]
        evaluate_all(_MeanModel(N_ITEMS), sequences, N_ITEMS, None, cfg.model_copy(update={"split": "val"}), max_len=3)
    assert competing["seen_targets"] == 2 and "already had" not in caplog.text

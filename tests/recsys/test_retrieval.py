"""FAISS retrieval checked against exact numpy search."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from recsys.data import RaggedItems
from recsys.retrieval import ann_recall, build_index, search_top_k, tune_index
from recsys.topk import top_k_blocked


def _vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _exact_top_k(items: np.ndarray, users: np.ndarray, k: int, seen: list[np.ndarray] | None = None):
    scores = users.astype(np.float64) @ items.T.astype(np.float64)  # (U, I)
    for u, s in enumerate(seen or []):
        scores[u, s] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _random_seen(n_users: int, n_items: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n_items, size=rng.integers(0, 30), replace=False) for _ in range(n_users)]


def test_flat_equals_exact_numpy_top_k() -> None:
    items, users = _vectors(300), _vectors(40, seed=1)
    got = search_top_k(build_index(items), users, k=10, batch_size=16)
    np.testing.assert_array_equal(got.ids, _exact_top_k(items, users, 10))
    want_scores = np.take_along_axis(users @ items.T, got.ids, axis=1)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5, atol=1e-5)
    assert got.ids.dtype == np.int64 and got.scores.dtype == np.float32
    assert got.stats == {"users": 40, "batches": 3, "fallback_users": 0, "short_users": 0}


def test_seen_items_are_never_returned_and_both_seen_forms_agree() -> None:
    items, users = _vectors(300), _vectors(50, seed=1)
    seen = _random_seen(50, 300)
    got = search_top_k(build_index(items), users, k=20, seen=seen, batch_size=7)
    np.testing.assert_array_equal(got.ids, _exact_top_k(items, users, 20, seen))
    for row, s in zip(got.ids, seen, strict=True):
        assert not set(row) & set(s.tolist())
    padded = np.full((50, max(len(s) for s in seen)), -1)
    for u, s in enumerate(seen):
        padded[u, : len(s)] = s
    np.testing.assert_array_equal(search_top_k(build_index(items), users, 20, seen=padded).ids, got.ids)


@pytest.mark.parametrize(
    ("factory", "nprobe", "ef_search"), [("IVF16,Flat", 12, None), ("HNSW16", None, 128)]
)
def test_ann_with_generous_parameters_matches_exact(factory: str, nprobe, ef_search) -> None:
    items, users = _vectors(2000), _vectors(100, seed=1)
    seen = _random_seen(100, 2000)
    index = build_index(items, factory, nprobe=nprobe, ef_search=ef_search)
    got = search_top_k(index, users, k=10, seen=seen)
    want = _exact_top_k(items, users, 10, seen)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.ids, want, strict=True)])
    assert recall >= 0.95
    assert ann_recall(index, items, users, 10, seen) == pytest.approx(recall)
    assert (got.ids >= 0).all()


def test_a_weak_ann_is_reported_by_ann_recall() -> None:
    items, users = _vectors(2000), _vectors(100, seed=1)
    index = build_index(items, "IVF32,Flat", nprobe=1)
    assert ann_recall(index, items, users, 10) < 0.9
    assert ann_recall(build_index(items), items, users, 10) == 1.0


def test_fallback_gives_k_results_to_a_user_who_has_seen_almost_everything() -> None:
    items, users = _vectors(400), _vectors(3, seed=1)
    rng = np.random.default_rng(3)
    unseen = rng.choice(400, size=8, replace=False)
    seen = [np.setdiff1d(np.arange(400), unseen), np.array([], dtype=np.int64), np.array([0, 1])]
    index = build_index(items, "IVF16,Flat", nprobe=1)  # a probed list holds ~25 items, ~all seen
    got = search_top_k(index, users, k=5, seen=seen)
    assert got.stats["fallback_users"] >= 1 and got.stats["short_users"] == 0
    np.testing.assert_array_equal(got.ids[0], _exact_top_k(items, users[:1], 5, seen[:1])[0])
    assert (got.ids >= 0).all() and np.isfinite(got.scores).all()
    raw = search_top_k(index, users, k=5, seen=seen, fallback=False)  # the ANN alone leaves user 0 short
    assert raw.stats["short_users"] >= 1 and (raw.ids[0] == -1).any()


def test_short_rows_only_when_the_catalogue_runs_out() -> None:
    items, users = _vectors(50), _vectors(2, seed=1)
    seen = [np.arange(47), np.arange(10)]  # user 0 has 3 unseen items left
    got = search_top_k(build_index(items), users, k=5, seen=seen)
    assert sorted(got.ids[0, :3].tolist()) == [47, 48, 49]
    assert got.ids[0, 3:].tolist() == [-1, -1] and np.isneginf(got.scores[0, 3:]).all()
    assert (got.ids[1] >= 10).all() and got.stats["short_users"] == 1


def test_a_user_with_fewer_than_k_unseen_items_still_gets_all_of_them_from_a_weak_ann() -> None:
    items, users = _vectors(400), _vectors(20, seed=1)
    rng = np.random.default_rng(4)
    seen = [np.setdiff1d(np.arange(400), rng.choice(400, size=5, replace=False)) for _ in range(20)]  # 5 left
    index = build_index(items, "IVF16,Flat", nprobe=1)  # a probed list rarely holds them all
    assert search_top_k(index, users, k=10, seen=seen, fallback=False).stats["short_users"] == 20
    got = search_top_k(index, users, k=10, seen=seen)
    for row in range(20):  # every unseen item, best first, then padding
        np.testing.assert_array_equal(got.ids[row, :5], _exact_top_k(items, users[row:row + 1], 5, seen[row:row + 1])[0])
    assert (got.ids[:, 5:] == -1).all()
    assert got.stats["fallback_users"] > 0 and got.stats["short_users"] == 20  # short: only 5 exist


def test_progress_is_logged_per_batch(caplog: pytest.LogCaptureFixture) -> None:
    items, users = _vectors(100), _vectors(10, seed=1)
    with caplog.at_level(logging.INFO, logger="recsys.retrieval"):
        search_top_k(build_index(items), users, k=3, batch_size=4)
    assert sum("candidates: users" in r.message for r in caplog.records if r.name == "recsys.retrieval") == 3


def test_bad_inputs_raise_precise_errors() -> None:
    items = _vectors(100)
    with pytest.raises(ValueError, match="Bogus"):
        build_index(items, "Bogus")
    with pytest.raises(ValueError, match="nprobe"):
        build_index(items, "Flat", nprobe=4)
    with pytest.raises(ValueError, match="k=101"):
        search_top_k(build_index(items), _vectors(2), k=101)
    with pytest.raises(ValueError, match="dimension"):
        search_top_k(build_index(items), _vectors(2, dim=8), k=5)
    with pytest.raises(ValueError, match="position 100"):
        search_top_k(build_index(items), _vectors(2), k=5, seen=[np.array([100]), np.array([1])])
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((4, 2), np.nan))


@pytest.mark.parametrize(("factory", "parameter"), [("IVF64,Flat", "nprobe"), ("HNSW4", "efSearch")])
def test_tune_index_keeps_the_smallest_value_that_reaches_the_target(factory: str, parameter: str) -> None:
    items, users = _vectors(3000), _vectors(200, seed=1)
    seen = _random_seen(200, 3000)
    index = build_index(items, factory)
    got = tune_index(index, items, users, 10, 0.95, seen)
    assert got.parameter == parameter and got.reached and got.recall >= 0.95
    recall = dict(got.tried)
    assert recall[got.value] == got.recall
    assert got.value == min(v for v, r in got.tried if r >= 0.95)  # the smallest tried that reaches it
    assert all(r < 0.95 for v, r in got.tried if v < got.value)
    values = [v for v, _ in got.tried]
    hit = next(i for i, (_, r) in enumerate(got.tried) if r >= 0.95)
    assert hit >= 2 and values[1 : hit + 1] == [2 * v for v in values[:hit]]  # doubled to the first hit
    assert len(values) > hit + 1 and all(values[hit - 1] < v < values[hit] for v in values[hit + 1 :])  # bisected
    assert ann_recall(index, items, users, 10, seen) == pytest.approx(got.recall)  # left at the chosen value


def test_tune_index_takes_exact_ids_from_blocked_top_k_and_reports_an_unreachable_target() -> None:
    items, users = _vectors(2000), _vectors(100, seed=1)
    seen = _random_seen(100, 2000)
    lengths = torch.tensor([len(s) for s in seen])
    ragged = RaggedItems(torch.from_numpy(np.concatenate(seen)).int(),
                         torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    exact = top_k_blocked(torch.from_numpy(users), torch.from_numpy(items), 10, ragged).ids.numpy()
    np.testing.assert_array_equal(exact, _exact_top_k(items, users, 10, seen))
    index = build_index(items, "IVF32,Flat")
    assert tune_index(index, items, users, 10, 0.9, seen, exact_ids=exact) == tune_index(
        index, items, users, 10, 0.9, seen)
    capped = tune_index(index, items, users, 10, 1.0, seen, max_value=4)
    assert not capped.reached and capped.value == 4 and [v for v, _ in capped.tried] == [1, 2, 4]
    flat = tune_index(build_index(items), items, users, 10, 0.99, seen)
    assert flat.parameter is None and flat.recall == 1.0 and flat.reached
    with pytest.raises(ValueError, match="target_recall"):
        tune_index(index, items, users, 10, 1.5)
    with pytest.raises(ValueError, match="exact_ids has shape"):
        tune_index(index, items, users, 10, 0.9, exact_ids=exact[:, :5])


class _Spy:
    """An index that records the k of every search (faiss indexes are SWIG objects; nothing to patch)."""

    def __init__(self, index) -> None:
        self.index, self.ntotal, self.d, self.searched = index, index.ntotal, index.d, []

    def search(self, x, k):
        self.searched.append(k)
        return self.index.search(x, k)


def test_a_heavy_user_does_not_widen_its_batchs_search_and_is_answered_exactly() -> None:
    """One user who saw 3,000 items used to make the whole batch search k + 3,000 results (40,000 seen in a
    4,096-user batch: 6.5 GB); the widening is capped and a user it leaves short is scored exactly."""
    from recsys.retrieval import WIDEN_CAP

    items, users = _vectors(5000), _vectors(40, seed=1)
    seen = _random_seen(40, 5000)
    seen[3] = np.argsort(-(users[3] @ items.T))[:3000]  # the heavy user saw its own 3,000 best items
    spy = _Spy(build_index(items))
    got = search_top_k(spy, users, k=10, seen=seen, batch_size=16, item_vectors=items)
    assert spy.searched and max(spy.searched) <= 10 + 1 + WIDEN_CAP
    np.testing.assert_array_equal(got.ids, _exact_top_k(items, users, 10, seen))
    assert got.stats["fallback_users"] == 1 and got.stats["short_users"] == 0


def test_tied_items_come_by_position_whatever_the_batch() -> None:
    """Items with one vector (e.g. cold items scored from the same attributes) tie: each user gets the tied
    items of smallest position, as the evaluation orders them, alone or in any batch (the batch-mates' seen
    counts used to decide which tied items the index returned)."""
    rng = np.random.default_rng(0)
    items = rng.standard_normal((60, 8)).astype(np.float32) * 0.1
    items[20:40] = rng.standard_normal(8).astype(np.float32) * 3  # 20 identical items, far ahead of the rest
    users = np.abs(rng.standard_normal((30, 8))).astype(np.float32) * np.sign(items[20])
    seen = [np.array([21, 25]) if u % 3 == 0 else rng.choice(20, size=int(rng.integers(0, 15)), replace=False)
            for u in range(30)]
    want = [[i for i in range(20, 40) if i not in set(s.tolist())][:5] for s in seen]
    for batch in (1, 4, 30):
        got = search_top_k(build_index(items), users, k=5, seen=seen, batch_size=batch, item_vectors=items)
        assert got.ids.tolist() == want, batch


def test_a_compressed_index_returns_exact_scores_in_order() -> None:
    """PQ distances are approximate: the lists' scores are user · item again, sorted, ties by position."""
    items, users = _vectors(3000, dim=16), _vectors(50, seed=1)
    got = search_top_k(build_index(items, "IVF16,PQ4"), users, k=10, item_vectors=items)
    exact = np.take_along_axis(users @ items.T, got.ids, axis=1)
    np.testing.assert_allclose(got.scores, exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(got.scores, axis=1) <= 0).all()
    raw = search_top_k(build_index(items, "IVF16,PQ4"), users, k=10, fallback=False)  # the index's own
    assert np.abs(raw.scores - np.take_along_axis(users @ items.T, raw.ids, axis=1)).max() > 0.1


def test_recall_without_an_unseen_item_in_the_sample_is_none_not_a_crash() -> None:
    """A sample of users who saw every item (e.g. of a 2-item allow list) used to raise ValueError."""
    items, users = _vectors(5), _vectors(4, seed=1)
    seen = [np.arange(5)] * 4
    index = build_index(items, "HNSW4")
    assert ann_recall(index, items, users, 3, seen) is None
    assert tune_index(index, items, users, 3, 0.9, seen) == (None, None, None, False, ())
    got = search_top_k(index, users, 3, seen, item_vectors=items)
    assert (got.ids == -1).all() and got.stats["short_users"] == 4


@pytest.mark.parametrize("factory", ["RR16,HNSW8", "HNSW8,Refine(Flat)"])
def test_target_recall_tunes_an_hnsw_behind_a_transform_or_a_refinement(factory: str) -> None:
    """tune_index recognised a bare HNSW only: a wrapped one was left at its default (recall 0.49)."""
    items, users = _vectors(2000), _vectors(100, seed=1)
    got = tune_index(build_index(items, factory), items, users, 10, 0.95)
    assert got.parameter == "efSearch" and got.reached and got.recall >= 0.95


def test_recall_truth_and_measure_hold_for_users_whose_best_items_are_mostly_seen() -> None:
    """Each user saw their 1,100 best items (more than the search widens past k): the exact reference was a
    Flat search capped at k + 1,024 results, which found no unseen item at all, so tuning was skipped ("no user
    has an unseen item") and ann_recall returned None (the min_recall gate skipped). The reference is now the
    blocked exact top k, and recall is measured on the lists the job publishes (exact fallback included)."""
    rng = np.random.default_rng(0)
    items = rng.standard_normal((3000, 16)).astype(np.float32)
    users = rng.standard_normal((20, 16)).astype(np.float32)
    seen = [np.argsort(-(items @ u))[:1100] for u in users]
    index = build_index(items, "IVF32,Flat", nprobe=1)
    tuning = tune_index(index, items, users, 10, 0.95, seen)
    assert tuning.parameter == "nprobe" and tuning.reached and tuning.recall >= 0.95
    published = search_top_k(index, users, 10, seen, item_vectors=items).ids
    values = torch.from_numpy(np.concatenate(seen).astype(np.int32))
    exact = top_k_blocked(torch.from_numpy(users), torch.from_numpy(items), 10,
                          RaggedItems(values, torch.arange(0, 1100 * 21, 1100))).ids.numpy()
    true_recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, published, strict=True)]))
    assert ann_recall(index, items, users, 10, seen) == pytest.approx(true_recall)
    faiss_nprobe_1 = build_index(items, "IVF32,Flat", nprobe=1)
    assert ann_recall(faiss_nprobe_1, items, users, 10, seen) is not None  # measured, not skipped


def test_a_users_list_does_not_depend_on_the_other_users_of_its_batch() -> None:
    """A Refine index's leading results change with the number of results asked for, and that number was set by
    the heaviest user of the batch: one user with 400 seen items changed 48 of 50 other users' lists (so
    shards differed from the whole night, and a recall sample measured other lists than those published)."""
    rng = np.random.default_rng(0)
    items, users = rng.standard_normal((4000, 16)).astype(np.float32), rng.standard_normal((50, 16)).astype(np.float32)
    seen = [rng.choice(4000, 6, replace=False) for _ in range(50)]
    index = build_index(items, "IVF64,PQ4,Refine(Flat)", nprobe=64)
    alone = search_top_k(index, users, 10, seen, item_vectors=items)
    heavy = rng.choice(4000, 400, replace=False)
    beside = search_top_k(index, np.vstack([users, users[:1]]), 10, [*seen, heavy], item_vectors=items)
    np.testing.assert_array_equal(beside.ids[:50], alone.ids)
    one_by_one = [search_top_k(index, users[i : i + 1], 10, [seen[i]], item_vectors=items).ids[0] for i in range(5)]
    np.testing.assert_array_equal(np.stack(one_by_one), alone.ids[:5])

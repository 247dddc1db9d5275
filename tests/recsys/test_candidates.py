"""Candidates from a model OLDER than the features: ids mapped through the model's own maps, exact top-K
checked against a direct scoring of the catalogue, unknown items never recommended, popularity fallback."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
import torch

from features.artifacts import FeatureSet
from features.readers import InputDataError
from features.schema import EVENT_TYPE_MAP, SEQUENCE_TYPES, SEQUENCES
from recsys.candidates import TrainedModel, generate_candidates, popular_top_k, select_active, user_vectors
from recsys.config import CandidatesConfig, ConfigError, build_config
from recsys.model import SASRec

K = 3


@pytest.fixture(scope="module")
def setup() -> tuple[TrainedModel, FeatureSet]:
    torch.manual_seed(0)
    model = SASRec(n_items=6, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).eval()
    # The model's catalogue: item_id 10..60 at item_idx 1..6; users 1 and 2.
    model_items = pl.DataFrame({"item_id": [10, 20, 30, 40, 50, 60], "item_idx": [1, 2, 3, 4, 5, 6],
                                "train_count": [5, 9, 9, 1, 3, 2]},
                               schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})
    model_users = pl.DataFrame({"user_id": [1, 2], "user_idx": [0, 1]},
                               schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    # Newer features: other indices for the same ids, items 70 and 80 the model never saw, users 3 and 4.
    item_map = pl.DataFrame({"item_id": [30, 20, 10, 70, 80], "item_idx": [1, 2, 3, 4, 5],
                             "train_count": [1, 1, 1, 1, 1]},
                            schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})
    user_map = pl.DataFrame({"user_id": [1, 2, 3, 4], "user_idx": [0, 1, 2, 3]},
                            schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    lists = pl.List(pl.Int32)
    sequences = pl.DataFrame(
        {"user_idx": [0, 1, 2, 3],
         "train_items": [[3], [1], [2, 3], [4]],  # user 1: 10, then 20 (val), then 70 (test)
         "val_items": [[2], [], [], [5]],
         "test_items": [[4], [], [], []]},
        schema={"user_idx": pl.Int32, "train_items": lists, "val_items": lists, "test_items": lists},
    )
    feats = FeatureSet(sequences, user_map, item_map, {"n_users": 4, "n_items": 5})
    return TrainedModel(model, model_users, model_items), feats


def _oracle(model: SASRec, history: list[int]) -> list[int]:
    """Top-K model item_idx by a direct dot product with every item, seen ones excluded."""
    with torch.no_grad():
        h = model(torch.tensor([history]))[0, -1]  # (D,)
        scores = model.score(h)[1:].numpy()  # (I,) row r = item_idx r + 1
    scores[np.asarray(history) - 1] = -np.inf
    return [int(i) + 1 for i in np.argsort(-scores, kind="stable")[:K]]


def test_ids_go_through_the_models_own_maps(setup):
    trained, feats = setup
    table, stats = generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10))
    to_id = dict(zip(trained.item_map["item_idx"], trained.item_map["item_id"], strict=True))
    got = {u: g["item_id"].to_list() for (u,), g in table.group_by("user_id")}
    # Histories in the MODEL's indices, unknown 70 dropped: user 1 → [10, 20], 2 → [30], 3 → [20, 10].
    for user, history in ((1, [1, 2]), (2, [3]), (3, [2, 1])):
        assert got[user] == [to_id[i] for i in _oracle(trained.model, history)], user
    assert not set(table["item_id"].to_list()) & {70, 80}
    assert table.filter(pl.col("user_id") == 1)["item_id"].is_in([10, 20]).sum() == 0  # seen excluded
    assert stats["users"] == 4 and stats["users_scored"] == 3
    assert stats["users_unknown_to_model"] == 2  # 3 is scored from its history, 4 falls back
    assert stats["unknown_items"] == 2 and stats["unknown_item_events"] == 3
    assert stats["model_items_not_in_features"] == 3


def test_user_without_known_history_gets_the_popular_fallback(setup):
    trained, feats = setup
    table, stats = generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10))
    fallback = table.filter(pl.col("user_id") == 4)
    # train_count 9, 9 (tie broken by item_id), 5; score = share of the model's 29 training events.
    assert fallback["item_id"].to_list() == [20, 30, 10]
    assert fallback["rank"].to_list() == [1, 2, 3]
    assert fallback["score"].to_list() == pytest.approx([9 / 29, 9 / 29, 5 / 29])
    assert stats["fallback_users"] == 1
    assert table.group_by("user_id").len()["len"].to_list() == [K] * 4


def test_popular_fallback_excludes_seen_items(setup):
    trained, _ = setup
    users = pl.DataFrame({"user_id": [7], "seen": [[20, 10]]},
                         schema={"user_id": pl.Int64, "seen": pl.List(pl.Int64)})
    assert popular_top_k(trained.item_map, users, K, exclude_seen=True)["item_id"].to_list() == [30, 50, 60]
    assert popular_top_k(trained.item_map, users, K, exclude_seen=False)["item_id"].to_list() == [20, 30, 10]


def test_popular_fallback_equals_a_direct_reference_and_does_not_widen_for_unknown_history(monkeypatch):
    """Seen items repeated, unknown to the catalogue, or many: each user's list is the first k popular items
    (ties by item_id) it has not seen. The cross join used to take k + the LONGEST seen list of any user rows
    per user: one fallback user with 40,000 unknown items made 5,000 users x 50,000 items 15.7 GiB."""
    rng = np.random.default_rng(3)
    item_map = pl.DataFrame({"item_id": np.arange(40, dtype=np.int64), "item_idx": np.arange(1, 41, dtype=np.int32),
                             "train_count": rng.integers(0, 5, 40)})
    seen = [list(rng.integers(0, 60, rng.integers(0, 30))) for _ in range(30)]  # ids 40..59 unknown, repeats
    seen[0] = list(range(1000, 6000))  # a long history of unknown items
    users = pl.DataFrame({"user_id": np.arange(30, dtype=np.int64), "seen": seen},
                         schema={"user_id": pl.Int64, "seen": pl.List(pl.Int64)})
    order = sorted(range(40), key=lambda i: (-item_map["train_count"][i], i))
    got = popular_top_k(item_map, users, 5, exclude_seen=True)
    for user, history in enumerate(seen):
        want = [i for i in order if i not in set(history)][:5]
        assert got.filter(pl.col("user_id") == user)["item_id"].to_list() == want, user
    # the cross join is users x (k + the most distinct catalogue items any user saw), not x (k + 5000)
    crossed: list[int] = []
    join = pl.DataFrame.join

    def spy(self, other, *args, **kwargs):
        out = join(self, other, *args, **kwargs)
        if kwargs.get("how") == "cross":
            crossed.append(out.height)
        return out

    monkeypatch.setattr(pl.DataFrame, "join", spy)
    popular_top_k(item_map, users, 5, exclude_seen=True)
    most_known = max(len({i for i in h if i < 40}) for h in seen)
    assert crossed == [30 * (5 + most_known)]
    popular_top_k(item_map, users.slice(0, 1), 5, exclude_seen=True)
    assert crossed[-1] == 5


def test_target_recall_tunes_the_index_before_the_search(setup):
    trained, feats = setup
    cfg = CandidatesConfig(k=K, index="HNSW4", target_recall=1.0, recall_sample=10)
    table, stats = generate_candidates(trained, feats, cfg)
    search = stats["search"]
    assert search["tuned_parameter"] == "efSearch" and search["target_reached"]
    assert search["tuned_value"] == search["tuning_tried"][-1][0] and search["tuning_recall"] == 1.0
    # every one of the 4 users is in the tuning sample: no other user to measure on, and the manifest says so
    assert search["recall_held_out"] is False and search["ann_recall_at_k"] == 1.0
    exact, _ = generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10))
    assert table.equals(exact)
    assert "tuned_parameter" not in generate_candidates(trained, feats, CandidatesConfig(k=K))[1]["search"]


def test_active_window_keeps_users_with_an_event_at_or_after_newest_minus_window(setup):
    _, feats = setup
    # Newest event 1,000; users' last events 1,000 / 900 / 899 / 100.
    last = pl.DataFrame({"user_idx": [0, 1, 2, 3], "last_timestamp": [1_000, 900, 899, 100]},
                        schema={"user_idx": pl.Int32, "last_timestamp": pl.Int64})
    for window, kept in ((100, [0, 1]), (101, [0, 1, 2]), (0, [0]), (900, [0, 1, 2, 3])):
        active, stats = select_active(feats, last, window)
        assert sorted(active.sequences["user_idx"].to_list()) == kept, window
        assert stats == {"active_window": window, "active_since": 1_000 - window,
                         "users_inactive": 4 - len(kept)}
        assert active.user_map.equals(feats.user_map) and active.item_map.equals(feats.item_map)


def test_active_window_threshold_comes_from_all_users_not_the_selected_ones(setup):
    _, feats = setup
    # user_idx 9 is in no sequence of these features (another shard's user) but holds the newest event.
    last = pl.DataFrame({"user_idx": [0, 1, 2, 3, 9], "last_timestamp": [50, 40, 30, 20, 100]},
                        schema={"user_idx": pl.Int32, "last_timestamp": pl.Int64})
    active, stats = select_active(feats, last, 60)
    assert sorted(active.sequences["user_idx"].to_list()) == [0, 1]
    assert stats["active_since"] == 40 and stats["users_inactive"] == 2


def _allowed_oracle(model: SASRec, history: list[int], allowed: list[int]) -> list[int]:
    """Top-K model item_idx among ``allowed`` (model item_idx) by a direct dot product, seen ones excluded."""
    with torch.no_grad():
        scores = model.score(model(torch.tensor([history]))[0, -1])[1:].numpy()
    keep = np.full(scores.shape, -np.inf)
    keep[np.asarray(allowed) - 1] = 0.0
    scores = scores + keep
    scores[np.asarray(history) - 1] = -np.inf
    return [int(i) + 1 for i in np.argsort(-scores, kind="stable")[:K] if np.isfinite(scores[i])]


@pytest.mark.parametrize("index", ["Flat", "HNSW4"])
def test_allowed_items_are_the_only_candidates_for_model_lists_and_fallback(setup, index):
    trained, feats = setup
    # Model items 20, 30, 40, 50 (item_idx 2..5) are allowed; 70 is known to the features only, 99 to nobody.
    allowed = pl.Series("item_id", [20, 30, 40, 50, 70, 99], dtype=pl.Int64)
    cfg = CandidatesConfig(k=K, index=index, recall_sample=10, allowed_items="allowed.csv",
                           target_recall=1.0 if index != "Flat" else None)
    table, stats = generate_candidates(trained, feats, cfg, allowed)
    to_id = dict(zip(trained.item_map["item_idx"], trained.item_map["item_id"], strict=True))
    got = {u: g["item_id"].to_list() for (u,), g in table.group_by("user_id")}
    for user, history in ((1, [1, 2]), (2, [3]), (3, [2, 1])):
        want = [to_id[i] for i in _allowed_oracle(trained.model, history, [2, 3, 4, 5])]
        assert got[user] == want, user
    assert len(got[1]) == K and len(got[3]) == K  # seen 10 / 20 do not use up allowed slots
    assert got[4] == [20, 30, 50]  # the fallback: the most popular ALLOWED items (10 has 5 events, not allowed)
    # its score stays the share of the model's 29 training events (the pyfunc model's too), not of the allowed
    # items' 9 + 9 + 3 + ...: it moved with every change of the allow list
    fallback = table.filter(pl.col("user_id") == 4)["score"].to_list()
    counts = dict(zip(trained.item_map["item_id"], trained.item_map["train_count"], strict=True))
    assert fallback == pytest.approx([counts[i] / 29 for i in (20, 30, 50)])
    assert set(table["item_id"].to_list()) <= {20, 30, 40, 50}
    assert stats["items_allowed"] == 4 and stats["allowed_items_unknown"] == 2
    everything, unrestricted = generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10))
    assert unrestricted["items_allowed"] == 6 and unrestricted["allowed_items_unknown"] == 0
    assert set(everything["item_id"].to_list()) - {20, 30, 40, 50}  # the list does change something here


def test_allowed_items_smaller_than_k_give_every_allowed_unseen_item(setup):
    trained, feats = setup
    allowed = pl.Series("item_id", [10, 60], dtype=pl.Int64)
    table, stats = generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10), allowed)
    assert stats["k_effective"] == 2
    got = {u: sorted(g["item_id"].to_list()) for (u,), g in table.group_by("user_id")}
    assert got == {1: [60], 2: [10, 60], 3: [60], 4: [10, 60]}  # users 1 and 3 have seen 10


def test_allowed_items_the_model_does_not_know_is_an_input_error(setup):
    trained, feats = setup
    allowed = pl.Series("item_id", [70, 99], dtype=pl.Int64)
    with pytest.raises(InputDataError, match=r"stock\.csv \(candidates\.allowed_items\): none of its 2 item ids"):
        generate_candidates(trained, feats, CandidatesConfig(k=K, allowed_items="stock.csv"), allowed)


def test_an_allow_list_too_short_for_the_index_is_searched_exactly(setup):
    trained, feats = setup
    allowed = pl.Series("item_id", [20, 30, 40], dtype=pl.Int64)
    ivf = CandidatesConfig(k=K, index="IVF4,Flat", nprobe=4, recall_sample=10)  # 4 lists need 4 vectors
    table, stats = generate_candidates(trained, feats, ivf, allowed)
    exact, _ = generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10), allowed)
    assert table.equals(exact) and stats["search"]["index_used"] == "Flat"
    whole = generate_candidates(trained, feats, ivf)[1]  # the whole catalogue (6 items) trains IVF4
    assert whole["search"]["index_used"] == "IVF4,Flat"
    # without an allow list too: 6 items cannot train 8 lists, and failing the night (exit 1, after every user
    # vector) helped nobody; exact search over fewer items than the index has lists is cheap
    small, stats = generate_candidates(trained, feats, CandidatesConfig(k=K, index="IVF8,Flat", recall_sample=10))
    assert small.equals(generate_candidates(trained, feats, CandidatesConfig(k=K, recall_sample=10))[0])
    assert stats["search"]["index_used"] == "Flat"


# ---- seen items competing, with the model's repeat bias -------------------------------------------------------


def _train_only(histories: list[list[int]]) -> pl.DataFrame:
    """A SEQUENCES table of train items only: user_idx i holds ``histories[i]``."""
    n, lists = len(histories), pl.List(pl.Int32)
    return pl.DataFrame({"user_idx": range(n), "train_items": histories, "val_items": [[]] * n, "test_items": [[]] * n},
                        schema={"user_idx": pl.Int32, "train_items": lists, "val_items": lists, "test_items": lists})


def _repeat_setup(n_items: int = 40, n_users: int = 30) -> tuple[TrainedModel, FeatureSet, list[list[int]]]:
    torch.manual_seed(1)
    model = SASRec(n_items=n_items, max_len=6, hidden=8, n_blocks=1, n_heads=1, dropout=0.0,
                   repeat_bias=True).eval()
    with torch.no_grad():  # strong enough to lift seen items past unseen ones, not all of them
        model.repeat_weight.copy_(torch.tensor([0.8, -0.5, 0.6, 0.3, 0.1, 0.05]))
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, n_items + 1, size=int(rng.integers(1, 12))).tolist() for _ in range(n_users)]
    items = pl.DataFrame({"item_id": [10 * i for i in range(1, n_items + 1)], "item_idx": range(1, n_items + 1),
                          "train_count": [1] * n_items},
                         schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})
    users = pl.DataFrame({"user_id": range(n_users), "user_idx": range(n_users)},
                         schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    sequences = _train_only(histories)
    feats = FeatureSet(sequences, users, items, {"n_users": n_users, "n_items": n_items})
    return TrainedModel(model, users, items), feats, histories


@pytest.mark.parametrize("index", ["Flat", "HNSW8"])
@pytest.mark.parametrize("allow", [False, True])
def test_seen_items_compete_with_their_repeat_bonus(index, allow):
    # Oracle: model.scores of the last max_len items (plain score + repeat bonus) over the whole catalogue (or
    # the allowed items), nothing excluded, top K by score.
    trained, feats, histories = _repeat_setup()
    allowed_idx = list(range(1, 41, 2)) if allow else list(range(1, 41))  # odd item_idx only
    allowed = pl.Series("item_id", [10 * i for i in allowed_idx], dtype=pl.Int64) if allow else None
    cfg = CandidatesConfig(k=5, index=index, exclude_seen=False, recall_sample=30, batch_size=7,  # several batches
                           target_recall=1.0 if index != "Flat" else None,
                           allowed_items="allowed.csv" if allow else None)
    table, _ = generate_candidates(trained, feats, cfg, allowed)
    lifted = 0
    for user, history in enumerate(histories):
        window = torch.tensor([[0] * (6 - len(history[-6:])) + history[-6:]])
        with torch.no_grad():
            scores = trained.model.scores(window)[0, 1:].numpy().astype(np.float64)  # (I,)
            plain = trained.model.score(trained.model.user_vectors(window))[0, 1:].numpy()
        mask = np.full(40, -np.inf)
        mask[np.asarray(allowed_idx) - 1] = 0.0
        want = [10 * (int(i) + 1) for i in np.argsort(-(scores + mask), kind="stable")[:5]]
        got = table.filter(pl.col("user_id") == user).sort("rank")
        assert got["item_id"].to_list() == want, user
        assert got["score"].to_numpy() == pytest.approx(np.sort(scores + mask)[::-1][:5], rel=1e-5, abs=1e-5)
        top_plain = {10 * (int(i) + 1) for i in np.argsort(-(plain + mask), kind="stable")[:5]}
        lifted += len(set(want) - top_plain)
    assert lifted > 0  # the bonus changes some lists: the test would notice a merge that ignores it


@pytest.mark.parametrize("allow", [False, True])
def test_the_recall_of_repeat_bonus_lists_is_that_of_the_published_lists(allow):
    """The recall recorded (and gated by min_recall) compared the index's PLAIN top k with the plain exact top k,
    while the job publishes lists with the repeat bonus (IVF at nprobe 1: recorded 0.24, the published lists'
    0.70). Now: the published lists against the exact search with the same bonus, on every user here."""
    trained, feats, _ = _repeat_setup(n_items=400, n_users=60)
    allowed = pl.Series("item_id", [10 * i for i in range(1, 401, 2)], dtype=pl.Int64) if allow else None
    common = {"k": 5, "exclude_seen": False, "recall_sample": 60, "allowed_items": "a.csv" if allow else None}
    exact, _ = generate_candidates(trained, feats, CandidatesConfig(index="Flat", **common), allowed)
    approx, stats = generate_candidates(trained, feats, CandidatesConfig(index="IVF16,Flat", nprobe=1, **common),
                                        allowed)
    lists = [t.group_by("user_id").agg("item_id").sort("user_id")["item_id"].to_list() for t in (exact, approx)]
    published = np.mean([len(set(e) & set(a)) for e, a in zip(*lists, strict=True)]) / 5
    assert published < 1.0  # nprobe 1 misses some: the check below can fail
    assert stats["search"]["ann_recall_at_k"] == pytest.approx(published)
    assert generate_candidates(trained, feats, CandidatesConfig(index="Flat", **common), allowed)[1][
        "search"]["ann_recall_at_k"] == 1.0


def test_target_recall_tunes_on_the_lists_published_with_the_repeat_bonus():
    """The tuner measured the index's plain top k, not the lists published (the plain top k + max_len, then the
    bonus): the recall it reached and recorded was another one. Every user here is in the tuning sample, so the
    tuning recall must be the published lists' recall against the exact (Flat) night, and reach the target."""
    trained, feats, _ = _repeat_setup(n_items=400, n_users=60)
    common = {"k": 5, "exclude_seen": False, "recall_sample": 60}
    exact, _ = generate_candidates(trained, feats, CandidatesConfig(index="Flat", **common))
    for target in (0.8, 0.9, 0.97):
        tuned, stats = generate_candidates(trained, feats, CandidatesConfig(index="IVF16,Flat", target_recall=target,
                                                                            **common))
        lists = [t.group_by("user_id").agg("item_id").sort("user_id")["item_id"].to_list() for t in (exact, tuned)]
        published = np.mean([len(set(e) & set(a)) for e, a in zip(*lists, strict=True)]) / 5
        assert stats["search"]["tuning_recall"] == pytest.approx(published), target
        assert published >= target


def test_the_min_recall_advice_names_what_to_raise():
    from recsys.candidates import recall_violations

    cfg = CandidatesConfig(k=100, min_recall=0.97, target_recall=0.95)
    search = {"ann_recall_at_k": 0.955, "recall_sample": 1000, "index_used": "IVF4096,Flat", "target_recall": 0.95,
              "tuning_sample": 1000, "tuned_parameter": "nprobe", "recall_held_out": True}
    (text,) = recall_violations(search, cfg, k=64)
    assert text.startswith("ANN recall@64 0.9550 (of the published lists, exact fallback included) on 1000 sampled")
    assert "tuned to candidates.target_recall 0.95 on 1000 other users: raise target_recall" in text
    assert "nprobe" not in text  # the tuner sets it: raising it does nothing
    assert recall_violations({**search, "ann_recall_at_k": 0.97}, cfg) == []
    (text,) = recall_violations({**search, "index_used": "PQ16", "tuned_parameter": None}, cfg)
    assert text.endswith("'PQ16': the index has no search parameter to tune (nprobe / efSearch): set a more exact "
                         "candidates.index")


def test_seen_items_excluded_make_the_repeat_bonus_irrelevant():
    trained, feats, histories = _repeat_setup()
    table, _ = generate_candidates(trained, feats, CandidatesConfig(k=5, recall_sample=30))
    for user, history in enumerate(histories):
        got = set(table.filter(pl.col("user_id") == user)["item_id"].to_list())
        assert not got & {10 * i for i in history} and len(got) == 5


# ---- the repeat bias by event type: each window event's type adds its bonus ----------------------------------

MODEL_TYPES = ["buy", "click", "view"]  # the model's type_idx 1..3
FEATURE_TYPES = ["buy", "cart", "click", "view"]  # tonight's type_idx 1..4 (name order); cart is new
TO_MODEL_TYPE = [0, 1, 0, 2, 3]  # tonight's type_idx -> the model's, by name (cart: 0, a type it never saw)


def _type_table(names: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"event_type": names, "type_idx": range(1, len(names) + 1), "n_events": [1] * len(names)},
                        schema=EVENT_TYPE_MAP)


def _typed_repeat_setup(n_items: int = 40, n_users: int = 30
                        ) -> tuple[TrainedModel, FeatureSet, list[list[int]], list[list[int]]]:
    """A repeat-bias model with event types (bonus buy +5, click -5, view +0.5) and histories with tonight's
    types, split over train / val / test. Returns the histories and their types (tonight's type_idx)."""
    trained, _, _ = _repeat_setup(n_items, n_users)  # its id maps
    torch.manual_seed(3)
    model = SASRec(n_items=n_items, max_len=6, hidden=8, n_blocks=1, n_heads=1, dropout=0.0, repeat_bias=True,
                   n_event_types=len(MODEL_TYPES)).eval()
    with torch.no_grad():
        model.repeat_weight.copy_(torch.tensor([0.8, -0.5, 0.6, 0.3, 0.1, 0.05]))
        model.repeat_type_weight.copy_(torch.tensor([5.0, -5.0, 0.5]))  # distinct: the types reorder the lists
    rng = np.random.default_rng(4)
    histories = [rng.integers(1, n_items + 1, size=int(rng.integers(1, 12))).tolist() for _ in range(n_users)]
    kinds = [rng.integers(1, len(FEATURE_TYPES) + 1, size=len(h)).tolist() for h in histories]

    def split(lists: list[list[int]], name: str) -> dict[str, list[list[int]]]:  # last two: val, test
        return {f"train_{name}": [x[:-2] for x in lists], f"val_{name}": [x[-2:-1] for x in lists],
                f"test_{name}": [x[-1:] for x in lists]}

    sequences = pl.DataFrame({"user_idx": range(n_users), **split(histories, "items"), **split(kinds, "types")},
                             schema=SEQUENCES | SEQUENCE_TYPES)
    feats = FeatureSet(sequences, trained.user_map, trained.item_map, {"n_users": n_users, "n_items": n_items},
                       event_types=_type_table(FEATURE_TYPES))
    typed = TrainedModel(model, trained.user_map, trained.item_map, event_types=_type_table(MODEL_TYPES))
    return typed, feats, histories, kinds


def _top(scores: np.ndarray, k: int) -> list[int]:
    return [10 * (int(i) + 1) for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("index", ["Flat", "HNSW8"])
def test_seen_items_compete_with_their_repeat_bonus_by_event_type(index):
    # Oracle: model.scores of the last max_len events with their types (tonight's types translated to the
    # model's by name), checked against a by-hand sum (plain + w[distance] + u[type], repeats summed) so that
    # a model that dropped the type bonus fails here too; nothing excluded, top K by score.
    trained, feats, histories, kinds = _typed_repeat_setup()
    cfg = CandidatesConfig(k=5, index=index, exclude_seen=False, recall_sample=30, batch_size=7,
                           target_recall=1.0 if index != "Flat" else None)
    table, _ = generate_candidates(trained, feats, cfg)
    model = trained.model
    w, u = model.repeat_weight.detach().numpy(), [0.0, 5.0, -5.0, 0.5]  # u[0] = 0: no type (cart)
    no_type_bonus = zero_types = 0
    for user, (history, kind) in enumerate(zip(histories, kinds, strict=True)):
        pad = [0] * (6 - len(history[-6:]))
        window = torch.tensor([pad + history[-6:]])  # (1, 6)
        window_types = torch.tensor([pad + [TO_MODEL_TYPE[t] for t in kind[-6:]]])  # (1, 6)
        with torch.no_grad():
            scores = model.scores(window, window_types)[0, 1:].numpy().astype(np.float64)  # (I,)
            plain = model.score(model.user_vectors(window, window_types))[0, 1:].numpy().astype(np.float64)
            untyped = model.scores(window, torch.zeros_like(window_types))[0, 1:].numpy()
        recency, by_hand = plain.copy(), plain.copy()
        for s, (item, t) in enumerate(zip(window[0].tolist(), window_types[0].tolist(), strict=True)):
            if item:
                recency[item - 1] += w[5 - s]
                by_hand[item - 1] += w[5 - s] + u[t]
        assert scores == pytest.approx(by_hand, rel=1e-5, abs=1e-5), user
        got = table.filter(pl.col("user_id") == user).sort("rank")
        assert got["item_id"].to_list() == _top(scores, 5), user
        assert got["score"].to_numpy() == pytest.approx(np.sort(scores)[::-1][:5], rel=1e-5, abs=1e-5)
        no_type_bonus += _top(recency, 5) != _top(scores, 5)
        zero_types += _top(untyped, 5) != _top(scores, 5)
    # the types change lists: candidates that ignored the type bonus, or the types, would fail above
    assert no_type_bonus > 0 and zero_types > 0


def test_text_item_ids_that_become_one_number_are_refused_not_listed_twice():
    """A model trained with text ids '7' and '07' (two items) scoring features with whole-number ids."""
    from recsys.config import ConfigError

    model = SASRec(n_items=4, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).eval()
    items = pl.DataFrame({"item_id": ["7", "07", "30", "40"], "item_idx": [1, 2, 3, 4], "train_count": [5, 4, 3, 2]},
                         schema={"item_id": pl.String, "item_idx": pl.Int32, "train_count": pl.Int64})
    users = pl.DataFrame({"user_id": [1], "user_idx": [0]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    feature_items = pl.DataFrame({"item_id": [7, 30, 40], "item_idx": [1, 2, 3], "train_count": [1, 1, 1]},
                                 schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})
    lists = pl.List(pl.Int32)
    sequences = pl.DataFrame({"user_idx": [0], "train_items": [[2]], "val_items": [[]], "test_items": [[]]},
                             schema={"user_idx": pl.Int32, "train_items": lists, "val_items": lists,
                                     "test_items": lists})
    feats = FeatureSet(sequences, users, feature_items, {"n_users": 1, "n_items": 3})
    with pytest.raises(ConfigError, match=r"text item ids \['7', '07'\].*data.item_id_type: string"):
        generate_candidates(TrainedModel(model, users, items), feats, CandidatesConfig(k=4, recall_sample=10))
    distinct = items.with_columns(pl.Series("item_id", ["7", "8", "30", "40"]))  # numbers once each: fine
    table, _ = generate_candidates(TrainedModel(model, users, distinct), feats, CandidatesConfig(k=3, recall_sample=10))
    assert table["item_id"].is_duplicated().sum() == 0


def _plain_catalogue(n: int) -> tuple[TrainedModel, FeatureSet]:
    torch.manual_seed(0)
    model = SASRec(n_items=n, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).eval()
    items = pl.DataFrame({"item_id": list(range(1, n + 1)), "item_idx": list(range(1, n + 1)), "train_count": [1] * n},
                         schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})
    users = pl.DataFrame({"user_id": [1, 2], "user_idx": [0, 1]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    lists = pl.List(pl.Int32)
    sequences = pl.DataFrame({"user_idx": [0, 1], "train_items": [[2], [3]], "val_items": [[], []],
                              "test_items": [[], []]},
                             schema={"user_idx": pl.Int32, "train_items": lists, "val_items": lists,
                                     "test_items": lists})
    return TrainedModel(model, users, items), FeatureSet(sequences, users, items, {"n_users": 2, "n_items": n})


def test_a_wrong_search_parameter_fails_with_an_allow_list_too():
    """Only an index that cannot be trained on the few allowed items falls back to exact search; a search
    parameter the index lacks (efSearch on IVF) is the config's error either way."""
    trained, feats = _plain_catalogue(300)
    allowed = pl.Series("item_id", list(range(1, 201)), dtype=pl.Int64)
    wrong = CandidatesConfig(k=5, index="IVF4,Flat", ef_search=64, recall_sample=10)
    for allow in (None, allowed):
        with pytest.raises(ValueError, match="has no search parameter 'efSearch'"):
            generate_candidates(trained, feats, wrong, allow)
    few = pl.Series("item_id", [1, 2, 3, 4, 5, 6], dtype=pl.Int64)  # 6 items cannot train 16 IVF lists
    _, stats = generate_candidates(trained, feats, CandidatesConfig(k=3, index="IVF16,Flat", recall_sample=10), few)
    assert stats["search"]["index_used"] == "Flat"
    # a whole catalogue too small for the index (300 items, 4096 lists) is searched exactly too: it failed the
    # night with a traceback (exit 1) after every user vector was computed
    table, stats = generate_candidates(trained, feats, CandidatesConfig(k=3, index="IVF4096,Flat", recall_sample=10))
    assert stats["search"]["index_used"] == "Flat"
    exact, _ = generate_candidates(trained, feats, CandidatesConfig(k=3, recall_sample=10))
    assert table.equals(exact)


def test_index_settings_faiss_rejects_are_config_errors_before_anything_is_read():
    """A typo in candidates.index, or nprobe on an index without lists, stopped `recsys run` with exit 1 after
    training, evaluating and promoting the model; the config refuses them (exit 2) for the served dimension."""
    for index, extra, says in [("Flatt", {}, "could not parse index string Flatt"),
                               ("Flat", {"nprobe": 8}, "has no search parameter 'nprobe'"),
                               ("HNSW32", {"nprobe": 8}, "has no search parameter 'nprobe'"),
                               ("IVF64,Flat", {"ef_search": 8}, "has no search parameter 'efSearch'"),
                               ("IVF64,PQ7", {}, "dimension 64")]:
        with pytest.raises(ConfigError, match=re.escape(says)) as err:
            build_config({"candidates": {"index": index, **extra}})
        assert "candidates.index" in str(err.value)
    assert build_config({"candidates": {"index": "IVF64,PQ8", "nprobe": 4}}).candidates.nprobe == 4
    # the dimension the model serves: 3 networks of 16 are 48 wide, which PQ32 does not divide
    with pytest.raises(ConfigError, match="dimension 48"):
        build_config({"model": {"hidden": 16, "ensemble": 3}, "candidates": {"index": "PQ32"}})
    # a model of another width than the config's (one from the registry) is refused when its index is built
    trained, feats = _plain_catalogue(50)  # 8 wide
    with pytest.raises(ConfigError, match="8-wide vectors"):
        generate_candidates(trained, feats, CandidatesConfig(k=3, index="PQ16", recall_sample=10))


def test_allowed_ids_of_the_wrong_type_are_counted_as_unknown(caplog):
    trained, feats = _plain_catalogue(10)
    allowed = pl.Series("item_id", ["1", "2", "3", "sku-9", "4.5"], dtype=pl.String)
    with caplog.at_level("WARNING"):
        _, stats = generate_candidates(trained, feats, CandidatesConfig(k=2, recall_sample=10), allowed)
    assert stats["items_allowed"] == 3 and stats["allowed_items_unknown"] == 2
    assert "2 ids of" in caplog.text and "'sku-9'" in caplog.text


def test_tied_items_are_listed_alike_by_the_job_and_the_pyfunc_model(setup):
    """Items 30..60 share one vector: the job and the served model both list the tied ones by item_idx (the
    pyfunc's torch.topk used to pick an arbitrary tied subset, in an arbitrary order)."""
    from recsys.serving import Recommender

    trained, feats = setup
    model = SASRec(n_items=6, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).eval()
    model.load_state_dict(trained.model.state_dict())
    with torch.no_grad():
        table = model.item_embeddings()
        table[1:3] = 0.0
        user = torch.from_numpy(user_vectors(model, pl.Series([[1, 2]]), 8))[0]  # does not read rows 3..6
        table[3:7] = 5.0 * user / user.norm()  # item_idx 3..6 (ids 30..60): one vector, the user's best
    tied = TrainedModel(model, trained.user_map, trained.item_map)
    job, _ = generate_candidates(tied, feats, CandidatesConfig(k=2, recall_sample=10))
    assert job.filter(pl.col("user_id") == 1)["item_id"].to_list() == [30, 40]  # history 10, 20
    served = Recommender(tied).top_k([[10, 20], [10, 20, 30]], 2)
    assert [ids for ids, _ in served] == [[30, 40], [40, 50]]
    assert served[0][1][0] == served[0][1][1]


def test_a_night_whose_sampled_users_saw_every_allowed_item_is_listed_without_recall(setup):
    """The ANN recall is undefined then: it is recorded as None (it used to crash the night)."""
    trained, feats = setup
    table, stats = generate_candidates(trained, feats, CandidatesConfig(k=2, recall_sample=10, index="HNSW4",
                                                                        target_recall=0.9),
                                       allowed=pl.Series("item_id", [10, 20]))
    assert stats["search"]["ann_recall_at_k"] is not None  # user 2 (saw 30) has 10 and 20 unseen
    only_seen = feats.sequences.with_columns(pl.lit([3, 2], dtype=pl.List(pl.Int32)).alias("train_items"))
    crowded = FeatureSet(only_seen, feats.user_map, feats.item_map, feats.manifest)
    table, stats = generate_candidates(trained, crowded, CandidatesConfig(k=2, recall_sample=10, index="HNSW4",
                                                                          target_recall=0.9),
                                       allowed=pl.Series("item_id", [10, 20]))
    assert stats["search"]["ann_recall_at_k"] is None and stats["search"]["tuned_parameter"] is None
    assert table.filter(pl.col("user_id") != 4).height == 0  # every scored user saw 10 and 20


def test_shards_tune_on_the_same_users_as_the_whole_night_so_their_union_is_the_night() -> None:
    """With an approximate index and candidates.target_recall each shard tuned nprobe on a sample of its OWN
    users (8 for one shard, 9 for the other and the whole night), so the union differed from the unsharded night
    for 55 of 300 users: the tuning sample is drawn from the whole night (``night``) by a hash of the user id."""
    from recsys.sharding import Shard, select_shard

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_items, n_users = 600, 300
    model = SASRec(n_items=n_items, max_len=8, hidden=16, n_blocks=1, n_heads=1, dropout=0.0).eval()
    items = pl.DataFrame({"item_id": range(1, n_items + 1), "item_idx": range(1, n_items + 1),
                          "train_count": [1] * n_items}, schema={"item_id": pl.Int64, "item_idx": pl.Int32,
                                                                 "train_count": pl.Int64})
    users = pl.DataFrame({"user_id": range(n_users), "user_idx": range(n_users)},
                         schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    seqs = pl.DataFrame({"user_idx": range(n_users),
                         "train_items": [rng.integers(1, n_items + 1, 6).tolist() for _ in range(n_users)],
                         "val_items": [[]] * n_users, "test_items": [[]] * n_users}, schema=SEQUENCES)
    feats = FeatureSet(seqs, users, items, {"n_users": n_users, "n_items": n_items})
    trained = TrainedModel(model, users, items)
    cfg = CandidatesConfig(k=10, index="IVF32,Flat", target_recall=0.8, recall_sample=40)
    whole, stats = generate_candidates(trained, feats, cfg)
    parts, tuned = [], []
    for i in range(2):
        part, part_stats = generate_candidates(trained, select_shard(feats, Shard(i, 2)), cfg, night=feats)
        parts.append(part)
        tuned.append(part_stats["search"]["tuning_tried"])  # the recall at each value tried: the same users
    assert tuned == [stats["search"]["tuning_tried"]] * 2
    assert pl.concat(parts).sort("user_id", "rank").equals(whole.sort("user_id", "rank"))


def test_a_shard_picks_the_nights_tuning_users_without_building_every_history(monkeypatch):
    """night_tuning_users builds histories for the smallest-hash users only (doubling while too few have an item
    the model knows): the same users, in the same order, as tuning_users over the whole night's histories."""
    from recsys.candidates import model_histories, night_tuning_users, tuning_users

    torch.manual_seed(0)
    model = SASRec(n_items=10, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).eval()
    ids = pl.Schema({"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})
    model_items = pl.DataFrame({"item_id": range(1, 11), "item_idx": range(1, 11), "train_count": [1] * 10},
                               schema=ids)
    item_map = pl.DataFrame({"item_id": range(1, 21), "item_idx": range(1, 21), "train_count": [1] * 20}, schema=ids)
    rng = np.random.default_rng(3)
    n_users = 300  # two thirds know only items 11..20, which the model never saw
    histories = [rng.integers(1 if u % 3 == 0 else 11, 21, size=int(rng.integers(1, 6))).tolist()
                 for u in range(n_users)]
    users = pl.DataFrame({"user_id": [f"u{u}" for u in range(n_users)], "user_idx": range(n_users)},
                         schema={"user_id": pl.String, "user_idx": pl.Int32})
    sequences = _train_only(histories)
    night = FeatureSet(sequences, users, item_map, {"n_users": n_users, "n_items": 20})
    trained = TrainedModel(model, users, model_items)
    whole = model_histories(night, model_items).filter(pl.col("items").list.len() > 0)
    import recsys.candidates

    built: list[int] = []
    monkeypatch.setattr(recsys.candidates, "model_histories",
                        lambda feats, *a: built.append(feats.sequences.height) or model_histories(feats, *a))
    for n in (1, 7, 40, 5000):
        built.clear()
        got = night_tuning_users(night, trained, n)
        assert got.equals(tuning_users(whole, n)), n
        assert got.height == min(n, whole.height)
        assert max(built) <= (n_users if n > 40 else 8 * n), (n, built)  # a few times n, not the night

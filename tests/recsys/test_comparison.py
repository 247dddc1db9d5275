"""Champion vs challenger on the same users: ids mapped through each model's own item map, items the champion
never saw dropped from histories and counted as misses as targets; checked against direct scoring."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from features.schema import SEQUENCES
from recsys.candidates import TrainedModel
from recsys.comparison import compare_on_validation
from recsys.model import SASRec

K = 3
USERS = pl.DataFrame({"user_id": [1], "user_idx": [0]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})


def _item_map(ids: list[int]) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "item_idx": list(range(1, len(ids) + 1)), "train_count": [1] * len(ids)},
                        schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})


def _model(n_items: int, seed: int) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(n_items=n_items, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).eval()


# Current features: items 10..60 at item_idx 1..6; (train history, val target) per user.
FEATURE_IDS = [10, 20, 30, 40, 50, 60]
ROWS = [([1, 2], 3), ([2], 6), ([6], 1), ([4, 5, 1], 2), ([3, 6], 5), ([5], 4), ([2, 3], 6)]


def _sequences() -> pl.DataFrame:
    return pl.DataFrame({"user_idx": list(range(len(ROWS))), "train_items": [h for h, _ in ROWS],
                         "val_items": [[t] for _, t in ROWS], "test_items": [[] for _ in ROWS]}, schema=SEQUENCES)


def _direct_ndcg(model: SASRec, history: list[int], target: int | None, exclude_seen: bool = True) -> float:
    """NDCG@K of ``target`` (the model's own index; None = an item it never saw: a miss) by direct scoring."""
    if target is None:
        return 0.0
    with torch.no_grad():
        scores = model.score(model(torch.tensor([history]))[0, -1])[1:].numpy()
    others = [i for i in range(1, model.n_items + 1) if not (exclude_seen and i in history) and i != target]
    rank = sum(1 for i in others if scores[i - 1] >= scores[target - 1])
    return 1 / np.log2(rank + 2) if rank < K else 0.0


def test_same_weights_under_another_item_order_compare_equal():
    challenger = _model(6, seed=0)
    # The champion: the same network with its item table in another order and an item map saying so.
    order = [4, 1, 6, 2, 5, 3]  # champion item_idx r+1 holds feature item order[r]
    champion = _model(6, seed=1)
    champion.load_state_dict(challenger.state_dict())
    with torch.no_grad():
        champion.item_emb.weight[1:] = challenger.item_emb.weight[order]
    ids = [FEATURE_IDS[i - 1] for i in order]
    got = compare_on_validation(challenger, TrainedModel(champion, USERS, _item_map(ids)), _sequences(),
                                _item_map(FEATURE_IDS), max_len=4, k=K)
    assert got.users_compared == 7 and got.users_without_known_history == 0
    assert got.challenger == pytest.approx(got.champion, abs=1e-6) and got.delta == pytest.approx(0, abs=1e-6)
    want = np.mean([_direct_ndcg(challenger, h, t) for h, t in ROWS])
    assert got.challenger == pytest.approx(want, rel=1e-5)


def test_items_the_champion_never_saw_are_dropped_from_histories_and_missed_as_targets():
    challenger, champion = _model(6, seed=0), _model(4, seed=2)
    champion_ids = [20, 30, 40, 50]  # never saw 10 (feature idx 1) nor 60 (feature idx 6)
    to_champion = {2: 1, 3: 2, 4: 3, 5: 4}
    got = compare_on_validation(challenger, TrainedModel(champion, USERS, _item_map(champion_ids)), _sequences(),
                                _item_map(FEATURE_IDS), max_len=4, k=K)
    # User 2's only history item (60) is unknown to the champion: left out of the comparison.
    kept = [r for r in ROWS if any(i in to_champion for i in r[0])]
    assert got.users_compared == len(kept) == 6 and got.users_without_known_history == 1
    # Users 1 and 6 have target 60 (user 2's 10 is not compared). User 6 has seen 2 of the champion's 4 items:
    # only 2 competitors are left, yet the unknown target must be a miss at K = 3.
    assert got.targets_unknown_to_champion == 2
    theirs = [_direct_ndcg(champion, [to_champion[i] for i in h if i in to_champion], to_champion.get(t))
              for h, t in kept]
    ours = [_direct_ndcg(challenger, h, t) for h, t in kept]
    assert got.champion == pytest.approx(np.mean(theirs), rel=1e-5, abs=1e-9)
    assert got.challenger == pytest.approx(np.mean(ours), rel=1e-5)
    assert got.delta == pytest.approx(np.mean(ours) - np.mean(theirs), rel=1e-5, abs=1e-9)
    assert got.delta_se == pytest.approx(np.std(np.array(ours) - np.array(theirs), ddof=1) / np.sqrt(6), rel=1e-5)


def test_a_champion_with_whole_number_ids_compares_on_text_features():
    # data.item_id_type changed from int to string since the champion was trained: its ids match through their
    # decimal text, so the same network compares equal, as in the first test.
    challenger = _model(6, seed=0)
    champion = _model(6, seed=1)
    champion.load_state_dict(challenger.state_dict())
    text_map = _item_map(FEATURE_IDS).with_columns(pl.col("item_id").cast(pl.String))
    got = compare_on_validation(challenger, TrainedModel(champion, USERS, _item_map(FEATURE_IDS)), _sequences(),
                                text_map, max_len=4, k=K)
    assert got.users_compared == 7 and got.targets_unknown_to_champion == 0
    assert got.delta == pytest.approx(0, abs=1e-6)


def test_seen_items_compete_when_evaluate_exclude_seen_is_false():
    challenger, champion = _model(6, seed=0), _model(6, seed=3)
    got = compare_on_validation(challenger, TrainedModel(champion, USERS, _item_map(FEATURE_IDS)), _sequences(),
                                _item_map(FEATURE_IDS), max_len=4, k=K, exclude_seen=False)
    ours = [_direct_ndcg(challenger, h, t, exclude_seen=False) for h, t in ROWS]
    theirs = [_direct_ndcg(champion, h, t, exclude_seen=False) for h, t in ROWS]
    assert got.challenger == pytest.approx(np.mean(ours), rel=1e-5)
    assert got.champion == pytest.approx(np.mean(theirs), rel=1e-5)
    assert np.mean(ours) != pytest.approx(np.mean([_direct_ndcg(challenger, h, t) for h, t in ROWS]))


def _typed_model(n_items: int, n_types: int, seed: int) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(n_items=n_items, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0,
                  n_event_types=n_types).eval()


def _type_table(names: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"event_type": names, "type_idx": list(range(1, len(names) + 1)), "n_events": [1] * len(names)},
                        schema={"event_type": pl.String, "type_idx": pl.Int16, "n_events": pl.Int64})


def test_a_typed_champion_gets_its_own_types_of_the_events_it_keeps():
    """Features: types buy(1) / view(2); the champion embeds cart(1) / view(2) / buy(3) and never saw items 10
    and 60: its histories keep the other items' events with their types renamed by name."""
    from features.schema import SEQUENCE_TYPES

    types = [[2, 1], [1], [2], [1, 2, 2], [2, 1], [1], [2, 2]]  # one per train item of ROWS
    seqs = _sequences().with_columns(pl.Series("train_types", types, dtype=pl.List(pl.Int16)),
                                     pl.Series("val_types", [[2]] * len(ROWS), dtype=pl.List(pl.Int16)),
                                     pl.Series("test_types", [[]] * len(ROWS), dtype=pl.List(pl.Int16)))
    assert set(SEQUENCE_TYPES) <= set(seqs.columns)
    challenger = _typed_model(6, 2, seed=0)
    champion = _typed_model(4, 3, seed=2)
    to_champion, type_to_champion = {2: 1, 3: 2, 4: 3, 5: 4}, {1: 3, 2: 2}
    trained = TrainedModel(champion, USERS, _item_map([20, 30, 40, 50]), event_types=_type_table(["cart", "view", "buy"]))
    got = compare_on_validation(challenger, trained, seqs, _item_map(FEATURE_IDS), max_len=4, k=K,
                                event_types=_type_table(["buy", "view"]))

    def direct(model: SASRec, history: list[int], kinds: list[int], target: int | None) -> float:
        if target is None:
            return 0.0
        with torch.no_grad():
            scores = model.scores(torch.tensor([history]), torch.tensor([kinds]))[0, 1:].numpy()
        others = [i for i in range(1, model.n_items + 1) if i not in history and i != target]
        rank = sum(1 for i in others if scores[i - 1] >= scores[target - 1])
        return 1 / np.log2(rank + 2) if rank < K else 0.0

    kept = [(h, k, t) for (h, t), k in zip(ROWS, types, strict=True) if any(i in to_champion for i in h)]
    theirs = [direct(champion, [to_champion[i] for i in h if i in to_champion],
                     [type_to_champion[x] for i, x in zip(h, k, strict=True) if i in to_champion], to_champion.get(t))
              for h, k, t in kept]
    ours = [direct(challenger, h, k, t) for h, k, t in kept]
    assert got.users_compared == len(kept) == 6
    assert got.champion == pytest.approx(np.mean(theirs), abs=1e-6)
    assert got.challenger == pytest.approx(np.mean(ours), abs=1e-6)


def test_a_typed_champion_on_features_without_types_names_the_setting():
    from recsys.config import ConfigError

    champion = TrainedModel(_typed_model(6, 2, seed=2), USERS, _item_map(FEATURE_IDS),
                            event_types=_type_table(["buy", "view"]))
    with pytest.raises(ConfigError, match="data.event_type_col"):
        compare_on_validation(_model(6, seed=0), champion, _sequences(), _item_map(FEATURE_IDS), max_len=4, k=K)


def test_several_targets_the_champion_never_saw_stay_several_targets():
    """A user's val targets 30, 50, 60 with 50 and 60 unknown to the champion: three targets (two certain
    misses), so the champion's NDCG@K is its hit on 30 over the ideal DCG of three targets, not of two."""
    challenger, champion = _model(6, seed=0), _model(4, seed=2)
    sequences = pl.DataFrame({"user_idx": [0], "train_items": [[1, 2]], "val_items": [[3, 5, 6]],
                              "test_items": [[]]}, schema=SEQUENCES)
    got = compare_on_validation(challenger, TrainedModel(champion, USERS, _item_map([10, 20, 30, 40])), sequences,
                                _item_map(FEATURE_IDS), max_len=4, k=K)
    assert got.targets_unknown_to_champion == 2 and got.users_compared == 1
    ideal = sum(1 / np.log2(i + 2) for i in range(3))
    assert got.champion == pytest.approx(_direct_ndcg(champion, [1, 2], 3) / ideal, rel=1e-5)


def test_text_ids_that_became_one_number_are_items_the_champion_cannot_recommend():
    """The champion was trained with text ids, two of which ('30', '030') are one number in tonight's int
    features: which one item 30 is cannot be told, so it is dropped from the champion's histories and a miss as
    a target, as an id it never saw (before: item 30 joined two champion rows, and the histories held it
    twice)."""
    challenger, champion = _model(6, seed=0), _model(7, seed=2)
    text_ids = ["10", "20", "30", "40", "50", "60", "030"]
    text_map = _item_map(list(range(7))).with_columns(pl.Series("item_id", text_ids))
    got = compare_on_validation(challenger, TrainedModel(champion, USERS, text_map), _sequences(),
                                _item_map(FEATURE_IDS), max_len=4, k=K)
    to_champion = {1: 1, 2: 2, 4: 4, 5: 5, 6: 6}  # feature item 3 (id 30) maps to none
    kept = [r for r in ROWS if any(i in to_champion for i in r[0])]
    assert got.users_compared == len(kept) == 7 and got.targets_unknown_to_champion == 1  # the first user's 30
    theirs = [_direct_ndcg(champion, [to_champion[i] for i in h if i in to_champion], to_champion.get(t))
              for h, t in kept]
    assert got.champion == pytest.approx(np.mean(theirs), rel=1e-5, abs=1e-9)


def test_a_champion_sharing_no_history_item_is_a_clear_error():
    from recsys.config import ConfigError

    champion = TrainedModel(_model(3, seed=2), USERS, _item_map([70, 80, 90]))  # a re-keyed catalogue
    with pytest.raises(ConfigError, match=r"knows no history item of tonight's 7 validation users \(its item map "
                                          r"shares 0 of the features' 6 items\).*promotion_basis=recorded"):
        compare_on_validation(_model(6, seed=0), champion, _sequences(), _item_map(FEATURE_IDS), max_len=4, k=K)

"""Item attributes in the model (model.item_features): exact item vectors, saving, warm starts and a planted task
that only attributes can solve for items the training data barely shows."""

from __future__ import annotations

import random

import polars as pl
import pytest
import torch

from features.schema import SEQUENCES
from recsys.candidates import TrainedModel
from recsys.config import ConfigError, build_config
from recsys.data import ItemAttributes, _padded_rows, pad_lists
from recsys.model import SASRec, load_model, save_model
from recsys.training import train_model
from recsys.warmstart import WarmStart

# 5 items, 3 values of column 1 (genre: a, b, c) and 2 of column 2 (brand: x, y).
IDS = torch.tensor([[0, 0, 0], [1, 2, 4], [3, 0, 0], [0, 0, 0], [1, 5, 0], [2, 3, 1]])
COLUMNS = torch.tensor([0, 1, 1, 1, 2, 2])


def _model(attention: str = "causal", **kwargs) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0, attention=attention,
                   n_feature_values=5, feature_slots=3, **kwargs)
    model.set_item_features(IDS, COLUMNS)
    return model.eval()


def _by_hand(model: SASRec, item: int) -> torch.Tensor:
    """id row + for each column the mean of the item's value rows in it."""
    assert model.feature_emb is not None
    vector = model.item_emb.weight[item].clone()
    values = [int(v) for v in IDS[item] if v]
    for column in (1, 2):
        rows = [model.feature_emb.weight[v] for v in values if int(COLUMNS[v]) == column]
        if rows:
            vector += torch.stack(rows).mean(0)
    return vector


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_item_vectors_are_the_id_row_plus_each_columns_mean(attention):
    model = _model(attention)
    expected = torch.stack([_by_hand(model, i) for i in range(6)])
    torch.testing.assert_close(model.item_embeddings(), expected)
    assert torch.equal(model.item_embeddings()[0], torch.zeros(8))  # padding stays zero
    items = torch.tensor([[0, 5, 1], [2, 2, 4]])
    torch.testing.assert_close(model.item_vectors(items), expected[items])
    if attention == "bidirectional":  # the [MASK] token has no attributes
        torch.testing.assert_close(model.item_vectors(torch.tensor([6])), model.item_emb.weight[6:7])
    # scores rank against the same table the input uses
    history = torch.tensor([[0, 1, 2, 5]])
    torch.testing.assert_close(model.scores(history), model.user_vectors(history) @ expected.T)


def test_both_ways_of_embedding_a_batch_agree():
    """A batch with more positions than the table has rows sums each catalogue row's attributes once and
    gathers; a smaller one sums per position: the same values and gradients."""
    few, many = torch.tensor([[5, 0, 2]]), torch.tensor([[5, 0, 2], [1, 1, 4], [3, 5, 5]])
    model = _model()
    model.set_item_features(IDS, COLUMNS, torch.tensor([False, True, False, True, True, True]))
    assert few.numel() < model.item_emb.num_embeddings <= many.numel()
    torch.testing.assert_close(model.item_vectors(many)[:1], model.item_vectors(few))
    grads = []
    for batch in (few, many[:1].expand(3, 3)):
        model.zero_grad()
        model.item_vectors(batch)[0].sum().backward()
        grads.append([model.item_emb.weight.grad.clone(), model.feature_emb.weight.grad.clone()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_items_without_a_training_event_are_scored_by_their_attributes_alone():
    model = _model()
    trained = torch.tensor([False, True, False, True, True, False])  # items 2 and 5 never in training
    model.set_item_features(IDS, COLUMNS, trained)
    expected = torch.stack([_by_hand(model, i) - (0 if trained[i] else 1) * model.item_emb.weight[i]
                            for i in range(6)])
    torch.testing.assert_close(model.item_embeddings(), expected)
    torch.testing.assert_close(model.item_vectors(torch.tensor([[2, 5, 1]])), expected[[2, 5, 1]].unsqueeze(0))
    model.scores(torch.tensor([[0, 1, 2, 5]])).sum().backward()
    grad = model.item_emb.weight.grad
    assert grad is not None and grad[[2, 5]].abs().sum() == 0 and grad[[1, 3, 4]].abs().sum() > 0
    with pytest.raises(ValueError, match="trained"):
        model.set_item_features(IDS, COLUMNS, trained[:3])


def test_attributes_change_the_output_and_get_gradients():
    model = _model()
    plain = SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith(("feature_emb", "item_feature", "item_id_weights"))})
    history = torch.tensor([[0, 1, 2, 5]])
    assert not torch.allclose(model.scores(history), plain.eval().scores(history))
    model.scores(history).sum().backward()
    assert model.feature_emb is not None and model.feature_emb.weight.grad is not None
    assert model.feature_emb.weight.grad[1:].abs().sum() > 0
    assert model.feature_emb.weight.grad[0].abs().sum() == 0  # "no value" never learns


def test_set_item_features_rejects_bad_tables():
    model = _model()
    with pytest.raises(ValueError, match="do not fit"):
        model.set_item_features(IDS[:, :2], COLUMNS)
    with pytest.raises(ValueError, match="0..5"):
        model.set_item_features(IDS.clamp(max=6) + (IDS == 5).long(), COLUMNS)
    with pytest.raises(ValueError, match="no item attributes"):
        SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0).set_item_features(IDS, COLUMNS)
    with pytest.raises(ValueError, match="both"):
        SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0, n_feature_values=5)


def test_saved_model_scores_without_the_feature_files(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    history = torch.tensor([[0, 1, 2, 5], [3, 3, 4, 1]])
    torch.testing.assert_close(loaded.scores(history), model.scores(history))
    assert loaded.kwargs["n_feature_values"] == 5 and loaded.kwargs["feature_slots"] == 3
    # a model without attributes keeps the state dict (and model.json) it always had
    plain = SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0)
    assert not any(k.startswith(("feature_emb", "item_feature", "item_id_weights")) for k in plain.state_dict())
    assert "n_feature_values" not in plain.kwargs


def test_item_attributes_of_feature_tables():
    table = pl.DataFrame({"item_idx": [2, 1, 3], "feature_idx": [[3], [1, 2], []]},
                         schema={"item_idx": pl.Int32, "feature_idx": pl.List(pl.Int32)})
    values = pl.DataFrame({"feature_idx": [1, 2, 3], "column": ["g", "g", "brand"], "value": ["a", "b", "x"],
                           "n_items": [1, 1, 1]}, schema={"feature_idx": pl.Int32, "column": pl.String,
                                                          "value": pl.String, "n_items": pl.Int64})
    attrs = ItemAttributes.of(table, values, _item_map([10, 20, 30], train_count=[2, 0, 1]))
    assert attrs.ids.tolist() == [[0, 0], [1, 2], [0, 3], [0, 0]]
    assert attrs.columns.tolist() == [0, 1, 1, 2]
    assert attrs.trained is not None and attrs.trained.tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match=r"1\.\.4"):
        ItemAttributes.of(table, values, _item_map([10, 20, 30, 40]))


def test_vectorised_rows_equal_pad_lists():
    rng = random.Random(0)
    lists = [[rng.randint(1, 50) for _ in range(rng.randint(0, 4))] for _ in range(500)]
    assert torch.equal(_padded_rows(pl.Series(lists, dtype=pl.List(pl.Int32))), pad_lists([[], *lists]))


# --- warm start ------------------------------------------------------------------------------------------

def _values(names: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame({"feature_idx": list(range(1, len(names) + 1)), "column": [c for c, _ in names],
                         "value": [v for _, v in names], "n_items": [1] * len(names)},
                        schema={"feature_idx": pl.Int32, "column": pl.String, "value": pl.String, "n_items": pl.Int64})


def _item_map(ids: list[int], train_count: list[int] | None = None) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "item_idx": list(range(1, len(ids) + 1)),
                         "train_count": train_count or [1] * len(ids)},
                        schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})


def test_warm_start_matches_attribute_values_by_column_and_text():
    old = _model()  # values 1..5 = genre a, b, c, brand x, y
    old_values = _values([("genre", "a"), ("genre", "b"), ("genre", "c"), ("brand", "x"), ("brand", "y")])
    # tonight: genre "c" gone, brand "z" new, the order shifted
    new_values = _values([("genre", "a"), ("genre", "b"), ("brand", "x"), ("brand", "y"), ("brand", "z")])
    torch.manual_seed(1)
    new = SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0, n_feature_values=5,
                 feature_slots=2)
    new_ids = torch.tensor([[0, 0], [1, 3], [2, 5], [0, 0], [4, 0], [1, 2]])
    new.set_item_features(new_ids, torch.tensor([0, 1, 1, 2, 2, 2]))
    fresh_z = new.feature_emb.weight[5].detach().clone()
    items = _item_map([10, 20, 30, 40, 50])
    source = TrainedModel(old, items.select("item_id", pl.col("item_idx").alias("user_idx")), items, old_values)
    report = WarmStart(source, "old", items, feature_values=new_values).apply(new)
    assert (report["values_from_source"], report["values_new"]) == (4, 1)
    w_old, w_new = old.feature_emb.weight, new.feature_emb.weight
    for new_idx, old_idx in ((1, 1), (2, 2), (3, 4), (4, 5)):
        torch.testing.assert_close(w_new[new_idx], w_old[old_idx])
    torch.testing.assert_close(w_new[5], fresh_z)  # a new value keeps its fresh init
    assert torch.equal(new.item_feature_ids, new_ids)  # tonight's item -> values table
    torch.testing.assert_close(new.item_emb.weight, old.item_emb.weight)


def test_warm_start_refuses_a_model_without_attributes():
    items = _item_map([10, 20, 30, 40, 50])
    plain = SASRec(n_items=5, max_len=4, hidden=8, n_blocks=1, n_heads=1, dropout=0.0)
    source = TrainedModel(plain, items.select("item_id", pl.col("item_idx").alias("user_idx")), items)
    with pytest.raises(ConfigError, match="without item attributes.*data.item_features"):
        WarmStart(source, "old", items, feature_values=_values([("g", "a")] * 5)).apply(_model())


# --- planted task -----------------------------------------------------------------------------------------

N_GROUPS, PER_GROUP = 8, 40  # 320 items in 8 groups; the next item is any item of the next group


def _planted(n_users: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    train, val = [], []
    for _ in range(n_users):
        group = rng.randrange(N_GROUPS)
        items = []
        for _ in range(12):
            items.append(1 + group * PER_GROUP + rng.randrange(PER_GROUP))
            group = (group + 1) % N_GROUPS
        train.append(items[:-1])
        val.append(items[-1:])
    return pl.DataFrame({"user_idx": list(range(n_users)), "train_items": train, "val_items": val,
                         "test_items": [[]] * n_users}, schema=SEQUENCES)


CFG = {"model": {"max_len": 12, "hidden": 32, "n_blocks": 1, "n_heads": 1, "dropout": 0.1},
       "train": {"batch_size": 32, "lr": 5e-3, "progress": False, "max_epochs": 15, "patience": 50}}
GROUP = [0, *[1 + (i - 1) // PER_GROUP for i in range(1, N_GROUPS * PER_GROUP + 1)]]  # value id = group + 1


def test_attributes_carry_what_sparse_ids_cannot(tmp_path):
    """Each item is seen ~5 times, too few to learn its group from its id; the group as an attribute gives it
    at once. Ceiling in expectation: the target is uniform over the 39 unseen items of the right group, so any
    10 of them give NDCG@10 = (1/39) sum_r 1/log2(r + 1) = 0.116 (the best epoch's estimate on 150 users runs
    above it: seeds 3 / 4 gave 0.155 / 0.149 with the groups, 0.088 / 0.091 without)."""
    n_items = N_GROUPS * PER_GROUP
    seqs = _planted(150, seed=3)
    attrs = ItemAttributes(torch.tensor(GROUP).unsqueeze(1), torch.tensor([0] + [1] * N_GROUPS))
    ids_only = train_model(build_config(CFG), seqs, n_items, tmp_path / "ids")
    with_groups = train_model(build_config(CFG), seqs, n_items, tmp_path / "groups", attributes=attrs)
    assert with_groups.model.n_feature_values == N_GROUPS
    assert with_groups.best_val_ndcg > 0.10  # a random ranking of the 309 unseen items: ~0.015
    assert with_groups.best_val_ndcg > ids_only.best_val_ndcg + 0.04


def test_new_items_are_ranked_by_their_attributes(tmp_path):
    """One new item per group (no event at all, last in the catalogue, scored by its group alone): for almost
    every user the one of the target's group scores above the other groups' new items."""
    n_old = N_GROUPS * PER_GROUP
    seqs = _planted(150, seed=3)
    trained = torch.tensor([False] + [True] * n_old + [False] * N_GROUPS)
    attrs = ItemAttributes(torch.tensor([*GROUP, *range(1, N_GROUPS + 1)]).unsqueeze(1),
                           torch.tensor([0] + [1] * N_GROUPS), trained)
    model = train_model(build_config(CFG), seqs, n_old + N_GROUPS, tmp_path, attributes=attrs).model
    histories = pad_lists(seqs["train_items"].to_list(), 12)
    targets = torch.tensor([v[0] for v in seqs["val_items"].to_list()])
    with torch.no_grad():
        new = model.scores(histories)[:, n_old + 1:]  # (users, N_GROUPS)
    assert (new.argmax(1) == (targets - 1) // PER_GROUP).float().mean() > 0.9  # 1.0 when written


def test_the_run_identity_covers_the_attributes():
    """A run resumes only onto the same attributes: another value of one item, or another trained mask, is
    another run."""
    from recsys.checkpoint import run_identity

    cfg, seqs = build_config(CFG), _planted(10, seed=0)
    attrs = ItemAttributes(IDS, COLUMNS)
    same = run_identity(cfg, seqs, 5, ItemAttributes(IDS.clone(), COLUMNS.clone()))
    assert run_identity(cfg, seqs, 5, attrs) == same
    other = IDS.clone()
    other[1, 0] = 2
    assert run_identity(cfg, seqs, 5, ItemAttributes(other, COLUMNS)) != same
    assert run_identity(cfg, seqs, 5, ItemAttributes(IDS, COLUMNS, torch.ones(6, dtype=torch.bool))) != same
    assert run_identity(cfg, seqs, 5) != same

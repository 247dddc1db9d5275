"""Warm start: every weight copied, item rows matched by external item_id (new items keep their random init,
old ones missing from the features are left out), the [MASK] row carried over, other architectures refused."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from recsys.candidates import TrainedModel
from recsys.config import ConfigError
from recsys.model import SASRec, SASRecEnsemble
from recsys.warmstart import WarmStart

ARCH = dict(max_len=6, hidden=8, n_blocks=2, n_heads=2)


def _item_map(ids: list[int]) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "item_idx": list(range(1, len(ids) + 1)), "train_count": [1] * len(ids)},
                        schema={"item_id": pl.Int64, "item_idx": pl.Int32, "train_count": pl.Int64})


def _source(ids: list[int], attention: str = "causal", seed: int = 0) -> TrainedModel:
    torch.manual_seed(seed)
    model = SASRec(n_items=len(ids), dropout=0.1, attention=attention, **ARCH)
    with torch.no_grad():  # make every weight distinct from a fresh init (LayerNorms start at 1 / 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.item_emb.weight[0].zero_()
    users = pl.DataFrame({"user_id": [1], "user_idx": [0]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    return TrainedModel(model.eval(), users, _item_map(ids))


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_item_rows_follow_the_item_id_and_every_other_weight_is_copied(attention):
    source = _source([10, 20, 30], attention)
    torch.manual_seed(1)
    new = SASRec(n_items=4, dropout=0.3, attention=attention, **ARCH)  # another dropout is fine
    fresh = new.item_emb.weight.detach().clone()
    counts = WarmStart(source, "old/model", _item_map([30, 40, 10, 50])).apply(new)

    assert counts == {"items_from_source": 2, "items_new": 2, "source_items_dropped": 1,  # 20 left out
                      "shrink": 1.0, "perturb": 0.0}
    old_rows, rows = source.model.item_emb.weight, new.item_emb.weight
    assert torch.equal(rows[1], old_rows[3]) and torch.equal(rows[3], old_rows[1])  # 30 and 10
    assert torch.equal(rows[2], fresh[2]) and torch.equal(rows[4], fresh[4])  # 40 and 50: their new init
    assert torch.equal(rows[0], torch.zeros(8))
    if attention == "bidirectional":
        assert torch.equal(rows[new.mask_token], old_rows[source.model.mask_token])
    old_state, state = source.model.state_dict(), new.state_dict()
    assert old_state.keys() == state.keys()
    for key in state:
        if key != "item_emb.weight":
            assert torch.equal(state[key], old_state[key]), key


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_shrink_and_perturb_mixes_each_carried_weight_with_the_fresh_init(attention):
    source = _source([10, 20, 30], attention)
    torch.manual_seed(1)
    new = SASRec(n_items=3, dropout=0.1, attention=attention, **ARCH)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    counts = WarmStart(source, "old/model", _item_map([30, 40, 10]), shrink=0.4, perturb=0.1).apply(new)

    assert counts["shrink"] == 0.4 and counts["perturb"] == 0.1
    old, state = source.model.state_dict(), new.state_dict()
    for key in state:
        if key != "item_emb.weight":
            torch.testing.assert_close(state[key], 0.4 * old[key] + 0.1 * fresh[key], msg=key)
    rows, old_rows, fresh_rows = state["item_emb.weight"], old["item_emb.weight"], fresh["item_emb.weight"]
    torch.testing.assert_close(rows[1], 0.4 * old_rows[3] + 0.1 * fresh_rows[1])  # 30
    torch.testing.assert_close(rows[3], 0.4 * old_rows[1] + 0.1 * fresh_rows[3])  # 10
    assert torch.equal(rows[2], fresh_rows[2])  # 40 is new: its fresh row, not shrunk
    assert torch.equal(rows[0], torch.zeros(8))
    if attention == "bidirectional":
        torch.testing.assert_close(rows[new.mask_token],
                                   0.4 * old_rows[source.model.mask_token] + 0.1 * fresh_rows[new.mask_token])


def test_same_catalogue_gives_the_same_scores():
    source = _source([10, 20, 30, 40])
    torch.manual_seed(5)
    new = SASRec(n_items=4, dropout=0.0, **ARCH)
    WarmStart(source, "old/model", _item_map([10, 20, 30, 40])).apply(new)
    items = torch.tensor([[0, 0, 1, 3, 2, 4], [0, 0, 0, 0, 4, 4]])
    with torch.no_grad():
        assert torch.equal(new.eval()(items), source.model(items))


def test_same_items_in_another_order_give_the_same_scores_per_item_id():
    source = _source([10, 20, 30])
    new = SASRec(n_items=3, dropout=0.0, **ARCH)
    WarmStart(source, "old/model", _item_map([30, 10, 20])).apply(new)
    # History 10, 20 is [1, 2] in the source's indices and [2, 3] in the new ones; item 30 is 3 / 1.
    with torch.no_grad():
        old = source.model.score(source.model(torch.tensor([[1, 2]]))[0, -1])  # (4,) by source idx
        got = new.eval().score(new(torch.tensor([[2, 3]]))[0, -1])  # (4,) by new idx
    assert torch.equal(got[[2, 3, 1]], old[[1, 2, 3]])


def test_another_architecture_is_a_config_error_naming_every_key():
    source = _source([10, 20])
    new = SASRec(n_items=2, max_len=6, hidden=16, n_blocks=1, n_heads=2, dropout=0.1)
    with pytest.raises(ConfigError) as exc:
        WarmStart(source, "models:/sasrec@champion", _item_map([10, 20])).apply(new)
    message = str(exc.value)
    assert "train.init_from (models:/sasrec@champion)" in message
    assert "model.hidden is 8 there, 16 here" in message and "model.n_blocks is 2 there, 1 here" in message
    assert "model.max_len" not in message and "train.init_from=null" in message


def test_text_ids_that_become_one_number_are_a_config_error_not_two_rows_for_one_item():
    def items(ids, dtype):
        return pl.DataFrame({"item_id": ids, "item_idx": list(range(1, len(ids) + 1)), "train_count": [1] * len(ids)},
                            schema={"item_id": dtype, "item_idx": pl.Int32, "train_count": pl.Int64})
    users = pl.DataFrame({"user_id": [1], "user_idx": [0]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    arch = dict(max_len=6, hidden=8, n_blocks=2, n_heads=2, dropout=0.1)
    source = TrainedModel(SASRec(n_items=3, **arch), users, items(["7", "07", "8"], pl.String))
    with pytest.raises(ConfigError, match=r"text item ids \['7', '07'\] are one Int64 id tonight"):
        WarmStart(source, "old/model", items([7, 8], pl.Int64)).apply(SASRec(n_items=2, **arch))
    distinct = TrainedModel(SASRec(n_items=3, **arch), users, items(["7", "9", "8"], pl.String))
    report = WarmStart(distinct, "old/model", items([7, 8], pl.Int64)).apply(SASRec(n_items=2, **arch))
    assert report["items_from_source"] == 2 and report["items_new"] == 0


def test_an_ensemble_starts_member_by_member_from_an_earlier_ensemble():
    """Each member from the earlier member of its position, item rows matched by item_id as for one network (the
    config refused train.init_from with model.ensemble > 1 before)."""
    torch.manual_seed(0)
    old = SASRecEnsemble(2, n_items=3, dropout=0.1, **ARCH)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p))
        for member in old.members:
            member.item_emb.weight[0].zero_()
    users = pl.DataFrame({"user_id": [1], "user_idx": [0]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})
    source = TrainedModel(old.eval(), users, _item_map([10, 20, 30]))
    torch.manual_seed(1)
    new = SASRecEnsemble(2, n_items=4, dropout=0.1, **ARCH)
    fresh = [m.item_emb.weight.detach().clone() for m in new.members]
    counts = WarmStart(source, "old/model", _item_map([30, 40, 10, 50])).apply(new)
    assert counts["items_from_source"] == 2 and counts["items_new"] == 2
    for i, (before, after) in enumerate(zip(old.members, new.members, strict=True)):
        rows, old_rows = after.item_emb.weight, before.item_emb.weight
        assert torch.equal(rows[1], old_rows[3]) and torch.equal(rows[3], old_rows[1]), i  # 30 and 10
        assert torch.equal(rows[2], fresh[i][2]), i  # 40: its new init
        for key, value in after.state_dict().items():
            if key != "item_emb.weight":
                assert torch.equal(value, before.state_dict()[key]), (i, key)
    with pytest.raises(ConfigError, match=r"model\.ensemble=2, this one 3; set model\.ensemble=2"):
        WarmStart(source, "old/model", _item_map([10])).apply(SASRecEnsemble(3, n_items=1, dropout=0.1, **ARCH))
    with pytest.raises(ConfigError, match=r"model\.ensemble=2, this one 1"):
        WarmStart(source, "old/model", _item_map([10])).apply(SASRec(n_items=1, dropout=0.1, **ARCH))

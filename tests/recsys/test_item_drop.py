"""Item dropout for causal training (train.item_drop): which inputs it drops, what it leaves alone, where it
applies, and that a model trained with it still learns a planted sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.config import ConfigError, build_config
from recsys.data import drop_items
from recsys.system import SASRecSystem
from recsys.training import train_model
from tests.recsys.test_system import planted_sequences, small_config


def left_padded(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)  # (B,) 1..width real items
    items = torch.randint(1, 1000, (rows, width), generator=g)
    real = torch.arange(width).unsqueeze(0) >= width - lengths.unsqueeze(1)  # (B, T) right-aligned
    return items.masked_fill(~real, 0)


def test_drop_items_drops_about_prob_of_the_droppable_inputs_and_nothing_else() -> None:
    inputs = left_padded(4000, 30, seed=0)
    types = (inputs % 3 + 1).masked_fill(inputs == 0, 0)
    torch.manual_seed(1)
    out, out_types = drop_items(inputs, 0.25, types)
    dropped = (inputs != 0) & (out == 0)
    droppable = inputs[:, :-1] != 0
    rate = dropped[:, :-1].sum().item() / droppable.sum().item()
    se = (0.25 * 0.75 / droppable.sum().item()) ** 0.5
    assert abs(rate - 0.25) < 6 * se, (rate, se)
    assert not dropped[:, -1].any()  # each row keeps its latest item
    assert torch.equal(out[~dropped], inputs[~dropped])  # kept items and padding unchanged
    assert torch.all(out_types[dropped] == 0)
    assert torch.equal(out_types[~dropped], types[~dropped])
    again, _ = drop_items(inputs, 0.25, types, generator=torch.Generator().manual_seed(5))
    same, _ = drop_items(inputs, 0.25, types, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, same)  # seeded: reproducible


def test_causal_training_batch_drops_inputs_and_keeps_every_target() -> None:
    system = SASRecSystem.from_config(build_config({"train": {"item_drop": 0.5}}), n_items=999)
    inputs = left_padded(64, 20, seed=2)
    targets = torch.roll(inputs, -1, 1)
    torch.manual_seed(0)
    got_inputs, got_targets, _, _ = system._training_inputs({"inputs": inputs, "targets": targets})
    assert torch.equal(got_targets, targets)
    assert ((got_inputs == 0) & (inputs != 0)).any()
    assert torch.equal(got_inputs[got_inputs != 0], inputs[got_inputs != 0])
    plain = SASRecSystem.from_config(build_config({}), n_items=999)
    assert plain._training_inputs({"inputs": inputs, "targets": targets})[0] is inputs


def test_item_drop_is_rejected_where_it_does_not_apply() -> None:
    with pytest.raises(ValueError, match="train.item_drop applies to causal"):
        SASRecSystem.from_config(build_config({"model": {"attention": "bidirectional"},
                                               "train": {"item_drop": 0.1}}), n_items=20)
    with pytest.raises(ConfigError, match="item_drop"):
        build_config({"train": {"item_drop": 1.0}})


def test_training_with_item_drop_learns_a_planted_sequence(tmp_path: Path) -> None:
    # the val target is the latest train item + 1: the latest input (never dropped) carries the answer
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=1)
    result = train_model(small_config(max_epochs=3, item_drop=0.3), seqs, n_items, tmp_path)
    assert result.best_val_ndcg > 0.5, result

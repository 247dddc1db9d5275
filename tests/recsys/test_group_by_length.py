"""train.group_by_length: batches of similar history length, every row still once per epoch."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from recsys.config import ConfigError, build_config
from recsys.data import PAD, IndexBatchSampler, SequenceDataModule
from recsys.training import train_model
from tests.recsys.test_system import planted_sequences, popularity_ndcg, small_config
from tests.recsys.test_windows import sequences

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.usefixtures("one_thread")]


def skewed_lengths(n: int, seed: int) -> torch.Tensor:
    """Mostly short rows and a few long ones, like most event logs (lengths 1..50)."""
    rng = random.Random(seed)
    return torch.tensor([min(50, int(rng.paretovariate(1.2)) + 1) for _ in range(n)])


@pytest.mark.parametrize(("n", "batch", "group"), [(1000, 32, 8), (1000, 32, 1), (97, 10, 3), (5, 8, 4)])
def test_every_row_once_per_epoch_in_the_same_number_of_batches(n: int, batch: int, group: int) -> None:
    lengths = skewed_lengths(n, seed=n)
    sampler = IndexBatchSampler(n, batch, shuffle=True, seed=3, lengths=lengths, group=group)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(torch.cat(batches).tolist()) == list(range(n))
        assert sum(len(b) < batch for b in batches) <= 1  # only the last run's remainder is short


def test_one_run_over_all_rows_cuts_the_length_order_into_batches() -> None:
    n, batch = 600, 25
    lengths = skewed_lengths(n, seed=1)
    sampler = IndexBatchSampler(n, batch, shuffle=True, seed=0, lengths=lengths, group=n // batch)
    got = sorted(tuple(sorted(lengths[b].tolist())) for b in sampler)
    ordered = sorted(lengths.tolist(), reverse=True)
    expected = sorted(tuple(sorted(ordered[i:i + batch])) for i in range(0, n, batch))
    assert got == expected


def test_the_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = skewed_lengths(500, seed=2)

    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = IndexBatchSampler(500, 16, shuffle=True, seed=seed, lengths=lengths, group=4)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in sampler]

    assert epoch_batches(7, 2) == epoch_batches(7, 2)
    assert epoch_batches(7, 2) != epoch_batches(7, 3)
    assert epoch_batches(7, 2) != epoch_batches(8, 2)


def test_grouped_batches_carry_the_same_rows_with_far_less_padding() -> None:
    rng = random.Random(0)
    histories = [[rng.randint(1, 30) for _ in range(int(k))] for k in skewed_lengths(800, seed=4).tolist()]

    def epoch(group: int | None) -> tuple[Counter, int]:
        dm = SequenceDataModule(sequences(histories), 30, max_len=40, batch_size=32, group_by_length=group)
        rows, cells = Counter(), 0
        for b in dm.train_dataloader():
            cells += b["inputs"].numel()
            for inp, tgt in zip(b["inputs"].tolist(), b["targets"].tolist(), strict=True):
                rows[(tuple(x for x in inp if x != PAD), tuple(x for x in tgt if x != PAD))] += 1
        return rows, cells

    plain_rows, plain_cells = epoch(None)
    grouped_rows, grouped_cells = epoch(8)
    assert grouped_rows == plain_rows
    assert grouped_cells * 3 < plain_cells, (grouped_cells, plain_cells)


def test_training_with_grouped_batches_learns_a_planted_sequence(tmp_path: Path) -> None:
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=1)
    result = train_model(small_config(max_epochs=3, group_by_length=4), seqs, n_items, tmp_path)
    assert result.best_val_ndcg > 0.5, result
    assert result.best_val_ndcg > popularity_ndcg(seqs, n_items) + 0.3


def test_bad_groups_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="group_by_length"):
        build_config({"train": {"group_by_length": 0}})
    with pytest.raises(ValueError, match="group_by_length must be at least 1"):
        SequenceDataModule(sequences([[1, 2, 3]]), n_items=30, max_len=4, group_by_length=0)
    with pytest.raises(ValueError, match="one length per row"):
        IndexBatchSampler(10, 4, shuffle=True, lengths=torch.ones(9), group=2)

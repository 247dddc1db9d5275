"""train.window_stride: windows over long histories, checked against a direct loop over the lists."""

from __future__ import annotations

import random
from collections import Counter

import polars as pl
import pytest
import torch

from features.schema import SEQUENCES
from recsys.config import ConfigError, build_config
from recsys.data import RaggedItems, SequenceDataModule, pad_lists


def sequences(train: list[list[int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_idx": list(range(len(train))), "train_items": train, "val_items": [[1]] * len(train),
         "test_items": [[]] * len(train)},
        schema=SEQUENCES,
    )


def reference_windows(items: list[int], width: int, stride: int | None) -> list[list[int]]:
    """The windows of one history by a plain loop: last ``width`` items, then ending ``stride`` earlier ..."""
    if len(items) < 2:
        return []
    end, out = len(items), []
    while True:
        out.append(items[max(0, end - width):end])
        if stride is None or end - width <= 0:
            return out
        end -= stride


def random_histories(n: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Lengths around and far beyond max_len + 1, plus the short cases 0 and 1 (no training row).
    lengths = [0, 1, 2, max_len, max_len + 1, max_len + 2, 2 * max_len + 1] + [rng.randint(0, 5 * max_len) for _ in range(n)]
    return [[rng.randint(1, 30) for _ in range(k)] for k in lengths]


@pytest.mark.parametrize(("max_len", "stride"), [(4, None), (4, 4), (4, 1), (4, 3), (7, 2), (1, 1)])
def test_windows_equal_a_direct_loop(max_len: int, stride: int | None) -> None:
    histories = random_histories(40, max_len, seed=max_len * 10 + (stride or 0))
    dm = SequenceDataModule(sequences(histories), n_items=30, max_len=max_len, window_stride=stride)
    expected = [w for items in histories for w in reference_windows(items, max_len + 1, stride)]
    assert dm.train_rows.tolist() == pad_lists(expected, max_len + 1).tolist()
    # The loader goes through every window once per epoch.
    loader = SequenceDataModule(sequences(histories), 30, max_len, batch_size=5, window_stride=stride).train_dataloader()
    seen: Counter = Counter()
    for batch in loader:
        for inp, tgt in zip(batch["inputs"].tolist(), batch["targets"].tolist(), strict=True):
            real_in, real_tgt = [x for x in inp if x], [x for x in tgt if x]
            assert real_in[1:] == real_tgt[:-1]  # targets are the inputs shifted by one
            seen[tuple(real_in[:1] + real_tgt)] += 1
    assert seen == Counter(tuple(w) for w in expected)


@pytest.mark.parametrize("max_len", [3, 5])
def test_stride_max_len_makes_every_train_item_after_the_first_a_target_once(max_len: int) -> None:
    histories = random_histories(30, max_len, seed=1)
    dm = SequenceDataModule(sequences(histories), n_items=30, max_len=max_len, window_stride=max_len)
    targets: Counter = Counter()
    for row in dm.train_rows.tolist():
        real = [x for x in row if x]
        targets.update(real[1:])  # the first item of a window is an input only
    assert targets == Counter(x for items in histories if len(items) >= 2 for x in items[1:])
    # Without windows, only the last max_len targets of each user are trained on.
    last_only = SequenceDataModule(sequences(histories), n_items=30, max_len=max_len)
    assert len(last_only.train_rows) == sum(len(h) >= 2 for h in histories) < len(dm.train_rows)


def test_pad_upto_cuts_rows_before_taking_the_tail() -> None:
    lists = [[1, 2, 3, 4, 5], [6, 7], [8]]
    ragged = RaggedItems.from_series(pl.Series(lists, dtype=pl.List(pl.Int32)))
    got = ragged.pad(torch.tensor([0, 0, 1, 2]), 3, upto=torch.tensor([4, 1, 2, 0]))
    assert got.tolist() == [[2, 3, 4], [0, 0, 1], [0, 6, 7], [0, 0, 0]]


def test_bad_strides_are_refused_naming_the_keys() -> None:
    with pytest.raises(ConfigError, match=r"train.window_stride \(9\) must be at most model.max_len \(8\)"):
        build_config({"model": {"max_len": 8}, "train": {"window_stride": 9}})
    with pytest.raises(ConfigError, match="window_stride"):
        build_config({"train": {"window_stride": 0}})
    with pytest.raises(ValueError, match=r"window_stride must be in \[1, max_len = 4\]"):
        SequenceDataModule(sequences([[1, 2, 3]]), n_items=30, max_len=4, window_stride=5)

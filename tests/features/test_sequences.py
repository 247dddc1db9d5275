"""Sequences in stable time order and both splits on hand-made tables with exact expected lists."""

from __future__ import annotations

import polars as pl
import pytest

from features.schema import SEQUENCES, check_schema
from features.sequences import assign_split, build_sequences, sort_events
from recsys.config import FeaturesConfig

SCHEMA = {"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64}


def _events(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def _lists(sequences: pl.DataFrame) -> dict[int, tuple[list[int], list[int], list[int]]]:
    return {row[0]: row[1:] for row in sequences.iter_rows()}


def test_time_order_is_stable_for_ties():
    # planted: user 0's items 1..6 in input order, timestamps with ties; user 1 interleaved in the input
    rows = [(0, 1, 10), (1, 9, 5), (0, 2, 10), (0, 3, 10), (1, 8, 1), (0, 4, 20), (0, 5, 20), (0, 6, 30)]
    shuffled_within_ts = [(0, 6, 30), *rows[:-1]]  # moving a later-timestamp row first changes nothing
    for table in (rows, shuffled_within_ts):
        ordered = sort_events(_events(table))
        assert ordered.filter(pl.col("user_idx") == 0)["item_idx"].to_list() == [1, 2, 3, 4, 5, 6]
        assert ordered.filter(pl.col("user_idx") == 1)["item_idx"].to_list() == [8, 9]


def test_leave_one_out_exact_lists():
    rows = [
        (0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 4, 4), (0, 5, 5),  # 5 events
        (1, 7, 9), (1, 6, 8), (1, 8, 9),  # 3 events; tie at 9 keeps input order: 6, 7, 8
        (2, 4, 1), (2, 5, 2),  # 2 events: all train
        (3, 9, 1),  # 1 event: all train
    ]  # fmt: skip
    sequences = build_sequences(assign_split(_events(rows), FeaturesConfig(split="leave_one_out")))
    check_schema(sequences, SEQUENCES, "sequences")
    assert _lists(sequences) == {
        0: ([1, 2, 3], [4], [5]),
        1: ([6], [7], [8]),
        2: ([4, 5], [], []),
        3: ([9], [], []),
    }


def test_time_split_exact_lists():
    rows = [
        (0, 1, 5), (0, 2, 10), (0, 3, 15), (0, 4, 20), (0, 5, 25),
        (1, 6, 19), (1, 7, 20),  # 20 == test_cutoff goes to test
        (2, 8, 30), (2, 9, 31),  # no history before the cutoffs
    ]  # fmt: skip
    features = FeaturesConfig(split="time", val_cutoff=10, test_cutoff=20)
    sequences = build_sequences(assign_split(_events(rows), features))
    check_schema(sequences, SEQUENCES, "sequences")
    assert _lists(sequences) == {
        0: ([1], [2, 3], [4, 5]),
        1: ([], [6], [7]),
        2: ([], [], [8, 9]),
    }


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_lazy_and_eager_agree(split):
    rows = [(u, i, (i * 7 + u) % 5) for u in range(4) for i in range(1, 9)]
    cutoffs = {"val_cutoff": 2, "test_cutoff": 4} if split == "time" else {}  # leave_one_out refuses cutoffs
    features = FeaturesConfig(split=split, **cutoffs)
    eager = build_sequences(assign_split(_events(rows), features))
    lazy = build_sequences(assign_split(_events(rows).lazy(), features)).collect()
    assert eager.equals(lazy)


def test_every_event_lands_in_exactly_one_list():
    rows = [(u, i, (i * 3) % 7) for u in range(5) for i in range(1, 2 + u * 2)]
    sequences = build_sequences(assign_split(_events(rows), FeaturesConfig()))
    lengths = sequences.select(pl.sum_horizontal(pl.col("^.*_items$").list.len())).to_series()
    assert lengths.sum() == len(rows)

"""User shards: the assignment (against a numpy splitmix64 oracle, pinned values, balance) and parsing."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest

from recsys.sharding import parse_shard, shard_of


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """Reference: splitmix64's finaliser in numpy uint64 arithmetic (which wraps around)."""
    z = np.asarray(ids, dtype=np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _shards(ids: list[int] | np.ndarray, count: int) -> np.ndarray:
    frame = pl.DataFrame({"user_id": ids}, schema={"user_id": pl.Int64})
    return frame.select(shard_of(pl.col("user_id"), count))["user_id"].to_numpy()


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_assignment_is_splitmix64_of_the_id(count: int) -> None:
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64),
                          np.array([0, 1, -1, 2**62, -(2**63), 2**63 - 1], dtype=np.int64)])
    assert np.array_equal(_shards(ids, count), splitmix64(ids) % np.uint64(count))


def test_the_oracle_is_splitmix64() -> None:
    # The first output of splitmix64 seeded with 0 (Vigna's reference splitmix64.c).
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF


def test_assignment_is_pinned() -> None:
    # A change here moves users between shards from one night to the next: only ever on purpose.
    assert _shards([0, 1, 2, 3, 42, -1, 10**12], 4).tolist() == [3, 1, 2, 1, 1, 0, 0]


@pytest.mark.parametrize("step", [1, 1000])
def test_patterned_ids_spread_evenly(step: int) -> None:
    counts = np.bincount(_shards(np.arange(20000) * step, 4), minlength=4)
    assert counts.min() > 0.9 * 5000 and counts.max() < 1.1 * 5000


def _text_shards(ids: list[str], count: int) -> np.ndarray:
    frame = pl.DataFrame({"user_id": ids}, schema={"user_id": pl.String})
    return frame.select(shard_of(pl.col("user_id"), count, pl.String))["user_id"].to_numpy()


def test_text_ids_shard_by_blake2b_of_their_utf8_bytes():
    ids = ["", "u1", "Ω-ünïcode", "550e8400-e29b-41d4-a716-446655440000", "B00X7"]
    want = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") % 7 for t in ids]
    assert _text_shards(ids, 7).tolist() == want


def test_text_assignment_is_pinned():
    # A change here moves users with text ids between shards from one night to the next: only ever on purpose.
    assert _text_shards(["u1", "u2", "u3", "alice", "bob", "B00X7"], 4).tolist() == [2, 2, 3, 1, 0, 0]


def test_patterned_text_ids_spread_evenly():
    counts = np.bincount(_text_shards([f"user-{i:06d}" for i in range(20000)], 4), minlength=4)
    assert counts.min() > 0.9 * 5000 and counts.max() < 1.1 * 5000


@pytest.mark.parametrize("text", ["0/1", "2/3", " 3/4 "])
def test_parse_shard_accepts_i_of_n(text: str) -> None:
    shard = parse_shard(text)
    assert f"{shard.index}/{shard.count}" == text.strip() and shard.name == f"shard={shard.index}-of-{shard.count}"


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", "", "1.0/2"])
def test_parse_shard_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="expected i/N with 0 <= i < N"):
        parse_shard(text)


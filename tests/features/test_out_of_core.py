"""Out-of-core build (features.partitions > 1) and the sorted-row policies, against in-memory and pandas oracles.

The data: the scale benchmark's generator (skewed, ties, exact duplicates), rows shuffled so that input order
matters, written as parquet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks.features_scale import generate_skewed_events, run_pandas
from features.build import build_features, partition_by_user
from features.policies import apply_policies
from features.schema import (
    ENCODED_EVENTS,
    FEATURE_FILES,
    ITEM_ID,
    ITEM_MAP,
    SEQUENCES,
    SPLIT,
    TIMESTAMP,
    USER_ID,
    USER_MAP,
)
from features.sequences import split_leave_one_out
from recsys.config import FeaturesConfig, load_config

TABLES = ("events", "sequences", "user_map", "item_map")


@pytest.fixture(scope="module")
def shuffled_events(tmp_path_factory) -> Path:
    """20,000 generated rows in a seeded random order, with an ``event_type`` column; as parquet."""
    directory = tmp_path_factory.mktemp("events")
    generate_skewed_events(20_000, directory / "generated.parquet", seed=5)
    events = pl.read_parquet(directory / "generated.parquet").sample(fraction=1.0, shuffle=True, seed=1)
    kinds = np.random.default_rng(2).choice(["view", "click"], size=events.height)
    events.with_columns(pl.Series("kind", kinds)).write_parquet(directory / "events.parquet")
    return directory / "events.parquet"


def _build(source: Path, work: Path, *overrides: str) -> tuple[dict, dict[str, pl.DataFrame]]:
    base = [f"data.path={source}", "data.format=parquet", "data.event_type_col=kind", f"work_dir={work}"]
    manifest = build_features(load_config(overrides=[*base, *overrides]))
    return manifest, {name: pl.read_parquet(work / "features" / FEATURE_FILES[name]) for name in TABLES}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["features.dedup=user_item", "features.min_user_events=4"],
        ["features.event_types=[view]", "features.dedup=none"],
        ["features.split=time", "features.val_cutoff=1615000000", "features.test_cutoff=1625000000"],
        ["features.max_user_events=60", "features.keep_last_events=20"],
        ["data.user_id_type=string", "data.item_id_type=string"],  # user ranges of text ids, in text order
        # the item k-core counts every range: iterated with the user k-core, the same rows and counts per reason
        ["features.min_user_events=5", "features.min_item_events=8"],
        ["features.min_item_events=12", "features.dedup=user_item", "features.keep_last_events=30"],
    ],
    ids=["default", "user_item_kcore", "event_types", "time_split", "user_limits", "text_ids", "item_kcore",
         "item_kcore_limits"],
)
def test_partitioned_build_equals_in_memory_build(shuffled_events, tmp_path, overrides):
    whole, expected = _build(shuffled_events, tmp_path / "p1", *overrides)
    parted, got = _build(shuffled_events, tmp_path / "p4", *overrides, "features.partitions=4")
    for name in TABLES:
        assert got[name].equals(expected[name]), name
    ignore = {"config", "created_at"}
    assert {k: v for k, v in parted.items() if k not in ignore} == {
        k: v for k, v in whole.items() if k not in ignore
    }
    assert parted["config"]["features"]["partitions"] == 4
    assert sorted(p.name for p in (tmp_path / "p4" / "features").iterdir()) == sorted(
        p.name for p in (tmp_path / "p1" / "features").iterdir()
    )


def test_pandas_reference_gives_the_same_sequences(shuffled_events, tmp_path):
    pytest.importorskip("pandas")
    # the reference knows no event types (so it dedups on user, item, timestamp): the same job reads none
    _, ours = _build(shuffled_events, tmp_path / "polars", "features.partitions=3", "data.event_type_col=null")
    run_pandas(shuffled_events, tmp_path / "pandas")
    contracts = {"sequences": SEQUENCES, "user_map": USER_MAP, "item_map": ITEM_MAP, "events": ENCODED_EVENTS}
    for name, contract in contracts.items():
        theirs = pl.read_parquet(tmp_path / "pandas" / FEATURE_FILES[name])
        assert theirs.columns == list(contract), name
        base = ours[name].select(list(contract))
        assert theirs.cast(base.schema).equals(base), name  # type: ignore[arg-type]
    manifest = json.loads((tmp_path / "polars" / "features" / FEATURE_FILES["manifest"]).read_text())
    assert manifest["dropped"]["duplicate"] > 0


def test_partition_by_user_keeps_users_whole_in_order(shuffled_events, tmp_path):
    events = pl.scan_parquet(shuffled_events).with_row_index("row")
    ranges = partition_by_user(events, 5, tmp_path / "ranges")
    parts = [pl.read_parquet(files) for files in ranges if files]
    assert sum(part.height for part in parts) == 20_000
    largest_user = events.group_by(USER_ID).len().select(pl.col("len").max()).collect().item()
    for before, after in zip(parts[:-1], parts[1:], strict=True):
        assert before[USER_ID].max() < after[USER_ID].min()  # ranges of user_id, in order
    for part in parts:
        assert part["row"].is_sorted()  # input order kept within a range
        assert part.height <= 20_000 / 5 + largest_user  # about equal row counts
    assert "_range" not in parts[0].columns


def test_the_item_kcore_out_of_core_iterates_like_in_memory(shuffled_events, tmp_path):
    """Refused out of core before (each range saw only its users' events of an item). Here several rounds are
    needed (dropping rare items takes users below the user k-core and back), and every reason is counted."""
    overrides = ["features.min_user_events=20", "features.min_item_events=40", "data.event_type_col=null"]
    whole, expected = _build(shuffled_events, tmp_path / "p1", *overrides)
    parted, got = _build(shuffled_events, tmp_path / "p7", *overrides, "features.partitions=7")
    for name in TABLES:
        assert got[name].equals(expected[name]), name
    assert parted["dropped"] == whole["dropped"] and whole["dropped"]["item_kcore"] > 0
    assert whole["dropped"]["user_kcore"] > 0 and parted["rows_kept"] == whole["rows_kept"]
    events = got["events"]
    assert events.group_by("user_idx").len()["len"].min() >= 20 and events.group_by("item_idx").len()["len"].min() >= 40


def _brute_force_kept(rows: list[tuple[int, int, int, str]], features: FeaturesConfig,
                      since: int | None = None) -> list[int]:
    """Positions kept by the event-type filter, the history window and dedup, by the definitions in plain
    Python."""
    allowed = [
        i for i, row in enumerate(rows) if (features.event_types is None or row[3] in features.event_types)
        and (since is None or row[2] >= since)
    ]
    if features.dedup == "none":
        kept = allowed
    else:
        width = 4 if features.dedup == "exact" else 2  # exact: identical rows, the event type included
        first: dict[tuple[int, ...], int] = {}
        for i in allowed:  # earliest timestamp, then first in the input
            key = rows[i][:width]
            if key not in first or rows[i][2] < rows[first[key]][2]:
                first[key] = i
        kept = sorted(first.values())
    by_user: dict[int, list[int]] = {}
    for i in kept:
        by_user.setdefault(rows[i][0], []).append(i)
    out = []
    for positions in by_user.values():
        if features.max_user_events is not None and len(positions) > features.max_user_events:
            continue  # a too active user: every row goes
        newest_last = sorted(positions, key=lambda i: (rows[i][2], i))  # time, then input order
        out += newest_last[-features.keep_last_events:] if features.keep_last_events else newest_last
    return sorted(out)


@pytest.mark.parametrize(
    "features",
    [
        FeaturesConfig(dedup="exact"),
        FeaturesConfig(dedup="user_item"),
        FeaturesConfig(dedup="exact", event_types=("view",)),
        FeaturesConfig(dedup="user_item", event_types=("view",)),
        FeaturesConfig(dedup="exact", max_user_events=105),
        FeaturesConfig(dedup="user_item", event_types=("view",), keep_last_events=3),
        FeaturesConfig(dedup="none", event_types=("view",), max_user_events=75, keep_last_events=40),
    ],
    ids=["exact", "user_item", "exact_filtered", "user_item_filtered", "too_active", "last_n",
         "too_active_last_n"],
)
@pytest.mark.parametrize("since", [None, 12])
def test_policies_on_sorted_rows_match_the_definitions(features, since):
    # few users, items and timestamps: many ties and duplicates, in random order
    rng = np.random.default_rng(11)
    n = 3_000
    columns = {
        USER_ID: rng.integers(0, 20, n),
        ITEM_ID: rng.integers(0, 8, n),
        TIMESTAMP: rng.integers(0, 30, n),
        "event_type": rng.choice(["view", "click"], n),
    }
    events = pl.DataFrame(columns).with_row_index("tag")
    kept, accounting = apply_policies(events.lazy(), features, since)
    rows = list(zip(*(columns[c].tolist() for c in columns), strict=True))
    assert kept["tag"].to_list() == _brute_force_kept(rows, features, since)
    assert (accounting.dropped["older_than_history"] > 0) == (since is not None)
    assert accounting.rows_kept == kept.height
    assert accounting.rows_in == kept.height + sum(accounting.dropped.values())
    for key, limit in (("user_too_active", features.max_user_events), ("older_than_last_n",
                                                                       features.keep_last_events)):
        if since is None:  # the case exercises the limit (with the window, fewer rows may stay under it)
            assert (accounting.dropped[key] > 0) == (limit is not None), key


def test_leave_one_out_matches_the_window_definition():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 7, 200)
    events = pl.DataFrame({"user_idx": np.repeat(np.arange(200), lengths).astype(np.int32)})
    n, position = pl.len().over("user_idx"), pl.int_range(pl.len()).over("user_idx")
    expected = (
        pl.when((n >= 3) & (position == n - 1))
        .then(pl.lit("test"))
        .when((n >= 3) & (position == n - 2))
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
    )
    assert split_leave_one_out(events)[SPLIT].equals(events.select(expected.alias(SPLIT)).to_series())


def test_generator_is_seeded_exact_and_ordered_per_user(tmp_path):
    first = generate_skewed_events(5_000, tmp_path / "a.parquet", seed=3)
    generate_skewed_events(5_000, tmp_path / "b.parquet", seed=3)
    events = pl.read_parquet(tmp_path / "a.parquet")
    assert events.equals(pl.read_parquet(tmp_path / "b.parquet"))
    assert events.height == 5_000 and events.schema == pl.Schema(
        {c: pl.Int64 for c in (USER_ID, ITEM_ID, TIMESTAMP)}
    )
    assert events.select(pl.col(TIMESTAMP).diff().over(USER_ID).min()).item() >= 0  # file order = time order
    assert events.is_duplicated().any()
    assert events[USER_ID].n_unique() == first["users"]

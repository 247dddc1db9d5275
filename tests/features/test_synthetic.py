"""The synthetic generator: seeded, fast, Zipf-skewed, with the planted successor pattern and duplicates."""

from __future__ import annotations

import time

import polars as pl
import pytest

from features.synthetic import EVENT_TYPES, generate_events
from recsys.config import SyntheticConfig

SMALL = SyntheticConfig(n_users=400, n_items=200, seed=11)


def _transitions(events: pl.DataFrame) -> pl.DataFrame:
    """(prev, item_id) pairs of consecutive distinct events per user."""
    unique = events.unique(maintain_order=True)
    prev = pl.col("item_id").shift().over("user_id").alias("prev")
    return unique.with_columns(prev).drop_nulls("prev")


def test_columns_and_dtypes():
    events = generate_events(SMALL)
    assert events.schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "event_type": pl.String}
    )
    assert set(events["event_type"].unique()) <= set(EVENT_TYPES)


def test_seeded_and_reproducible():
    assert generate_events(SMALL).equals(generate_events(SMALL))
    assert not generate_events(SMALL).equals(generate_events(SMALL.model_copy(update={"seed": 12})))


def test_lengths_order_and_duplicates():
    cfg = SMALL.model_copy(update={"duplicate_rate": 0.05})
    events = generate_events(cfg)
    unique = events.unique(maintain_order=True)
    lengths = unique.group_by("user_id").len()["len"]
    assert lengths.min() >= cfg.min_len and lengths.max() <= cfg.max_len
    assert events.height - unique.height == round(cfg.duplicate_rate * unique.height)
    increasing = unique.select((pl.col("timestamp").diff().over("user_id").drop_nulls() > 0).all()).item()
    assert increasing


def test_popularity_is_skewed():
    counts = generate_events(SMALL)["item_id"].value_counts(sort=True)["count"]
    top_decile_share = counts.head(counts.len() // 10).sum() / counts.sum()
    assert top_decile_share > 0.3  # uniform popularity would give 0.1


@pytest.mark.parametrize("follow_prob", [0.75, 0.0])
def test_planted_pattern_predicts_next_item(follow_prob):
    events = generate_events(SMALL.model_copy(update={"follow_prob": follow_prob}))
    pairs = _transitions(events).group_by("prev", "item_id").len()
    best = pairs.group_by("prev").agg(pl.col("len").max().alias("best"), pl.col("len").sum().alias("total"))
    accuracy = best["best"].sum() / best["total"].sum()  # most-frequent-successor accuracy
    if follow_prob:
        assert accuracy > 0.7
    else:
        assert accuracy < 0.3


def test_fast_enough():
    start = time.perf_counter()
    generate_events(SyntheticConfig(n_users=2000, min_len=60, max_len=60))
    assert time.perf_counter() - start < 1.0


def test_min_len_above_max_len_is_rejected():
    with pytest.raises(ValueError, match="min_len"):
        generate_events(SyntheticConfig(min_len=20, max_len=10))


def test_the_features_job_reads_synthetic_ids_as_the_configured_id_types(tmp_path):
    """data.user_id_type / item_id_type were dropped for data.source=synthetic (ids stayed Int64), so the string-id
    paths could not be tried on the demo data."""
    from pipelines.cli import EXIT_OK, main

    work = tmp_path / "work"
    assert main(["features", "--quiet", f"work_dir={work}", "data.source=synthetic", "data.synthetic.n_users=30",
                 "data.synthetic.n_items=20", "tracking.enabled=false", "data.item_id_type=string",
                 "data.user_id_type=string"]) == EXIT_OK
    assert pl.read_parquet(work / "features" / "item_map.parquet").schema["item_id"] == pl.String
    assert pl.read_parquet(work / "features" / "user_map.parquet").schema["user_id"] == pl.String


def test_the_demo_input_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failed write (full disk, stop) leaves no partial file beside the input, and a killed writer's is cleared
    by the next write (both stayed there)."""
    import subprocess
    import sys

    import features.build as build

    path = tmp_path / "input" / "events.csv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.parent.mkdir()
    (path.parent / f".events.csv.tmp-{dead.pid}").write_text("half")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        build.write_synthetic(SMALL, path)
    assert list(path.parent.iterdir()) == []
    monkeypatch.undo()
    build.write_synthetic(SMALL, path)
    assert [p.name for p in path.parent.iterdir()] == ["events.csv"]
    assert pl.read_csv(path).height == generate_events(SMALL).height

"""build_features end to end: synthetic and file input, every file written and consistent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from features.artifacts import last_event_times
from features.build import build_features
from features.readers import InputDataError
from features.schema import (
    ENCODED_EVENTS,
    EVENT_TYPE_FILES,
    EVENT_TYPE_MAP,
    FEATURE_FILES,
    ITEM_MAP,
    SEQUENCE_TYPES,
    SEQUENCES,
    USER_MAP,
    check_schema,
)
from features.synthetic import EVENT_TYPES
from recsys.config import ConfigError, load_config

SYNTHETIC = ["data.source=synthetic", "data.synthetic.n_users=300", "data.synthetic.n_items=100"]


def _read(features_dir: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(features_dir / FEATURE_FILES[name])


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("work")
    cfg = load_config(overrides=[*SYNTHETIC, f"work_dir={work}", "features.min_user_events=5"])
    return build_features(cfg), work / "features"


def test_writes_every_file_with_its_contract(synthetic_build):
    manifest, out = synthetic_build
    # the generator writes an event_type column: the type table and the sequences' type lists come with it
    assert {p.name for p in out.iterdir()} == {*FEATURE_FILES.values(), *EVENT_TYPE_FILES.values(), "config.yaml"}
    assert json.loads((out / FEATURE_FILES["manifest"]).read_text()) == manifest
    contracts = {"events": ENCODED_EVENTS, "sequences": SEQUENCES | SEQUENCE_TYPES, "user_map": USER_MAP,
                 "item_map": ITEM_MAP}
    for name, contract in contracts.items():
        check_schema(_read(out, name), contract, name)
    types = pl.read_parquet(out / EVENT_TYPE_FILES["event_types"])
    check_schema(types, EVENT_TYPE_MAP, "event_types")
    assert types.columns == list(EVENT_TYPE_MAP)
    assert types["event_type"].to_list() == sorted(EVENT_TYPES)  # every generated type, by name
    assert types["type_idx"].to_list() == list(range(1, len(EVENT_TYPES) + 1))
    assert types["n_events"].sum() == manifest["rows_kept"]  # the generator writes no null type
    assert manifest["event_types"] == {"n_types": len(EVENT_TYPES), "null_types": 0,
                                       "n_events": dict(types.select("event_type", "n_events").iter_rows())}
    assert (out.parent / "input" / "events.csv").is_file()
    assert load_config(out / "config.yaml").to_dict() == manifest["config"]


def test_manifest_counts_are_consistent(synthetic_build):
    manifest, out = synthetic_build
    events, sequences = _read(out, "events"), _read(out, "sequences")
    assert manifest["rows_in"] == manifest["rows_kept"] + sum(manifest["dropped"].values())
    assert manifest["dropped"]["duplicate"] > 0  # the generator plants exact duplicates
    assert manifest["rows_kept"] == events.height
    assert manifest["n_users"] == sequences.height == _read(out, "user_map").height
    assert manifest["n_items"] == _read(out, "item_map").height == events["item_idx"].max()
    assert manifest["n_users_with_val"] == manifest["n_users_with_test"] == manifest["n_users"]
    assert manifest["n_events_per_split"] == dict(Counter(events["split"].to_list()))
    assert _read(out, "item_map")["train_count"].sum() == manifest["n_events_per_split"]["train"]
    assert {"sha256", "bytes"} <= set(manifest["inputs"]["events"])
    assert manifest["polars_version"] == pl.__version__


def test_sequences_match_events(synthetic_build):
    _, out = synthetic_build
    events = _read(out, "events").sort("user_idx", "timestamp", maintain_order=True)
    first_user = events.filter(pl.col("user_idx") == 0)
    row = _read(out, "sequences").row(0, named=True)
    assert row["train_items"] + row["val_items"] + row["test_items"] == first_user["item_idx"].to_list()


def test_a_sequential_rule_beats_popularity(synthetic_build):
    """Planted answer: 'next = most frequent successor of the last item' beats top-10 popularity by far."""
    _, out = synthetic_build
    train, val, test = (
        _read(out, "sequences")[c].to_list() for c in ("train_items", "val_items", "test_items")
    )
    history = [t + v for t, v in zip(train, val, strict=True)]
    targets = [items[0] for items in test]
    successors: dict[int, Counter] = {}
    for items in train:
        for prev, nxt in zip(items[:-1], items[1:], strict=True):
            successors.setdefault(prev, Counter())[nxt] += 1
    top10 = set(_read(out, "item_map").sort("train_count", descending=True)["item_idx"].head(10))
    popularity_hits = sum(t in top10 for t in targets) / len(targets)
    rule_hits = sum(
        t in {i for i, _ in successors.get(h[-1], Counter()).most_common(10)}
        for h, t in zip(history, targets, strict=True)
    ) / len(targets)
    assert rule_hits > 0.7 > 0.4 > popularity_hits


def test_build_from_a_csv_file_with_policies(tmp_path, write_file):
    rows = ["user_id,item_id,timestamp,kind"]
    rows += [f"{u},{i},{10 * i},view" for u in (1, 2, 3) for i in (1, 2, 3, 4)]
    rows += ["1,1,10,view", "4,9,5,view", "2,2,20,click"]  # exact duplicate, lone user/item, filtered type
    path = write_file("events.csv", "\n".join(rows) + "\n")
    cfg = load_config(
        overrides=[
            f"work_dir={tmp_path / 'work'}",
            f"data.path={path}",
            "data.event_type_col=kind",
            "features.event_types=[view]",
            "features.min_user_events=2",
            "features.min_item_events=2",
        ]
    )
    manifest = build_features(cfg)
    assert manifest["dropped"] == {"event_type_filtered": 1, "older_than_history": 0, "duplicate": 1,
                                   "user_too_active": 0,
                                   "older_than_last_n": 0, "user_kcore": 1, "item_kcore": 0}
    assert (manifest["rows_in"], manifest["rows_kept"], manifest["n_users"], manifest["n_items"]) == (
        15,
        12,
        3,
        4,
    )
    sequences = _read(tmp_path / "work" / "features", "sequences")
    assert sequences.row(0, named=True) == {"user_idx": 0, "train_items": [1, 2], "val_items": [3],
                                            "test_items": [4], "train_types": [1, 1], "val_types": [1],
                                            "test_types": [1]}  # 'view', the only type kept, is type 1


def test_failed_build_keeps_previous_output(tmp_path, write_file):
    work = tmp_path / "work"
    good = write_file("good.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,4\n1,4,5\n")
    first = build_features(load_config(overrides=[f"work_dir={work}", f"data.path={good}"]))
    bad = write_file("bad.csv", "user_id,item_id,timestamp\n1,abc,3\n")
    with pytest.raises(InputDataError, match="bad.csv"):
        build_features(load_config(overrides=[f"work_dir={work}", f"data.path={bad}"]))
    assert json.loads((work / "features" / FEATURE_FILES["manifest"]).read_text()) == first


def test_nothing_left_after_policies_is_an_error(tmp_path, write_file):
    path = write_file("events.csv", "user_id,item_id,timestamp\n1,2,3\n2,3,4\n")
    cfg = load_config(overrides=[f"work_dir={tmp_path}", f"data.path={path}", "features.min_user_events=2"])
    with pytest.raises(InputDataError, match="no events left"):
        build_features(cfg)


def test_user_limits_name_their_keys_when_nothing_is_left(tmp_path, write_file):
    path = write_file("events.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,4\n2,3,4\n2,5,6\n")
    cfg = load_config(overrides=[f"work_dir={tmp_path}", f"data.path={path}", "features.max_user_events=1"])
    with pytest.raises(InputDataError, match=r"4 rows in.*'user_too_active': 4.*features\.max_user_events \(now 1\)"):
        build_features(cfg)
    kept = build_features(load_config(overrides=[f"work_dir={tmp_path}", f"data.path={path}",
                                                 "features.keep_last_events=1"]))
    assert kept["rows_kept"] == 2 and kept["dropped"]["older_than_last_n"] == 2
    with pytest.raises(ConfigError, match=r"features\.min_user_events \(3\) is above features\.max_user_events"):
        load_config(overrides=["features.min_user_events=3", "features.max_user_events=2"])


def test_last_event_times_per_user_and_clear_errors(synthetic_build, tmp_path):
    _, features_dir = synthetic_build
    events = _read(features_dir, "events")
    got = last_event_times(features_dir).sort("user_idx")
    expected = events.group_by("user_idx").agg(pl.col("timestamp").max()).sort("user_idx")
    assert got["user_idx"].equals(expected["user_idx"])
    assert got["last_timestamp"].to_list() == expected["timestamp"].to_list()
    with pytest.raises(FileNotFoundError, match="events.parquet does not exist; run `recsys features`"):
        last_event_times(tmp_path)
    events.drop("timestamp").write_parquet(tmp_path / FEATURE_FILES["events"])
    with pytest.raises(ValueError, match="events.parquet: missing column 'timestamp'"):
        last_event_times(tmp_path)

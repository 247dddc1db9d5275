"""data.path as a directory or a glob of csv / parquet files: the same features as one file holding all rows,
every file validated on its own (errors name the file and row), one fingerprint per file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.build import build_features
from features.readers import InputDataError
from features.schema import FEATURE_FILES
from recsys.config import ConfigError, load_config

TABLES = ("events", "sequences", "user_map", "item_map")


def _events(seed: int = 0, n: int = 3_000) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({"user_id": rng.integers(0, 150, n), "item_id": rng.integers(0, 60, n),
                         "timestamp": rng.integers(1_700_000_000, 1_700_000_000 + 30 * 86_400, n)})


def _build(path: Path | str, work: Path, fmt: str, *extra: str) -> tuple[dict, dict[str, pl.DataFrame]]:
    cfg = load_config(overrides=[f"data.path={path}", f"data.format={fmt}", f"work_dir={work}",
                                 "tracking.enabled=false", *extra])
    manifest = build_features(cfg)
    return manifest, {name: pl.read_parquet(work / "features" / FEATURE_FILES[name]) for name in TABLES}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_partitioned_directory_gives_the_features_of_one_file(tmp_path, fmt):
    events = _events()
    whole = tmp_path / f"all.{fmt}"
    getattr(events, f"write_{fmt}")(whole)
    parts = tmp_path / "events"
    day = (events["timestamp"] - 1_700_000_000) // 86_400
    for d in range(30):  # daily partitions, hive style, rows of a day in their original order
        (parts / f"date=2024-05-{d + 1:02d}").mkdir(parents=True)
        getattr(events.filter(day == d), f"write_{fmt}")(parts / f"date=2024-05-{d + 1:02d}" / f"part-0.{fmt}")
    (parts / "_SUCCESS").write_text("")  # what Spark leaves beside the files: not an events file
    one, expected = _build(whole, tmp_path / "one", fmt)
    many, got = _build(parts, tmp_path / "many", fmt)
    for name in TABLES:
        assert got[name].equals(expected[name]), name
    assert many["rows_in"] == one["rows_in"] == events.height
    files = many["inputs"]["events"]["files"]
    assert len(files) == 30 and files[0]["path"].endswith(f"date=2024-05-01/part-0.{fmt}")
    assert all(len(f["sha256"]) == 64 for f in files)
    globbed, by_glob = _build(f"{parts}/date=2024-05-*/*.{fmt}", tmp_path / "glob", fmt)
    for name in TABLES:
        assert by_glob[name].equals(expected[name]), name
    assert [f["sha256"] for f in globbed["inputs"]["events"]["files"]] == [f["sha256"] for f in files]
    _, out_of_core = _build(parts, tmp_path / "ooc", fmt, "features.partitions=3")  # streaming passes too
    for name in TABLES:
        assert out_of_core[name].equals(expected[name]), name


def test_a_bad_value_names_its_file_and_row(tmp_path):
    parts = tmp_path / "events"
    parts.mkdir()
    (parts / "a.csv").write_text("user_id,item_id,timestamp\n1,2,100\n1,3,101\n")
    (parts / "b.csv").write_text("user_id,item_id,timestamp\n2,4,100\n2,x7,101\n")
    with pytest.raises(InputDataError, match=r"(?s)b\.csv.*data row 2"):
        _build(parts, tmp_path / "work", "csv")
    assert not (tmp_path / "work" / "features").exists()


def test_several_files_need_timestamps_and_a_format_that_reads_them(tmp_path):
    parts = tmp_path / "events"
    parts.mkdir()
    for name in ("a", "b"):
        (parts / f"{name}.csv").write_text("user_id,item_id\n1,2\n")
    cfg = load_config(overrides=[f"data.path={parts}", "data.timestamp_col=null", f"work_dir={tmp_path / 'w'}"])
    with pytest.raises(ConfigError, match=r"holds 2 files; reading several files needs data\.timestamp_col"):
        build_features(cfg)
    pairs = load_config(overrides=[f"data.path={parts}", "data.format=pairs", f"work_dir={tmp_path / 'w'}"])
    with pytest.raises(ConfigError, match=r"is a directory; data\.format='pairs' reads one file"):
        build_features(pairs)
    nothing = load_config(overrides=[f"data.path={parts}/*.parquet", "data.format=parquet",
                                     f"work_dir={tmp_path / 'w'}"])
    with pytest.raises(ConfigError, match=r"matches no file"):
        build_features(nothing)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_leftovers_of_unfinished_writes_and_empty_partitions_are_not_events(tmp_path, fmt):
    """Spark's _temporary/ (an unfinished write), hidden folders and a quiet day's empty file add no rows."""
    events = _events(n=400)
    whole = tmp_path / f"all.{fmt}"
    getattr(events, f"write_{fmt}")(whole)
    parts = tmp_path / "events"
    for d, frame in enumerate((events[:200], events[200:])):
        (parts / f"date={d}").mkdir(parents=True)
        getattr(frame, f"write_{fmt}")(parts / f"date={d}" / f"part-0.{fmt}")
    for leftover in ("_temporary/0/_temporary/attempt_1", ".staging", "date=0/_temporary/0"):
        (parts / leftover).mkdir(parents=True)
        getattr(events[:50], f"write_{fmt}")(parts / leftover / f"part-0.{fmt}")  # copies: would be duplicates
    (parts / "date=2").mkdir()
    getattr(events.clear(), f"write_{fmt}")(parts / "date=2" / f"part-0.{fmt}")  # header / schema only
    (parts / "date=3").mkdir()
    (parts / "date=3" / f"part-0.{fmt}").write_bytes(b"")  # what some exporters write for a quiet day: 0 bytes
    one, expected = _build(whole, tmp_path / "one", fmt)
    for path in (parts, f"{parts}/**/*.{fmt}"):
        many, got = _build(path, tmp_path / f"many-{len(str(path))}", fmt)
        for name in TABLES:
            assert got[name].equals(expected[name]), name
        assert many["rows_in"] == one["rows_in"] == events.height
        assert len(many["inputs"]["events"]["files"]) == 4  # the two days and the two empty ones
    with pytest.raises(InputDataError, match="is empty|not a readable parquet"):  # alone, it is an error
        _build(parts / "date=3" / f"part-0.{fmt}", tmp_path / "alone", fmt)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_paths_with_glob_characters_that_exist_are_read_as_names(tmp_path, fmt):
    """'export [v2].csv' or a directory 'dir[v2]' exists: read as that file / directory, not as a pattern."""
    events = _events(n=300)
    whole = tmp_path / f"all.{fmt}"
    getattr(events, f"write_{fmt}")(whole)
    _, expected = _build(whole, tmp_path / "one", fmt)
    named = tmp_path / f"export [v2]?.{fmt}"
    getattr(events, f"write_{fmt}")(named)
    folder = tmp_path / "dir[v2]*"
    folder.mkdir()
    getattr(events, f"write_{fmt}")(folder / f"part-0.{fmt}")
    for path in (named, folder):
        _, got = _build(path, tmp_path / f"work-{path.name[:3]}", fmt)
        for name in TABLES:
            assert got[name].equals(expected[name]), (path, name)


def test_a_directory_of_empty_files_is_an_error_naming_it(tmp_path):
    parts = tmp_path / "events"
    parts.mkdir()
    for name in ("a", "b"):
        (parts / f"{name}.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(InputDataError, match=r"events: every one of its 2 files has no rows"):
        _build(parts, tmp_path / "work", "csv")
    assert not (tmp_path / "work" / "features").exists()


def test_a_partition_of_untyped_nulls_is_read_and_an_empty_one_skipped(tmp_path):
    """Parquet dtype Null (pandas / pyarrow for a column with no value): a day whose events have no type is
    read (null types), and a day with no rows is an empty partition whatever its columns' dtypes."""
    parts = tmp_path / "events"
    parts.mkdir()
    pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": [1, 2, 3], "kind": ["view", "buy", "view"]}
                 ).write_parquet(parts / "day1.parquet")
    pl.DataFrame({"user_id": [2, 2], "item_id": [1, 2], "timestamp": [4, 5], "kind": [None, None]}
                 ).write_parquet(parts / "day2.parquet")
    pl.DataFrame(schema=dict.fromkeys(("user_id", "item_id", "timestamp", "kind"), pl.Null)
                 ).write_parquet(parts / "day3.parquet")
    assert pl.read_parquet_schema(parts / "day2.parquet")["kind"] == pl.Null
    manifest, tables = _build(parts, tmp_path / "work", "parquet", "data.event_type_col=kind")
    assert manifest["rows_in"] == 5 and len(manifest["inputs"]["events"]["files"]) == 3
    assert manifest["event_types"] == {"n_types": 2, "n_events": {"buy": 1, "view": 2}, "null_types": 2}
    assert tables["user_map"]["user_id"].to_list() == [1, 2]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_quiet_day_as_other_exporters_write_it_is_skipped_too(tmp_path, fmt):
    """pandas writes an empty frame's csv as one newline and its parquet with no column at all, gzip an empty
    export as 20 bytes: each was an error stopping the night ("is empty", "column 'user_id' not found")."""
    import gzip

    events = _events(n=300)
    whole = tmp_path / f"all.{fmt}"
    getattr(events, f"write_{fmt}")(whole)
    parts = tmp_path / "events"
    parts.mkdir()
    getattr(events, f"write_{fmt}")(parts / f"day1.{fmt}")
    if fmt == "csv":
        (parts / "day2.csv").write_text("\n")  # pd.DataFrame().to_csv(index=False)
        (parts / "day3.csv.gz").write_bytes(gzip.compress(b""))
    else:
        pl.DataFrame().write_parquet(parts / "day2.parquet")  # no column, no row: pd.DataFrame().to_parquet()
        assert pl.read_parquet_schema(parts / "day2.parquet") == {}
    one, expected = _build(whole, tmp_path / "one", fmt)
    many, got = _build(parts, tmp_path / "many", fmt)
    for name in TABLES:
        assert got[name].equals(expected[name]), name
    assert many["rows_in"] == one["rows_in"] == events.height
    assert len(many["inputs"]["events"]["files"]) == (3 if fmt == "csv" else 2)
    with pytest.raises(InputDataError, match="is empty|not found"):  # alone, it is an error
        _build(parts / f"day2.{fmt}", tmp_path / "alone", fmt)


def test_files_whose_timestamps_are_in_different_units_are_refused_naming_them(tmp_path):
    """An exporter that switched from epoch seconds to milliseconds: read together, every later event sorted
    after every earlier one by the unit alone (the only sign was a "future timestamps" warning on the new
    files). A file spanning two magnitudes (a stray far-future value) is not judged, and one unit passes."""
    parts = tmp_path / "events"
    parts.mkdir()
    _day(parts, "date=1.csv", [1, 2], "user_id,item_id,timestamp\n1,1,1700000000\n1,2,1700000100\n2,1,1700000200\n")
    ms = _day(parts, "date=2.csv", [1], "user_id,item_id,timestamp\n1,3,1700086400000\n2,3,1700086500000\n")
    with pytest.raises(InputDataError, match=r"mix timestamp units: .*date=1.csv holds 1700000000..1700000200 "
                                             r"\(seconds.*date=2.csv 1700086400000..1700086500000 \(milliseconds\)"):
        _build(parts, tmp_path / "work", "csv")
    assert not (tmp_path / "work" / "features").exists()
    ms.write_text("user_id,item_id,timestamp\n1,3,1700086400\n2,3,99999999999999\n")  # seconds, one stray value
    manifest, _ = _build(parts, tmp_path / "work", "csv")
    assert manifest["rows_in"] == 5


def _day(parts: Path, name: str, users: list[int], text: str | None = None) -> Path:
    rows = "".join(f"{u},{i},{u * 100 + i}\n" for u in users for i in range(1, 5))
    (parts / name).write_text(text or "user_id,item_id,timestamp\n" + rows)
    return parts / name


def test_the_files_read_are_the_files_listed_validated_and_fingerprinted(tmp_path, monkeypatch):
    """The next day's partition landing mid-build is neither read nor listed in the manifest; a file rewritten
    after its validation (here with a bad id) stops the job, naming it, before anything is written."""
    import features.build

    parts = tmp_path / "events"
    parts.mkdir()
    _day(parts, "date=1.csv", [1, 2]), _day(parts, "date=2.csv", [3, 4])
    read = features.build.read_events
    landing = {"date=3.csv": None}

    def read_then_land(*args: object) -> pl.LazyFrame:
        frame = read(*args)  # lists and validates the files
        for name, text in landing.items():
            _day(parts, name, [5, 6], text)
        return frame

    monkeypatch.setattr(features.build, "read_events", read_then_land)
    manifest, tables = _build(parts, tmp_path / "work", "csv")
    assert [Path(f["path"]).name for f in manifest["inputs"]["events"]["files"]] == ["date=1.csv", "date=2.csv"]
    assert manifest["rows_in"] == 16 and tables["user_map"]["user_id"].to_list() == [1, 2, 3, 4]
    landing = {"date=2.csv": "user_id,item_id,timestamp\nabc,1,2001\n3,2,2002\n"}  # a re-export, unvalidated
    (parts / "date=3.csv").unlink()
    with pytest.raises(InputDataError, match=r"date=2\.csv changed while the features were built from it"):
        _build(parts, tmp_path / "work2", "csv")
    assert not (tmp_path / "work2" / "features").exists()


@pytest.mark.parametrize("partitions", ["1", "2"])
@pytest.mark.parametrize("change", ["a line that no longer parses", "removed"])
def test_a_file_changed_so_that_its_second_read_fails_is_named_not_a_polars_error(tmp_path, monkeypatch, partitions,
                                                                               change):
    """The exporter appends a line with an extra field (or the file goes) after validation: the policies'
    read failed with a raw polars ComputeError ("found more fields than defined in 'Schema'"), exit 1; the
    change is the cause, as for a change that still parses."""
    import features.build

    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{i % 9},{i % 7},{100 + i}\n" for i in range(50)))
    read = features.build.read_events

    def read_then_change(*args: object) -> pl.LazyFrame:
        frame = read(*args)  # validated
        if change == "removed":
            path.unlink()
        else:
            with path.open("a") as fh:
                fh.write("3,4,999,extra\n")
        return frame

    monkeypatch.setattr(features.build, "read_events", read_then_change)
    verb = "was removed" if change == "removed" else "changed"
    with pytest.raises(InputDataError, match=rf"events\.csv {verb} while the features were built from it"):
        _build(path, tmp_path / "work", "csv", f"features.partitions={partitions}")
    assert not (tmp_path / "work" / "features").exists()

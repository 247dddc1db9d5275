"""Input gate of the feature job (features.min_rows_ratio, features.max_event_age): a truncated or stale
export fails before anything is written and the previous features stay as they were; the boundaries are
exact, in memory and out of core, and `recsys run --run-date` is the age's reference."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from features.build import build_features
from features.readers import InputDataError
from pipelines.cli import EXIT_INPUT, main
from recsys.config import ConfigError, load_config

DAY = 86_400
RUN_DATE = dt.date(2024, 5, 1)
END = int(dt.datetime(2024, 5, 2, tzinfo=dt.UTC).timestamp())  # the end of RUN_DATE, UTC


def _events(path: Path, users: int, newest: int) -> Path:
    """``users`` users with 4 events each (10 rows apart by user), the newest at timestamp ``newest``."""
    rows = [(u, 100 + (u * 3 + j) % 17, newest - (users - 1 - u) * 10 - (3 - j) * DAY)
            for u in range(users) for j in range(4)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(path)
    return path


def _build(path: Path, work: Path, *overrides: str, run_date: dt.date = RUN_DATE) -> dict:
    cfg = load_config(overrides=[f"data.path={path}", f"work_dir={work}", "tracking.enabled=false", *overrides])
    return build_features(cfg, run_date)


def _snapshot(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((work / "features").iterdir())}


@pytest.mark.parametrize("partitions", [1, 2])
def test_too_few_rows_against_the_previous_build_fail_and_keep_it(tmp_path, partitions):
    work, part = tmp_path / "work", f"features.partitions={partitions}"
    first = _build(_events(tmp_path / "full.csv", 50, END), work, part, "features.min_rows_ratio=0.8")
    assert first["rows_in"] == 200 and first["newest_timestamp"] == END
    assert first["input_gate"] == {"min_rows_ratio": 0.8, "previous_rows_in": None, "max_event_age": None,
                                   "newest_since": None, "max_history_age": None,
                                   "history_since": None}  # the first build has nothing to compare with
    before = _snapshot(work)
    short = _events(tmp_path / "short.csv", 39, END)  # 156 rows: 78 % of 200
    with pytest.raises(InputDataError, match=r"short\.csv: 156 rows, 78\.0% of the previous build's 200 "
                                             r"\(features\.min_rows_ratio 0\.8\).*previous features are kept"):
        _build(short, work, part, "features.min_rows_ratio=0.8")
    assert _snapshot(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["features"]  # no temporary directory left behind
    exact = _build(_events(tmp_path / "exact.csv", 40, END), work, part, "features.min_rows_ratio=0.8")
    assert exact["rows_in"] == 160 and exact["input_gate"]["previous_rows_in"] == 200  # 160 = 0.8 * 200 passes
    again = _build(short, work, part)  # no ratio set: nothing checked, the previous count still recorded
    assert again["rows_in"] == 156 and again["input_gate"]["previous_rows_in"] == 160


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_newest_event_older_than_the_age_allows_fails(tmp_path, partitions):
    work, part = tmp_path / "work", f"features.partitions={partitions}"
    newest = END - 2 * DAY
    events = _events(tmp_path / "events.csv", 30, newest)
    ok = _build(events, work, part, f"features.max_event_age={2 * DAY}")  # exactly 2 days old: allowed
    assert ok["input_gate"]["newest_since"] == newest and ok["newest_timestamp"] == newest
    before = _snapshot(work)
    with pytest.raises(InputDataError, match=rf"events\.csv: the newest event \(timestamp {newest}\) is older "
                                             rf"than {newest + 1} = end of the run date \({END}\) - "
                                             rf"features\.max_event_age {2 * DAY - 1}: a stale export"):
        _build(events, work, part, f"features.max_event_age={2 * DAY - 1}")
    with pytest.raises(InputDataError, match="stale export"):  # a day later, the same file is 3 days old
        _build(events, work, part, f"features.max_event_age={2 * DAY}", run_date=RUN_DATE + dt.timedelta(1))
    assert _snapshot(work) == before


def test_recsys_run_checks_the_age_against_its_run_date(tmp_path, capsys):
    events = _events(tmp_path / "events.csv", 30, END - DAY)
    work = tmp_path / "work"
    common = ["--quiet", f"data.path={events}", f"work_dir={work}", "tracking.enabled=false",
              f"features.max_event_age={DAY}"]
    code = main(["run", "--run-date", "2024-05-02", *common])  # 2 days old at the end of 2024-05-02
    assert code == EXIT_INPUT
    assert "stale export" in capsys.readouterr().err
    assert not (work / "features").exists() and not (work / "model").exists()
    assert not (work / "runs").exists()  # no success marker
    manifest_of = work / "features" / "manifest.json"
    assert main(["features", *common, f"features.max_event_age={10**9}"]) == 0  # today: any age this big
    assert json.loads(manifest_of.read_text())["input_gate"]["max_event_age"] == 10**9


def test_recsys_features_takes_the_gate_date_from_run_date(tmp_path, capsys):
    # A backfill from a scheduler (Airflow's {{ ds }}): the events' age is measured at the end of that date,
    # not today, so an old day passes or fails as it did on its own night.
    events = _events(tmp_path / "events.csv", 30, END - DAY)
    common = ["--quiet", f"data.path={events}", f"work_dir={tmp_path / 'work'}", "tracking.enabled=false",
              f"features.max_event_age={2 * DAY}"]
    assert main(["features", "--run-date", "2024-05-02", *common]) == 0  # exactly 2 days old then: allowed
    assert main(["features", "--run-date", "2024-05-03", *common]) == EXIT_INPUT
    assert "stale export" in capsys.readouterr().err
    assert main(["features", *common]) == EXIT_INPUT  # today: years old
    with pytest.raises(SystemExit) as stop:  # a malformed date is a usage error, as for recsys run
        main(["features", "--run-date", "2024-5-2", *common])
    assert stop.value.code == 2 and "YYYY-MM-DD" in capsys.readouterr().err


def test_a_corrupt_previous_manifest_stops_the_ratio_check_by_name_and_nothing_else(tmp_path):
    from recsys.config import ConfigError

    work = tmp_path / "work"
    events = _events(tmp_path / "full.csv", 50, END)
    _build(events, work)
    # cut off; valid JSON but no object (was an AttributeError traceback); a rows_in that is no row count
    for text, why in [('{"rows_in": 2', "Expecting"), ("[]", "not a JSON object"),
                      ('{"rows_in": "many"}', "not a row count")]:
        (work / "features" / "manifest.json").write_text(text)
        with pytest.raises(ConfigError, match=r"manifest\.json \(the previous build, which features\.min_rows_ratio "
                                              rf"compares with\) is not a features manifest \(.*{why}"):
            _build(events, work, "features.min_rows_ratio=0.8")
        assert _build(events, work)["input_gate"]["previous_rows_in"] is None  # without the ratio: rebuilt
        assert (work / "features" / "manifest.json").read_text() != text


def test_the_ratio_compares_with_the_build_a_crash_between_the_renames_put_aside(tmp_path):
    """Killed between atomic_dir's two renames, a build leaves the previous features as .features.old-<pid>@host
    (and its own half-written .features.tmp-…): the next build restores them before the gate reads them."""
    import os
    import socket
    import subprocess
    import sys

    work = tmp_path / "work"
    _build(_events(tmp_path / "full.csv", 50, END), work)
    before = _snapshot(work)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that is gone
    writer = f"{dead.pid}@{socket.gethostname()}"
    os.replace(work / "features", work / f".features.old-{writer}")
    (work / f".features.tmp-{writer}").mkdir()
    with pytest.raises(InputDataError, match=r"short\.csv: 156 rows, 78\.0% of the previous build's 200"):
        _build(_events(tmp_path / "short.csv", 39, END), work, "features.min_rows_ratio=0.8")
    assert _snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["features"]


@pytest.mark.parametrize("partitions", [1, 2])
def test_the_history_window_keeps_events_from_the_end_of_the_run_date_minus_the_age(tmp_path, partitions):
    """features.max_history_age: years of partitions still build a bounded recent window; the boundary is exact
    (an event at the window's first second is kept), each dropped row counted, users and items only seen
    before the window leave the maps."""
    since = END - 3 * DAY
    rows = [(1, 10, since - 1), (1, 11, since), (1, 12, since + 5), (1, 13, since + 9),  # user 1: the first goes
            (2, 20, since - DAY), (2, 21, since - 50),  # user 2 and items 20, 21: only before the window
            (3, 11, since + 1), (3, 12, since + 2), (3, 13, since + 3)]
    path = tmp_path / "events.csv"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(path)
    work = tmp_path / "work"
    part = f"features.partitions={partitions}"
    manifest = _build(path, work, part, f"features.max_history_age={3 * DAY}")
    assert manifest["rows_in"] == 9 and manifest["rows_kept"] == 6
    assert manifest["dropped"]["older_than_history"] == 3 and sum(manifest["dropped"].values()) == 3
    assert manifest["input_gate"]["history_since"] == since
    users = pl.read_parquet(work / "features" / "user_map.parquet")["user_id"].sort().to_list()
    items = pl.read_parquet(work / "features" / "item_map.parquet")["item_id"].sort().to_list()
    assert users == [1, 3] and items == [11, 12, 13]
    events = pl.read_parquet(work / "features" / "events.parquet")
    assert events["timestamp"].min() == since
    before = _snapshot(work)
    # a day later the window has moved past every event: named, and the previous features are kept
    with pytest.raises(InputDataError, match=r"no events left after the row policies \(9 rows in, dropped .*"
                                             r"'older_than_history': 9.*relax features\.max_history_age \(now "
                                             rf"{3 * DAY}\)"):
        _build(path, work, part, f"features.max_history_age={3 * DAY}", run_date=RUN_DATE + dt.timedelta(1))
    assert _snapshot(work) == before


@pytest.mark.parametrize("key", ["max_history_age", "max_event_age"])
def test_millisecond_timestamps_with_an_age_in_seconds_are_refused(tmp_path, key):
    """Review: integer milliseconds pass through as they are, so a window or an age in epoch seconds compared
    with them kept every event (and a stale export always passed): named instead, nothing written."""
    path = tmp_path / "events.csv"
    rows = [(u, 100 + j, (END - 3 * DAY + u * 10 + j) * 1000) for u in range(20) for j in range(4)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(path)
    work = tmp_path / "work"
    with pytest.raises(InputDataError, match=rf"past the year 5000 as epoch seconds: milliseconds .*features\.{key}"):
        _build(path, work, f"features.{key}={90 * DAY}")
    assert not (work / "features").exists()
    assert _build(path, work)["rows_kept"] == 80  # without an age the order is all that matters: accepted


def test_a_history_window_starting_after_the_validation_cutoff_is_refused(tmp_path):
    path = _events(tmp_path / "events.csv", 10, END)
    overrides = ["features.split=time", f"features.val_cutoff={END - 10 * DAY}", f"features.test_cutoff={END - DAY}"]
    with pytest.raises(ConfigError, match=r"features\.max_history_age .* features\.val_cutoff .* would get none"):
        _build(path, tmp_path / "work", *overrides, f"features.max_history_age={5 * DAY}")
    assert _build(path, tmp_path / "work", *overrides, f"features.max_history_age={20 * DAY}")["rows_kept"] > 0

"""conf/prod.yaml, the documented nightly setup, on two nights of synthetic events in daily Parquet
partitions: the first night from scratch, the second warm started from the champion it promoted, candidates
from the registry, every gate and retention switched on as the file has them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl

from features.synthetic import generate_events
from pipelines.cli import EXIT_OK, main
from recsys.config import SyntheticConfig

CONF = Path(__file__).resolve().parents[2] / "conf" / "prod.yaml"
NIGHT1, NIGHT2 = dt.date(2024, 5, 1), dt.date(2024, 5, 2)


def _partitions(events: pl.DataFrame, root: Path, part: str) -> None:
    day = pl.from_epoch("timestamp", time_unit="s").dt.date().alias("day")
    for (d,), rows in events.with_columns(day).group_by("day", maintain_order=True):
        (root / f"date={d}").mkdir(parents=True, exist_ok=True)
        rows.drop("day").write_parquet(root / f"date={d}" / f"{part}.parquet")


def test_two_nights_of_the_production_config(tmp_path, capsys):
    events = generate_events(SyntheticConfig(n_users=300, n_items=80, min_len=8, max_len=30, seed=3))
    # Shift time so that night 1's newest event is on 2024-05-01; night 2 adds a later day of events.
    shift = int(dt.datetime(2024, 5, 1, 20, tzinfo=dt.UTC).timestamp()) - int(events["timestamp"].max())
    events = events.with_columns(pl.col("timestamp") + shift)
    cut = int(dt.datetime(2024, 5, 1, 6, tzinfo=dt.UTC).timestamp())
    data, work = tmp_path / "events", tmp_path / "work"
    _partitions(events.filter(pl.col("timestamp") < cut), data, "part-0")
    small = [f"work_dir={work}", f"data.path={data}", "model.max_len=20", "model.hidden=16", "train.max_epochs=3",
             "evaluate.item_block_size=32", "candidates.k=10", "candidates.recall_sample=50"]

    # the first night as every other: no champion to start from in the fresh registry, so from scratch
    first = ["run", "--quiet", "--config", str(CONF), "--run-date", str(NIGHT1), *small]
    assert main(first) == EXIT_OK, capsys.readouterr().err
    report1 = json.loads((work / "model" / "train_report.json").read_text())
    assert report1["warm_start"] is None and report1["registered_version"] == "1"

    _partitions(events.filter(pl.col("timestamp") >= cut), data, "part-1")  # the new day's files arrive
    second = ["run", "--quiet", "--config", str(CONF), "--run-date", str(NIGHT2), *small]
    assert main(second) == EXIT_OK, capsys.readouterr().err
    report2 = json.loads((work / "model" / "train_report.json").read_text())
    assert report2["warm_start"]["uri"] == "models:/sasrec@champion" and report2["warm_start"]["version"] == "1"
    assert report2["registered_version"] == "2"
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    assert promotion["basis"] == "rescored" and promotion["champion_version"] == "1"
    assert promotion["comparison"]["users_compared"] > 0
    features = json.loads((work / "features" / "manifest.json").read_text())
    assert features["input_gate"]["previous_rows_in"] < features["rows_in"] == events.height
    assert len(features["inputs"]["events"]["files"]) == len(list(data.glob("date=*/*.parquet")))
    evaluation = json.loads((work / "evaluation" / "report.json").read_text())
    assert list(evaluation["model"]["segments"]) == ["1-4", "5-19", "20+"]
    types = evaluation["model"]["type_segments"]  # by the test target's event type, users counted once
    assert set(types) <= {"click", "purchase", "view"} and sum(t["n_users"] for t in types.values()) == \
        evaluation["model"]["n_users"]
    nights = sorted(p.name for p in (work / "candidates").glob("date=*"))
    assert nights == [f"date={NIGHT1}", f"date={NIGHT2}"]
    manifest = json.loads((work / "candidates" / f"date={NIGHT2}" / "manifest.json").read_text())
    assert manifest["model"]["uri"] == "models:/sasrec@champion" and json.loads((work / "candidates" / f"date={NIGHT2}" / "retention.json").read_text())["keep_days"] == 14
    assert manifest["active_window"] == 2592000 and manifest["users"] > 0
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(CONF), f"work_dir={work}"]) == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["runs"]["run"]["run_date"] == str(NIGHT2) and status["candidates"]["nights"] == [
        str(NIGHT1), str(NIGHT2)]
